"""Cost of one Jacobian-vector product, forward mode vs double backward.

    python tools/fisher_product_cost.py [--batch 1000] [--repeats 15]

On the paper's autoencoder MLP (784-1000-500-250-30-250-500-1000-784, tanh),
times `kfac_keras.fisher_products.jacobian_vector_product` with each method
and a plain forward pass, each in a `tf.function`, calls interleaved; prints
medians and the largest difference between the two products.
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kfac_keras import fisher_products  # noqa: E402

SIZES = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((SIZES[0],))] + [
        keras.layers.Dense(n, activation="tanh") for n in SIZES[1:]])
    x = tf.random.normal((args.batch, SIZES[0]))
    variables = model.trainable_variables
    tangents = [tf.random.normal(v.shape) for v in variables]

    def product(method):
        return tf.function(lambda: fisher_products.jacobian_vector_product(
            lambda: model(x, training=True), variables, tangents, method)[1])

    functions = {"forward mode": product("forward"),
                 "double backward": product("double_backward"),
                 "plain forward pass": tf.function(lambda: model(x, training=True))}
    for fn in functions.values():
        fn()
    times = {name: [] for name in functions}
    for _ in range(args.repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn().numpy()
            times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        print(f"{name:18s} {1000 * np.median(values):7.1f} ms  "
              f"(median of {args.repeats}, batch {args.batch})")
    difference = tf.reduce_max(tf.abs(functions["forward mode"]() - functions["double backward"]()))
    print(f"max |forward mode - double backward| = {float(difference):.3g}")


if __name__ == "__main__":
    main()
