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
(tensorflow/tensorflow#72388, keras-team/keras#20585), so the two-worker
version uses the custom loop with `tf.train.Checkpoint` /
`CheckpointManager` (every 4 steps; the chief's directory is the one
restored): worker 1 of 2 loopback workers SIGKILLs itself after 6 steps, the
job (both workers) is stopped and restarted, resumes at step 4 and must end
(after 24 steps) with the single-process uninterrupted state, same tolerance.
"""

from distributed_scenarios import run_scenario

KILL_AFTER_STEPS = 12
PROCESS_TIMEOUT = 60  # seconds per training process


def test_killed_fit_resumes_to_the_uninterrupted_state(tmp_path):
    output = run_scenario("mirrored_resume", str(tmp_path), KILL_AFTER_STEPS,
                          PROCESS_TIMEOUT, timeout=3 * PROCESS_TIMEOUT)
    assert "PASS resume/killed" in output, output
    assert "PASS resume/final_state" in output, output


def test_killed_multiworker_job_resumes_to_the_uninterrupted_state(tmp_path):
    output = run_scenario("multiworker_resume", str(tmp_path), 6, PROCESS_TIMEOUT,
                          timeout=3 * PROCESS_TIMEOUT)
    assert "PASS multiworker_resume/killed" in output, output
    for index in range(2):
        assert f"PASS multiworker_resume/worker{index}" in output, output
