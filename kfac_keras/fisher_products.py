"""Jacobian-vector products of a model's output, for exact Fisher products.

`u^T F v = mean_n c_n (J_n u)^T H_n (J_n v)` (`kfac_keras.quadratic_model`)
needs `J v`, the derivative of the model output along a parameter direction
`v`. Two ways to compute it:

* **Forward mode** (`"forward"`): `tf.autodiff.ForwardAccumulator`, one
  forward pass carrying tangents.
* **Double backward** (`"double_backward"`): `J^T u` is linear in the output
  cotangent `u`, so `J v = d/du [(J^T u) . v]`. One forward pass, one
  backward pass recorded on an outer tape, and the backward pass of that
  backward pass (evaluated at `u = 0`; the result does not depend on `u`).

Why forward mode fails through Keras's recurrent layers: inside a
`tf.function`, `ForwardAccumulator` computes the tangent of a `While` op by
tracing the op's *gradient* function with the loop's captured inputs, and
the resource handle of a variable read inside the loop body (the LSTM's
`recurrent_kernel`) reaches it as a loop output that has lost its handle
data; TensorFlow then raises `Tried to take gradients (or similar) of a
variable without handle data: ... lstm/while:7` (and, with the loop's
TensorList accumulators, a `variant`-vs-`int64` dtype `TypeError`). Eagerly
the loop is a Python loop and forward mode works; a variable read *before*
the loop works too. Reverse mode through `While` (what training uses) is
unaffected, and so is its second derivative, which is why the double-backward
product works there.

TensorFlow's `ForwardAccumulator` itself computes each op's tangent by the
same trick, op by op (`forwardprop._jvp_helper` runs the op's gradient
function under a tape), so the two methods give the same numbers and cost
about the same (`tools/fisher_product_cost.py`); only the `While` op differs.
`jvp_method(model)` picks `"double_backward"` for models with a layer that
runs a `While` loop (`keras.layers.RNN` and its subclasses, including those
inside `Bidirectional`) and `"forward"` otherwise.
"""

import keras
import tensorflow as tf

from kfac_keras import keras_internals

#: Accepted `method` values of `jacobian_vector_product`.
JVP_METHODS = ("auto", "forward", "double_backward")


def jvp_method(model):
    """The JVP method `"auto"` resolves to for `model`.

    Args:
        model: a Keras model (or layer).

    Returns:
        `"double_backward"` if `model` contains a recurrent layer (whose
        `While` loop forward mode cannot differentiate in graph mode), else
        `"forward"`.
    """
    layers = keras_internals.child_layers(model, include_self=True)
    if any(isinstance(layer, keras.layers.RNN) for layer in layers):
        return "double_backward"
    return "forward"


def forward_mode_jvp(forward_fn, variables, tangents):
    """`(y, J v)` by forward-mode differentiation.

    Args:
        forward_fn: callable `() -> y` that reads `variables`.
        variables: the variables the direction moves.
        tangents: the direction, one tensor per variable (same shapes).

    Returns:
        `(y, jvp)`, `jvp` shaped like `y` (zeros if `y` does not depend on
        the variables).
    """
    primals = [getattr(v, "value", v) for v in variables]
    tangents = [tf.cast(t, p.dtype) for t, p in zip(tangents, primals)]
    with tf.autodiff.ForwardAccumulator(primals, tangents) as accumulator:
        y = forward_fn()
    jvp = accumulator.jvp(y, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return y, jvp


def double_backward_jvp(forward_fn, variables, tangents):
    """`(y, J v)` as `d/du [(J^T u) . v]`, with reverse mode only.

    Args:
        forward_fn: callable `() -> y` that reads `variables`.
        variables: the variables the direction moves.
        tangents: the direction, one tensor per variable (same shapes).

    Returns:
        `(y, jvp)`, `jvp` shaped like `y` (zeros if `y` does not depend on
        the variables).
    """
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            y = forward_fn()
        # The cotangent only needs y's shape and dtype; J^T u is linear in
        # it, so its value (zero) does not affect the result.
        outputs = tf.nest.flatten(y)
        cotangents = [tf.zeros_like(output) for output in outputs]
        outer.watch(cotangents)
        vjp = inner.gradient(outputs, variables, output_gradients=cotangents,
                             unconnected_gradients=tf.UnconnectedGradients.ZERO)
        projection = tf.add_n(
            [tf.reduce_sum(tf.cast(g, tf.float32) * tf.cast(t, tf.float32))
             for g, t in zip(vjp, tangents)] + [tf.constant(0.0)])
    jvp = outer.gradient(projection, cotangents,
                         unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return y, tf.nest.pack_sequence_as(y, jvp)


def jacobian_vector_product(forward_fn, variables, tangents, method="forward"):
    """`(y, J v)` with the chosen method.

    Args:
        forward_fn: callable `() -> y` that reads `variables`.
        variables: the variables the direction moves (others stay fixed).
        tangents: the direction, one tensor per variable.
        method: `"forward"` (default) or `"double_backward"`; resolve
            `"auto"` with `jvp_method(model)` first.

    Returns:
        `(y, jvp)`.

    Raises:
        ValueError: for another `method`.
    """
    if method == "forward":
        return forward_mode_jvp(forward_fn, variables, tangents)
    if method == "double_backward":
        return double_backward_jvp(forward_fn, variables, tangents)
    raise ValueError(
        f"`method` must be 'forward' or 'double_backward' (resolve 'auto' with "
        f"jvp_method(model)); received {method!r}.")
