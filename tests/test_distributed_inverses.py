"""`KFAC(distributed_inverses=True)`: each replica decomposes its share of
the blocks and the results are all-reduced (`kfac_keras.distributed`).

The end-to-end test trains a 4-layer MLP (4 Kronecker blocks, shared out
over 2 MirroredStrategy replicas on logical CPUs) and compares it with a
single-device run on the same global batches (weights and every optimizer
variable, `rtol=1e-4, atol=1e-6`; see `tests/distributed_scenarios.py`),
which the replicated mode also equals (`tests/test_distributed_mirrored.py`).
"""

import pytest

import kfac_keras
from kfac_keras import distributed
from distributed_scenarios import run_scenario


def test_greedy_balance_by_cost_hand_computed():
    # Decreasing cost order: 27 -> r0; 8 -> r1 (0 < 27); 8 -> r1 (8 < 27);
    # 8 -> r1 (16 < 27); 1 -> r1 (24 < 27); 0 -> r1 (25 < 27).
    assert distributed.assign_owners([8, 27, 1, 8, 0, 8], 2) == [1, 0, 1, 1, 1, 1]
    # Equal costs alternate; more replicas than blocks leaves replicas idle.
    assert distributed.assign_owners([5, 5, 5, 5], 2) == [0, 1, 0, 1]
    assert distributed.assign_owners([3, 1], 4) == [0, 1]


def test_decomposition_cost_of_a_dense_block():
    import keras
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    optimizer = kfac_keras.KFAC(seed=0)
    registration = optimizer.attach(model)
    (block,) = registration.blocks
    # A: 5 x 5 (4 inputs + bias), G: 3 x 3; factors and their inverses.
    assert distributed.decomposition_cost(block) == 2 * (5 ** 3 + 3 ** 3)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_option_must_be_a_bool(value):
    with pytest.raises(TypeError, match="distributed_inverses"):
        kfac_keras.KFAC(distributed_inverses=value)


def test_option_is_in_the_config():
    optimizer = kfac_keras.KFAC(distributed_inverses=True)
    assert optimizer.get_config()["distributed_inverses"] is True
    assert kfac_keras.KFAC.from_config(optimizer.get_config()).distributed_inverses is True


def test_two_replicas_sharing_decompositions_match_one_device():
    output = run_scenario("mirrored_equivalence", ["distributed_inverses"])
    assert "PASS distributed_inverses/loop" in output, output
