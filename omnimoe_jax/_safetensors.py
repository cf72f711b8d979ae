"""Minimal reader and writer for the .safetensors format, so seed checkpoints load without torch.

Layout (https://github.com/huggingface/safetensors): an 8-byte little-endian header length, a JSON header
mapping each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets into the data that
follows the header; an optional "__metadata__" entry of strings), then the raw little-endian bytes.
"""

from __future__ import annotations

import json
import math
import os
import struct

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor in the file as a numpy array (bf16 as `ml_dtypes.bfloat16`)."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise ValueError(f"{os.fspath(path)!r} is not a safetensors file: shorter than its 8-byte header length")
    (header_len,) = struct.unpack("<Q", raw[:8])
    if 8 + header_len > len(raw):
        raise ValueError(f"{os.fspath(path)!r} is not a safetensors file: header length {header_len} past end of file")
    where = os.fspath(path)
    try:
        header = json.loads(raw[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{where!r} is not a safetensors file: its header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{where!r} is not a safetensors file: its header is a {type(header).__name__}, not an object")
    data = memoryview(raw)[8 + header_len :]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise ValueError(f"tensor {name!r} in {where!r} needs dtype, shape and data_offsets, got {info!r}")
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"tensor {name!r} in {where!r} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        expected = math.prod(info["shape"]) * dtype.itemsize
        if not 0 <= begin <= end <= len(data) or end - begin != expected:
            raise ValueError(
                f"tensor {name!r} in {where!r}: data_offsets [{begin}, {end}) do not hold its shape "
                f"{info['shape']} of {info['dtype']} ({expected} bytes) within the {len(data)} data bytes"
            )
        tensors[name] = np.frombuffer(data[begin:end], dtype=dtype).reshape(info["shape"]).copy()
    return tensors


def save_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray]) -> None:
    """Write numpy arrays to a .safetensors file that `safetensors.torch.load_file` reads."""
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        array = np.asarray(tensors[name])  # tobytes() below writes C order; 0-d arrays stay 0-d
        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        if dtype not in _NAMES:
            raise ValueError(f"tensor {name!r} has dtype {array.dtype}, which safetensors cannot store here")
        blob = array.astype(dtype, copy=False).tobytes()
        header[name] = {
            "dtype": _NAMES[dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        chunks.append(blob)
        offset += len(blob)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8-byte alignment with spaces
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for blob in chunks:
            f.write(blob)
