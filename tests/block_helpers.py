"""NumPy oracles and small utilities for the block tests (float64 throughout).

The oracles do not call kfac_keras code: they are the independent
computations the blocks are checked against. `pseudo_sample_captures` uses
the library's registration only to capture a layer's tensors in a forward pass.
"""

import itertools
import re

import keras
import numpy as np
import pytest
import tensorflow as tf


class VariableFactory:
    """Stands in for the optimizer in `block.build(...)`: creates variables."""

    def __init__(self):
        self.variables = []

    def add_variable(self, shape, initializer="zeros", dtype="float32", name=None):
        init = keras.initializers.get(initializer)
        variable = keras.Variable(init(tuple(shape), dtype=dtype), dtype=dtype, name=name)
        self.variables.append(variable)
        return variable


# What TensorFlow's CPU convolution kernels say when they cannot run a layout.
_CPU_KERNEL_LIMITS = ("only supports NHWC", "only supports NDHWC",
                      "not yet support dilation", "does not support dilation",
                      "only supports NWC", "The Conv2D op currently only supports",
                      "Unimplemented")


def _kernel_message(message):
    for line in message.splitlines():
        if any(phrase in line for phrase in _CPU_KERNEL_LIMITS):
            # Drop TensorFlow's `{{function_node ...}}` prefix and terminal colours.
            line = re.sub(r"\x1b\[[0-9;]*m|\{\{[^}]*\}\}", "", line)
            return line.strip()[:240]
    return message.splitlines()[0][:240]


def seeded_layer(cls, shape, kwargs, filters, seed=0):
    """A layer of class `cls` with seeded random kernel and bias, built by a
    call on a seeded random input of `shape`; returns `(layer, x)`."""
    layer = cls(filters, bias_initializer=keras.initializers.RandomNormal(seed=seed + 1),
                kernel_initializer=keras.initializers.RandomNormal(seed=seed), **kwargs)
    x = np.random.default_rng(seed).normal(size=shape).astype("float32")
    try:
        layer(x)
    except (tf.errors.UnimplementedError, tf.errors.InvalidArgumentError) as error:
        # TensorFlow's CPU kernels without oneDNN run only channels-last, undilated
        # convolutions (oneDNN, on by default on some CPUs, runs the rest): a user of
        # this machine cannot run the layer at all, so there is no output to test.
        message = str(error)
        if not any(phrase in message for phrase in _CPU_KERNEL_LIMITS):
            raise
        pytest.skip(f"{cls.__name__}({kwargs}) does not run on this TensorFlow build's "
                    f"CPU kernels: {_kernel_message(message)}")
    return layer, x


def channels_last(array, layer):
    """`array` in channels-last layout for `layer`'s data format."""
    array = np.asarray(array)
    if layer.data_format == "channels_first":
        return np.moveaxis(array, 1, -1)
    return array


def built(block):
    block.build(VariableFactory())
    return block


def same_padding(size, kernel, stride, dilation):
    """TensorFlow's SAME padding `(before, after)` for one axis."""
    effective = (kernel - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


def numpy_patches(x, kernel_size, strides, dilation, padding):
    """Patches by explicit loops: `(B, *out, prod(kernel_size), C)`.

    `x` is channels-last `(B, *spatial, C)`; rows of each patch are kernel
    offsets in row-major order, like a row-major flattened Keras kernel.
    """
    x = np.asarray(x, np.float64)
    rank = len(kernel_size)
    spatial = x.shape[1:-1]
    pads = []
    for i in range(rank):
        if padding == "valid":
            pads.append((0, 0))
        elif padding == "causal":
            pads.append(((kernel_size[i] - 1) * dilation[i], 0))
        else:
            pads.append(same_padding(spatial[i], kernel_size[i], strides[i], dilation[i]))
    padded = np.zeros((x.shape[0],) + tuple(s + b + a for s, (b, a) in zip(spatial, pads))
                      + (x.shape[-1],))
    index = (slice(None),) + tuple(slice(b, b + s) for s, (b, _) in zip(spatial, pads))
    padded[index] = x
    out = [(padded.shape[1 + i] - (kernel_size[i] - 1) * dilation[i] - 1) // strides[i] + 1
           for i in range(rank)]
    offsets = list(itertools.product(*[range(k) for k in kernel_size]))
    result = np.zeros((x.shape[0],) + tuple(out) + (len(offsets), x.shape[-1]))
    for n in range(x.shape[0]):
        for position in itertools.product(*[range(o) for o in out]):
            for j, offset in enumerate(offsets):
                source = tuple(position[i] * strides[i] + offset[i] * dilation[i]
                               for i in range(rank))
                result[(n,) + position + (j,)] = padded[(n,) + source]
    return result


def with_ones(rows):
    """Appends the homogeneous coordinate to `(..., d)` rows."""
    rows = np.asarray(rows, np.float64)
    return np.concatenate([rows, np.ones(rows.shape[:-1] + (1,))], axis=-1)


def kfac_factors(input_rows, grad_rows, num_examples):
    """`A = rows^T rows / m`, `G = grads^T grads / R` (R = number of rows)."""
    a = np.asarray(input_rows, np.float64).reshape(-1, np.shape(input_rows)[-1])
    g = np.asarray(grad_rows, np.float64).reshape(-1, np.shape(grad_rows)[-1])
    return a.T @ a / num_examples, g.T @ g / g.shape[0]


def kronecker_damped_solve(a, g, v, damping, method):
    """The damped inverse of `A (x) G` applied to `V` (row-major vec), densely.

    `"eigh"`: `(kron(A, G) + damping I)^{-1} vec(V)`. `"cholesky"`/`"inverse"`:
    factored Tikhonov, `kron(A + pi gamma I, G + gamma/pi I)^{-1} vec(V)` with
    `pi = sqrt((tr A/dim A)/(tr G/dim G))`, `gamma = sqrt(damping)`.
    """
    a, g, v = (np.asarray(t, np.float64) for t in (a, g, v))
    if method == "eigh":
        matrix = np.kron(a, g) + damping * np.eye(a.shape[0] * g.shape[0])
    else:
        pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))
        gamma = np.sqrt(damping)
        matrix = np.kron(a + pi * gamma * np.eye(a.shape[0]),
                         g + gamma / pi * np.eye(g.shape[0]))
    return np.linalg.solve(matrix, v.reshape(-1)).reshape(v.shape)


def relative_error(actual, expected):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    return np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30)


def pseudo_sample_captures(model, layer, x):
    """Captures whose G is the *expected* G under the Gaussian of MSE.

    For `(1/d)||y - f||^2` the sampled output gradients `u` have
    `E[u u^T] = (2/d) I`. Feeding one capture per output coordinate `k`, with
    `u_k = sqrt(2/d) e_k` backpropagated to the pre-activation, makes the block
    sum `sum_k u_k u_k^T = (2/d) I` exactly; the block sees the `d` captures as
    `d` uses (locations), so its `A` is `d` times and its `G` `1/d` times the
    single-use factors, and `kron(A, G)` is exact. Also returns the gradient
    rows `(d, m, T, C)` for the NumPy oracles.
    """
    import kfac_keras

    registration = kfac_keras.register(model)
    with tf.GradientTape(persistent=True) as tape:
        with registration.capture() as recorder:
            y = model(x)
    (inputs, preact), = recorder.for_layer(layer)
    d = y.shape[-1]
    rows = []
    for k in range(d):
        direction = np.zeros(y.shape, np.float32)
        direction[:, k] = np.sqrt(2.0 / d)
        rows.append(tape.gradient(y, preact, output_gradients=tf.constant(direction)))
    return [(inputs, r) for r in rows], inputs.numpy(), np.stack([r.numpy() for r in rows])


def exact_fisher(model, params, x):
    """mean_n J_n^T (2/d) J_n over the parameters `params` (flattened in order)."""
    total = None
    for n in range(len(x)):
        with tf.GradientTape() as tape:
            out = model(x[n:n + 1])[0]
        jac = np.concatenate([j.numpy().reshape(out.shape[0], -1)
                              for j in tape.jacobian(out, params)], axis=1).astype(np.float64)
        term = jac.T @ jac * (2.0 / out.shape[0])
        total = term if total is None else total + term
    return total / len(x)
