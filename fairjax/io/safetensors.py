"""Torch-free, streaming safetensors reading and writing.

The safetensors format is: an 8-byte little-endian header length ``n``, ``n``
bytes of JSON ``{key: {"dtype", "shape", "data_offsets": [begin, end]}, ...,
"__metadata__": {...}}``, then the raw little-endian tensor bytes. We parse it
ourselves so that

* tensors are read one at a time, from a memory map or with ``pread`` (never the whole file),
* bfloat16 / float8 work through ``ml_dtypes`` (numpy has no bf16),
* a truncated or corrupt file is a one-line error naming the file,
* writing streams tensor by tensor into a temp file renamed into place.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterable, Iterator
from typing import Any

import ml_dtypes
import numpy as np

from fairjax.errors import CheckpointError

_DTYPES: dict[str, Any] = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}

_MAX_HEADER = 100 * 1024 * 1024


def dtype_name(dtype) -> str:
    try:
        return _NAMES[np.dtype(dtype)]
    except KeyError:
        raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors") from None


class SafetensorsReader:
    """Lazy reader of one ``.safetensors`` file.

    ``reader[key]`` returns a numpy array backed by the file's memory map (no
    copy until you transform it). Use as a context manager or call ``close``.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise CheckpointError(f"{self.path}: file not found")
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(
                    f"{self.path}: truncated or corrupt safetensors file (header of {n} bytes, file of {size})"
                )
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._info: dict[str, tuple[Any, tuple[int, ...], int, int]] = {}
        end_max = 0
        for key, info in header.items():
            try:
                dt = _DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: corrupt safetensors entry for {key!r}: {info}") from None
            if end - begin != int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize:
                raise CheckpointError(f"{self.path}: corrupt safetensors entry for {key!r}: size disagrees with shape")
            self._info[key] = (dt, shape, begin, end)
            end_max = max(end_max, end)
        self._data_start = 8 + n
        if self._data_start + end_max > size:
            raise CheckpointError(
                f"{self.path}: truncated safetensors file ({size} bytes, the header needs "
                f"{self._data_start + end_max}); re-download or re-export it"
            )
        self._file = open(self.path, "rb")
        self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def keys(self) -> list[str]:
        return list(self._info)

    def __contains__(self, key: str) -> bool:
        return key in self._info

    def __len__(self) -> int:
        return len(self._info)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._info[key][1]

    def dtype(self, key: str) -> np.dtype:
        return np.dtype(self._info[key][0])

    def __getitem__(self, key: str) -> np.ndarray:
        dt, shape, begin, end = self._info[key]
        if end == begin:
            return np.zeros(shape, dt)
        arr = np.frombuffer(self._mm, dtype=dt, count=(end - begin) // np.dtype(dt).itemsize,
                            offset=self._data_start + begin)
        return arr.reshape(shape)

    def read(self, key: str) -> np.ndarray:
        """A new array holding ``key``'s tensor, read with ``pread`` rather than through the memory map:
        no file page stays mapped, so reading a whole file this way holds only the arrays returned
        (safe to call from several threads at once)."""
        dt, shape, begin, end = self._info[key]
        out = np.empty(shape, dt)
        view = memoryview(out.reshape(-1).view(np.uint8))
        fd, pos, got = self._file.fileno(), self._data_start + begin, 0
        while got < end - begin:
            if hasattr(os, "preadv"):
                n = os.preadv(fd, [view[got:]], pos + got)
            else:  # pragma: no cover (platforms without preadv)
                chunk = os.pread(fd, end - begin - got, pos + got)
                view[got:got + len(chunk)] = chunk
                n = len(chunk)
            if n == 0:
                raise CheckpointError(f"{self.path}: truncated while reading {key!r}; re-download or re-export it")
            got += n
        return out

    def close(self) -> None:
        # Arrays handed out may still reference the map; let GC close it then.
        self._mm = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_safetensors(path: str | os.PathLike, items: Iterable[tuple[str, np.ndarray]] | dict,
                      metadata: dict[str, str] | None = None) -> None:
    """Write ``items`` to ``path`` atomically (temp file + rename).

    ``items`` may be a dict or a re-iterable of ``(key, array)``; the header is
    computed from shapes first, then tensors are written one at a time.
    """
    path = os.fspath(path)
    if isinstance(items, dict):
        items = list(items.items())
    else:
        items = list(items)
    header: dict[str, Any] = {}
    offset = 0
    for key, arr in items:
        if key in header:
            raise CheckpointError(f"{path}: duplicate key {key!r}")
        nbytes = int(np.prod(arr.shape, dtype=np.int64)) * np.dtype(arr.dtype).itemsize
        header[key] = {"dtype": dtype_name(arr.dtype), "shape": list(arr.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * (-len(hbytes) % 8)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(hbytes)))
            f.write(hbytes)
            for _, arr in items:
                a = np.ascontiguousarray(np.asarray(arr))
                if a.dtype.byteorder == ">":
                    a = a.astype(a.dtype.newbyteorder("<"))
                f.write(memoryview(a.reshape(-1).view(np.uint8)))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class ShardedReader:
    """A diffusers / transformers weight folder: one file, or shards with an index.

    ``ShardedReader(folder, prefix)`` looks for ``{prefix}.safetensors`` or
    ``{prefix}.safetensors.index.json`` (also the ``.fp16`` / ``.bf16`` variants
    when ``variant`` is given). Keys of all shards are exposed as one mapping.
    """

    def __init__(self, folder: str | os.PathLike, prefix: str, variant: str | None = None):
        folder = os.fspath(folder)
        self.folder = folder
        stem = f"{prefix}.{variant}" if variant else prefix
        single = os.path.join(folder, f"{stem}.safetensors")
        index = os.path.join(folder, f"{stem}.safetensors.index.json")
        if variant and not os.path.isfile(index):  # diffusers/transformers name variant indexes this way
            index = os.path.join(folder, f"{prefix}.safetensors.index.{variant}.json")
        self._readers: dict[str, SafetensorsReader] = {}
        self._where: dict[str, str] = {}
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: corrupt shard index ({e})") from None
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
            if missing:
                raise CheckpointError(f"{index} names shard(s) not in {folder}: {', '.join(missing)}")
            for s in shards:
                self._readers[s] = SafetensorsReader(os.path.join(folder, s))
            for key, s in weight_map.items():
                if key not in self._readers[s]:
                    raise CheckpointError(f"{index}: key {key!r} is not in shard {s}")
                self._where[key] = s
            for s, r in self._readers.items():
                for key in r.keys():
                    self._where.setdefault(key, s)
        elif os.path.isfile(single):
            self._readers[single] = SafetensorsReader(single)
            self._where = {k: single for k in self._readers[single].keys()}
        else:
            present = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
            raise CheckpointError(
                f"no {stem}.safetensors or {stem}.safetensors.index.json in {folder} "
                f"(found: {', '.join(present[:8]) or 'nothing'}); point at a diffusers/transformers weight folder"
            )
        metadata: dict[str, str] = {}
        for r in self._readers.values():
            metadata.update(r.metadata)
        self.metadata = metadata

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._readers[self._where[key]].shape(key)

    def dtype(self, key: str) -> np.dtype:
        return self._readers[self._where[key]].dtype(key)

    def __getitem__(self, key: str) -> np.ndarray:
        return self._readers[self._where[key]][key]

    def read(self, key: str) -> np.ndarray:
        """:meth:`SafetensorsReader.read` of the shard holding ``key``."""
        return self._readers[self._where[key]].read(key)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for key in self._where:
            yield key, self[key]

    def close(self) -> None:
        for r in self._readers.values():
            r.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
