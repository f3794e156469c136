"""Writes the notebooks in this folder from the cell sources below, and runs them.

The notebooks are generated so that their shared parts (badge, install cell,
size switch, closing timing line) stay identical, and so that a change to the
library's API is one edit here. Usage, from the repository root::

    python colab/build_notebooks.py                 # write all notebooks (no outputs)
    python colab/build_notebooks.py --execute       # write, then run each at tutorial size
    python colab/build_notebooks.py --execute --small --only quickstart

``--execute`` runs each notebook top to bottom in a kernel on this Python
interpreter (``kfac_keras.examples.notebook_utils.execute_notebook``) and
saves the real outputs into the notebook. Writing a notebook without
``--execute`` drops its saved outputs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))

#: Where the "Open in Colab" badges and the install cell point. They assume
#: the project is published on GitHub as kfac-keras/kfac_keras.
GITHUB_REPO = "kfac-keras/kfac_keras"
COLAB_URL = f"https://colab.research.google.com/github/{GITHUB_REPO}/blob/main/colab/{{name}}.ipynb"
BADGE = "https://colab.research.google.com/assets/colab-badge.svg"


def md(text):
    return nbformat.v4.new_markdown_cell(text.strip("\n"))


def code(text):
    return nbformat.v4.new_code_cell(text.strip("\n"))


def header(name, title, intro):
    badge = f"[![Open In Colab]({BADGE})]({COLAB_URL.format(name=name)})"
    return [md(f"# {title}\n\n{badge}\n\n{intro.strip()}")]


INSTALL = f'''
# In Colab, install kfac_keras from its repository (set KFAC_KERAS_REPO to your
# fork's URL if you publish it elsewhere). Anywhere else this cell installs
# nothing: there the package is expected to be installed already
# (`pip install -e .` in a clone of the repository).
import os
import sys
import time

KFAC_KERAS_REPO = os.environ.get("KFAC_KERAS_REPO", "https://github.com/{GITHUB_REPO}")
if "google.colab" in sys.modules:
    %pip install -q "kfac_keras @ git+{{KFAC_KERAS_REPO}}"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # quiet TensorFlow's C++ logging
notebook_start = time.perf_counter()
'''

SIZE_MD = '''
**Size switch.** With the environment variable `KFAC_KERAS_NOTEBOOK_SMALL=1` (as in CI) every
run below uses few steps and little data, only to check that each cell works; without it the
notebook uses its tutorial sizes. The first output line says which size produced the outputs
you are looking at.
'''

FOOTER = '''
print(f"This notebook ran in {time.perf_counter() - notebook_start:.0f} s.", nbu.size_banner())
'''

KFAC_PARAGRAPH = '''
**What K-FAC is.** K-FAC (Kronecker-factored approximate curvature, Martens & Grosse 2015)
takes approximate *natural-gradient* steps `(F + λI)⁻¹ ∇h`, where `F` is the Fisher
information matrix: the curvature of the loss as seen through the model's predictive
distribution. `F` is far too large to store, so K-FAC keeps one block per layer and writes
each block as a Kronecker product `A ⊗ G` of two small matrices: `A`, the second moment of
the layer's inputs, and `G`, the second moment of the gradients with respect to the layer's
pre-activations (computed with targets *sampled* from the model, which makes it the Fisher
rather than the empirical Fisher). The inverse of `A ⊗ G` is `A⁻¹ ⊗ G⁻¹`, so a step only
needs the inverses of the small factors, which are refreshed every few steps. Each step
costs more than an SGD or Adam step, and in exchange far fewer steps are needed.
'''


# --------------------------------------------------------------------------
# quickstart
# --------------------------------------------------------------------------

def quickstart():
    cells = header("quickstart", "K-FAC for Keras in one minute", '''
Train an MNIST classifier with `model.compile(optimizer=kfac_keras.KFAC())`, then compare its
training loss with Adam's on the same model, the same initial weights and the same batches.
''')
    cells += [md(KFAC_PARAGRAPH), code(INSTALL), md(SIZE_MD), code('''
import keras
import matplotlib.pyplot as plt

import kfac_keras
from kfac_keras.datasets import load_mnist
from kfac_keras.examples import notebook_utils as nbu

print(nbu.size_banner())
'''), md('''
## Data

`load_mnist` uses the folder named by `KFAC_KERAS_DATA_DIR` if it is set (CI points it at a
copy of the MNIST files), else `keras.datasets.mnist` (downloaded in Colab), and says which
one it used. We keep the last 20% of the images for validation.
'''), code('''
x, y, source = load_mnist()
print("Data:", source)
split = int(0.8 * len(x))
x_train, y_train = x[:split], y[:split]
x_val, y_val = x[split:], y[split:]
train_size = nbu.choose(small=2000, tutorial=len(x_train))
x_train, y_train = x_train[:train_size], y_train[:train_size]
EPOCHS = nbu.choose(small=2, tutorial=5)
BATCH_SIZE = 500
print(f"{len(x_train)} training and {len(x_val)} validation images; "
      f"{EPOCHS} epochs of batches of {BATCH_SIZE}")
'''), md('''
## Train with K-FAC

Compile with `kfac_keras.KFAC()` (defaults: learning rate 0.01, momentum 0.9, damping 1e-3,
factor statistics every 10 steps, factor inverses every 20) and add **one callback**,
`kfac_keras.KFACCallback()`. The callback registers the layers with the optimizer (it prints
which layer got which Fisher block) and swaps in a training step that captures each layer's
inputs and pre-activation gradients in the same forward pass. Without it, the first step raises
an error that says what to add; K-FAC never silently trains as plain SGD.

The epoch lines show K-FAC's own values next to the loss: the current `damping` and the
norm of the last update (`update_norm`).
'''), code('''
def make_model():
    keras.utils.set_random_seed(0)  # same initial weights and batch order for both runs
    return keras.Sequential([
        keras.Input((784,)),
        keras.layers.Dense(256, activation="relu"),
        keras.layers.Dense(10),  # logits
    ])

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

model = make_model()
model.compile(optimizer=kfac_keras.KFAC(), loss=LOSS, metrics=["accuracy"])
kfac_timer = nbu.FitTimer()  # per-batch loss and training time, for the plot
kfac_history = model.fit(
    x_train, y_train, batch_size=BATCH_SIZE, epochs=EPOCHS,
    validation_data=(x_val, y_val), verbose=2,
    callbacks=[kfac_keras.KFACCallback(), kfac_timer])
'''), md('''
## The same with Adam
'''), code('''
model = make_model()
model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=LOSS, metrics=["accuracy"])
adam_timer = nbu.FitTimer()
adam_history = model.fit(
    x_train, y_train, batch_size=BATCH_SIZE, epochs=EPOCHS,
    validation_data=(x_val, y_val), verbose=2, callbacks=[adam_timer])
'''), md('''
## K-FAC vs Adam

Training loss per step (a 10-step moving average of the per-batch loss) against the number
of steps (left) and against the training time (right; the first two steps, which include
tracing, are charged the median step time, and the validation between epochs is left out).
'''), code('''
runs = [{"label": "K-FAC", "history": kfac_timer.result()},
        {"label": "Adam (lr 1e-3)", "history": adam_timer.result()}]
fig = nbu.plot_loss_curves(runs, ylabel="cross-entropy", title="MNIST MLP, training loss")
plt.show()
for label, history in [("K-FAC", kfac_history), ("Adam", adam_history)]:
    print(f"{label:5s}: final validation accuracy {history.history['val_accuracy'][-1]:.4f}, "
          f"training loss {history.history['loss'][-1]:.4f}")
print(f"median step time: K-FAC {runs[0]['history']['per_step_ms']:.0f} ms, "
      f"Adam {runs[1]['history']['per_step_ms']:.0f} ms")
'''), md('''
## Next

* `autoencoder_paper.ipynb`: the paper's deep autoencoder, with K-FAC's adaptive step size,
  momentum and damping, against SGD with momentum and Adam.
* `convnet_and_transformer.ipynb`: convolutions, normalization layers, attention and
  embeddings; choosing a block per layer.
* `custom_loop_and_distributed.ipynb`: K-FAC in your own training loop, and `MirroredStrategy`.
* `tuning.ipynb`: what damping, learning rate, `T_cov`/`T_inv` and adaptive damping do.
'''), code(FOOTER)]
    return cells


# --------------------------------------------------------------------------
# autoencoder_paper
# --------------------------------------------------------------------------

def autoencoder_paper():
    cells = header("autoencoder_paper", "The K-FAC paper's deep autoencoder", '''
Martens & Grosse (2015) show K-FAC's speed on the deep MNIST autoencoder of Hinton &
Salakhutdinov (2006), `784-1000-500-250-30-250-500-1000-784`, a classic hard optimization
problem for first-order methods. This notebook trains it with K-FAC as in the paper (step size
and momentum chosen every step by the quadratic model, damping adapted by the
Levenberg-Marquardt rule) and with SGD with momentum and Adam, and reports the **steps** and
the **seconds** each needs to reach a set of training-loss targets.
''')
    cells += [code(INSTALL), md(SIZE_MD), code('''
import keras
import matplotlib.pyplot as plt
import numpy as np

import kfac_keras
from kfac_keras.datasets import load_mnist
from kfac_keras.examples import notebook_utils as nbu
from kfac_keras.examples.autoencoder import PIXELS, make_autoencoder

print(nbu.size_banner())
x, _, source = load_mnist()
print("Data:", source)
STEPS = nbu.choose(small=12, tutorial=120)
BATCH_SIZE = nbu.choose(small=250, tutorial=500)
TARGETS = nbu.choose(small=(450, 400), tutorial=(250, 200, 150, 120))
print(f"{STEPS} steps of batches of {BATCH_SIZE}; targets (summed CE per image): {TARGETS}")
'''), md('''
## Model and loss

`make_autoencoder()` builds the network with tanh hidden units, a linear 30-unit code layer and
a logit output, trained with `BinaryCrossentropy(from_logits=True)` on the pixel intensities.
Keras averages that loss over the 784 pixels; like the paper we report the cross-entropy
**summed over the pixels of an image** (784 × the Keras loss). The targets are pixel
intensities in [0, 1], not binary values, so this loss never reaches 0.

With only the 10,000-image MNIST test set available (as in CI), that set is the training
set, and the absolute loss values are not comparable with the paper's.
'''), code('''
model = make_autoencoder()
model.summary()
LOSS = keras.losses.BinaryCrossentropy(from_logits=True)
'''), md('''
## K-FAC as in the paper

`AdaptiveOptions(quadratic_model_step=True)` chooses the step size `α` and the momentum `μ`
of every step by minimizing the local quadratic model of the loss, using products with the
exact mini-batch Fisher (paper section 7); `learning_rate` and `momentum` are then left
unset. `adapt_damping=True` adapts the damping `λ` every 5 steps with the
Levenberg-Marquardt rule (section 6.5): `λ` shrinks when the quadratic model predicted the
loss change well (reduction ratio `ρ > 3/4`) and grows when it did not (`ρ < 1/4`).

Every optimizer starts from the same initial weights and sees the same batches in the same
order (`nbu.train`, a wrapper of the benchmark harness `kfac_keras.examples.common`).
'''), code('''
def make_kfac():
    return kfac_keras.KFAC(
        damping=0.1,  # the initial damping; adapted from here on
        adaptive=kfac_keras.AdaptiveOptions(quadratic_model_step=True, adapt_damping=True),
        seed=0)

kfac_run = nbu.train(make_autoencoder, make_kfac, x, None, LOSS, steps=STEPS,
                     batch_size=BATCH_SIZE, label="K-FAC (adaptive)", report=True)
print(f"K-FAC: {kfac_run['per_step_ms']:.0f} ms/step, final loss "
      f"{kfac_run['final_loss'] * PIXELS:.1f}")
'''), md('''
## Baselines

SGD with momentum 0.9 and Adam, each at the learning rate that did best in 60-step trial runs
at batch size 500 (SGD: 0.1, 0.3, 1; Adam: 1e-3, 3e-3). For a full learning-rate grid search
run `python -m kfac_keras.examples.autoencoder`.
'''), code('''
baselines = {
    "SGD+momentum (lr 1)": lambda: keras.optimizers.SGD(1.0, momentum=0.9),
    "Adam (lr 3e-3)": lambda: keras.optimizers.Adam(3e-3),
}
runs = [kfac_run]
for label, make_optimizer in baselines.items():
    run = nbu.train(make_autoencoder, make_optimizer, x, None, LOSS, steps=STEPS,
                    batch_size=BATCH_SIZE, label=label)
    print(f"{label}: {run['per_step_ms']:.0f} ms/step, final loss {run['final_loss'] * PIXELS:.1f}")
    runs.append(run)
'''), md('''
## Steps and seconds to the targets

A target counts as reached at the first step where the 10-step moving average of the
per-batch training loss is at or below it; `-` means not within the run. Seconds are
wall-clock run time on this machine (tracing and compilation excluded).
'''), code('''
print(nbu.target_table(runs, TARGETS, loss_scale=PIXELS))
fig = nbu.plot_loss_curves(runs, loss_scale=PIXELS, targets=TARGETS,
                           ylabel="summed CE per image", title="Deep autoencoder, MNIST")
plt.show()
'''), md('''
## What K-FAC's adaptive rules did

The step size `α` and momentum `μ` that the quadratic model chose at each step, and the damping
`λ` with the reduction ratio `ρ` that drives it (`ρ` is computed every 5 steps).
'''), code('''
values = kfac_run["values"]
fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
axes[0].plot(values["alpha"], label="α (step size)")
axes[0].plot(values["mu"], label="μ (momentum)")
axes[0].legend()
axes[1].semilogy(values["damping"])
axes[1].set_ylabel("damping λ")
rho = values["rho"]
axes[2].plot(np.flatnonzero(np.isfinite(rho)), rho[np.isfinite(rho)], ".")
axes[2].axhline(0.25, color="grey", ls="--", lw=0.8)
axes[2].axhline(0.75, color="grey", ls="--", lw=0.8)
axes[2].set_ylabel("reduction ratio ρ")
for ax in axes:
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
fig.tight_layout()
plt.show()
'''), code(FOOTER)]
    return cells


# --------------------------------------------------------------------------
# convnet_and_transformer
# --------------------------------------------------------------------------

def convnet_and_transformer():
    cells = header("convnet_and_transformer", "K-FAC for convnets and Transformers", '''
K-FAC has structured Fisher blocks for more than Dense layers: convolutions (KFC, Grosse &
Martens 2016), depthwise and grouped convolutions, `EinsumDense` (the projections inside
`MultiHeadAttention`), embeddings, and the scale and offset of normalization layers. Anything
else gets a diagonal block. This notebook trains a small CNN on MNIST and a small Transformer
encoder on a synthetic sequence task, reads the **registration report** (which block each
layer got, and why), and changes the choice for some layers.
''')
    cells += [code(INSTALL), md(SIZE_MD), code('''
import keras
import matplotlib.pyplot as plt

import kfac_keras
from kfac_keras.datasets import load_mnist
from kfac_keras.examples import notebook_utils as nbu
from kfac_keras.examples.small_models import random_token_data, small_cnn, small_transformer

print(nbu.size_banner())
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
'''), md('''
## A small CNN on MNIST

`small_cnn()` is `Conv2D → BatchNormalization → ReLU → MaxPooling2D`, twice, then a Dense
classifier. `KFACCallback` prints the registration report when training starts: one row per
block with its kind, the shapes of its factors and their memory.
'''), code('''
images, labels, source = load_mnist(flatten=False)
print("Data:", source)
split = int(0.8 * len(images))
train_size = nbu.choose(small=1000, tutorial=split)
x_train, y_train = images[:train_size], labels[:train_size]
x_val, y_val = images[split:], labels[split:]
CNN_EPOCHS = nbu.choose(small=1, tutorial=3)
print(f"{len(x_train)} training and {len(x_val)} validation images, {CNN_EPOCHS} epochs")

cnn_kfac = nbu.fit_and_record(
    small_cnn, kfac_keras.KFAC(learning_rate=0.05, damping=0.1, seed=0), LOSS,
    x_train, y_train, epochs=CNN_EPOCHS, batch_size=250, validation_data=(x_val, y_val),
    label="K-FAC, automatic blocks")
'''), md('''
Reading the report:

* `conv1`, `conv2`: **KFC** blocks. The input factor is over the `3×3×channels` patches
  (spatial positions count as extra examples), the output factor over the filters.
* `bn1`, `bn2`: **scale-and-shift** blocks, a 2×2 block for each channel's `(γ, β)` pair.
* `logits`: a Dense **Kronecker** block (the `+1` in the input factor is the bias).

## Choosing blocks per layer

`layer_blocks` maps a layer *name* or *class name* to `"auto"`, `"kronecker"` (the structured
block; an error if the layer has none), `"diagonal"` or `"identity"` (plain gradient, the same
as listing the layer in `exclude_layers`). A name beats a class. Here both normalization
layers get diagonal blocks instead of their 2×2 blocks (a cruder approximation that ignores the
coupling of each channel's scale and offset); the report shows the choice and a note. A cruder
block can need more damping: with `damping=1e-2` instead of `0.1`, this run diverges on this
data while the automatic blocks still train (`tuning.ipynb` shows what damping does).
'''), code('''
cnn_choices = nbu.fit_and_record(
    small_cnn,
    kfac_keras.KFAC(learning_rate=0.05, damping=0.1, seed=0,
                    layer_blocks={"BatchNormalization": "diagonal"}),
    LOSS, x_train, y_train, epochs=CNN_EPOCHS, batch_size=250,
    validation_data=(x_val, y_val), label="K-FAC, diagonal blocks for the BNs")
'''), md('''
`exclude_layers` gives layers the plain gradient. To see what a choice does without training,
attach the optimizer to a model yourself (`KFACCallback` and `make_train_step` do this) and
read the report:
'''), code('''
optimizer = kfac_keras.KFAC(exclude_layers=["bn1", "bn2"])
print(optimizer.attach(small_cnn()).report())
'''), md('''
Asking for a Kronecker block where none exists is an error that says why:
'''), code('''
try:
    kfac_keras.register(small_transformer(), layer_blocks={"position_embedding": "kronecker"})
except ValueError as error:
    print("ValueError:", error)
'''), md('''
Both CNN runs next to Adam, with the same initial weights and batches:
'''), code('''
cnn_adam = nbu.fit_and_record(
    small_cnn, keras.optimizers.Adam(1e-3), LOSS, x_train, y_train, epochs=CNN_EPOCHS,
    batch_size=250, validation_data=(x_val, y_val), label="Adam (lr 1e-3)")
cnn_runs = [cnn_kfac, cnn_choices, cnn_adam]
fig = nbu.plot_loss_curves(cnn_runs, ylabel="cross-entropy", title="small CNN, MNIST")
plt.show()
for run in cnn_runs:
    print(f"{run['label']:40s} validation accuracy {run['epochs']['val_accuracy'][-1]:.4f}, "
          f"{run['per_step_ms']:.0f} ms/step")
'''), md('''
## A small Transformer

`small_transformer()` is a one-block Transformer encoder: token embedding plus a learned
position embedding (a custom layer), `MultiHeadAttention` with a residual connection and
`LayerNormalization`, a position-wise feed-forward network, mean pooling and a Dense
classifier. The task (`random_token_data`) is synthetic: which of 4 token ranges is most
frequent in a sequence of 12 tokens.
'''), code('''
SEQ_EXAMPLES = nbu.choose(small=512, tutorial=8192)
tokens, token_labels = random_token_data(SEQ_EXAMPLES + 1024, seed=0)
t_train, l_train = tokens[:SEQ_EXAMPLES], token_labels[:SEQ_EXAMPLES]
t_val, l_val = tokens[SEQ_EXAMPLES:], token_labels[SEQ_EXAMPLES:]
SEQ_EPOCHS = nbu.choose(small=1, tutorial=6)

transformer_kfac = nbu.fit_and_record(
    small_transformer, kfac_keras.KFAC(learning_rate=0.05, damping=0.1, seed=0), LOSS,
    t_train, l_train, epochs=SEQ_EPOCHS, batch_size=128, validation_data=(t_val, l_val),
    label="K-FAC")
'''), md('''
Reading the report:

* `token_embedding`: an **embedding** block, `diag(token frequencies) ⊗ G`.
* `attention/query`, `key`, `value`, `attention_output`: `EinsumDense` **Kronecker** blocks,
  with the sequence positions (and heads) as extra examples.
* `feed_forward_1`, `feed_forward_2`, `logits`: Dense Kronecker blocks (positions as extra
  examples for the first two).
* `attention_norm`, `feed_forward_norm`: **scale-and-shift** blocks of the layer norms.
* `position_embedding`: a **diagonal** block, the fallback for a custom layer, with a note.
'''), code('''
transformer_adam = nbu.fit_and_record(
    small_transformer, keras.optimizers.Adam(1e-3), LOSS, t_train, l_train,
    epochs=SEQ_EPOCHS, batch_size=128, validation_data=(t_val, l_val), label="Adam (lr 1e-3)")
transformer_runs = [transformer_kfac, transformer_adam]
fig = nbu.plot_loss_curves(transformer_runs, ylabel="cross-entropy",
                           title="small Transformer, synthetic token task")
plt.show()
for run in transformer_runs:
    print(f"{run['label']:15s} validation accuracy {run['epochs']['val_accuracy'][-1]:.4f}, "
          f"{run['per_step_ms']:.0f} ms/step")
'''), md('''
The report is also available after training as `optimizer.registration.report()`, and as a list
of dicts (one per block) from `optimizer.registration.describe()`:
'''), code('''
for info in transformer_kfac["optimizer"].registration.describe()[:3]:
    print(info["block"], "|", info["kind"], "|", info["factor_shapes"])
'''), code(FOOTER)]
    return cells


# --------------------------------------------------------------------------
# custom_loop_and_distributed
# --------------------------------------------------------------------------

def custom_loop_and_distributed():
    cells = header("custom_loop_and_distributed", "K-FAC in a custom training loop, and with MirroredStrategy", '''
`model.fit` is not required: `kfac_keras.make_train_step` gives a training step to call from
your own loop. This notebook writes the usual `tf.GradientTape` loop for Adam, then the K-FAC
version of the same loop, and then tries both `fit` and the custom loop under
`tf.distribute.MirroredStrategy` with two replicas on the CPU.
''')
    cells += [code(INSTALL), md('''
`MirroredStrategy` needs several devices. On a CPU-only machine we split the CPU into two
*logical* devices; this has to happen before TensorFlow creates its first tensor, so it is the
first thing the notebook does after the install.
'''), code('''
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
print(tf.config.list_logical_devices("CPU"))
'''), md(SIZE_MD), code('''
import keras
import matplotlib.pyplot as plt
import numpy as np

import kfac_keras
from kfac_keras.datasets import load_mnist
from kfac_keras.examples import notebook_utils as nbu

print(nbu.size_banner())
x, y, source = load_mnist()
print("Data:", source)
STEPS = nbu.choose(small=20, tutorial=300)
BATCH_SIZE = 256
dataset = (tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=0)
           .repeat().batch(BATCH_SIZE, drop_remainder=True).take(STEPS))

def make_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((784,)),
                             keras.layers.Dense(128, activation="relu"),
                             keras.layers.Dense(10)])

loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
print(f"{STEPS} steps of batches of {BATCH_SIZE}")
'''), md('''
## The usual `tf.GradientTape` loop (Adam)
'''), code('''
model = make_model()
adam = keras.optimizers.Adam(1e-3)

@tf.function
def adam_step(x_batch, y_batch):
    with tf.GradientTape() as tape:
        loss = loss_fn(y_batch, model(x_batch, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    adam.apply_gradients(zip(grads, model.trainable_variables))
    return loss

adam_losses = [float(adam_step(xb, yb)) for xb, yb in dataset]
print(f"Adam: loss {adam_losses[0]:.3f} -> {adam_losses[-1]:.3f}")
'''), md('''
## The same loop with K-FAC

K-FAC needs each layer's inputs and the gradients with respect to its pre-activations **from
the same forward pass** as the loss, and every `cov_update_every` steps the gradient of a loss
on targets sampled from the model. So the step is built for you:
`make_train_step(model, optimizer, loss)` runs the forward pass under its own
`tf.GradientTape` with the layers instrumented, updates the curvature statistics and inverses
when they are due (inside `tf.cond`, no host round trip), preconditions the gradient and
applies the update. Wrap it in `tf.function` like any step. It returns the logs: the loss,
plus K-FAC's values (damping, update norm, skipped steps). Do **not** call
`optimizer.apply_gradients` yourself.

Everything else in the loop (metrics, logging, checkpoints, early stopping) stays yours.
'''), code('''
model = make_model()
kfac = kfac_keras.KFAC(learning_rate=0.01, damping=1e-3, seed=0)
kfac_step = tf.function(kfac_keras.make_train_step(model, kfac, loss_fn))
print(kfac.registration.report())  # make_train_step registered the layers

kfac_losses = []
for step, (xb, yb) in enumerate(dataset, start=1):
    logs = kfac_step(xb, yb)
    kfac_losses.append(float(logs["loss"]))
    if step % max(1, STEPS // 5) == 0:
        print(f"step {step:4d}  " + "  ".join(f"{k} {float(v):.4g}" for k, v in logs.items()))
'''), code('''
def moving_average(values, window=10):
    return np.convolve(values, np.ones(window) / window, mode="valid")

plt.figure(figsize=(6, 4))
plt.plot(moving_average(kfac_losses), label="K-FAC (custom loop)")
plt.plot(moving_average(adam_losses), label="Adam (custom loop)")
plt.yscale("log")
plt.xlabel("step")
plt.ylabel("training loss (10-step average)")
plt.legend()
plt.grid(True, which="both", alpha=0.3)
plt.show()
'''), md('''
## MirroredStrategy

Two replicas, each computing half of every global batch. The baseline first: Adam with `fit`
under the strategy.
'''), code('''
tf.get_logger().setLevel("WARNING")  # TensorFlow logs every all-reduce at INFO level
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
print("replicas in sync:", strategy.num_replicas_in_sync)
DIST_STEPS = nbu.choose(small=10, tutorial=100)
x_dist, y_dist = x[:DIST_STEPS * BATCH_SIZE], y[:DIST_STEPS * BATCH_SIZE]

with strategy.scope():
    model = make_model()
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss_fn)
history = model.fit(x_dist, y_dist, batch_size=BATCH_SIZE, epochs=1, shuffle=False, verbose=2)
'''), md('''
Now K-FAC under the same strategy. This version of kfac_keras does not support strategies with
more than one replica yet: K-FAC's periodic work (statistics, decompositions, non-finite
guards) runs inside `tf.cond`, where `MirroredStrategy` cannot all-reduce or update mirrored
variables. Rather than failing deep inside the first step, `KFACCallback` and `make_train_step`
raise `NotImplementedError` up front, with the reason. The two cells below try `fit` and a
custom loop; while the limitation lasts they print that error (any other error stops the
notebook), and once it is lifted they train.
'''), code('''
import textwrap

def report_unsupported(what, error):
    print(f"{what}: NotImplementedError in kfac_keras {kfac_keras.__version__}:")
    print(textwrap.fill(str(error), width=96, initial_indent="  ", subsequent_indent="  "))

with strategy.scope():
    model = make_model()
    model.compile(optimizer=kfac_keras.KFAC(learning_rate=0.01, damping=1e-3, seed=0),
                  loss=loss_fn)
try:
    history = model.fit(x_dist, y_dist, batch_size=BATCH_SIZE, epochs=1, shuffle=False,
                        verbose=2, callbacks=[kfac_keras.KFACCallback(verbose=0)])
    print("K-FAC + MirroredStrategy, fit: final loss", history.history["loss"][-1])
except NotImplementedError as error:
    report_unsupported("K-FAC + MirroredStrategy with fit", error)
'''), md('''
The custom loop under the strategy: `strategy.run` calls the K-FAC step on each replica's part
of the batch.
'''), code('''
@tf.function
def distributed_step(x_batch, y_batch):
    logs = strategy.run(replica_step, args=(x_batch, y_batch))
    return strategy.reduce("MEAN", logs["loss"], axis=None)

dist_dataset = strategy.experimental_distribute_dataset(
    tf.data.Dataset.from_tensor_slices((x_dist, y_dist)).batch(BATCH_SIZE, drop_remainder=True))
try:
    with strategy.scope():
        model = make_model()
        kfac = kfac_keras.KFAC(learning_rate=0.01, damping=1e-3, seed=0)
        replica_step = kfac_keras.make_train_step(model, kfac, loss_fn)
    dist_losses = [float(distributed_step(xb, yb)) for xb, yb in dist_dataset]
    print(f"K-FAC + MirroredStrategy, custom loop: loss {dist_losses[0]:.3f} -> "
          f"{dist_losses[-1]:.3f}")
except NotImplementedError as error:
    report_unsupported("K-FAC + MirroredStrategy with a custom loop", error)
'''), code(FOOTER)]
    return cells


# --------------------------------------------------------------------------
# tuning
# --------------------------------------------------------------------------

def tuning():
    cells = header("tuning", "Tuning K-FAC: damping, learning rate, T_cov/T_inv, adaptive damping", '''
What each of K-FAC's main knobs does, measured on one model (an MNIST MLP), each run from the
same initial weights on the same batches:

1. the damping `λ`,
2. the learning rate,
3. how often the curvature statistics (`T_cov`) and the inverses (`T_inv`) are refreshed,
4. adaptive damping (the Levenberg-Marquardt rule) and the quadratic-model step size and
   momentum, with plots of `λ`, `ρ`, `α` and `μ` over training.
''')
    cells += [code(INSTALL), md(SIZE_MD), code('''
import keras
import matplotlib.pyplot as plt
import numpy as np

import kfac_keras
from kfac_keras.datasets import load_mnist
from kfac_keras.examples import notebook_utils as nbu

print(nbu.size_banner())
x, y, source = load_mnist()
print("Data:", source)
STEPS = nbu.choose(small=15, tutorial=150)
BATCH_SIZE = 500
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

def make_model():
    return keras.Sequential([keras.Input((784,)),
                             keras.layers.Dense(256, activation="tanh"),
                             keras.layers.Dense(128, activation="tanh"),
                             keras.layers.Dense(10)])

def run(label, **options):
    """Trains a fresh model with KFAC(seed=0, **options); same weights and batches every time."""
    return nbu.train(make_model, lambda: kfac_keras.KFAC(seed=0, **options), x, y, LOSS,
                     steps=STEPS, batch_size=BATCH_SIZE, label=label)

def summary(runs):
    """Final smoothed loss, and the mean step time (which includes the steps that
    refresh the statistics and the inverses)."""
    for r in runs:
        print(f"{r['label']:40s} final loss {r['final_loss']:.4f}   "
              f"mean {r['mean_step_ms']:.0f} ms/step")

print(f"{STEPS} steps of batches of {BATCH_SIZE}")
'''), md('''
## 1. Damping

K-FAC inverts `F + λI`. A small `λ` trusts the curvature estimate: long steps in directions of
low curvature, which are fast when the estimate is good and unstable when it is not. A large
`λ` makes `(F + λI)⁻¹ ≈ I/λ`: the step becomes a gradient step of size `learning_rate / λ`,
so very large damping is just slow SGD. (With the default `inverse_method="cholesky"` the
damping is split between the two Kronecker factors, "factored Tikhonov" damping.)
'''), code('''
damping_runs = [run(f"damping {d:g}", learning_rate=0.01, damping=d)
                for d in nbu.choose(small=(1e-3, 1e-1), tutorial=(1e-4, 1e-3, 1e-2, 1e-1, 1.0))]
summary(damping_runs)
fig = nbu.plot_loss_curves(damping_runs, ylabel="cross-entropy", title="learning rate 0.01")
plt.show()
'''), md('''
## 2. Learning rate

The learning rate scales the preconditioned step (momentum 0.9 throughout). Learning rate and
damping interact: for directions where the curvature is below `λ`, the step is about
`learning_rate / λ` times the gradient.
'''), code('''
lr_runs = [run(f"learning rate {lr:g}", learning_rate=lr, damping=1e-3)
           for lr in nbu.choose(small=(0.01, 0.1), tutorial=(0.001, 0.003, 0.01, 0.03, 0.1))]
summary(lr_runs)
fig = nbu.plot_loss_curves(lr_runs, ylabel="cross-entropy", title="damping 1e-3")
plt.show()
'''), md('''
## 3. T_cov and T_inv

`cov_update_every` (`T_cov`) sets how often the factor statistics are recomputed (an extra
backward pass with sampled targets), and `inv_update_every` (`T_inv`) how often the factors are
decomposed (cubic in the layer widths). Refreshing less often makes steps cheaper; refreshing
too rarely lets the curvature estimate go stale. Compare the curves **per step** (left) and
**per second** (right).
'''), code('''
schedule_runs = [run(f"T_cov {c}, T_inv {i}", learning_rate=0.01, damping=1e-3,
                     cov_update_every=c, inv_update_every=i)
                 for c, i in nbu.choose(small=((1, 1), (10, 20)),
                                        tutorial=((1, 1), (10, 20), (50, 100)))]
summary(schedule_runs)
fig = nbu.plot_loss_curves(schedule_runs, ylabel="cross-entropy",
                           title="learning rate 0.01, damping 1e-3")
plt.show()
'''), md('''
## 4. Adaptive damping

With `AdaptiveOptions(adapt_damping=True)` the damping is adapted every
`damping_update_every` steps (5 by default) by the Levenberg-Marquardt rule: K-FAC compares
the actual change of the loss after an update with the change its quadratic model predicted,
`ρ = (h(θ + δ) − h(θ)) / (M(δ) − M(0))`. When `ρ > 3/4` the model was good and `λ` shrinks by
`(19/20)^5`; when `ρ < 1/4` it was poor and `λ` grows by the inverse factor. Below, three runs
with a fixed learning rate of 0.01 start from very different damping values.

What to look for: `ρ` measures how well the model predicted *the step that was taken*. With a
fixed learning rate and momentum the step is not the model's optimum, and a short step is
predicted well whatever `λ` is, so `ρ` stays near 1 and `λ` keeps shrinking until the steps
become too long and the loss rises; only then does `ρ` fall and `λ` grow again. A run that
starts with too little damping is hurt before the rule can catch up. The rule is at its best
together with the quadratic-model step of section 5, which chooses the step length from the
same model.
'''), code('''
adaptive = kfac_keras.AdaptiveOptions(adapt_damping=True)
adaptive_runs = [run(f"adaptive, initial damping {d:g}", learning_rate=0.01, damping=d,
                     adaptive=adaptive)
                 for d in nbu.choose(small=(1e-3,), tutorial=(1e-4, 1e-2, 1.0))]
summary(adaptive_runs)

fig, axes = plt.subplots(1, 3, figsize=(14, 3.5))
for r in adaptive_runs:
    values = r["values"]
    axes[0].semilogy(values["damping"], label=r["label"])
    rho = values["rho"]
    axes[1].plot(np.flatnonzero(np.isfinite(rho)), rho[np.isfinite(rho)], ".-", label=r["label"])
    axes[2].semilogy(nbu.common.moving_average(r["history"]["loss"]), label=r["label"])
axes[0].set_ylabel("damping λ")
axes[1].set_ylabel("reduction ratio ρ")
axes[1].axhline(0.25, color="grey", ls="--", lw=0.8)
axes[1].axhline(0.75, color="grey", ls="--", lw=0.8)
axes[2].set_ylabel("training loss (10-step average)")
for ax in axes:
    ax.set_xlabel("step")
    ax.grid(True, which="both", alpha=0.3)
axes[0].legend(fontsize=8)
fig.tight_layout()
plt.show()
'''), md('''
## 5. Step size and momentum from the quadratic model

With `AdaptiveOptions(quadratic_model_step=True)` there is no learning rate or momentum to tune:
every step, `α` and `μ` minimize the quadratic model along the preconditioned gradient and the
previous update (two extra forward-mode passes per step). Combined with adaptive damping, this
is the full algorithm of the paper.
'''), code('''
full_run = run("quadratic-model α, μ + adaptive damping", damping=1e-2,
               adaptive=kfac_keras.AdaptiveOptions(quadratic_model_step=True, adapt_damping=True))
reference = next(r for r in lr_runs if r["label"] == "learning rate 0.01")
summary([full_run, reference])

values = full_run["values"]
fig, axes = plt.subplots(1, 3, figsize=(14, 3.5))
axes[0].plot(values["alpha"], label="α (step size)")
axes[0].plot(values["mu"], label="μ (momentum)")
axes[0].legend()
axes[1].semilogy(values["damping"])
axes[1].set_ylabel("damping λ")
for r in (full_run, reference):
    axes[2].semilogy(nbu.common.moving_average(r["history"]["loss"]), label=r["label"])
axes[2].set_ylabel("training loss (10-step average)")
axes[2].legend(fontsize=8)
for ax in axes:
    ax.set_xlabel("step")
    ax.grid(True, which="both", alpha=0.3)
fig.tight_layout()
plt.show()
'''), md('''
## Rules of thumb

* Start with the defaults (`learning_rate=0.01`, `momentum=0.9`, `damping=1e-3`), then try
  damping over a few powers of ten; it is usually the most important knob.
* If training is unstable, raise the damping before lowering the learning rate; if it is slow
  and steady, lower the damping.
* Raise `T_cov`/`T_inv` until the per-second curve stops improving; on a CPU the
  decompositions dominate for wide layers.
* `AdaptiveOptions(quadratic_model_step=True, adapt_damping=True)` (the paper's algorithm)
  leaves only the initial damping to choose, at the cost of extra forward passes. Adaptive
  damping alone, with a fixed learning rate, can let the damping drift too low (section 4).
'''), code(FOOTER)]
    return cells


NOTEBOOKS = {
    "quickstart": quickstart,
    "autoencoder_paper": autoencoder_paper,
    "convnet_and_transformer": convnet_and_transformer,
    "custom_loop_and_distributed": custom_loop_and_distributed,
    "tuning": tuning,
}


def build(name):
    """The notebook `name` as an ``nbformat`` node (no outputs)."""
    notebook = nbformat.v4.new_notebook()
    notebook.cells = NOTEBOOKS[name]()
    notebook.metadata = {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
        "colab": {"provenance": [], "toc_visible": True},
    }
    return notebook


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=sorted(NOTEBOOKS), default=None,
                        help="notebooks to write (default: all)")
    parser.add_argument("--execute", action="store_true",
                        help="run each notebook and save its outputs")
    parser.add_argument("--small", action="store_true",
                        help="with --execute: run at the small (CI) size")
    parser.add_argument("--timeout", type=int, default=1800,
                        help="seconds allowed per cell (default: %(default)s)")
    args = parser.parse_args(argv)
    for name in args.only or NOTEBOOKS:
        path = os.path.join(HERE, f"{name}.ipynb")
        nbformat.write(build(name), path)
        if not args.execute:
            print(f"wrote {path}")
            continue
        from kfac_keras.examples import notebook_utils  # noqa: PLC0415

        start = time.perf_counter()
        notebook_utils.execute_notebook(path, small=args.small, timeout=args.timeout,
                                        save_to=path)
        print(f"wrote and executed {path} ({'small' if args.small else 'tutorial'} size) "
              f"in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
