"""LoRA as a separate param-tree delta.

A LoRA is a FLAT dict keyed by the '/'-joined path of the kernel it adapts::

    {'down_blocks_1/attentions_0/transformer_blocks_0/attn1/to_q/kernel':
        {'a': (fan_in, r), 'b': (r, out)}, ...}

where for a kernel ``W`` of shape ``(*K, out)`` (Dense ``(in, out)``, Conv HWIO
``(kh, kw, in, out)``, Conv1d ``(k, in, out)``) ``fan_in = prod(K)``. Merging is

    ``W' = W + (alpha / r) * (a @ b).reshape(W.shape)``

done just before ``model.apply``. Only the LoRA dict is trained (it is the only
tree optax sees, so the only one with optimizer state); the base params are the
frozen reference model as they are, never copied.

Layout and PEFT: ``a.reshape(*K, r)`` is PEFT's ``lora_A.weight`` in Flax layout
(Linear: ``lora_A.weight = a.T`` of shape ``(r, in)``; Conv2d:
``lora_A.weight = a.reshape(kh, kw, in, r).transpose(3, 2, 0, 1)``, OIHW) and
``b.T`` is ``lora_B.weight`` (``(out, r)``, or ``(out, r, 1, 1)`` for a conv);
PEFT's scale is also ``alpha / r``.

Scanned layers (``scan_layers=True``: params ``.../transformer_blocks/...``, ``model/layers/...`` with a
leading layer axis, :mod:`fairjax.io.tree`): a LoRA is still keyed by the UNROLLED kernel paths
(``.../transformer_blocks_3/attn1/to_q/kernel``), in memory and on disk. :func:`match_kernels`,
:func:`init` and :func:`trainable_mask` see the unrolled view of stacked params (per-layer shapes), so
both layouts give the same LoRA; :func:`merge` adds the per-layer deltas, stacked (zeros for the layers
a LoRA leaves out), to the stacked kernel; :func:`lora_variables` stacks ``a`` and ``b`` for
:func:`lora_interceptor`, which reads them inside the scan.
"""

from __future__ import annotations

import json
import math
import os
import re
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fairjax.errors import CheckpointError, UserError
from fairjax.io.safetensors import SafetensorsReader, check_float, write_safetensors
from fairjax.io.tree import STACKED, locate, path_str, unrolled_shapes

Lora = dict[str, dict[str, jax.Array]]

FORMAT = "fairjax.lora"
FORMAT_VERSION = "1"
_RESERVED_META = ("format", "format_version", "alpha", "rank")

__all__ = ["init", "merge", "delta", "match_kernels", "trainable_mask", "rank_of", "num_params",
           "save", "load", "lora_variables", "lora_interceptor", "FORMAT"]


# ----------------------------------------------------------------------------- selection

def _compile(targets: str | Iterable[str]) -> list[re.Pattern]:
    pats = [targets] if isinstance(targets, str) else list(targets)
    if not pats:
        raise UserError("no LoRA target regex given; pass e.g. r'attn[12]/to_(q|k|v|out_0)/kernel$'")
    return [re.compile(p) for p in pats]


def _is_kernel(path: str, shape: tuple[int, ...]) -> bool:
    return path.rsplit("/", 1)[-1] == "kernel" and len(shape) >= 2


def _some(paths: list[str], n: int = 8) -> str:
    more = f", ... ({len(paths) - n} more)" if len(paths) > n else ""
    return ", ".join(paths[:n]) + more if paths else "none"


def match_kernels(params: Mapping, targets: str | Iterable[str]) -> list[str]:
    """Sorted '/'-joined paths of the kernels (``.../kernel``, ndim >= 2) that any regex in
    ``targets`` finds (``re.search``). A regex that selects no kernel is a ``UserError``
    naming it and listing some kernel paths. Stacked (scanned) params are seen unrolled:
    ``transformer_blocks_0/...``, ``transformer_blocks_1/...``, each with its layer's shape."""
    flat = unrolled_shapes(params)
    kernels = sorted(p for p, v in flat.items() if _is_kernel(p, v))
    chosen: set[str] = set()
    for pat in _compile(targets):
        hits = [p for p in kernels if pat.search(p)]
        if not hits:
            other = [p for p in flat if pat.search(p)]
            why = f"it only matches non-kernel leaves ({_some(other, 4)})" if other else "it matches no param"
            raise UserError(f"LoRA target {pat.pattern!r} selects no kernel: {why}; "
                             f"kernel paths look like: {_some(kernels)}")
        chosen.update(hits)
    return sorted(chosen)


def trainable_mask(params: Mapping, targets: str | Iterable[str]) -> Any:
    """Bool tree shaped like ``params``: True for every leaf (any kind) whose path a regex
    in ``targets`` finds. For partial full fine-tuning with ``optax.masked``; LoRA
    training does not need it (optax sees only the LoRA dict). The regexes match unrolled
    paths; a stacked leaf is True when they select every one of its layers, and a
    ``UserError`` when they select only some (train with ``scan_layers`` off for that)."""
    pats = _compile(targets)
    flat = sorted(unrolled_shapes(params))
    for pat in pats:
        if not any(pat.search(p) for p in flat):
            raise UserError(f"trainable target {pat.pattern!r} matches no param; paths look like: "
                             f"{_some(flat)}")

    def leaf(path: tuple[str, ...], v) -> bool:
        stack = [i for i, k in enumerate(path[:-1]) if k in STACKED]
        if not stack:
            return any(p.search(path_str(path)) for p in pats)
        i = stack[0]
        layers = [path_str(path[:i] + (f"{path[i]}_{j}",) + path[i + 1:]) for j in range(jnp.shape(v)[0])]
        hits = [any(p.search(u) for p in pats) for u in layers]
        if any(hits) and not all(hits):
            raise UserError(f"trainable targets select only some layers of the scanned param {path_str(path)} "
                            f"({sum(hits)} of {len(hits)}); select all of them or set scan_layers off")
        return all(hits)

    def mark(tree, prefix):
        return {k: mark(v, prefix + (k,)) if isinstance(v, Mapping) else leaf(prefix + (k,), v)
                for k, v in tree.items()}

    return mark(params, ())


# ----------------------------------------------------------------------------- init / merge

def init(params: Mapping, targets: str | Iterable[str], rank: int, alpha: float, rng: jax.Array,
         *, init_scale: float = 1.0) -> Lora:
    """New LoRA for the kernels selected by ``targets`` (see :func:`match_kernels`).

    Per kernel ``W (*K, out)``: ``a ~ U(-bound, bound)`` of shape ``(prod(K), rank)`` with
    ``bound = init_scale / sqrt(prod(K))`` -- PEFT's ``kaiming_uniform_(a=sqrt(5))`` for
    ``lora_A`` when ``init_scale = 1`` -- and ``b = 0`` of shape ``(rank, out)``, both
    float32, so the merged model starts exactly at the base model. ``alpha`` is only
    checked here (it does not change the initial values, as in PEFT); pass it again
    to :func:`merge` and :func:`save`. Each kernel draws from ``fold_in(rng, i)``
    with ``i`` its index in sorted path order.
    """
    if not isinstance(rank, (int, np.integer)) or rank < 1:
        raise UserError(f"LoRA rank must be a positive int, got {rank!r}")
    if not alpha > 0:
        raise UserError(f"LoRA alpha must be > 0, got {alpha!r}")
    flat = unrolled_shapes(params)
    out: Lora = {}
    for i, path in enumerate(match_kernels(params, targets)):
        shape = flat[path]
        fan_in = math.prod(shape[:-1])
        bound = init_scale / math.sqrt(fan_in)
        a = jax.random.uniform(jax.random.fold_in(rng, i), (fan_in, int(rank)), jnp.float32, -bound, bound)
        out[path] = {"a": a, "b": jnp.zeros((int(rank), shape[-1]), jnp.float32)}
    return out


def rank_of(entry: Mapping) -> int:
    """``r`` of one LoRA entry ``{'a': (fan_in, r), 'b': (r, out)}``."""
    return int(jnp.shape(entry["a"])[-1])


def delta(entry: Mapping, shape: tuple[int, ...], alpha: float) -> jax.Array:
    """``(alpha / r) * (a @ b).reshape(shape)`` in float32 (or wider if a / b are)."""
    a, b = entry["a"], entry["b"]
    r = rank_of(entry)
    dt = jnp.promote_types(jnp.result_type(a, b), jnp.float32)
    return ((alpha / r) * (a.astype(dt) @ b.astype(dt))).reshape(shape)


def _check_entry(path: str, entry, shape: tuple[int, ...]) -> None:
    if not isinstance(entry, Mapping) or set(entry) != {"a", "b"}:
        raise UserError(f"LoRA entry {path!r} must be a dict with exactly 'a' and 'b'")
    sa, sb = jnp.shape(entry["a"]), jnp.shape(entry["b"])
    fan_in = math.prod(shape[:-1])
    if len(sa) != 2 or len(sb) != 2 or sa[1] != sb[0] or sa[0] != fan_in or sb[1] != shape[-1]:
        raise UserError(f"LoRA entry {path!r} has a{tuple(sa)}, b{tuple(sb)}; kernel {tuple(shape)} "
                         f"needs a({fan_in}, r), b(r, {shape[-1]})")


def check_fits(lora: Mapping[str, Mapping], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Every entry of ``lora`` names a kernel of ``shapes`` (``{'/'-joined path: shape}``, e.g. from a
    safetensors header) and has ``a (prod(K), r)``, ``b (r, out)`` for its kernel ``(*K, out)``; else a
    one-line ``UserError`` naming the first entry that does not, before anything is merged or written."""
    unknown = sorted(p for p in lora if p not in shapes)
    if unknown:
        raise UserError(f"LoRA paths not in the params: {_some(unknown)}; was the LoRA made for "
                        "another model (or another param prefix)?")
    for path, entry in sorted(lora.items()):
        _check_entry(path, entry, tuple(shapes[path]))


def _group(params: Mapping, lora: Mapping[str, Mapping]) -> dict[tuple[str, ...], tuple[Any, dict]]:
    """``{param tree path: (leaf, {layer or None: (unrolled path, entry)})}`` of the kernels ``lora`` adapts,
    each entry checked against its (per-layer) kernel shape."""
    where = {path: locate(params, path) for path in lora}
    unknown = sorted(p for p, w in where.items() if w is None)
    if unknown:
        raise UserError(f"LoRA paths not in the params: {_some(unknown)}; was the LoRA made for "
                         "another model (or another param prefix)?")
    out: dict[tuple[str, ...], tuple[Any, dict]] = {}
    for path, entry in lora.items():
        tpath, layer = where[path]
        w = params
        for k in tpath:
            w = w[k]
        shape = tuple(jnp.shape(w))
        _check_entry(path, entry, shape if layer is None else shape[1:])
        out.setdefault(tpath, (w, {}))[1][layer] = (path, entry)
    return out


def merge(params: Mapping, lora: Mapping[str, Mapping], alpha: float) -> Any:
    """``params`` with each kernel in ``lora`` replaced by ``W + (alpha/r) (a @ b).reshape(W.shape)``.

    The sum is taken in float32 (or wider) and cast back to ``W.dtype``; every other
    leaf and every untouched subtree is passed through as the same object. Pure:
    jittable and differentiable w.r.t. ``lora`` (and ``params``). A LoRA path that is
    not a kernel of ``params`` is a ``UserError`` naming it. Stacked (scanned) params:
    the entries of a stack's layers (unrolled paths) give one delta per layer, stacked
    (zeros for layers without one) and added to the stacked kernel, so ``merge`` on the
    stacked params equals the stacked ``merge`` on the unrolled ones.
    """
    new: dict[str, Any] = {}
    for tpath, (w, layers) in _group(params, lora).items():
        if None in layers:
            d = delta(layers[None][1], w.shape, alpha)
        else:
            shape = tuple(w.shape[1:])
            ds = {i: delta(e, shape, alpha) for i, (_, e) in layers.items()}
            zero = jnp.zeros(shape, next(iter(ds.values())).dtype)
            d = jnp.stack([ds.get(i, zero) for i in range(w.shape[0])])
        new["/".join(tpath)] = (w.astype(jnp.promote_types(w.dtype, d.dtype)) + d).astype(w.dtype)
    return _replace(params, new)


def _replace(tree: Mapping, new: Mapping[str, Any]) -> Any:
    """Copy-on-write: rebuild only the dicts on the paths of ``new``."""
    by_head: dict[str, dict[str, Any]] = {}
    for path, v in new.items():
        head, _, rest = path.partition("/")
        by_head.setdefault(head, {})[rest] = v
    out = dict(tree)
    for head, sub in by_head.items():
        out[head] = sub[""] if "" in sub else _replace(tree[head], sub)
    return type(tree)(out) if not isinstance(tree, dict) else out


def num_params(lora: Mapping[str, Mapping]) -> int:
    """Total number of LoRA values (``sum a.size + b.size``)."""
    return int(sum(np.prod(jnp.shape(e["a"])) + np.prod(jnp.shape(e["b"])) for e in lora.values()))


# ----------------------------------------------------------------------------- files

def save(path: str | os.PathLike, lora: Mapping[str, Mapping], *, alpha: float, **meta) -> None:
    """Write ``lora`` to a safetensors file atomically (temp file + rename).

    Keys ``'<kernel path>/a'`` and ``'<kernel path>/b'`` (arrays as they are);
    metadata ``format = fairjax.lora``, ``format_version``, ``alpha``, ``rank`` (an int,
    or a JSON ``{path: r}`` when ranks differ) and every ``meta`` item JSON-encoded
    (e.g. ``targets=[...]``, ``base_model='...'``).
    """
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UserError(f"cannot save LoRA to {path}: folder {parent} does not exist; create it first")
    clash = sorted(set(meta) & set(_RESERVED_META))
    if clash:
        raise UserError(f"metadata keys {clash} are reserved by the LoRA file format; rename them")
    if not lora:
        raise UserError("refusing to save an empty LoRA (no entries)")
    items = []
    for p in sorted(lora):
        entry = lora[p]
        if not isinstance(entry, Mapping) or set(entry) != {"a", "b"}:
            raise UserError(f"LoRA entry {p!r} must be a dict with exactly 'a' and 'b'")
        items += [(f"{p}/a", np.asarray(entry["a"])), (f"{p}/b", np.asarray(entry["b"]))]
    ranks = {p: rank_of(e) for p, e in lora.items()}
    rank = next(iter(ranks.values())) if len(set(ranks.values())) == 1 else ranks
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "alpha": json.dumps(float(alpha)), "rank": json.dumps(rank)}
    metadata.update({k: json.dumps(v) for k, v in meta.items()})
    write_safetensors(path, items, metadata)


def load(path: str | os.PathLike) -> tuple[Lora, dict[str, Any]]:
    """Read a file written by :func:`save`: ``(lora, meta)`` with ``meta['alpha']``,
    ``meta['rank']`` and the extra metadata decoded. A file that is not a fairjax LoRA
    is a one-line :class:`CheckpointError`."""
    path = os.fspath(path)
    with SafetensorsReader(path) as rd:
        md = dict(rd.metadata)
        if md.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not a fairjax LoRA file (metadata format={md.get('format')!r}, "
                                  f"expected {FORMAT!r}); write it with fairjax.lora.save")
        if md.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{path}: fairjax LoRA format version {md.get('format_version')!r} "
                                  f"is not supported (this fairjax reads {FORMAT_VERSION!r})")
        check_float(rd, rd.keys(), path)
        groups: dict[str, dict[str, np.ndarray]] = {}
        for key in rd.keys():
            base, _, leaf = key.rpartition("/")
            if leaf not in ("a", "b") or not base:
                raise CheckpointError(f"{path}: unexpected key {key!r} in a fairjax LoRA file")
            groups.setdefault(base, {})[leaf] = np.array(rd[key])
    lora: Lora = {}
    for base, g in sorted(groups.items()):
        if set(g) != {"a", "b"} or g["a"].ndim != 2 or g["b"].ndim != 2 or g["a"].shape[1] != g["b"].shape[0]:
            shapes = {k: v.shape for k, v in g.items()}
            raise CheckpointError(f"{path}: LoRA entry {base!r} is incomplete or inconsistent ({shapes})")
        lora[base] = {"a": jnp.asarray(g["a"]), "b": jnp.asarray(g["b"])}
    try:
        meta = {k: json.loads(v) for k, v in md.items() if k not in ("format", "format_version")}
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt LoRA metadata ({e})") from None
    return lora, meta


# ----------------------------------------------------------------------------- unmerged (interceptor)

def _salt(path: str) -> int:
    return zlib.crc32(path.encode())


def lora_variables(lora: Mapping[str, Mapping], params: Mapping, alpha: float) -> dict:
    """The ``'lora'`` variable collection that :func:`lora_interceptor` reads: nested like the modules,
    one ``{'a', 'b', 'scale', 'salt'}`` per adapted Dense (``scale = alpha / r``, ``salt = crc32`` of the
    unrolled kernel path, the dropout mask's salt). For a scanned stack (stacked ``params``) the leaves
    get a leading layer axis, which ``nn.scan`` slices like the params (``variable_axes={'lora': 0}``):
    layers a LoRA leaves out get ``a = b = 0`` and ``scale = 0``, ranks that differ between layers are
    padded with zero columns of ``a`` / rows of ``b`` (exactly the same product). Pure and
    differentiable w.r.t. ``lora``; pass it as ``model.apply({'params': params, 'lora': ...}, ...)``."""
    out: dict = {}
    for tpath, (w, layers) in _group(params, lora).items():
        if None in layers:
            path, e = layers[None]
            v = {"a": e["a"], "b": e["b"], "scale": np.float32(alpha / rank_of(e)), "salt": np.uint32(_salt(path))}
        else:
            n, r = int(jnp.shape(w)[0]), max(rank_of(e) for _, e in layers.values())
            fan_in, width = math.prod(jnp.shape(w)[1:-1]), int(jnp.shape(w)[-1])
            ax = next(i for i, k in enumerate(tpath[:-1]) if k in STACKED)  # the stacked segment
            a, b, scale, salt = [], [], [], []
            for i in range(n):
                path, e = layers.get(i, (path_str(tpath[:ax] + (f"{tpath[ax]}_{i}",) + tpath[ax + 1:]), None))
                if e is None:
                    a.append(jnp.zeros((fan_in, r), jnp.float32))
                    b.append(jnp.zeros((r, width), jnp.float32))
                    scale.append(0.0)
                else:
                    pad = r - rank_of(e)
                    a.append(jnp.pad(e["a"], ((0, 0), (0, pad))) if pad else e["a"])
                    b.append(jnp.pad(e["b"], ((0, pad), (0, 0))) if pad else e["b"])
                    scale.append(alpha / rank_of(e))
                salt.append(_salt(path))
            v = {"a": jnp.stack(a), "b": jnp.stack(b), "scale": np.asarray(scale, np.float32),
                 "salt": np.asarray(salt, np.uint32)}
        node = out
        for k in tpath[:-1]:
            node = node.setdefault(k, {})
        node.update(v)
    return out


def lora_interceptor(dropout: float = 0.0, row_keys=None):
    """A flax method interceptor: every ``nn.Dense`` with ``'lora'`` variables (:func:`lora_variables`)
    returns ``dense(x) + scale * (drop(x) @ a) @ b`` with ``scale = alpha / r`` (PEFT's ``lora.Linear``;
    equal to ``x @ (W + (alpha/r) a b)`` without the dropout). ``drop`` zeroes each entry with
    probability ``dropout`` and scales by ``1 / (1 - dropout)``, its mask :func:`hash_keep_mask` of
    ``row_keys[i]`` salted with ``crc32`` of the unrolled kernel path (no dropout when ``row_keys`` is
    None). The variables are read from the module itself, so it works inside ``nn.scan`` (scanned
    layers get their own layer's ``a``, ``b``, scale and salt). Use it as::

        with nn.intercept_methods(lora_interceptor(dropout, row_keys)):
            model.apply({'params': params, 'lora': lora_variables(lora, params, alpha)}, ...)

    No merged copy of a kernel is made."""

    def icpt(next_fun, args, kwargs, ctx):
        if ctx.method_name != "__call__" or not isinstance(ctx.module, nn.Dense):
            return next_fun(*args, **kwargs)
        y = next_fun(*args, **kwargs)
        mod = ctx.module
        if not mod.has_variable("lora", "a"):
            return y
        a, b, scale, salt = (mod.get_variable("lora", k) for k in ("a", "b", "scale", "salt"))
        x = jnp.asarray(args[0]).astype(y.dtype)
        if dropout > 0 and row_keys is not None:
            keep = hash_keep_mask(jax.random.key_data(row_keys), salt, dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - dropout), 0.0).astype(y.dtype)
        a, b = a.astype(y.dtype), b.astype(y.dtype)
        dot = mod.dot_general or jax.lax.dot_general  # fairjax's Dense: the product's CPU form
        xa = dot(x, a, (((x.ndim - 1,), (0,)), ((), ())))
        xab = dot(xa, b, (((xa.ndim - 1,), (0,)), ((), ())))
        return y + (jnp.asarray(scale).astype(y.dtype) * xab).astype(y.dtype)

    return icpt


def _mix32(h):
    """lowbias32 (Wellons): an invertible 32-bit integer hash with good avalanche."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


def hash_keep_mask(key_data, salt, rate: float, shape) -> jax.Array:
    """Dropout keep-mask of ``shape`` (rows first): entry ``j`` of row ``i`` is kept when
    ``mix(mix(j ^ k_i0 ^ salt) ^ k_i1) >= rate * 2^32`` (``k_i`` = row ``i``'s key data).

    A counter-based hash of the element index, computed elementwise where it is used, so XLA
    fuses it into the dropout and never stores a mask (``jax.random.bernoulli`` masks were kept
    alive across layers by XLA, ~2 GB per device at 8 layers x 8 pairs). The index is built in
    ``shape`` itself from one iota per axis: computed on a flat ``(rows, prod(shape[1:]))`` iota and
    reshaped, the mask lost the activations' row sharding under FSDP, so XLA's SPMD partitioner
    computed it in another layout and moved it with an all-to-all (a stored bool mask per LoRA'd
    layer and pass, 0.17 GiB per LLaMA-7B layer at 8 pairs per device; bench/memory_vila_u.py).
    Keep probability ``1 - rate`` to within 2^-32; fresh masks per step, row and layer through the
    keys and salt."""
    shape = tuple(shape)
    kd = key_data.astype(jnp.uint32).reshape(shape[0], -1)
    row = (shape[0],) + (1,) * (len(shape) - 1)
    j = jnp.zeros((1,) + shape[1:], jnp.uint32)  # flat index within the row, built in x's own shape (no reshape)
    for axis in range(1, len(shape)):
        j = j + jax.lax.broadcasted_iota(jnp.uint32, (1,) + shape[1:], axis) * jnp.uint32(math.prod(shape[axis + 1:]))
    salt = jnp.asarray(salt & 0xFFFFFFFF if isinstance(salt, int) else salt, jnp.uint32)  # an int or a uint32 array
    h = _mix32(j ^ kd[:, :1].reshape(row) ^ salt)
    h = _mix32(h ^ kd[:, -1:].reshape(row))
    return h >= jnp.uint32(min(int(rate * 2**32), 2**32 - 1))
