"""Torch-free, streaming safetensors reading and writing.

The safetensors format is: an 8-byte little-endian header length ``n``, ``n``
bytes of JSON ``{key: {"dtype", "shape", "data_offsets": [begin, end]}, ...,
"__metadata__": {...}}``, then the raw little-endian tensor bytes. We parse it
ourselves so that

* tensors are read one at a time, from a memory map or with ``pread`` (never the whole file),
* bfloat16 / float8 work through ``ml_dtypes`` (numpy has no bf16),
* a truncated or corrupt file is a one-line error naming the file and the key: the header must be a
  JSON object whose entries tile the data section exactly (:func:`check_header`), and a sharded
  index may only name files in its own folder,
* :func:`check_float` refuses integer / boolean tensors where weights are expected (no silent cast),
* writing streams tensor by tensor into a temp file renamed into place (a full disk: the temp file is
  removed and the error carries the file's size, ``e.needed``).
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
from fairjax.io.fs import DISK_FULL, temp_path

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


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise CheckpointError(f"duplicate key {k!r}")
        out[k] = v
    return out


def parse_header(raw: bytes, path: str) -> dict:
    """The JSON header of a safetensors file: an object, no repeated key (a one-line error otherwise)."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    except CheckpointError as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    return header


def check_header(header: dict, data_size: int, path: str) -> tuple[dict[str, str], dict]:
    """``(metadata, {key: (dtype, shape, begin, end)})`` of a parsed header, validated as the safetensors
    format requires: every entry an object with a known ``dtype``, a ``shape`` of non-negative integers and
    integer ``data_offsets`` ``0 <= begin <= end`` with ``end - begin = prod(shape) * itemsize``; the
    entries, in offset order, tile the data section exactly (no overlap, no gap, nothing past its end).
    Anything else is a one-line :class:`CheckpointError` naming the file and the key."""
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ must map names to strings)")
    info: dict[str, tuple[Any, tuple[int, ...], int, int]] = {}
    for key, entry in header.items():
        bad = f"{path}: corrupt safetensors entry for {key!r}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise CheckpointError(f"{bad}: {entry!r} (need dtype, shape and data_offsets)")
        if entry["dtype"] not in _DTYPES:
            raise CheckpointError(f"{bad}: unknown dtype {entry['dtype']!r} (known: {', '.join(_DTYPES)})")
        shape, offsets = entry["shape"], entry["data_offsets"]
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise CheckpointError(f"{bad}: shape {shape!r} is not a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
            raise CheckpointError(f"{bad}: data_offsets {offsets!r} are not two non-negative integers")
        dt = _DTYPES[entry["dtype"]]
        begin, end = offsets
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
        if end < begin or end - begin != nbytes:
            raise CheckpointError(f"{bad}: data_offsets [{begin}, {end}] hold {end - begin} bytes, but "
                                  f"{entry['dtype']} x {tuple(shape)} needs {nbytes}")
        info[key] = (dt, tuple(shape), begin, end)
    pos = 0
    for key, (_, _, begin, end) in sorted(info.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin < pos:
            raise CheckpointError(f"{path}: corrupt safetensors entry for {key!r}: its bytes [{begin}, {end}) overlap "
                                  f"the previous tensor's (which end at {pos})")
        if begin > pos:
            raise CheckpointError(f"{path}: corrupt safetensors file: {begin - pos} bytes before {key!r} belong to "
                                  f"no tensor (offsets {pos}..{begin})")
        pos = end
    if pos > data_size:
        raise CheckpointError(f"{path}: truncated safetensors file (its tensors need {pos} bytes of data, the file "
                              f"has {data_size}); re-download or re-export it")
    if pos < data_size:
        raise CheckpointError(f"{path}: corrupt safetensors file: {data_size - pos} bytes after the last tensor "
                              "belong to no tensor")
    return metadata, info


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def is_float_dtype(dtype) -> bool:
    """Floating point (float64/32/16, bfloat16, float8): what model weights must be."""
    dt = np.dtype(dtype)
    return np.issubdtype(dt, np.floating) or dt in (np.dtype(ml_dtypes.bfloat16), np.dtype(ml_dtypes.float8_e4m3fn),
                                                    np.dtype(ml_dtypes.float8_e5m2))


def check_float(reader, keys, what: str) -> None:
    """One line listing every key of ``reader`` (header only) whose dtype is not floating point:
    an integer or boolean tensor where a weight is expected is never cast silently."""
    bad = [f"{k} ({dtype_name(reader.dtype(k))})" for k in keys if not is_float_dtype(reader.dtype(k))]
    if bad:
        raise CheckpointError(f"{what}: {len(bad)} tensor(s) are not floating point where weights are expected: "
                              f"{', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}; is the file mislabelled or "
                              "not a model checkpoint?")


class SafetensorsReader:
    """Lazy reader of one ``.safetensors`` file.

    ``reader[key]`` returns a numpy array backed by the file's memory map (no
    copy until you transform it). Use as a context manager or call ``close``.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise CheckpointError(f"{self.path}: file not found" if not os.path.isdir(self.path) else
                                  f"{self.path} is a folder; a .safetensors file was expected")
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
            header = parse_header(f.read(n), self.path)
        self._data_start = 8 + n
        self.metadata, self._info = check_header(header, size - self._data_start, self.path)
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
    tmp = temp_path(path)
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
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno in DISK_FULL:  # say how much this file needed
            e.needed, e.needed_for = 8 + len(hbytes) + offset, path
            e.filename = path
        raise


def _inside(folder: str, name: str) -> bool:
    """``name`` is a plain file name in ``folder`` (no separator, no ``..``, not absolute). A file there may
    still be a symlink (the Hugging Face cache links every file to its blob store)."""
    return bool(name) and name not in (".", "..") and "/" not in name and os.sep not in name \
        and not os.path.isabs(name)


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
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: corrupt shard index ({type(e).__name__}: {e})") from None
            if not isinstance(weight_map, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise CheckpointError(f"{index}: corrupt shard index (weight_map must map tensor names to file names)")
            shards = sorted(set(weight_map.values()))
            outside = [s for s in shards if not _inside(folder, s)]
            if outside:
                raise CheckpointError(f"{index} names shard(s) outside {folder}: {', '.join(outside)}; an index may "
                                      "only name files in its own folder")
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

    def file_of(self, key: str) -> str:
        """The path of the file that holds ``key``."""
        return self._readers[self._where[key]].path

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
