"""Layer types under `MirroredStrategy` with two logical CPU replicas
(`tests/distributed_scenarios.py`, `mirrored_layers`), `fit` with
`KFACCallback` and KFAC's defaults (Levenberg-Marquardt damping, KL
clipping).

* Embedding -> Conv2D -> Dense (an Embedding block with diagonal A, a KFC
  conv block, a dense block): weights, every optimizer variable and the
  logged K-FAC values equal a single-device `fit` on the same global batches
  to `rtol=1e-4, atol=1e-6`.
* With a BatchNormalization layer (`synchronized=False`): not compared with
  one device, because under the strategy each replica normalizes its half
  of the batch by that half's mean and variance (Keras's rule), which is a
  different function of the weights than one device normalizing the whole
  batch. Checked instead: training runs, and the trainable weights and the
  K-FAC state are finite and identical on both replicas (the moving
  statistics are per replica, as Keras keeps them).
* `BatchNormalization(synchronized=True)` raises NotImplementedError naming
  the layer before any K-FAC state exists.
"""

from distributed_scenarios import run_scenario


def test_embedding_conv2d_and_batchnorm_under_two_replicas():
    output = run_scenario("mirrored_layers")
    for label in ("embedding_conv2d", "batchnorm_trains", "synchronized_batchnorm_refused"):
        assert f"PASS layers/{label}" in output, output
