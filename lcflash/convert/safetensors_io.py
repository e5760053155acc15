"""A small memory-mapped safetensors reader and a streaming writer.

Our own so that bf16 reads and writes go through numpy (ml_dtypes) without a torch or device copy, tensors
are read lazily one by one, and a damaged file gives an error that names the file and the key.
"""

from __future__ import annotations

import json
import mmap
import os
import struct

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


class SafetensorsError(ValueError):
    pass


class SafetensorsFile:
    def __init__(self, path: str):
        self.path = path
        try:
            self._f = open(path, "rb")
            size = os.fstat(self._f.fileno()).st_size
            if size < 8:
                raise SafetensorsError(f"{path}: file too short to be safetensors ({size} bytes)")
            (n,) = struct.unpack("<Q", self._f.read(8))
            if n > size - 8:
                raise SafetensorsError(f"{path}: header length {n} exceeds file size {size} (truncated or corrupt)")
            header = json.loads(self._f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{path}: corrupt safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries = header
        self._base = 8 + n
        for key, e in header.items():
            start, end = e["data_offsets"]
            if e["dtype"] not in DTYPES:
                raise SafetensorsError(f"{path}: key {key!r} has unsupported dtype {e['dtype']}")
            want = int(np.prod(e["shape"], dtype=np.int64)) * np.dtype(DTYPES[e["dtype"]]).itemsize
            if end - start != want or self._base + end > size:
                raise SafetensorsError(f"{path}: key {key!r} data is truncated or inconsistent with its shape")
        self._mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ) if size > self._base else None

    def keys(self):
        return self.entries.keys()

    def shape(self, key: str) -> tuple:
        return tuple(self.entries[key]["shape"])

    def dtype(self, key: str) -> np.dtype:
        return np.dtype(DTYPES[self.entries[key]["dtype"]])

    def get(self, key: str) -> np.ndarray:
        """A read-only view into the mapped file (no copy until the caller converts it)."""
        e = self.entries[key]
        start, end = e["data_offsets"]
        dtype = np.dtype(DTYPES[e["dtype"]])
        arr = np.frombuffer(self._mm, dtype=dtype, count=(end - start) // dtype.itemsize, offset=self._base + start)
        return arr.reshape(e["shape"])


def write_safetensors(path: str, tensors, metadata: dict | None = None) -> None:
    """Writes [(key, shape, dtype, producer)] where producer() returns the array; one tensor in memory at a time."""
    header, offset = {}, 0
    for key, shape, dtype, _ in tensors:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[key] = {"dtype": NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key, shape, dtype, produce in tensors:
            arr = np.ascontiguousarray(produce(), dtype=dtype)
            if arr.shape != tuple(shape):
                raise ValueError(f"{key}: produced shape {arr.shape}, declared {tuple(shape)}")
            f.write(arr.tobytes())
        f.flush()
        os.fsync(f.fileno())
