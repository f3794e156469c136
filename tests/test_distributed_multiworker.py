"""K-FAC under `tf.distribute.MultiWorkerMirroredStrategy`: two worker
processes on 127.0.0.1 (free ports, `TF_CONFIG`), started by the test and
killed if they outlive the time bound.

Each worker trains the tiny MLP of `tests/distributed_scenarios.py` for 8
custom-loop steps (`strategy.run(make_train_step(...))`, `cov_update_every=2`,
`inv_update_every=4`, otherwise KFAC's defaults: Levenberg-Marquardt damping
with its batch passes split over the workers, KL clipping), feeding its
replica's half of each global batch; the oracle is a single-process run on
the same global batches. Both workers' weights, optimizer variables
(momentum, damping, counters, factors, inverses) and logged K-FAC values
(damping, rho, predicted change) must equal the oracle's to `rtol=1e-4,
atol=1e-6`.

Keras 3 `model.fit` fails under MultiWorkerMirroredStrategy for any
optimizer (tensorflow/tensorflow#72388, keras-team/keras#20585: it reduces
scalar logs along axis 0), so the multi-worker test uses the custom loop;
`fit` with `KFACCallback` is tested under MirroredStrategy.

Kill-and-resume: the same custom loop over 3 epochs with `tf.train.Checkpoint`
/ `CheckpointManager` every 4 steps (the chief's directory is the one
restored; `BackupAndRestore` needs `fit`); worker 1 SIGKILLs itself after 6
steps, the job (both workers) is stopped and restarted, must resume at step
4 and end (after 24 steps) with the single-process uninterrupted state, same
tolerance.
"""

from distributed_scenarios import run_scenario

WORKER_TIMEOUT = 100  # seconds, per worker process


def test_two_workers_match_one_process(tmp_path):
    output = run_scenario("multiworker", str(tmp_path), WORKER_TIMEOUT,
                          timeout=WORKER_TIMEOUT + 20)
    assert "PASS multiworker/worker0" in output, output
    assert "PASS multiworker/worker1" in output, output


def test_killed_multiworker_job_resumes_to_the_uninterrupted_state(tmp_path):
    output = run_scenario("multiworker_resume", str(tmp_path), 6, WORKER_TIMEOUT,
                          timeout=2 * WORKER_TIMEOUT + 20)
    assert "PASS multiworker_resume/killed" in output, output
    for index in range(2):
        assert f"PASS multiworker_resume/worker{index}" in output, output
