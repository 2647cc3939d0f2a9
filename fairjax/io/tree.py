"""Nested param dicts and their ``/``-joined paths (the keys of fairjax's safetensors files and the
strings that partition rules and LoRA targets match)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fairjax.errors import CheckpointError

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


# ----------------------------------------------------------------------------- stacked layers

#: the children that fairjax's models scan (``scan_layers=True``): the UNet's
#: ``transformer_blocks_i``, LLaMA's ``layers_i`` and the VILA-U depth transformer's ``blocks_i``.
#: Apply the functions below to one model's params at a time: VILA-U's ``mm_projector`` has
#: ``layers_0, layers_2`` (or one un-indexed ``layers``) that are not a stack.
STACKED = ("transformer_blocks", "layers", "blocks")


def _layout_error(msg: str) -> CheckpointError:
    return CheckpointError(msg)


def _is_abstract(x) -> bool:
    """A ``jax.ShapeDtypeStruct`` (checked without importing jax for numpy-only callers)."""
    return type(x).__name__ == "ShapeDtypeStruct" and hasattr(x, "sharding")


def _index(key: str, names: Sequence[str]) -> tuple[str, int] | None:
    """``'layers_3' -> ('layers', 3)`` when the part before the last ``_`` is one of ``names``."""
    head, sep, tail = key.rpartition("_")
    if sep and head in names and tail.isdigit() and str(int(tail)) == tail:
        return head, int(tail)
    return None


def _stack_leaves(leaves: list, where: str):
    shapes = {tuple(np.shape(x)) for x in leaves}
    dtypes = {np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype for x in leaves}
    if len(shapes) != 1 or len(dtypes) != 1:
        raise _layout_error(f"cannot stack {where}: the layers' shapes / dtypes differ ({sorted(shapes)}, "
                            f"{sorted(map(str, dtypes))})")
    first = leaves[0]
    if all(isinstance(x, np.ndarray) for x in leaves):
        return np.stack(leaves)
    import jax

    if _is_abstract(first):
        return jax.ShapeDtypeStruct((len(leaves),) + tuple(first.shape), first.dtype)
    return jax.numpy.stack(leaves)


def _stack_group(trees: list, where: str):
    """Same-structure subtrees (one per layer) -> one subtree with a leading layer axis on every leaf."""
    first = trees[0]
    if not isinstance(first, Mapping):
        return _stack_leaves(trees, where)
    keys = set(first)
    for t in trees[1:]:
        if not isinstance(t, Mapping) or set(t) != keys:
            raise _layout_error(f"cannot stack {where}: the layers hold different params")
    return {k: _stack_group([t[k] for t in trees], f"{where}/{k}") for k in first}


def stack_layers(tree: Mapping, names: Sequence[str] = STACKED, prefix: str = "") -> dict:
    """The scanned layout of ``tree``: children ``name_0 .. name_{L-1}`` (``name`` in ``names``) become one
    child ``name`` whose leaves have a leading layer axis of length ``L`` (``leaf[i]`` = layer ``i``'s).

    numpy leaves stay numpy, ``jax.ShapeDtypeStruct`` leaves stay abstract, anything else is stacked with
    ``jnp.stack`` (jittable). Indices must run ``0 .. L-1`` and a node may not also hold a child named
    ``name`` itself; the layers must hold the same param names, shapes and dtypes. Inverse of
    :func:`unstack_layers`."""
    groups: dict[str, dict[int, Any]] = {}
    out: dict = {}
    for k, v in tree.items():
        hit = _index(k, names)
        if hit is not None:
            groups.setdefault(hit[0], {})[hit[1]] = v
        else:
            out[k] = stack_layers(v, names, f"{prefix}{k}/") if isinstance(v, Mapping) else v
    for name, layers in groups.items():
        where = f"{prefix}{name}_*"
        if name in tree:
            raise _layout_error(f"cannot stack {where}: {prefix}{name} exists beside the indexed layers")
        if sorted(layers) != list(range(len(layers))):
            raise _layout_error(f"cannot stack {where}: layer indices {sorted(layers)} are not 0..{len(layers) - 1}")
        out[name] = _stack_group([layers[i] for i in range(len(layers))], where)
    return out


def _leaves(tree) -> list:
    return [x for v in tree.values() for x in _leaves(v)] if isinstance(tree, Mapping) else [tree]


def _leading(tree, where: str) -> int:
    lengths = {int(np.shape(x)[0]) if np.shape(x) else -1 for x in _leaves(tree)}
    if len(lengths) != 1 or -1 in lengths:
        raise _layout_error(f"{where} is not a layer stack (its leaves' leading dims are {sorted(lengths)})")
    return lengths.pop()


def _take(tree, i: int):
    if isinstance(tree, Mapping):
        return {k: _take(v, i) for k, v in tree.items()}
    if _is_abstract(tree):
        return type(tree)(tuple(tree.shape[1:]), tree.dtype)
    return tree[i]


def unstack_layers(tree: Mapping, names: Sequence[str] = STACKED, prefix: str = "") -> dict:
    """The unrolled layout (what every file holds) of a :func:`stack_layers` tree: a child ``name``
    (``name`` in ``names``) with leading layer axis ``L`` becomes ``name_0 .. name_{L-1}``; ``leaf[i]``
    (a view for numpy leaves). A tree with no stacked child comes back as is (copied dicts)."""
    out: dict = {}
    for k, v in tree.items():
        if k in names and isinstance(v, Mapping):
            for i in range(_leading(v, prefix + k)):
                key = f"{k}_{i}"
                if key in tree:
                    raise _layout_error(f"cannot unstack {prefix}{k}: {prefix}{key} exists beside it")
                out[key] = _take(v, i)
        else:
            out[k] = unstack_layers(v, names, f"{prefix}{k}/") if isinstance(v, Mapping) else v
    return out


def is_stacked(tree: Mapping, names: Sequence[str] = STACKED) -> bool:
    """Whether any node of ``tree`` has a child named exactly one of ``names`` (a scanned stack)."""
    return any(k in names and isinstance(v, Mapping) or isinstance(v, Mapping) and is_stacked(v, names)
               for k, v in tree.items())


def unrolled_shapes(tree: Mapping, names: Sequence[str] = STACKED, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """``{'/'-joined unrolled path: shape}`` of the leaves of ``tree`` in either layout (stacked leaves
    listed once per layer, without the layer axis): the shapes :func:`unstack_layers` would give."""
    out: dict[str, tuple[int, ...]] = {}
    for k, v in tree.items():
        if k in names and isinstance(v, Mapping):
            n = _leading(v, prefix + k)
            inner = {p: s[1:] for p, s in unrolled_shapes(v, (), "").items()}
            for i in range(n):
                out.update({f"{prefix}{k}_{i}/{p}": s for p, s in inner.items()})
        elif isinstance(v, Mapping):
            out.update(unrolled_shapes(v, names, f"{prefix}{k}/"))
        else:
            out[prefix + k] = tuple(np.shape(v))
    return out


def locate(tree: Mapping, path: str, names: Sequence[str] = STACKED) -> tuple[tuple[str, ...], int | None] | None:
    """Where the unrolled ``path`` (``'a/layers_3/b/kernel'``) lives in ``tree``: ``(tree path, None)`` for a
    leaf of that path, ``(('a', 'layers', 'b', 'kernel'), 3)`` for row 3 of a stacked leaf; None if absent."""
    node: Any = tree
    out: list[str] = []
    index = None
    for seg in path.split("/"):
        if not isinstance(node, Mapping):
            return None
        if seg in node:
            node = node[seg]
            out.append(seg)
            continue
        hit = _index(seg, names)
        if hit is None or index is not None or not isinstance(node.get(hit[0]), Mapping):
            return None
        node = node[hit[0]]
        out.append(hit[0])
        index = hit[1]
    if isinstance(node, Mapping):
        return None
    if index is not None and not (np.ndim(node) and index < np.shape(node)[0]):
        return None
    return tuple(out), index
