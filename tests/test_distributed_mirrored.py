"""K-FAC under `tf.distribute.MirroredStrategy` with two logical CPU replicas.

Each test runs a scenario of `tests/distributed_scenarios.py` in a fresh
subprocess (logical devices must be configured before TensorFlow starts).
The oracle is a single-device K-FAC run from the same initial weights on the
same global batches (its math is tested against dense NumPy oracles
elsewhere): after 8 steps (16 with the defaults) with `cov_update_every=2`,
`inv_update_every=4`, the weights and every optimizer variable (momentum,
damping, counters, factors, decompositions) agree to `rtol=1e-4, atol=1e-6`, and the two
replicas' copies of every variable are identical. Fisher targets are
sampled, so the factors agree only because each replica samples with its
global example indices.

With KFAC's defaults (Levenberg-Marquardt damping, KL clipping) the logged
K-FAC values (`damping`, `rho`, `qmodel_change`, `update_norm`) are compared
too (same tolerances).

The guard test puts an Inf in the second replica's half of a statistics-step
batch: the step is skipped on both replicas (no variable changes, including
BatchNormalization's moving statistics; `skipped_steps` = 1), and the run
ends like the single-device run that skips the same batch.
"""

from distributed_scenarios import run_scenario


def test_two_replicas_match_one_device_fit_and_custom_loop():
    """Custom loop (`strategy.run(make_train_step(...))` in a `tf.function`,
    and eagerly) and `fit` with `KFACCallback`, default options (Cholesky
    inverses)."""
    output = run_scenario("mirrored_equivalence", ["cholesky"])
    for mode in ("loop", "fit", "eager"):
        assert f"PASS cholesky/{mode}" in output, output


def test_default_kfac_with_levenberg_marquardt_damping_matches_one_device():
    """`KFAC(seed=...)` defaults (the orthogonal step rule, the
    Levenberg-Marquardt rule every 10 steps, which needs the quadratic model's
    Fisher products and the loss after the update on the global batch,
    computed per replica and combined), 16 steps so the rule runs at steps 0
    and 10: fit, custom loop and eager loop equal one device, damping, rho
    and the predicted change included, and the rule did run (rho finite,
    damping moved from its initial 1e-2)."""
    # Twice the steps of the other scenarios, hence twice the time limit.
    output = run_scenario("mirrored_equivalence", ["defaults"], timeout=220)
    for mode in ("loop", "fit", "eager"):
        assert f"PASS defaults/{mode}" in output, output
        assert f"PASS defaults/{mode}/damping_adapted" in output, output


def test_ekfac_matches_one_device():
    """`inverse_method="ekfac"` with `scale_update_every=1`: the corrected
    diagonals are estimated per replica, averaged over the replicas with
    their example counts in one all-reduce (as the factor statistics), after
    the step's decomposition when there is one; fit, custom loop and eager
    loop equal one device, scalings and weights included."""
    output = run_scenario("mirrored_equivalence", ["ekfac"], timeout=220)
    for mode in ("loop", "fit", "eager"):
        assert f"PASS ekfac/{mode}" in output, output


def test_kfac_without_arguments_trains_under_fit():
    """Literally `KFAC()` (random seed, so no single-device oracle): finite,
    falling loss, the Levenberg-Marquardt rule and the factors ran, the
    replicas are identical."""
    output = run_scenario("mirrored_no_arguments")
    assert "PASS no_arguments/fit" in output, output


def test_inf_in_one_replica_skips_the_step_on_both():
    output = run_scenario("mirrored_guard")
    assert "PASS guard/bad_step_changes_nothing" in output, output
    assert "PASS guard/final_state" in output, output
    assert "PASS guard/batchnorm_statistics_restored" in output, output


def test_unsupported_options_are_refused_before_any_state():
    output = run_scenario("mirrored_unsupported")
    assert "PASS unsupported jit_compile" in output, output
    assert "PASS unsupported fit" in output, output
