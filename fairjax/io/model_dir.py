"""The fairjax model directory format.

A model directory holds one sub-folder per component, named as in a diffusers
pipeline folder (``unet/``, ``vae/``, ``text_encoder/``, ...), each with

* ``config.json``: the upstream (diffusers / transformers) config dict as is,
* ``params.safetensors``: the Flax param tree, keys are ``/``-joined Flax paths
  (``down_blocks_0/resnets_0/conv1/kernel``), arrays in Flax layout,

plus ``fairjax.json`` at the top (``{"format": 1, "components": [...]}``).
A single component folder (``config.json`` + ``params.safetensors``) is also
accepted wherever a model directory is.

safetensors rather than orbax for models: the files are read lazily tensor by
tensor (no full second copy), are readable without JAX, and a user can inspect
them with any safetensors tool. Training state (optimizer, step, RNG) is
checkpointed with orbax by the trainer, not here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Mapping

import numpy as np

from fairjax.errors import CheckpointError
from fairjax.io.safetensors import SafetensorsReader, write_safetensors
from fairjax.io.tree import flatten, path_str, unflatten

PARAMS_FILE = "params.safetensors"
CONFIG_FILE = "config.json"
INDEX_FILE = "fairjax.json"
FORMAT_VERSION = 1


def save_params(path: str, params: Mapping, metadata: dict | None = None) -> None:
    items = [(path_str(p), np.asarray(v)) for p, v in flatten(params).items()]
    write_safetensors(path, items, metadata)


def load_params(path: str, target_shapes=None, dtype=None, *, workers: int = 4, mmap: bool = False) -> dict:
    """Read a ``params.safetensors`` into a nested dict of numpy arrays.

    With ``target_shapes`` (``{flax path: shape}``), every missing, unexpected
    and mismatched key is reported in one error before anything is read. It may
    also be a function returning that mapping: it is then called while the file is
    read, and the same error comes once both are done. Tensors are read with
    ``pread`` by ``workers`` threads (no file page stays mapped: the process holds
    the arrays it returns and nothing else), cast to ``dtype`` when given.

    ``mmap=True``: a tensor that needs no cast is a read-only view of the file's memory map
    instead (what diffusers' ``from_pretrained`` does with safetensors): nothing is read until
    it is used, and its pages belong to the page cache, not to the process. fairjax writes
    model files to a temporary name and renames them, so a view never sees a file change.
    """
    from concurrent.futures import ThreadPoolExecutor

    def check(r: SafetensorsReader, shapes) -> None:
        want = {path_str(p): tuple(s) for p, s in shapes.items()}
        have = {k: r.shape(k) for k in r.keys()}
        missing = [k for k in want if k not in have]
        unexpected = [k for k in have if k not in want]
        bad = [f"{k} {have[k]} vs model {want[k]}" for k in want if k in have and have[k] != want[k]]
        if missing or unexpected or bad:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing: {', '.join(missing)}")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected: {', '.join(unexpected)}")
            if bad:
                parts.append(f"{len(bad)} shape mismatch: {'; '.join(bad)}")
            raise CheckpointError(f"{path} does not fit the model config: " + " | ".join(parts))

    def read(r: SafetensorsReader, k: str) -> np.ndarray:
        same = dtype is None or np.dtype(dtype) == r.dtype(k)
        if mmap and same:
            return r[k]
        a = r.read(k)
        return a if same else a.astype(dtype)

    with SafetensorsReader(path) as r:
        if target_shapes is not None and not callable(target_shapes):
            check(r, target_shapes)
        with ThreadPoolExecutor(max(1, workers), thread_name_prefix="fairjax-load") as pool:
            futures = {k: pool.submit(read, r, k) for k in r.keys()}
            try:
                if callable(target_shapes):
                    check(r, target_shapes())
                flat = {tuple(k.split("/")): f.result() for k, f in futures.items()}
            except BaseException:
                for f in futures.values():
                    f.cancel()
                raise
    return unflatten(flat)


def save_component(folder: str, config: Mapping, params: Mapping) -> None:
    os.makedirs(folder, exist_ok=True)
    save_params(os.path.join(folder, PARAMS_FILE), params)
    write_json(os.path.join(folder, CONFIG_FILE), dict(config))


def component_dir(model_dir: str, name: str) -> str:
    """Resolve ``model_dir`` (a model directory or a bare component folder) to the component folder."""
    model_dir = os.fspath(model_dir)
    if not os.path.isdir(model_dir):
        raise CheckpointError(f"{model_dir}: model directory not found")
    sub = os.path.join(model_dir, name)
    for cand in (sub, model_dir):
        if os.path.isfile(os.path.join(cand, CONFIG_FILE)) and os.path.isfile(os.path.join(cand, PARAMS_FILE)):
            return cand
    raise CheckpointError(
        f"{model_dir}: no fairjax '{name}' component (need {name}/{CONFIG_FILE} and {name}/{PARAMS_FILE}); "
        f"convert a diffusers folder with tools/convert_diffusers.py first"
    )


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def write_index(model_dir: str, components: list[str], **extra) -> None:
    write_json(os.path.join(model_dir, INDEX_FILE), {"format": FORMAT_VERSION, "components": components, **extra})


@contextlib.contextmanager
def atomic_output_dir(out: str, overwrite: bool = False):
    """Yield a temp directory that becomes ``out`` only if the block succeeds.

    An existing ``out`` is an error unless ``overwrite``; on failure nothing is
    left behind and an existing ``out`` is untouched.
    """
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another path or pass --overwrite")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.tmp-{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(out):
        old = os.path.join(parent, f".{os.path.basename(out)}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old:
        if os.path.isdir(old):
            shutil.rmtree(old)
        else:
            os.remove(old)
