"""K-FAC options under `MirroredStrategy` with two logical CPU replicas.

Same oracle and tolerances as `tests/test_distributed_mirrored.py` (a
single-device run on the same global batches; see
`tests/distributed_scenarios.py`), custom-loop step, for
`inverse_method="eigh"`, `approximation="tridiagonal"` (a chain of three
Dense layers) and `l2_reg` + `norm_constraint` + Keras `weight_decay`
together.
"""

import pytest

from distributed_scenarios import run_scenario


@pytest.mark.parametrize("configuration", [
    "eigh", "tridiagonal", "l2_norm_constraint_weight_decay"])
def test_two_replicas_match_one_device(configuration):
    output = run_scenario("mirrored_equivalence", [configuration])
    assert f"PASS {configuration}/loop" in output, output
