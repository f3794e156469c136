"""K-FAC step time with 1 and 2 replicas on CPU, and the bytes exchanged.

Run with::

    python -m benchmarks.distributed_cost [--batch-size 1000]
        [--periods 2] [--data-dir DIR]

Splits the CPU into two logical devices (before TensorFlow starts) and, for
the MNIST autoencoder (784-1000-500-250-30-250-500-1000-784, sigmoid
cross-entropy) at the default K-FAC options, times the mean custom-loop step
over whole `inv_update_every` periods (so statistics and decompositions
count at their real frequency; two warm-up steps first) for:

* `1 replica`: the plain step, on one logical device;
* `2 replicas`: `MirroredStrategy` over the two logical devices, each
  replica getting half of the global batch (`kfac_keras.distributed`),
  with replicated decompositions (the default);
* `2 replicas, distributed_inverses`: the same with
  `KFAC(distributed_inverses=True)`.

It also prints the float32 bytes the multi-replica step all-reduces: every
step the gradients and the loss, every `cov_update_every` steps the factor
estimates (and the example count), and with `distributed_inverses` every
`inv_update_every` steps the blocks' whole state and one flag per block.

Two logical devices share the same physical cores, so this measures the
overhead of the multi-replica step, not a speed-up.
"""

import argparse
import itertools
import os

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def configure_two_logical_cpus():
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)


def communication_bytes(optimizer, model):
    """Float32 bytes all-reduced per step, per `T_cov` and per `T_inv`
    (the latter with `distributed_inverses` only)."""
    parameters = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    factors = 0
    state = 0
    blocks = optimizer.registration.blocks
    for block in blocks:
        for shapes in block.factor_shapes().values():
            shapes = shapes if isinstance(shapes, list) else [shapes]
            factors += sum(int(np.prod(shape)) for shape in shapes)
        state += sum(int(np.prod(v.shape)) for v in block.state_variables())
    return {"per_step": 4 * (parameters + 1),
            "per_cov_update": 4 * (factors + 1),
            "per_inv_update_distributed": 4 * (state + len(blocks))}


def time_steps(step, batches, period, periods):
    """Mean seconds per step over `periods` whole periods, after 2 warm-ups.

    Args:
        step: `(inputs, targets) -> result`, one training step.
        batches: list of `(inputs, targets)`, used in turn.
        period: int, steps per period (`inv_update_every`).
        periods: int, periods timed.

    Returns:
        A Python float.
    """
    from benchmarks.timing import call_seconds

    cycle = itertools.cycle(batches)
    return float(np.mean(call_seconds(lambda: step(*next(cycle)), period * periods)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--periods", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)

    configure_two_logical_cpus()
    import keras
    import tensorflow as tf

    import kfac_keras
    from benchmarks.autoencoder import make_autoencoder
    from benchmarks.mnist_data import load_mnist

    x, _, source = load_mnist(args.data_dir)
    x = x[:2 * args.batch_size].astype("float32")
    global_batches = [(x[i:i + args.batch_size], x[i:i + args.batch_size])
                      for i in range(0, len(x), args.batch_size)]
    loss = keras.losses.BinaryCrossentropy(from_logits=True)
    results = {}

    def build(**options):
        keras.utils.set_random_seed(0)
        model = make_autoencoder()
        return model, kfac_keras.KFAC(seed=0, **options)

    with tf.device("/cpu:0"):
        model, optimizer = build()
        step = tf.function(kfac_keras.make_train_step(model, optimizer, loss))
        batches = [(tf.constant(a), tf.constant(b)) for a, b in global_batches]
        results["1 replica"] = time_steps(
            lambda a, b: step(a, b)["loss"].numpy(), batches, optimizer.inv_update_every,
            args.periods)
    communication = communication_bytes(optimizer, model)

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    for label, options in (("2 replicas", {}),
                           ("2 replicas, distributed_inverses",
                            {"distributed_inverses": True})):
        with strategy.scope():
            model, optimizer = build(**options)
            replica_step = kfac_keras.make_train_step(model, optimizer, loss)

        @tf.function
        def distributed_step(a, b, replica_step=replica_step):
            per_replica = strategy.run(replica_step, args=(a, b))
            return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica["loss"], axis=None)

        batches = []
        for a, b in global_batches:
            share = len(a) // 2

            def replica_slice(context, a=a, b=b):
                start = context.replica_id_in_sync_group * share
                return a[start:start + share], b[start:start + share]

            batches.append(strategy.experimental_distribute_values_from_function(replica_slice))
        results[label] = time_steps(
            lambda a, b: distributed_step(a, b).numpy(), batches,
            optimizer.inv_update_every, args.periods)

    print(f"Model: MNIST autoencoder ({source}), global batch {args.batch_size}, "
          "default KFAC options, CPU split into 2 logical devices.\n")
    print("| configuration | ms per step |")
    print("|---|---|")
    for label, seconds in results.items():
        print(f"| {label} | {1000.0 * seconds:.1f} |")
    print("\nfloat32 bytes all-reduced by the multi-replica step:")
    for key, value in communication.items():
        print(f"  {key}: {value} ({value / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
