"""Nested param dicts and their ``/``-joined paths (the keys of fairjax's safetensors files and the
strings that partition rules and LoRA targets match)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Path = tuple[str, ...]


def flatten(tree: Mapping, prefix: Path = ()) -> dict[Path, Any]:
    """Nested dict -> ``{path tuple: leaf}``."""
    out: dict[Path, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def unflatten(flat: Mapping[Path, Any]) -> dict:
    """``{path tuple: leaf}`` -> nested dict."""
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def path_str(path: Sequence[Any]) -> str:
    """``'/'``-joined path of a leaf, from a tuple of names or a ``jax.tree_util`` key path:
    ``('unet', 'conv_in', 'kernel') -> 'unet/conv_in/kernel'``."""
    parts = []
    for k in path:
        if isinstance(k, str):
            parts.append(k)
            continue
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def shapes_of(tree: Mapping) -> dict[Path, tuple[int, ...]]:
    """``{path: shape}`` of a param tree or of ``jax.eval_shape`` output."""
    return {p: tuple(v.shape) for p, v in flatten(tree).items()}
