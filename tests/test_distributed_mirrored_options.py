"""K-FAC options under `MirroredStrategy` with two logical CPU replicas.

Same oracle and tolerances as `tests/test_distributed_mirrored.py` (a
single-device run on the same global batches; see
`tests/distributed_scenarios.py`), custom-loop step, for
`inverse_method="eigh"`, `approximation="tridiagonal"` (a chain of three
Dense layers), `l2_reg` + `norm_constraint` + Keras `weight_decay`
together, the Levenberg-Marquardt rule every 2 steps (four times in the
run), and `AdaptiveOptions(quadratic_model_step=True, adapt_damping=True)`
(alpha and mu from the 2x2 system whose Fisher Gram matrix is summed over
the replicas' slices; `alpha`, `mu`, `rho`, damping compared every run's
end). For the adaptive configurations the scenario also checks that the
rule ran (rho finite, damping moved).
"""

import pytest

from distributed_scenarios import run_scenario


@pytest.mark.parametrize("configuration", [
    "eigh", "tridiagonal", "l2_norm_constraint_weight_decay"])
def test_two_replicas_match_one_device(configuration):
    output = run_scenario("mirrored_equivalence", [configuration])
    assert f"PASS {configuration}/loop" in output, output


@pytest.mark.parametrize("configuration", ["adapt_damping_every_2", "quadratic_model_step"])
def test_two_replicas_with_adaptive_options_match_one_device(configuration):
    output = run_scenario("mirrored_equivalence", [configuration])
    assert f"PASS {configuration}/loop" in output, output
    assert f"PASS {configuration}/loop/damping_adapted" in output, output
