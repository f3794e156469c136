"""Causal transformer language model benchmark: K-FAC against tuned Adam and Muon.

Run with::

    python -m benchmarks.transformer_lm [--quick] [--optimizers kfac,adam,muon]
        [--steps N] [--batch-size 64] [--out-dir DIR] [--no-grid]
        [--jit auto|on|off] [--target-gaps 1.0,0.7,0.5] ...

Data (``benchmarks.markov_lm``). Sequences of ``LENGTH = 32`` tokens from a
fixed random order-2 Markov chain over ``VOCAB = 32`` tokens (rows drawn from
a Dirichlet(0.2), chain seed ``--chain-seed``, default 1), started from the
chain's stationary law of token pairs. The model reads tokens 0..30 and
predicts tokens 1..31. The best possible mean next-token cross-entropy, the
**floor**, is the chain's exact conditional entropy (``MarkovChain.floor``);
the targets are the floor plus ``--target-gaps`` nats (default 1.0, 0.7,
0.5). Every training step gets fresh sequences (``steps x batch_size`` are
sampled up front with ``--seed`` and used once each, in the same order for
every optimizer), so the training loss estimates the expected loss and can
only approach the floor from above (up to batch noise).

Model (``markov_lm.make_transformer_lm``): token Embedding(32, 64) plus
learned positions, 2 pre-LayerNorm blocks of causal MultiHeadAttention (4
heads of 16) and Dense(256, relu)-Dense(64), both residual, a final
LayerNormalization and Dense(32) logits (named ``logits``). The loss is
``keras.losses.SparseCategoricalCrossentropy(from_logits=True)``, the mean
over tokens, in nats per token. K-FAC gives the Embedding its ``diag(freq)
(x) G`` block, the attention projections and Dense layers Kronecker blocks
(positions as locations), the LayerNormalizations scale-and-shift blocks
and the custom position table the diagonal block. Muon gets
``exclude_layers=["logits"]``.

Training. ``harness.benchmark_optimizers``: same initial weights and batches
for every optimizer, Adam's and Muon's learning rates grid-searched with
``--grid-steps`` runs (the grid is extended when the best value is at an
edge), K-FAC at its defaults unless ``--kfac-*`` or ``--lrs kfac=...`` say
otherwise. The table gives steps and seconds for the moving average of the
training cross-entropy to reach each target, and the cross-entropy on
``HELD_OUT_SEQUENCES`` fresh held-out sequences after the final run.

Cost. The command prints each optimizer's median and mean step time and the
total wall time. ``--quick`` (40 steps, easier targets, two-point grids of
10-step runs, no XLA probe) is a smoke test.
"""

from __future__ import annotations

import sys

import keras
import numpy as np

from benchmarks import cli, harness, reports
from benchmarks.markov_lm import MarkovChain, make_transformer_lm, next_token_pairs

OUTPUT_LAYER = "logits"
VOCAB = 32
LENGTH = 32
D_MODEL = 64
LAYERS = 2
HEADS = 4
CONCENTRATION = 0.2
DEFAULT_CHAIN_SEED = 1
DEFAULT_BATCH_SIZE = 64
# Every optimizer sits on the unigram plateau (about floor + 1.2) for a few
# hundred steps before it learns to use the two previous tokens
# (tools/step_efficiency/RESULTS.md, section 3), hence the long default run.
DEFAULT_STEPS = 1500
QUICK_STEPS = 40
DEFAULT_OPTIMIZERS = ("kfac", "adam", "muon")
# Targets in nats per token above the floor.
DEFAULT_TARGET_GAPS = (1.0, 0.7, 0.5)
QUICK_TARGET_GAPS = (1.4, 1.25)
HELD_OUT_SEQUENCES = 2000
HELD_OUT_SEED = 20261202


def build_parser():
    p = cli.build_common_parser(
        "transformer_lm", __doc__.split("\n\n")[0], default_steps=DEFAULT_STEPS,
        quick_steps=QUICK_STEPS, default_optimizers=DEFAULT_OPTIMIZERS, mnist_data=False)
    p.set_defaults(batch_size=DEFAULT_BATCH_SIZE)
    p.add_argument("--target-gaps", default=None,
                   help="comma list of targets in nats per token above the chain's entropy "
                        f"floor (default {','.join(f'{g:g}' for g in DEFAULT_TARGET_GAPS)}; "
                        f"{','.join(f'{g:g}' for g in QUICK_TARGET_GAPS)} with --quick)")
    p.add_argument("--chain-seed", type=int, default=DEFAULT_CHAIN_SEED,
                   help="seed of the Markov chain's transition probabilities "
                        "(default: %(default)s)")
    return p


def held_out_cross_entropy(model, inputs, targets, batch_size=500):
    """Mean next-token cross-entropy (nats per token) of `model` on held-out sequences.

    Args:
        model: a Keras model from token ids to next-token logits.
        inputs: int array `(count, length - 1)` of input tokens.
        targets: int array `(count, length - 1)` of next tokens.
        batch_size: int, prediction batch size. Defaults to 500.

    Returns:
        A Python float.
    """
    logits = np.asarray(model.predict(inputs, batch_size=batch_size, verbose=0), np.float64)
    logits -= logits.max(axis=-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    picked = np.take_along_axis(log_probs, np.asarray(targets)[..., None], axis=-1)
    return float(-picked.mean())


def main(argv=None):
    parser = build_parser()
    args, t_start, steps, grid_steps, jit = cli.start_race(
        parser, argv, default_steps=DEFAULT_STEPS, quick_steps=QUICK_STEPS)
    gaps = cli.race_targets(parser, args, "--target-gaps", DEFAULT_TARGET_GAPS, QUICK_TARGET_GAPS)

    chain = MarkovChain(vocab=VOCAB, concentration=CONCENTRATION, seed=args.chain_seed)
    floor = chain.floor(LENGTH)
    targets = tuple(round(floor + g, 4) for g in gaps)
    x, y = next_token_pairs(chain.sample(steps * args.batch_size, LENGTH,
                                         np.random.default_rng(args.seed)))
    x_held_out, y_held_out = next_token_pairs(chain.sample(
        HELD_OUT_SEQUENCES, LENGTH, np.random.default_rng(HELD_OUT_SEED)))
    print(f"data: order-2 Markov chain over {VOCAB} tokens (chain seed {args.chain_seed}), "
          f"{x.shape[0]} training sequences of {LENGTH} tokens; entropy floor "
          f"{floor:.4f} nats/token; targets {', '.join(f'{t:g}' for t in targets)}", flush=True)

    specs = cli.race_specs(args, OUTPUT_LAYER)
    if not specs:
        return 2

    def evaluate(model):
        value = held_out_cross_entropy(model, x_held_out, y_held_out)
        print(f"  held-out cross-entropy on {HELD_OUT_SEQUENCES} sequences: {value:.4f} "
              f"(floor {floor:.4f})", flush=True)
        return {"held_out_ce": value}

    def make_model():
        return make_transformer_lm(VOCAB, LENGTH, D_MODEL, LAYERS, HEADS)

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    bench = harness.benchmark_optimizers(
        specs, make_model, x, y, loss,
        steps=steps, batch_size=args.batch_size, seed=args.seed,
        grid=not args.no_grid, quick=args.quick, grid_steps=grid_steps,
        lr_overrides=args.lrs, jit=jit, smooth_window=args.smooth,
        warmup_steps=args.warmup, loss_unit=" nats/token", verbose=args.verbose,
        evaluate=evaluate)
    runs, grids = bench["runs"], bench["grids"]

    notes = [
        f"data: order-2 Markov chain over {VOCAB} tokens, Dirichlet({CONCENTRATION:g}) rows, "
        f"chain seed {args.chain_seed}; sequences of {LENGTH} tokens from the stationary pair "
        f"law, fresh ones every step; entropy floor {floor:.4f} nats/token (exact)",
        f"targets: floor + {', '.join(f'{g:g}' for g in gaps)} nats/token",
        f"model: token Embedding({VOCAB},{D_MODEL}) + learned positions, {LAYERS} pre-LayerNorm "
        f"blocks of causal MultiHeadAttention({HEADS} heads x {D_MODEL // HEADS}) and "
        f"Dense({4 * D_MODEL}, relu)-Dense({D_MODEL}), final LayerNorm, Dense({VOCAB}) logits; "
        "loss: SparseCategoricalCrossentropy(from_logits=True), mean nats per token",
        f"batch size {args.batch_size} sequences, {steps} steps, seed {args.seed}; same initial "
        "weights and batches for every optimizer",
        f"held-out CE: mean next-token cross-entropy on {HELD_OUT_SEQUENCES} fresh sequences "
        "after the final training run",
        *cli.protocol_notes(args, grid_steps, jit, loss_name="training cross-entropy"),
    ]

    reports.finish_race(
        runs, grids, targets, args.out_dir, t_start,
        title="Causal transformer LM (order-2 Markov chain)",
        plot_title="Causal transformer LM, order-2 Markov chain", loss_name="train CE",
        loss_label="training cross-entropy (nats/token)", notes=notes,
        extra_columns=[("held-out CE", reports.evaluation_column("held_out_ce"))])
    return 0


if __name__ == "__main__":
    sys.exit(main())
