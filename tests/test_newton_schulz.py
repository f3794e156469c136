"""Newton-Schulz schedules and normalisations against independent NumPy computations.

`step_rules.newton_schulz(normalization="gram", coefficients="tuned")` against a float64 NumPy
loop with the coefficients written out here, and against the SVD (the result keeps the singular
vectors and maps each singular value by the composed scalar polynomial); the band the tuned
schedule promises, which Muon's coefficients miss at the same iteration count; the argument
checks; bfloat16 products; `orthogonal_direction`'s scale.
"""

import numpy as np
import pytest
import tensorflow as tf

from kfac_keras import step_rules

MUON = (3.4445, -4.7750, 2.0315)
#: The tuned schedules, written out independently of the library's table.
TUNED = {1: [(4.1486, -8.2340, 5.0035)],
         2: [(4.89, -12.2394, 8.0535), (3.4702, -4.8192, 2.0491)]}
#: The tuned schedule's promise (tools/step_efficiency/ns_coefficients.py): every singular value
#: of `X_0` in `[LOWER[k], 1]` ends in BAND (to 1e-4 after the coefficients' rounding).
LOWER = {1: 0.1742, 2: 0.0428}
BAND = (0.68, 1.21)


def _numpy_loop(matrix, schedule, normalization):
    """Float64 quintic Newton-Schulz on the matrix as given (no transposition)."""
    x = np.asarray(matrix, np.float64)
    x = x / np.linalg.norm(x)
    if normalization == "gram":
        x = x / np.sqrt(np.linalg.norm(x @ x.T))
    for a, b, c in schedule:
        gram = x @ x.T
        x = a * x + b * gram @ x + c * gram @ gram @ x
    return x


def _matrix_with_singular_values(values, rows, cols, seed):
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((rows, len(values))))
    v, _ = np.linalg.qr(rng.standard_normal((cols, len(values))))
    return (u * values) @ v.T, u, v


@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (5, 5)])
@pytest.mark.parametrize("normalization", ["frobenius", "gram"])
@pytest.mark.parametrize("iterations", [1, 2])
def test_tuned_schedule_matches_numpy_loop(shape, normalization, iterations):
    matrix = np.random.default_rng(3).standard_normal(shape) * np.logspace(0, -2, shape[1])
    got = step_rules.newton_schulz(tf.constant(matrix, tf.float32), iterations,
                                   normalization=normalization, coefficients="tuned").numpy()
    # The loop on the matrix itself: the polar approximation does not depend on which side
    # the library iterates on.
    np.testing.assert_allclose(got, _numpy_loop(matrix, TUNED[iterations], normalization),
                               atol=2e-6, rtol=0)


def test_gram_normalisation_with_muon_coefficients_matches_numpy_loop():
    matrix = np.random.default_rng(4).standard_normal((7, 5)) * np.logspace(0, -3, 5)
    got = step_rules.newton_schulz(tf.constant(matrix, tf.float32), 3, normalization="gram").numpy()
    np.testing.assert_allclose(got, _numpy_loop(matrix, [MUON] * 3, "gram"), atol=2e-6, rtol=0)


def test_gram_normalisation_maps_the_largest_singular_value_by_its_fourth_power_norm():
    """`X_0 = P / (sum s^4)^(1/4)` in singular values: compare with the SVD's map."""
    values = np.array([2.0, 1.0, 0.5, 0.01])
    matrix, u, v = _matrix_with_singular_values(values, 9, 6, seed=5)
    got = step_rules.newton_schulz(tf.constant(matrix, tf.float32), 2, normalization="gram",
                                   coefficients="tuned").numpy()
    x = values / np.sum(values ** 4) ** 0.25
    for a, b, c in TUNED[2]:
        x = a * x + b * x ** 3 + c * x ** 5
    np.testing.assert_allclose(got, (u * x) @ v.T, atol=2e-6, rtol=0)


@pytest.mark.parametrize("iterations", [1, 2])
def test_tuned_schedule_puts_the_promised_interval_in_the_band(iterations):
    """Singular values of `X_0 = P / ||P P^T||_F^(1/2)` spread over `[LOWER[k], 1)`, one of them
    just above `LOWER[k]`, all end in BAND (read off as `u_i^T NS(P) v_i`, the SVD's own
    vectors); Muon's coefficients at the same k leave that one below the band."""
    lower = LOWER[iterations]
    spread = np.concatenate([[1.0], np.logspace(np.log10(lower), -0.05, 10)])
    # One more value w with w / (sum spread^4 + w^4)^(1/4) = 1.001 lower, so that after the
    # normalisation one singular value sits at the interval's lower end.
    target = 1.001 * lower
    w = (target ** 4 * np.sum(spread ** 4) / (1.0 - target ** 4)) ** 0.25
    values = np.concatenate([spread, [w]])
    matrix, u, v = _matrix_with_singular_values(values, 20, 16, seed=6)
    x0 = values / np.sum(values ** 4) ** 0.25
    assert abs(x0[-1] - target) < 1e-9 and x0.max() < 1.0
    for coefficients, expect_band in (("tuned", True), ("muon", False)):
        got = step_rules.newton_schulz(tf.constant(matrix, tf.float32), iterations,
                                       normalization="gram", coefficients=coefficients).numpy()
        mapped = np.einsum("ri,rc,ci->i", u, got, v)
        in_interval = mapped[x0 >= lower]
        if expect_band:
            assert in_interval.min() >= BAND[0] - 1e-4 and in_interval.max() <= BAND[1] + 1e-4
        else:
            assert mapped[-1] < BAND[0] - 0.05


def test_tuned_schedule_stays_bounded_on_all_inputs():
    """`g(x)` in `[0, 1.21]` for every `x` in `[0, 1.05]` (scalar grid, the composed polynomial
    from the library's schedule), so no singular value grows without bound or flips sign."""
    x = np.linspace(0.0, 1.05, 4001)
    for iterations in (1, 2):
        y = x.copy()
        for a, b, c in step_rules.newton_schulz_schedule(iterations, "tuned"):
            y = a * y + b * y ** 3 + c * y ** 5
        assert y.min() >= -1e-12 and y.max() <= BAND[1] + 1e-4


def test_schedule_names_and_arguments_are_checked():
    matrix = tf.ones((3, 4))
    assert step_rules.newton_schulz_schedule(3) == (MUON,) * 3
    assert [tuple(t) for t in step_rules.newton_schulz_schedule(2, "tuned")] == TUNED[2]
    with pytest.raises(ValueError, match="coefficients='tuned' has schedules"):
        step_rules.newton_schulz(matrix, 3, coefficients="tuned")
    with pytest.raises(ValueError, match="`coefficients` must be one of"):
        step_rules.newton_schulz(matrix, 2, coefficients="polar_express")
    with pytest.raises(ValueError, match="`normalization` must be one of"):
        step_rules.newton_schulz(matrix, 2, normalization="spectral")
    with pytest.raises(ValueError, match="`iterations` must be >= 1"):
        step_rules.newton_schulz(matrix, 0)


def test_zero_matrix_and_batch_with_gram_normalisation():
    rng = np.random.default_rng(7)
    matrices = np.stack([np.zeros((4, 6)), rng.standard_normal((4, 6)),
                         rng.standard_normal((4, 6))])
    got = step_rules.newton_schulz(tf.constant(matrices, tf.float32), 2, normalization="gram",
                                   coefficients="tuned").numpy()
    assert np.all(got[0] == 0.0)
    for index in (1, 2):
        np.testing.assert_allclose(got[index], _numpy_loop(matrices[index], TUNED[2], "gram"),
                                   atol=2e-6, rtol=0)


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_bfloat16_gram_tuned_matches_the_float64_loop(shape):
    matrix = np.random.default_rng(8).standard_normal(shape)
    got = step_rules.newton_schulz(tf.constant(matrix, tf.float32), 2, "bfloat16", "gram",
                                   "tuned").numpy()
    expected = _numpy_loop(matrix, TUNED[2], "gram")
    # bfloat16 has an 8-bit mantissa: relative error of the products ~ 2^-8 per product.
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 0.03


def test_orthogonal_direction_passes_the_schedule_and_scales():
    matrix = np.random.default_rng(9).standard_normal((5, 8))
    got = step_rules.orthogonal_direction(tf.constant(matrix, tf.float32), 2, "float32", "gram",
                                          "tuned").numpy()
    np.testing.assert_allclose(got, 0.2 * np.sqrt(8.0) * _numpy_loop(matrix, TUNED[2], "gram"),
                               atol=5e-6, rtol=0)
