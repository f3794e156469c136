"""Where the K-FAC step of the transformer classifier goes, block by block.

Trains `transformer_classifier`'s model for `--steps` steps with the given
KFAC options, then, on one batch, preconditions the gradient of the training
loss with the optimizer's current blocks (`KFAC.precondition`) and prints
per block: the gradient norm, the preconditioned norm, the block's share of
`g^T Delta` (which the norm constraint budgets: `lr^2 g^T Delta <= c`) and
the cosine of `Delta` with `g`.

    python tools/keras_programs/transformer_diagnostics.py --steps 40
"""

import argparse
import json
import os
import sys

import keras
import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(__file__))
import transformer_classifier as program  # noqa: E402

import kfac_keras  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kfac", default="{}")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--position", choices=["keras_io", "batched"], default="keras_io")
    args = parser.parse_args()
    keras.utils.set_random_seed(0)
    x, y = program.synthetic_reviews(args.steps * 32 + 64, 1)
    model = program.build_model(args.position)
    optimizer = kfac_keras.KFAC(**json.loads(args.kfac))
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    model.fit(x[:args.steps * 32], y[:args.steps * 32], batch_size=32, epochs=1, verbose=0,
              callbacks=[kfac_keras.KFACCallback(verbose=0)])
    xb, yb = x[-64:], y[-64:]
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        loss = model.compute_loss(x=xb, y=yb, y_pred=model(xb, training=True))
    grads = [tf.convert_to_tensor(g) for g in tape.gradient(loss, variables)]
    deltas = optimizer.precondition(grads, variables)
    by_id = {id(v): (g, d) for v, g, d in zip(variables, grads, deltas)}
    total = sum(float(tf.reduce_sum(g * d)) for g, d in zip(grads, deltas))
    print(f"loss {float(loss):.4f}  damping {float(optimizer.total_damping()):.3g}  "
          f"g.Delta {total:.4g}")
    print(f"{'block':58s} {'kind':12s} {'|g|':>9s} {'|Delta|':>9s} {'share':>7s} {'cos':>6s}")
    for block in optimizer.registration.blocks:
        pairs = [by_id[id(v)] for v in block.variables if id(v) in by_id]
        g = tf.concat([tf.reshape(p[0], [-1]) for p in pairs], 0)
        d = tf.concat([tf.reshape(p[1], [-1]) for p in pairs], 0)
        gd = float(tf.reduce_sum(g * d))
        cos = gd / max(float(tf.norm(g) * tf.norm(d)), 1e-30)
        print(f"{block.name[-58:]:58s} {block.kind.split(' (')[0]:12s} "
              f"{float(tf.norm(g)):9.3g} {float(tf.norm(d)):9.3g} {gd / total:7.3f} {cos:6.3f}")

    sentiment = np.arange(100, 100 + 2 * program.SENTIMENT_TOKENS)
    for block in optimizer.registration.blocks:
        if not hasattr(block, "token_frequencies"):
            continue
        g, d = by_id[id(block.variables[0])]
        frequencies = block.token_frequencies.numpy()
        row_norm = np.linalg.norm(tf.convert_to_tensor(d).numpy(), axis=1)
        grad_norm = np.linalg.norm(tf.convert_to_tensor(g).numpy(), axis=1)
        damping_part = (float(block.frequency_damping.numpy())
                        if hasattr(block, "frequency_damping") else float("nan"))
        print(f"{block.name}: A-side damping pi*gamma {damping_part:.3g}; "
              f"token frequency (per example) median {np.median(frequencies):.3g}, "
              f"max {frequencies.max():.3g}, sentiment ids mean "
              f"{frequencies[sentiment[sentiment < len(frequencies)]].mean():.3g}")
        if len(frequencies) > sentiment.max():
            print(f"  |Delta| on the 40 sentiment rows {np.linalg.norm(row_norm[sentiment]):.3g} "
                  f"(|g| there {np.linalg.norm(grad_norm[sentiment]):.3g}), on all rows "
                  f"{np.linalg.norm(row_norm):.3g} (|g| {np.linalg.norm(grad_norm):.3g})")


if __name__ == "__main__":
    main()
