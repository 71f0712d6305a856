"""A GGUF file's metadata and tensor table, read in milliseconds.

gguf's own GGUFReader builds numpy views for every part of every field: for a 49k-token vocabulary and its
merges that is seconds per process, paid by the launcher and by every rank. This reader walks the header once
with struct, decodes the values, and leaves tensor data as byte views of one memory map (layout: llama.cpp's
docs/gguf.md, versions 2 and 3).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

_MAGIC = b"GGUF"
# value type id -> struct format of one scalar (8 = string, 9 = array are handled apart)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass
class GGUFTensor:
    name: str
    dims: tuple[int, ...]  # GGUF order (ne[0] first: the innermost, contiguous dimension)
    tensor_type: int  # a gguf.GGMLQuantizationType value
    data: np.ndarray  # uint8 bytes, shaped (*outer dims, bytes per row): what gguf.quants.dequantize takes


class GGUFFile:
    """`fields` maps each metadata key to its value (str, number, bool, or list); `tensors` is in file order."""

    def __init__(self, path: str):
        from gguf.constants import GGML_QUANT_SIZES  # deferred like every gguf import: GGUF users only

        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = self._map
        if buf[:4] != _MAGIC:
            raise ValueError(f"{path}: not a GGUF file (magic {bytes(buf[:4])!r})")
        version, n_tensors, n_fields = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        self._pos = 24  # after magic, version and the two counts
        self.fields: dict[str, Any] = {}
        for _ in range(n_fields):
            key = self._string()
            self.fields[key] = self._value(self._unpack("<I"))
        table = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._unpack("<I")
            dims = struct.unpack_from(f"<{n_dims}Q", buf, self._pos)
            self._pos += 8 * n_dims
            tensor_type, offset = struct.unpack_from("<IQ", buf, self._pos)
            self._pos += 12
            table.append((name, dims, tensor_type, offset))
        align = int(self.fields.get("general.alignment", 32))
        start = -(-self._pos // align) * align
        data = np.frombuffer(self._map, dtype=np.uint8)
        self.tensors = []
        for name, dims, tensor_type, offset in table:
            block, type_size = GGML_QUANT_SIZES[tensor_type]
            row_bytes = dims[0] // block * type_size
            rows = int(np.prod(dims[1:], dtype=np.int64))
            begin = start + offset
            view = data[begin : begin + rows * row_bytes].reshape(*reversed(dims[1:]), row_bytes)
            self.tensors.append(GGUFTensor(name, tuple(dims), tensor_type, view))

    def _unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self._map, self._pos)
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._unpack("<Q")
        text = self._map[self._pos : self._pos + n].decode("utf-8", errors="replace")
        self._pos += n
        return text

    def _value(self, kind: int) -> Any:
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            item_kind, count = self._unpack("<I"), self._unpack("<Q")
            if item_kind in _SCALARS:  # numbers in one read
                fmt = f"<{count}{_SCALARS[item_kind]}"
                values = list(struct.unpack_from(fmt, self._map, self._pos))
                self._pos += struct.calcsize(fmt)
                return values
            return [self._value(item_kind) for _ in range(count)]
        if kind not in _SCALARS:
            raise ValueError(f"GGUF metadata value type {kind} is unknown")
        return self._unpack("<" + _SCALARS[kind])
