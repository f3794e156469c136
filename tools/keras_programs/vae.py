"""keras-io's convolutional VAE on MNIST, trained with K-FAC and with Adam.

The program is the keras-io example's structure (encoder Conv2D/Dense and a
sampling layer, decoder Dense and Conv2DTranspose, a custom `train_step`
with reconstruction + KL and its own metrics), changed only in the optimizer
and the callback: `optimizer=kfac_keras.KFAC()` plus
`callbacks=[kfac_keras.KFACCallback()]`. K-FAC runs the model's own
`train_step` (`kfac_keras.custom_step`). Prints, per optimizer, the training
total loss per epoch (Keras's epoch mean), the total loss (reconstruction +
KL) of the final model on the whole data set with fixed sampling noise, and
the wall time.

Usage (from the repository root; MNIST IDX files, not copied into the repo)::

    KFAC_KERAS_DATA_DIR=../shared/data/mnist python tools/keras_programs/vae.py --epochs 5
"""

import argparse
import json
import os
import sys
import time

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

import kfac_keras
from kfac_choice import make_kfac

# The MNIST loader moved from kfac_keras.datasets to benchmarks/mnist_data.py.
# The repository root is on sys.path only for this import, so `kfac_keras`
# still comes from wherever it came from before.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks.mnist_data import load_mnist  # noqa: E402
del sys.path[0]

LATENT_DIM = 2


class Sampling(layers.Layer):
    """Draws `z = mean + exp(log_var / 2) * eps` with `eps ~ N(0, I)`."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seed_generator = keras.random.SeedGenerator(1337)

    def call(self, inputs):
        z_mean, z_log_var = inputs
        eps = keras.random.normal(ops.shape(z_mean), seed=self.seed_generator)
        return z_mean + ops.exp(0.5 * z_log_var) * eps


def make_encoder():
    inputs = keras.Input(shape=(28, 28, 1))
    h = layers.Conv2D(32, 3, activation="relu", strides=2, padding="same")(inputs)
    h = layers.Conv2D(64, 3, activation="relu", strides=2, padding="same")(h)
    h = layers.Flatten()(h)
    h = layers.Dense(16, activation="relu")(h)
    z_mean = layers.Dense(LATENT_DIM, name="z_mean")(h)
    z_log_var = layers.Dense(LATENT_DIM, name="z_log_var")(h)
    z = Sampling()([z_mean, z_log_var])
    return keras.Model(inputs, [z_mean, z_log_var, z], name="encoder")


def make_decoder():
    latent = keras.Input(shape=(LATENT_DIM,))
    h = layers.Dense(7 * 7 * 64, activation="relu")(latent)
    h = layers.Reshape((7, 7, 64))(h)
    h = layers.Conv2DTranspose(64, 3, activation="relu", strides=2, padding="same")(h)
    h = layers.Conv2DTranspose(32, 3, activation="relu", strides=2, padding="same")(h)
    outputs = layers.Conv2DTranspose(1, 3, activation="sigmoid", padding="same")(h)
    return keras.Model(latent, outputs, name="decoder")


def vae_losses(encoder, decoder, data):
    """`(reconstruction, kl)`: batch means of the per-image summed binary
    cross-entropy and of the KL divergence to the standard normal prior."""
    z_mean, z_log_var, z = encoder(data)
    reconstruction = decoder(z)
    reconstruction_loss = ops.mean(ops.sum(
        keras.losses.binary_crossentropy(data, reconstruction), axis=(1, 2)))
    kl = -0.5 * (1 + z_log_var - ops.square(z_mean) - ops.exp(z_log_var))
    return reconstruction_loss, ops.mean(ops.sum(kl, axis=1))


class VAE(keras.Model):
    """The keras-io VAE model: no `call`, its own `train_step` and metrics."""

    def __init__(self, encoder, decoder, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder
        self.decoder = decoder
        self.total_loss_tracker = keras.metrics.Mean(name="total_loss")
        self.reconstruction_loss_tracker = keras.metrics.Mean(name="reconstruction_loss")
        self.kl_loss_tracker = keras.metrics.Mean(name="kl_loss")

    @property
    def metrics(self):
        return [self.total_loss_tracker, self.reconstruction_loss_tracker,
                self.kl_loss_tracker]

    def train_step(self, data):
        with tf.GradientTape() as tape:
            reconstruction_loss, kl_loss = vae_losses(self.encoder, self.decoder, data)
            total_loss = reconstruction_loss + kl_loss
        grads = tape.gradient(total_loss, self.trainable_weights)
        self.optimizer.apply_gradients(zip(grads, self.trainable_weights))
        self.total_loss_tracker.update_state(total_loss)
        self.reconstruction_loss_tracker.update_state(reconstruction_loss)
        self.kl_loss_tracker.update_state(kl_loss)
        return {
            "loss": self.total_loss_tracker.result(),
            "reconstruction_loss": self.reconstruction_loss_tracker.result(),
            "kl_loss": self.kl_loss_tracker.result(),
        }


def evaluate_total_loss(vae, images, batch_size=500):
    """Reconstruction + KL of the final model on `images` (fixed noise seed)."""
    keras.utils.set_random_seed(7)
    totals = []
    for start in range(0, len(images), batch_size):
        reconstruction, kl = vae_losses(vae.encoder, vae.decoder,
                                        images[start:start + batch_size])
        totals.append(float(reconstruction) + float(kl))
    return float(np.mean(totals))


def train(optimizer_name, images, epochs, batch_size, seed, kfac_options, step_rule=None):
    keras.utils.set_random_seed(seed)
    vae = VAE(make_encoder(), make_decoder())
    if optimizer_name == "kfac":
        vae.compile(optimizer=make_kfac({"seed": seed, **kfac_options}, step_rule))
        callbacks = [kfac_keras.KFACCallback()]
    else:
        vae.compile(optimizer=keras.optimizers.Adam())
        callbacks = []
    start = time.perf_counter()
    history = vae.fit(images, epochs=epochs, batch_size=batch_size, verbose=2,
                      callbacks=callbacks)
    seconds = time.perf_counter() - start
    return {
        "optimizer": optimizer_name,
        "options": kfac_options if optimizer_name == "kfac" else {},
        "step_rule": step_rule if optimizer_name == "kfac" else None,
        "epoch_total_loss": [round(v, 2) for v in history.history["loss"]],
        "epoch_kl_loss": [round(v, 3) for v in history.history["kl_loss"]],
        "final_total_loss": round(evaluate_total_loss(vae, images), 2),
        "seconds": round(seconds, 1),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--optimizers", default="kfac,adam")
    parser.add_argument("--kfac-options", type=json.loads, default={},
                        help='JSON keyword arguments of KFAC, e.g. \'{"norm_constraint": 1e-3}\'')
    parser.add_argument("--step-rule", type=json.loads, default=None, help="JSON StepRuleKFAC arguments (tools/step_efficiency/step_rules.py): train with that step rule instead of KFAC's (kfac_choice.py)")
    parser.add_argument("--examples", type=int, default=None,
                        help="use only the first N images (quick checks)")
    args = parser.parse_args()
    x, _, source = load_mnist(flatten=False, allow_download=False)
    x = x[:args.examples]
    print(f"data: {source}, {len(x)} images")
    results = [train(name, x, args.epochs, args.batch_size, args.seed, args.kfac_options,
                     args.step_rule)
               for name in args.optimizers.split(",")]
    for result in results:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
