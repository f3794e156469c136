"""Kill-and-resume of a multi-replica K-FAC `fit` with `BackupAndRestore`.

A `fit` (3 epochs of 8 steps) under `MirroredStrategy` over two logical CPUs,
with `keras.callbacks.BackupAndRestore` (backup at each epoch end; Keras 3
resumes at the start of the saved epoch, so mid-epoch backups would replay
steps) and `KFACCallback`, is SIGKILLed by itself after 12 steps (mid-epoch
2), then started again in a new process: it must resume from the backup
(train only the last 2 epochs) and end with the weights and every optimizer
variable (momentum, damping, counters, factors, inverses) of an
uninterrupted single-device `fit` on the same data order (`rtol=1e-4,
atol=1e-6`; see `tests/distributed_scenarios.py`).

Keras 3 `fit` fails under `MultiWorkerMirroredStrategy` for any optimizer
(tensorflow/tensorflow#72388, keras-team/keras#20585); the two-worker
kill-and-resume test (custom loop, `tf.train.Checkpoint`) is in
`tests/test_distributed_multiworker.py`.
"""

from distributed_scenarios import run_scenario

KILL_AFTER_STEPS = 12
PROCESS_TIMEOUT = 90  # seconds per training process


def test_killed_fit_resumes_to_the_uninterrupted_state(tmp_path):
    output = run_scenario("mirrored_resume", str(tmp_path), KILL_AFTER_STEPS,
                          PROCESS_TIMEOUT, timeout=3 * PROCESS_TIMEOUT)
    assert "PASS resume/killed" in output, output
    assert "PASS resume/final_state" in output, output

