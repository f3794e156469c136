"""Dynamic loss scaling under `MirroredStrategy` with two logical CPU
replicas (`tests/distributed_scenarios.py`, `mirrored_loss_scaling`).

Each replica scales its loss by the dynamic scale and unscales its
gradients; the cross-replica part of the step sees the summed gradients,
so the non-finite guard and Keras's scale rule (halve after a non-finite
batch, double after `dynamic_growth_steps` finite ones) act once, for all
replicas. The oracle is the single-device step on the same global batches
with the same `LossScaleOptimizer`:

* float32 policy with an explicit `LossScaleOptimizer(KFAC(...))`: weights,
  every optimizer variable, the logged K-FAC values and the loss scale agree
  to `rtol=1e-4, atol=1e-6` (the loss-scaling logic is exact);
* `mixed_float16` (Keras wraps KFAC itself): same comparison to
  `rtol=2e-2, atol=1e-4` (float16 forward pass; measured largest relative
  difference about 7e-3, in a factor inverse), factors stay float32.

Both runs put an Inf in the second replica's half of batch 4: the step is
skipped on both replicas (`skipped_steps` = 1), the scale halves, and the
weights, momentum and factors are those of the step before.
"""

import pytest

from distributed_scenarios import run_scenario


@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
def test_loss_scaled_two_replicas_match_one_device(policy):
    output = run_scenario("mirrored_loss_scaling", policy)
    assert f"PASS {policy}/skipped_step" in output, output
    assert f"PASS {policy}/final_state" in output, output
