"""Convolution patches, extracted exactly as Keras' convolutions see them.

KFC (Grosse & Martens 2016) needs, at every output location `t` of a
convolution, the input patch `x_t` that the kernel is multiplied with, in the
same order as the kernel's flattening, so that

    output[n, t, :] = x_t @ reshape(kernel, (-1, filters)) (+ bias).

Keras kernels have shape `(*kernel_size, in_channels, filters)`; flattening
them row-major orders the rows by kernel offset (row-major over the spatial
kernel axes) and then by input channel. `extract_patches` returns patches of
shape `(batch, *output_spatial, num_offsets, channels)` with the offsets in the
same row-major order, so `reshape(patches, (batch, *output_spatial, -1))` lines
up with the kernel.

The padding, strides and dilation are those of the layer: `"valid"`, `"same"`
(TensorFlow's convention: `total = max((ceil(n/s) - 1) s + (k - 1) d + 1 - n, 0)`,
`total // 2` before and the rest after) and `"causal"` (1D only:
`(k - 1) d` zeros before). The patches are built from one strided slice of the
padded input per kernel offset, so no identity-kernel convolution is run.

Memory: the patches hold `batch * |T| * prod(kernel_size) * channels` floats
(`|T|` = number of output locations), i.e. `prod(kernel_size) / prod(strides)`
times the input. For 1x1 kernels the single slice *is* the (strided) input.
"""

import math

import tensorflow as tf

PADDINGS = ("valid", "same", "causal")


def to_channels_last(tensor, data_format):
    """Moves the channel axis of a `(batch, C, *spatial)` tensor to the end."""
    if data_format == "channels_last":
        return tensor
    if data_format != "channels_first":
        raise ValueError(
            "`data_format` must be 'channels_last' or 'channels_first'; "
            f"received {data_format!r}.")
    rank = len(tensor.shape)
    return tf.transpose(tensor, [0] + list(range(2, rank)) + [1])


def _size(tensor, axis):
    """Static size of `axis` when known, else a scalar int32 tensor."""
    static = tensor.shape[axis]
    return int(static) if static is not None else tf.shape(tensor)[axis]


def _maximum(a, b):
    if isinstance(a, int) and isinstance(b, int):
        return max(a, b)
    return tf.maximum(a, b)


def spatial_padding(size, kernel, stride, dilation, padding):
    """`(before, after)` zero padding of one spatial axis, as the layer pads.

    Args:
        size: input size along the axis (int or scalar tensor).
        kernel: kernel size along the axis.
        stride: stride along the axis.
        dilation: dilation rate along the axis.
        padding: one of `PADDINGS`.

    Returns:
        A pair `(before, after)` of ints or scalar tensors.
    """
    effective = (kernel - 1) * dilation + 1
    if padding == "valid":
        return 0, 0
    if padding == "causal":
        return effective - 1, 0
    if padding == "same":
        out = (size + stride - 1) // stride
        total = _maximum((out - 1) * stride + effective - size, 0)
        before = total // 2
        return before, total - before
    raise ValueError(f"`padding` must be one of {PADDINGS}; received {padding!r}.")


def extract_patches(inputs, kernel_size, strides, dilation_rate, padding,
                    data_format="channels_last"):
    """The input patch at every output location of a convolution.

    Args:
        inputs: `(batch, *spatial, C)` (or `(batch, C, *spatial)` with
            `channels_first`) tensor, the convolution's input.
        kernel_size: tuple of ints, one per spatial axis.
        strides: tuple of ints, one per spatial axis.
        dilation_rate: tuple of ints, one per spatial axis.
        padding: `"valid"`, `"same"` or `"causal"` (the last for 1D only).
        data_format: `"channels_last"` (default) or `"channels_first"`.

    Returns:
        A `(batch, *output_spatial, prod(kernel_size), C)` tensor (channels
        last), kernel offsets in row-major order.
    """
    rank = len(kernel_size)
    if not (len(strides) == len(dilation_rate) == rank):
        raise ValueError(
            "`kernel_size`, `strides` and `dilation_rate` must have one entry "
            f"per spatial axis; received {kernel_size}, {strides}, {dilation_rate}.")
    if padding == "causal" and rank != 1:
        raise ValueError("`padding='causal'` is only defined for 1D convolutions.")
    x = to_channels_last(inputs, data_format)
    if len(x.shape) != rank + 2:
        raise ValueError(
            f"Expected a rank-{rank + 2} input for a {rank}D convolution; "
            f"received shape {inputs.shape}.")
    pads = [spatial_padding(_size(x, 1 + i), kernel_size[i], strides[i],
                            dilation_rate[i], padding) for i in range(rank)]
    if any(not (isinstance(b, int) and isinstance(a, int) and a == b == 0)
           for b, a in pads):
        paddings = [[0, 0]] + [[b, a] for b, a in pads] + [[0, 0]]
        if all(isinstance(v, int) for pair in paddings for v in pair):
            x = tf.pad(x, paddings)
        else:
            x = tf.pad(x, tf.stack([tf.stack([tf.cast(v, tf.int32) for v in pair])
                                    for pair in paddings]))
    out_sizes = []
    for i in range(rank):
        effective = (kernel_size[i] - 1) * dilation_rate[i] + 1
        out_sizes.append((_size(x, 1 + i) - effective) // strides[i] + 1)

    slices = []
    for offset in _row_major_offsets(kernel_size):
        index = [slice(None)]
        for i in range(rank):
            start = offset[i] * dilation_rate[i]
            stop = start + (out_sizes[i] - 1) * strides[i] + 1
            index.append(slice(start, stop, strides[i]))
        index.append(slice(None))
        slices.append(x[tuple(index)])
    return tf.stack(slices, axis=-2)


def _row_major_offsets(kernel_size):
    offsets = [()]
    for size in kernel_size:
        offsets = [o + (k,) for o in offsets for k in range(size)]
    return offsets


class ConvGeometry:
    """A convolution layer's patch geometry, read once at registration.

    Args:
        layer: a built Keras convolution (plain, depthwise or separable).
    """

    def __init__(self, layer):
        self.kernel_size = tuple(int(k) for k in layer.kernel_size)
        self.strides = tuple(int(s) for s in layer.strides)
        self.dilation_rate = tuple(int(d) for d in layer.dilation_rate)
        self.padding = layer.padding
        self.data_format = layer.data_format
        self.num_offsets = math.prod(self.kernel_size)

    def example_rows(self, captures):
        """Per-example patch rows `(m, T, num_offsets, C_in)` and gradient rows
        `(m, T, C_out)`, float32, channels last; the uses of a shared layer are
        concatenated along the location axis `T`.

        Args:
            captures: `(inputs, preactivation_grads)` pairs, one per call.
        """
        patch_rows, grad_rows = [], []
        for capture in captures:
            inputs, grads = capture[0], capture[1]
            patches = extract_patches(
                tf.cast(inputs, tf.float32), self.kernel_size, self.strides,
                self.dilation_rate, self.padding, self.data_format)
            examples = tf.shape(patches)[0]
            patch_rows.append(tf.reshape(
                patches, [examples, -1, self.num_offsets, patches.shape[-1]]))
            grads = to_channels_last(tf.cast(grads, tf.float32), self.data_format)
            grad_rows.append(tf.reshape(grads, [examples, -1, grads.shape[-1]]))
        return tf.concat(patch_rows, axis=1), tf.concat(grad_rows, axis=1)

    def example_weights(self, captures, join):
        """Row weights `(m, T)` aligned with `example_rows` (output locations),
        or None; `join` is `kfac_keras.blocks.kronecker.join_location_weights`."""
        sizes = []
        for capture in captures:
            grads = to_channels_last(capture[1], self.data_format)
            sizes.append((tf.shape(grads)[0],
                          [grads.shape[a] if grads.shape[a] is not None else tf.shape(grads)[a]
                           for a in range(1, len(grads.shape) - 1)]))
        return join(captures, sizes)
