"""Linked params: a component's Flax params read straight from the PyTorch checkpoint they were converted from.

A model cache entry (:mod:`fairjax.convert.cache`) need not hold a second, transposed copy of a 5 GB UNet:
when a conversion keeps each tensor's dtype, the component folder holds ``params.link.json`` instead of
``params.safetensors``::

    {"format": "fairjax-link", "version": 1,
     "sources": [{"path": "/abs/.../diffusion_pytorch_model.safetensors", "size": N, "mtime_ns": M}, ...],
     "tensors": {"down_blocks_0/resnets_0/conv1/kernel": [0, "down_blocks.0.resnets.0.conv1.weight"], ...}}

:class:`LinkedReader` has :class:`~fairjax.io.safetensors.SafetensorsReader`'s interface with Flax keys,
shapes and layout: ``reader[k]`` is a view of the source file's memory map, transposed (OIHW -> HWIO,
(out, in) -> (in, out)) without a copy, so a load reads nothing until a tensor is used, as diffusers'
``from_pretrained`` does; ``reader.read(k)`` is a new C-contiguous array. Each source's size and mtime are
checked when the reader opens: a source that is gone or was rewritten since the conversion is a one-line
error, never a silent mix of old and new weights (the resolver keys entries by the same fingerprints, so
asking for the model again converts it again). :func:`fairjax.io.model_dir.open_params` opens either form.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np

from fairjax.errors import CheckpointError
from fairjax.io.safetensors import SafetensorsReader

LINK_FILE = "params.link.json"
LINK_FORMAT = "fairjax-link"
LINK_VERSION = 1
#: PyTorch kernel -> Flax kernel by rank (OIHW -> HWIO, OIW -> WIO, (out, in) -> (in, out)): the rule of
#: fairjax.convert.core, which sits above this layer (tests/test_resolve.py checks linked reads against it)
_TO_FLAX = {2: (1, 0), 3: (2, 1, 0), 4: (2, 3, 1, 0)}


def _stat(path: str) -> dict:
    st = os.stat(path)
    return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _perm(leaf: str, ndim: int) -> tuple[int, ...] | None:
    return _TO_FLAX.get(ndim) if leaf == "kernel" else None


def linkable(reader, keys, dtype) -> bool:
    """A conversion of ``keys`` to ``dtype`` (None: as stored) that changes no tensor's dtype, so the component
    can link to its source instead of copying it."""
    return dtype is None or all(reader.dtype(k) == np.dtype(dtype) for k in keys)


def link_json(tensors: Mapping[str, tuple[str, str]]) -> dict:
    """The content of a ``params.link.json`` (write it with ``fairjax.io.model_dir.write_json``): ``tensors`` is
    ``{flax key: (source file, source key)}``; each source is recorded with its size and mtime now."""
    files = sorted({os.path.realpath(f) for f, _ in tensors.values()})
    index = {f: i for i, f in enumerate(files)}
    return {"format": LINK_FORMAT, "version": LINK_VERSION, "sources": [_stat(f) for f in files],
            "tensors": {k: [index[os.path.realpath(f)], key] for k, (f, key) in sorted(tensors.items())}}


def sources_intact(path: str) -> bool:
    """Every source the link at ``path`` names is there with the size and mtime it had when linked (False for
    an unreadable link too): what :func:`fairjax.convert.cache.is_complete` asks before reusing an entry."""
    try:
        with open(path, encoding="utf-8") as f:
            sources = json.load(f)["sources"]
        for s in sources:
            now = _stat(s["path"])
            if (now["size"], now["mtime_ns"]) != (s["size"], s["mtime_ns"]):
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


class LinkedReader:
    """Reads a ``params.link.json`` (module docstring); a context manager like ``SafetensorsReader``."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            with open(self.path, encoding="utf-8") as f:
                link = json.load(f)
            ok = (isinstance(link, dict) and link.get("format") == LINK_FORMAT and isinstance(link.get("sources"), list)
                  and isinstance(link.get("tensors"), dict))
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: file not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path}: corrupt params link ({type(e).__name__}: {e}); delete its model "
                                  f"folder and convert again") from None
        if not ok:
            raise CheckpointError(f"{self.path}: not a fairjax params link; delete its model folder and convert again")
        if link.get("version") != LINK_VERSION:
            raise CheckpointError(f"{self.path}: params link version {link.get('version')!r}, this fairjax reads "
                                  f"{LINK_VERSION}; delete its model folder and convert again")
        self.metadata = {"format": "fairjax", "source": ", ".join(s.get("path", "?") for s in link["sources"])}
        self._readers: list[SafetensorsReader] = []
        try:
            for s in link["sources"]:
                src = s.get("path", "?")
                try:
                    now = _stat(src)
                except OSError:
                    raise CheckpointError(f"{self.path} links to {src}, which is gone; ask for the model again (it is "
                                          f"converted again) or delete {os.path.dirname(self.path)}") from None
                if (now["size"], now["mtime_ns"]) != (s.get("size"), s.get("mtime_ns")):
                    raise CheckpointError(f"{self.path} links to {src}, which changed since it was converted; ask for "
                                          f"the model again (it is converted again) or delete "
                                          f"{os.path.dirname(self.path)}")
                self._readers.append(SafetensorsReader(src))
            self._where: dict[str, tuple[SafetensorsReader, str]] = {}
            for k, (i, key) in link["tensors"].items():
                r = self._readers[i]
                if key not in r:
                    raise CheckpointError(f"{self.path}: {k} links to {key!r}, which is not in {r.path}; delete "
                                          f"{os.path.dirname(self.path)} and convert again")
                self._where[k] = (r, key)
        except BaseException:
            self.close()
            raise

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        r, k = self._where[key]
        shape = r.shape(k)
        perm = _perm(key.rsplit("/", 1)[-1], len(shape))
        return tuple(shape[p] for p in perm) if perm else tuple(shape)

    def dtype(self, key: str) -> np.dtype:
        r, k = self._where[key]
        return r.dtype(k)

    def __getitem__(self, key: str) -> np.ndarray:
        """A transposed view of the source's memory map (nothing read until used)."""
        r, k = self._where[key]
        a = r[k]
        perm = _perm(key.rsplit("/", 1)[-1], a.ndim)
        return a.transpose(perm) if perm else a

    def read(self, key: str) -> np.ndarray:
        """A new C-contiguous array in Flax layout (read with ``pread``, then transposed)."""
        r, k = self._where[key]
        a = r.read(k)
        perm = _perm(key.rsplit("/", 1)[-1], a.ndim)
        return np.ascontiguousarray(a.transpose(perm)) if perm else a

    def close(self) -> None:
        for r in self._readers:
            r.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
