"""A strict, memory-mapped safetensors reader (numpy + ml_dtypes; nothing is unpickled).

Format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length ``n``,
``n`` bytes of UTF-8 JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{str: str}}``, then the data buffer; offsets are relative to the buffer start, row-major,
little-endian. We read it ourselves rather than through ``safetensors.numpy`` because that path
has no F8_E8M0 (and maps F8 types inconsistently across versions), and because every defect must
be reported with the file and the tensor it concerns.

Every header is checked before a byte of data is read: known dtype, non-negative integer shape,
``end - begin == prod(shape) * itemsize``, offsets inside the file, no two tensors overlapping, no
duplicate names. Tensors are returned as read-only views of a ``numpy.memmap``: the host holds a
tensor's pages only while it is being converted and placed.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os

import ml_dtypes
import numpy as np

from jaxfp4.checkpoint.errors import CheckpointError

#: safetensors dtype string -> numpy dtype (F8 and BF16 through ml_dtypes, bit-exact views).
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
}

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One header entry: ``dtype`` is the safetensors string (e.g. ``"F8_E4M3"``)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    end: int  # absolute file offset one past the last byte

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for k, v in pairs:
        if k in seen:
            raise CheckpointError(f"duplicate key {k!r} in the safetensors header", tensor=k)
        seen[k] = v
    return seen


class SafetensorsFile:
    """The header of one ``.safetensors`` file, validated; tensors read on demand."""

    def __init__(self, path: str):
        self.path = path
        self._mmap: np.memmap | None = None
        try:
            self.tensors, self.metadata = self._read_header()
        except CheckpointError as e:
            raise e.at(file=path) from None

    def _read_header(self) -> tuple[dict[str, TensorInfo], dict[str, str]]:
        size = os.path.getsize(self.path)
        if size < 8:
            raise CheckpointError(f"file is {size} bytes: too short for a safetensors header")
        with open(self.path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(f"header length {n} does not fit the {size}-byte file (truncated or not safetensors)")
            raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"header is not valid JSON: {e}") from None
        if not isinstance(header, dict):
            raise CheckpointError("header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        data_start, data_len = 8 + n, size - 8 - n
        tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            tensors[name] = self._entry(name, entry, data_start, data_len)
        spans = sorted((t.begin, t.end, t.name) for t in tensors.values() if t.nbytes)
        for (_, e0, a), (b1, _, b) in itertools.pairwise(spans):
            if b1 < e0:
                raise CheckpointError(f"data of {a!r} and {b!r} overlap (header offsets lie)", tensor=b)
        return tensors, metadata

    @staticmethod
    def _entry(name: str, entry: object, data_start: int, data_len: int) -> TensorInfo:
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise CheckpointError("header entry lacks dtype/shape/data_offsets", tensor=name)
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPES:
            raise CheckpointError(f"unknown safetensors dtype {dtype!r}", tensor=name)
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise CheckpointError(f"shape {shape!r} is not a list of non-negative integers", tensor=name)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise CheckpointError(f"data_offsets {offsets!r} is not [begin, end]", tensor=name)
        b, e = offsets
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if not 0 <= b <= e or e - b != expected:
            raise CheckpointError(
                f"data_offsets {offsets} span {e - b} bytes; {dtype}{shape} needs {expected} (header offsets lie)",
                tensor=name,
            )
        if e > data_len:
            raise CheckpointError(
                f"data_offsets end {e} is past the data buffer ({data_len} bytes): file truncated", tensor=name
            )
        return TensorInfo(name, dtype, tuple(shape), data_start + b, data_start + e)

    def read(self, name: str) -> np.ndarray:
        """The tensor as a read-only numpy view of the memory-mapped file (no copy)."""
        info = self.tensors[name]
        dt = DTYPES[info.dtype]
        if info.nbytes == 0:
            return np.zeros(info.shape, dt)
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._mmap[info.begin : info.end].view(dt).reshape(info.shape)

    def close(self) -> None:
        """Drop the memory map (views already returned keep it alive until they die)."""
        self._mmap = None
