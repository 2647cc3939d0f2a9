"""PyTorch <-> Flax parameter mapping shared by every model family.

One naming convention covers all fairjax models (UNet, VAE, CLIP, LLaMA, ...):
the Flax module tree mirrors the PyTorch module tree, and a ``ModuleList``
index ``xs.N`` becomes a submodule named ``xs_N``::

    down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.weight
    -> down_blocks_1/attentions_0/transformer_blocks_0/attn1/to_out_0/kernel

Leaves: a PyTorch ``weight`` becomes ``kernel`` (``nn.Dense`` / ``nn.Conv``),
``scale`` (norms) or ``embedding`` (``nn.Embed``) -- whichever the Flax model
has -- and anything else keeps its name. Layout rules (the only transforms):

* conv ``weight`` OIHW -> ``kernel`` HWIO (``transpose(2, 3, 1, 0)``),
* conv1d OIW -> WIO, linear ``weight`` (out, in) -> ``kernel`` (in, out),
* everything else as is.

The inverse (export) splits a trailing ``_N`` back into ``.N`` except for
names listed as ``literal`` by the family (``time_embedding.linear_1`` is a
real attribute name in diffusers, not a list index; the removed diffusers
Flax code got this wrong and dropped SDXL's ``add_embedding`` on export).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np

from fairjax.errors import CheckpointError
from fairjax.io.safetensors import check_float
from fairjax.io.tree import Path, flatten, path_str, unflatten

_WEIGHT_LEAVES = ("kernel", "scale", "embedding", "weight")
_TRAILING_INDEX = re.compile(r"(.+)_(\d+)")


# ----------------------------------------------------------------------------- names

def torch_to_flax_prefix(key: str) -> Path:
    """``a.b.0.c.weight`` -> ``('a', 'b_0', 'c', 'weight')`` (leaf not yet resolved)."""
    out: list[str] = []
    for part in key.split("."):
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def flax_to_torch_key(path: Path, literal: Iterable[str] = ()) -> str:
    """Inverse of :func:`torch_to_flax_prefix` plus the leaf rename."""
    literal = set(literal)
    parts: list[str] = []
    for seg in path[:-1]:
        m = _TRAILING_INDEX.fullmatch(seg)
        if m and seg not in literal:
            parts += [m.group(1), m.group(2)]
        else:
            parts.append(seg)
    leaf = path[-1]
    parts.append("weight" if leaf in ("kernel", "scale", "embedding") else leaf)
    return ".".join(parts)


def torch_to_flax_array(arr: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel":
        if arr.ndim == 4:
            return arr.transpose(2, 3, 1, 0)
        if arr.ndim == 3:
            return arr.transpose(2, 1, 0)
        if arr.ndim == 2:
            return arr.T
    return arr


def flax_to_torch_array(arr: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel":
        if arr.ndim == 4:
            return arr.transpose(3, 2, 0, 1)
        if arr.ndim == 3:
            return arr.transpose(2, 1, 0)
        if arr.ndim == 2:
            return arr.T
    return arr


def _flax_shape(shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
    if leaf == "kernel":
        if len(shape) == 4:
            return (shape[2], shape[3], shape[1], shape[0])
        if len(shape) == 3:
            return (shape[2], shape[1], shape[0])
        if len(shape) == 2:
            return (shape[1], shape[0])
    return tuple(shape)


# ----------------------------------------------------------------------------- conversion

def plan_conversion(
    source_shapes: Mapping[str, tuple[int, ...]],
    target_shapes: Mapping[Path, tuple[int, ...]],
    *,
    ignore: Iterable[str] = (),
    rename: Callable[[str], str] | None = None,
) -> dict[str, tuple[Path, str]]:
    """Map every checkpoint key onto a Flax leaf, checking all of them at once.

    Returns ``{torch_key: (flax_path, leaf_kind)}``. Raises one
    :class:`CheckpointError` that lists every missing, unexpected and
    shape-mismatched key.
    """
    ignore_res = [re.compile(p) for p in ignore]
    plan: dict[str, tuple[Path, str]] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    for key, shape in source_shapes.items():
        if any(r.search(key) for r in ignore_res):
            continue
        name = rename(key) if rename else key
        prefix = torch_to_flax_prefix(name)
        candidates = _WEIGHT_LEAVES if prefix[-1] == "weight" else (prefix[-1],)
        path = next((prefix[:-1] + (c,) for c in candidates if prefix[:-1] + (c,) in target_shapes), None)
        if path is None:
            unexpected.append(key)
            continue
        want = tuple(target_shapes[path])
        got = _flax_shape(tuple(shape), path[-1])
        if got != want:
            mismatched.append(f"{key} {tuple(shape)} -> {path_str(path)} {got} but the model has {want}")
            continue
        plan[key] = (path, path[-1])
    covered = {p for p, _ in plan.values()}
    missing = [path_str(p) for p in target_shapes if p not in covered]
    mismatched_paths = {m.split(" -> ")[1].split(" ")[0] for m in mismatched}
    missing = [m for m in missing if m not in mismatched_paths]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing in checkpoint: {', '.join(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected in checkpoint: {', '.join(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch: {'; '.join(mismatched)}")
        raise CheckpointError("checkpoint does not fit the model config: " + " | ".join(parts))
    return plan


def convert_checkpoint(
    reader,
    target_shapes: Mapping[Path, tuple[int, ...]],
    *,
    dtype=None,
    ignore: Iterable[str] = (),
    rename: Callable[[str], str] | None = None,
) -> dict:
    """Stream a PyTorch-layout checkpoint into a nested Flax param dict.

    ``reader`` maps torch keys to arrays with ``keys()``, ``shape(key)`` and
    ``reader[key]`` (see :class:`~fairjax.io.safetensors.ShardedReader`);
    ``target_shapes`` is ``{flax path: shape}`` (from ``jax.eval_shape``).
    Everything is validated from the header first; then tensors are read,
    transposed and cast one at a time, so peak memory is the output tree plus
    one tensor. ``dtype=None`` keeps the checkpoint's dtype.
    """
    plan = plan_conversion({k: reader.shape(k) for k in reader.keys()}, target_shapes,
                           ignore=ignore, rename=rename)
    if hasattr(reader, "dtype"):
        check_float(reader, plan, getattr(reader, "path", None) or getattr(reader, "folder", "checkpoint"))
    flat: dict[Path, np.ndarray] = {}
    for key, (path, leaf) in plan.items():
        arr = torch_to_flax_array(reader[key], leaf)
        flat[path] = np.array(arr, dtype=dtype if dtype is not None else arr.dtype, order="C", copy=True)
    return unflatten(flat)


def export_state(params: Mapping, *, literal: Iterable[str] = (), dtype=None,
                 rename: Callable[[str], str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(torch_key, array)`` in PyTorch layout for a Flax param tree."""
    literal = tuple(literal)
    for path, arr in flatten(params).items():
        key = flax_to_torch_key(path, literal)
        if rename:
            key = rename(key)
        a = flax_to_torch_array(np.asarray(arr), path[-1])
        if dtype is not None:
            a = a.astype(dtype)
        yield key, np.ascontiguousarray(a)
