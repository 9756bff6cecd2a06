"""Where each ONNX axis lives in the TFLite tensor: NCHW becomes NHWC, a channel shuffle's rank-5 tensor a 4-D one,
and whether a reshape then moves data."""

import numpy as np

NHWC = (0, 2, 3, 1)
# Rank 5 appears in a channel shuffle, N x groups x C/groups x H x W. It is stored as N x HW x groups x C/groups:
# splitting the channel axis stays a reshape that moves no data, as in NCHW, and the shuffle is a 4-D transpose,
# which CMSIS-NN's kernel runs (it has no 5-D one).
SHUFFLE = ((0,), (3, 4), (1,), (2,))


def layout(rank: int) -> tuple[tuple[int, ...], ...]:
    """TFLite axis i holds the ONNX axes layout[i] (merged): channels last for image-like tensors, else ONNX order."""
    return tuple((i,) for i in NHWC) if rank == 4 else SHUFFLE if rank == 5 else tuple((i,) for i in range(rank))


def to_tflite_layout(array: np.ndarray) -> np.ndarray:
    """An ONNX-ordered array (a constant operand, or numbered elements) in its TFLite layout."""
    groups = layout(array.ndim)
    order = [axis for group in groups for axis in group]
    return array.transpose(order).reshape([int(np.prod([array.shape[a] for a in g])) for g in groups])


def layout_free(in_shape: tuple, out_shape: tuple) -> bool:
    """Whether a reshape moves no data once both tensors are stored in their TFLite layout: the elements, numbered
    in ONNX order, come out of both TFLite tensors in the same order (shapes are small: this is exact and cheap)."""
    numbered = np.arange(int(np.prod(in_shape))).reshape(in_shape)
    return np.array_equal(to_tflite_layout(numbered).ravel(), to_tflite_layout(numbered.reshape(out_shape)).ravel())


def same_padding(size: int, k: int, s: int, d: int) -> tuple[int, int]:
    total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2, total - total // 2
