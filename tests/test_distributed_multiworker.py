"""K-FAC under `tf.distribute.MultiWorkerMirroredStrategy`: two worker
processes on 127.0.0.1 (free ports, `TF_CONFIG`), started by the test and
killed if they outlive the time bound.

Each worker trains the tiny MLP of `tests/distributed_scenarios.py` for 8
custom-loop steps (`strategy.run(make_train_step(...))`, `cov_update_every=2`,
`inv_update_every=4`), feeding its replica's half of each global batch; the
oracle is a single-process run on the same global batches. Both workers'
weights and optimizer variables (momentum, damping, counters, factors,
inverses) must equal the oracle's to `rtol=1e-4, atol=1e-6`.

Keras 3 `model.fit` fails under MultiWorkerMirroredStrategy for any
optimizer (tensorflow/tensorflow#72388, keras-team/keras#20585: it reduces
scalar logs along axis 0), so the multi-worker test uses the custom loop;
`fit` with `KFACCallback` is tested under MirroredStrategy.
"""

from distributed_scenarios import run_scenario

WORKER_TIMEOUT = 100  # seconds, per worker


def test_two_workers_match_one_process(tmp_path):
    output = run_scenario("multiworker", str(tmp_path), WORKER_TIMEOUT,
                          timeout=WORKER_TIMEOUT + 20)
    assert "PASS multiworker/worker0" in output, output
    assert "PASS multiworker/worker1" in output, output
