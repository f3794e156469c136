"""Sample weights in the factors under `MirroredStrategy` with two logical
CPU replicas (`tests/distributed_scenarios.py`, `mirrored_weighted`).

Each replica's input factor is a weighted mean over its rows, `A_r = (1/m_w,r)
sum r abar abar^T`; the cross-replica estimate must be the weighted mean of
the whole batch, so the replicas' estimates are averaged with their weighted
counts `m_w,r` (the output-gradient factors with their example counts). With
zero weights concentrated in one replica's half of every batch, an average
by example counts would differ from one device; a statistics batch whose
weights are all 0 leaves the input factors unchanged on both. Compared, as in the other
distributed tests: weights and every optimizer variable after 8 steps, custom
loop (Dense blocks, and a tridiagonal chain with its cross factors) and `fit`,
`rtol=1e-4, atol=1e-6`.
"""

from distributed_scenarios import run_scenario


def test_weighted_factors_under_two_replicas_match_one_device():
    output = run_scenario("mirrored_weighted", timeout=300)
    for label in ("cholesky/loop", "cholesky/fit", "tridiagonal/loop"):
        assert f"PASS weighted/{label}" in output, output
