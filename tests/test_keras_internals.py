"""Private Keras internals stay in `kfac_keras/keras_internals.py`.

The package touches Keras internals (`keras.src`, underscore attributes of
Keras objects) only through the wrappers of that module, so that a Keras
upgrade changes one file. The wrappers themselves are checked against the
public behaviour they stand in for, on a tiny model.
"""

import os
import re

import keras
import numpy as np

import kfac_keras
from kfac_keras import keras_internals

PACKAGE = os.path.dirname(kfac_keras.__file__)
#: Keras internals the package is known to need (see keras_internals.py).
PRIVATE_NAMES = (
    "keras.src", "_flatten_layers", "_compute_loss", "_loss_tracker", "_trainable_variables",
    "_get_variable_index", "_distributed_tf_update_step", "_distribution_strategy",
    "_clip_gradients", "_get_current_learning_rate", "_learning_rate", "_use_weight_decay",
    "_fn_kwargs", "data_adapter_utils", "scale_loss_for_distribution", "global_state",
)
#: Call sites in modules owned by other work in progress, to be switched to
#: the wrappers (remove an entry when its module no longer needs it).
PENDING = {}  # call sites still to switch to the wrappers: none
# The overrides Keras calls on the optimizer (they forward to the wrappers).
OVERRIDES = ("def _backend_update_step", "def _apply_weight_decay")


def _library_modules():
    for root, _, files in os.walk(PACKAGE):
        if os.path.join(PACKAGE, "examples") in root:
            continue  # the benchmark harness, not the library
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                yield os.path.relpath(path, PACKAGE), path


def test_private_keras_names_appear_only_in_keras_internals():
    offenders = {}
    for relative, path in _library_modules():
        if relative == "keras_internals.py":
            continue
        with open(path) as handle:
            text = handle.read()
        for override in OVERRIDES:
            text = text.replace(override, "")
        # Calls of the wrappers (some share the private name they wrap).
        text = re.sub(r"keras_internals\.\w+", "", text)
        found = {name for name in PRIVATE_NAMES
                 if re.search(r"(?<!\w)" + re.escape(name) + r"\b", text)}
        unexpected = found - PENDING.get(relative, set())
        if unexpected:
            offenders[relative] = sorted(unexpected)
    assert not offenders, f"use kfac_keras.keras_internals instead: {offenders}"


def test_wrappers_match_the_public_behaviour():
    keras.utils.set_random_seed(0)
    inner = keras.layers.Dense(2, name="inner")
    model = keras.Sequential([keras.Input((3,)), inner, keras.layers.Dense(1, name="out")])
    children = keras_internals.child_layers(model)
    assert ([layer for layer in children if not isinstance(layer, keras.layers.InputLayer)]
            == model.layers)
    assert keras_internals.own_trainable_variables(inner) == inner.trainable_variables
    optimizer = kfac_keras.KFAC(learning_rate=0.5, clipnorm=1.0, adaptive=None)
    optimizer.build(model.trainable_variables)
    assert (keras_internals.optimizer_trainable_variables(optimizer)
            == model.trainable_variables)
    velocity = keras_internals.optimizer_slot(optimizer, optimizer.velocities, inner.kernel)
    assert tuple(velocity.shape) == tuple(inner.kernel.shape)
    assert float(keras_internals.current_learning_rate(optimizer)) == 0.5
    keras_internals.learning_rate_variable(optimizer).assign(0.25)
    assert float(optimizer.learning_rate) == 0.25
    clipped, = keras_internals.clip_gradients(optimizer, [np.full((3, 2), 10.0, "float32")])
    np.testing.assert_allclose(np.linalg.norm(clipped), 1.0, rtol=1e-5)  # clipnorm=1
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    assert keras_internals.loss_function_options(loss)["from_logits"] is True
    assert isinstance(keras_internals.name_scope_stack(), list)
