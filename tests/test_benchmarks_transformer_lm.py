"""The transformer LM benchmark: its Markov chain's entropy floor, checked independently, and a smoke run."""

import csv
import itertools
import os
import sys

import keras
import numpy as np
import pytest

from benchmarks import markov_lm, transformer_lm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stationary_pair_law(next_probs):
    """The stationary law of the pair chain (a, b) -> (b, c), by solving
    `pi T = pi, sum(pi) = 1` as one least-squares system (no iteration)."""
    vocab = next_probs.shape[0]
    transition = np.zeros((vocab * vocab, vocab * vocab))
    for a, b, c in itertools.product(range(vocab), repeat=3):
        transition[a * vocab + b, b * vocab + c] = next_probs[a, b, c]
    system = np.vstack([transition.T - np.eye(vocab * vocab), np.ones((1, vocab * vocab))])
    rhs = np.concatenate([np.zeros(vocab * vocab), [1.0]])
    law, *_ = np.linalg.lstsq(system, rhs, rcond=None)
    return law.reshape(vocab, vocab)


def test_floor_equals_expected_loss_of_the_true_conditionals_by_enumeration():
    # Every sequence of a 3-token chain of length 5, weighted by its probability:
    # the floor is the expected mean of -log p(x_t | x_<t), t = 1..4.
    chain = markov_lm.MarkovChain(vocab=3, concentration=0.5, seed=3)
    law = _stationary_pair_law(chain.next_probs)
    first = law.sum(axis=1)
    length = 5
    expected, total = 0.0, 0.0
    for seq in itertools.product(range(3), repeat=length):
        probability = law[seq[0], seq[1]]
        losses = [-np.log(law[seq[0], seq[1]] / first[seq[0]])]
        for t in range(2, length):
            p = chain.next_probs[seq[t - 2], seq[t - 1], seq[t]]
            probability *= p
            losses.append(-np.log(p))
        expected += probability * np.mean(losses)
        total += probability
    assert total == pytest.approx(1.0, abs=1e-12)
    assert chain.floor(length) == pytest.approx(expected, rel=1e-10)


def test_floor_of_the_benchmark_chain_against_a_linear_solve_of_the_stationary_law():
    chain = markov_lm.MarkovChain(vocab=transformer_lm.VOCAB,
                                  concentration=transformer_lm.CONCENTRATION,
                                  seed=transformer_lm.DEFAULT_CHAIN_SEED)
    law = _stationary_pair_law(chain.next_probs)
    np.testing.assert_allclose(chain.pair_probs, law, atol=1e-12)
    p = chain.next_probs
    with np.errstate(divide="ignore", invalid="ignore"):
        later = -np.nansum(law[..., None] * p * np.where(p > 0, np.log(p), 0.0))
        joint = law[law > 0]
        first = law.sum(axis=1)
        first_token = -(joint * np.log(joint)).sum() + (first * np.log(first)).sum()
    length = transformer_lm.LENGTH
    expected = (first_token + (length - 2) * later) / (length - 1)
    assert chain.floor(length) == pytest.approx(expected, rel=1e-10)
    # The floor lies below the unigram entropy and above zero.
    assert 0.0 < chain.floor(length) < np.log(chain.vocab)


def test_sampled_sequences_reach_the_floor_monte_carlo():
    chain = markov_lm.MarkovChain(vocab=8, concentration=0.3, seed=5)
    length = 12
    seqs = chain.sample(40000, length, np.random.default_rng(0))
    first = chain.pair_probs.sum(axis=1)
    per_token = np.empty((seqs.shape[0], length - 1))
    per_token[:, 0] = -np.log(chain.pair_probs[seqs[:, 0], seqs[:, 1]] / first[seqs[:, 0]])
    for t in range(2, length):
        per_token[:, t - 1] = -np.log(chain.next_probs[seqs[:, t - 2], seqs[:, t - 1], seqs[:, t]])
    per_sequence = per_token.mean(axis=1)
    standard_error = per_sequence.std() / np.sqrt(per_sequence.size)
    assert abs(per_sequence.mean() - chain.floor(length)) < 4 * standard_error
    # Stationarity: late pairs have the starting pair law.
    late = np.bincount(seqs[:, 9] * 8 + seqs[:, 10], minlength=64) / seqs.shape[0]
    assert 0.5 * np.abs(late - chain.pair_probs.ravel()).sum() < 0.02


def test_next_token_pairs_shifts_by_one():
    seqs = np.arange(12).reshape(2, 6)
    inputs, targets = markov_lm.next_token_pairs(seqs)
    np.testing.assert_array_equal(inputs, seqs[:, :-1])
    np.testing.assert_array_equal(targets, seqs[:, 1:])
    with pytest.raises(ValueError, match="at least 2 tokens"):
        markov_lm.next_token_pairs(np.zeros((3, 1)))


def test_held_out_cross_entropy_matches_keras_loss():
    model = markov_lm.make_transformer_lm(vocab=5, length=6, d_model=8, layers=1, heads=2)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 5, (7, 5)), rng.integers(0, 5, (7, 5))
    # Moves the logits away from zero (Keras's initial output layer is small).
    model.get_layer("logits").kernel.assign(rng.normal(size=(8, 5)))
    keras_value = float(keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, model(x)))
    assert transformer_lm.held_out_cross_entropy(model, x, y) == pytest.approx(keras_value,
                                                                               rel=1e-5)


def test_make_transformer_lm_checks_heads():
    with pytest.raises(ValueError, match="divisible"):
        markov_lm.make_transformer_lm(d_model=10, heads=4)


def test_step_efficiency_tasks_use_the_same_chain_and_model():
    sys.path.insert(0, os.path.join(REPO, "tools", "step_efficiency"))
    try:
        import tasks
    finally:
        sys.path.remove(os.path.join(REPO, "tools", "step_efficiency"))
    assert tasks.MarkovChain is markov_lm.MarkovChain
    assert tasks.make_transformer_lm is markov_lm.make_transformer_lm


def test_parser_has_no_mnist_flag():
    with pytest.raises(SystemExit):
        transformer_lm.build_parser().parse_args(["--data-dir", "somewhere"])
    with pytest.raises(SystemExit):
        transformer_lm.main(["--target-gaps", "0.5,-1"])


def test_entry_point_smoke(tmp_path, monkeypatch, capsys):
    # A smaller model and held-out set keep this a few seconds; the chain is the benchmark's.
    monkeypatch.setattr(transformer_lm, "D_MODEL", 16)
    monkeypatch.setattr(transformer_lm, "LAYERS", 1)
    monkeypatch.setattr(transformer_lm, "HELD_OUT_SEQUENCES", 200)
    code = transformer_lm.main([
        "--steps", "6", "--no-grid", "--optimizers", "kfac,adam", "--jit", "off",
        "--target-gaps", "5,0.01", "--out-dir", str(tmp_path)])
    assert code == 0
    with open(tmp_path / "results.csv") as f:
        rows = {row["optimizer"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"kfac", "adam"}
    floor = markov_lm.MarkovChain(seed=transformer_lm.DEFAULT_CHAIN_SEED).floor(
        transformer_lm.LENGTH)
    for row in rows.values():
        assert int(row["steps_run"]) == 6
        # floor + 5 is above the initial loss (about log 32 = floor + 1.2): reached at once;
        # floor + 0.01 cannot be reached in 6 steps.
        assert row[f"steps_to_{round(floor + 5, 4):g}"] == "1"
        assert row[f"steps_to_{round(floor + 0.01, 4):g}"] == ""
        assert float(row["held-out CE"]) > floor - 0.05
    assert f"entropy floor {floor:.4f}" in capsys.readouterr().out
    assert os.path.exists(tmp_path / "results.md")
