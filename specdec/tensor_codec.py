"""Tensors on the wire: raw little-endian bytes with dtype and shape (never repeated float)."""

from __future__ import annotations

import math

import numpy as np
import torch

from specdec.errors import InvalidArgument
from specdec.v1 import common_pb2

_NUMPY_OF = {
    common_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    common_pb2.DTYPE_FLOAT16: np.dtype("<f2"),
    common_pb2.DTYPE_INT32: np.dtype("<i4"),
    common_pb2.DTYPE_INT64: np.dtype("<i8"),
}
_WIRE_OF = {
    torch.float32: common_pb2.DTYPE_FLOAT32,
    torch.float16: common_pb2.DTYPE_FLOAT16,
    torch.int32: common_pb2.DTYPE_INT32,
    torch.int64: common_pb2.DTYPE_INT64,
}


def encode_tensor(tensor: torch.Tensor) -> common_pb2.Tensor:
    """Serialize a CPU or GPU tensor of a supported dtype."""
    if tensor.dtype not in _WIRE_OF:
        raise ValueError(f"unsupported dtype on the wire: {tensor.dtype}")
    wire = _WIRE_OF[tensor.dtype]
    array = tensor.detach().cpu().contiguous().numpy().astype(_NUMPY_OF[wire], copy=False)
    return common_pb2.Tensor(data=array.tobytes(), dtype=wire, shape=list(tensor.shape))


def decode_tensor(message: common_pb2.Tensor, expected_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Parse a Tensor message, checking that dtype, shape and byte length agree."""
    if message.dtype not in _NUMPY_OF:
        raise InvalidArgument(f"tensor has unsupported dtype {message.dtype}")
    shape = tuple(int(d) for d in message.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"tensor shape {shape} has a negative dimension")
    if expected_shape is not None and shape != tuple(expected_shape):
        raise InvalidArgument(f"tensor shape {shape} does not match the expected {tuple(expected_shape)}")
    dtype = _NUMPY_OF[message.dtype]
    expected_bytes = math.prod(shape) * dtype.itemsize
    if len(message.data) != expected_bytes:
        raise InvalidArgument(
            f"tensor of shape {shape} and dtype {dtype} needs {expected_bytes} bytes, got {len(message.data)}"
        )
    array = np.frombuffer(message.data, dtype=dtype).reshape(shape)
    return torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=True))
