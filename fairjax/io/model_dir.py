"""The fairjax model directory format.

A model directory holds one sub-folder per component, named as in a diffusers
pipeline folder (``unet/``, ``vae/``, ``text_encoder/``, ...), each with

* ``config.json``: the upstream (diffusers / transformers) config dict as is,
* ``params.safetensors``: the Flax param tree, keys are ``/``-joined Flax paths
  (``down_blocks_0/resnets_0/conv1/kernel``), arrays in Flax layout; or, in a model cache entry
  converted without a dtype change, ``params.link.json``: the same tree read from the source
  checkpoint and transposed on the fly (:mod:`fairjax.io.linked`; :func:`open_params` opens both),

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

from fairjax.errors import CheckpointError, OutputError
from fairjax.io import fs
from fairjax.io.linked import LINK_FILE, LinkedReader
from fairjax.io.safetensors import SafetensorsReader, check_float, write_safetensors
from fairjax.io.tree import flatten, path_str, unflatten

PARAMS_FILE = "params.safetensors"
CONFIG_FILE = "config.json"
INDEX_FILE = "fairjax.json"
FORMAT_VERSION = 1


def save_params(path: str, params: Mapping, metadata: dict | None = None) -> None:
    items = [(path_str(p), np.asarray(v)) for p, v in flatten(params).items()]
    write_safetensors(path, items, metadata)


def params_file(folder: str) -> str:
    """The file that holds a component's params: ``params.safetensors``, else ``params.link.json`` when only
    that exists (the former's path when neither does, for the error that names it)."""
    own = os.path.join(folder, PARAMS_FILE)
    link = os.path.join(folder, LINK_FILE)
    return link if not os.path.isfile(own) and os.path.isfile(link) else own


def has_params(folder: str) -> bool:
    """``folder`` holds a component's params (either form)."""
    return os.path.isfile(params_file(folder))


def open_params(path: str) -> SafetensorsReader | LinkedReader:
    """A reader of a component's params given the path of its ``params.safetensors`` (or of its folder): that
    file, else the folder's ``params.link.json`` (Flax keys and layout either way)."""
    path = os.fspath(path)
    folder, name = (path, PARAMS_FILE) if os.path.isdir(path) else os.path.split(path)
    if name == PARAMS_FILE:
        path = params_file(folder)
    return LinkedReader(path) if path.endswith(LINK_FILE) else SafetensorsReader(path)


def load_params(path: str, target_shapes=None, dtype=None, *, workers: int = 4, mmap: bool = False) -> dict:
    """Read a ``params.safetensors`` (or the ``params.link.json`` beside it: :func:`open_params`) into a
    nested dict of numpy arrays.

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

    def check(r, shapes) -> None:
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
        check_float(r, want, path)  # integer or mislabelled tensors where weights go: an error, never a cast

    def read(r, k: str) -> np.ndarray:
        same = dtype is None or np.dtype(dtype) == r.dtype(k)
        if mmap and same:
            return r[k]
        a = r.read(k)
        return a if same else a.astype(dtype)

    with open_params(path) as r:
        path = r.path
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
        if os.path.isfile(os.path.join(cand, CONFIG_FILE)) and has_params(cand):
            return cand
    raise CheckpointError(
        f"{model_dir}: no fairjax '{name}' component (need {name}/{CONFIG_FILE} and {name}/{PARAMS_FILE}); "
        f"convert a diffusers folder with tools/convert_diffusers.py first"
    )


def read_json(path: str) -> dict:
    """A JSON object file (a config, an index): a missing, unreadable, invalid or non-object file is a
    one-line CheckpointError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a folder; a JSON file was expected there") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({fs.os_error_message(e) or e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object ({{...}}), found a {type(obj).__name__}")
    return obj


def write_json(path: str, obj) -> None:
    """Write ``obj`` as JSON atomically (temp file + rename); NaN / inf are refused (not valid JSON)."""
    try:
        text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except ValueError as e:
        raise CheckpointError(f"cannot write {path}: {e} (a value is NaN or infinite, which JSON cannot hold)") \
            from None
    tmp = fs.temp_path(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_index(model_dir: str, components: list[str], **extra) -> None:
    write_json(os.path.join(model_dir, INDEX_FILE), {"format": FORMAT_VERSION, "components": components, **extra})


@contextlib.contextmanager
def atomic_output_dir(out: str, overwrite: bool = False):
    """Yield a temp directory that becomes ``out`` only if the block succeeds.

    An existing ``out`` is an error unless ``overwrite``; on failure (an exception, Ctrl-C, or SIGTERM
    when no other handler is installed) the temp folder is removed and an existing ``out`` is untouched.
    The block holds ``out``'s lock (:class:`fairjax.io.fs.PathLock`: a second run writing the same
    ``out`` is refused), temp folders that dead processes left beside ``out`` are removed first, and
    the operating system's refusals (read-only, disk full: with how much was written) are one-line
    :class:`~fairjax.errors.OutputError` s.
    """
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out) and not overwrite:
        raise OutputError(f"{out} already exists; choose another path or pass --overwrite")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise OutputError(f"{out} is a file, not a folder; choose a folder path")
    with fs.locked(out, what="output"), _terminate_raises(out):
        fs.remove_stale_temps(out)
        tmp = fs.temp_path(out)
        try:
            if os.path.exists(tmp):
                shutil.rmtree(tmp)
            os.makedirs(tmp)
        except OSError as e:
            raise OutputError(f"cannot write {out}: {fs.os_error_message(e) or e}") from None
        try:
            yield tmp
        except BaseException as e:
            written = _tree_bytes(tmp) if isinstance(e, OSError) and e.errno in fs.DISK_FULL else 0
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError) and e.errno in fs.DISK_FULL:
                if getattr(e, "needed_for", None):  # name the file where it would have been
                    e.needed_for = out + e.needed_for[len(tmp):] if e.needed_for.startswith(tmp) else e.needed_for
                raise OutputError(fs.disk_full_message(e, out, written)) from None
            raise
        old = None
        try:
            if os.path.exists(out):
                old = fs.temp_path(out, "old")
                os.replace(out, old)
            os.replace(tmp, out)
        except BaseException as e:  # an OS refusal, or Ctrl-C / SIGTERM between the block and the rename
            shutil.rmtree(tmp, ignore_errors=True)
            if old and not os.path.exists(out):
                os.replace(old, out)
            if isinstance(e, OSError):
                raise OutputError(f"cannot write {out}: {fs.os_error_message(e) or e}") from None
            raise
        if old:
            if os.path.isdir(old) and not os.path.islink(old):
                shutil.rmtree(old)
            else:
                os.remove(old)


def _tree_bytes(folder: str) -> int:
    """Bytes of the files under ``folder``."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


@contextlib.contextmanager
def _terminate_raises(out: str):
    """While the block runs, SIGTERM (when nothing else handles it) prints one line and raises
    ``SystemExit(143)``, so the ``except`` above removes the partial output as on Ctrl-C."""
    import signal
    import sys
    import threading

    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        print(f"error: stopped by SIGTERM before {out} was complete; the partial output was removed",
              file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is stop:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
