"""The UNet family's conversion rules (diffusers ``UNet2DConditionModel`` <-> Flax).

The generic rules of :mod:`fairjax.convert.core` cover every key; the family
only adds

* ``LITERAL``: Flax segment names that are real diffusers attribute names, not
  ``ModuleList`` indices (``time_embedding.linear_1``, ``add_embedding.linear_2``),
  so that export writes ``linear_1`` and not ``linear.1``,
* ``IGNORE``: checkpoint keys with no Flax counterpart (none in diffusers 0.42).

Import (diffusers ``unet/`` folder -> fairjax component folder) and export
(fairjax component folder -> diffusers ``unet/`` folder, optionally with a LoRA
merged) both stream: every key and shape is checked from the file headers first,
then tensors are read, transposed, cast and written one at a time, so neither
holds more than one tensor beyond the memory-mapped input.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from fairjax.convert.core import flax_to_torch_key, plan_conversion
from fairjax.errors import CheckpointError
from fairjax.io.model_dir import CONFIG_FILE, PARAMS_FILE, read_json, write_json
from fairjax.io.safetensors import SafetensorsReader, ShardedReader, check_float, write_safetensors
from fairjax.io.tree import Path, path_str, shapes_of

LITERAL = ("linear_1", "linear_2")
IGNORE: tuple[str, ...] = ()
WEIGHTS_NAME = "diffusion_pytorch_model"
CLASS_NAME = "UNet2DConditionModel"


# ----------------------------------------------------------------------------- names and shapes

def target_shapes(config: Mapping) -> dict[Path, tuple[int, ...]]:
    """``{flax path: shape}`` of the Flax UNet for a diffusers config dict (``jax.eval_shape``, no memory)."""
    from fairjax.models.unet import UNet2DConditionModel, param_shapes

    return shapes_of(param_shapes(UNet2DConditionModel.from_config(config)))


def plan(source_shapes: Mapping[str, tuple[int, ...]], shapes: Mapping[Path, tuple[int, ...]]) -> dict:
    """Map a diffusers state dict's ``{key: shape}`` onto the Flax UNet; one error lists every problem."""
    return plan_conversion(source_shapes, shapes, ignore=IGNORE)


def torch_key(path: Path) -> str:
    """Flax path -> diffusers key (``add_embedding/linear_1/kernel`` -> ``add_embedding.linear_1.weight``)."""
    return flax_to_torch_key(path, LITERAL)


def module_name(path: Path) -> str:
    """Flax kernel path -> diffusers module path (``.../attn1/to_q/kernel`` -> ``...attn1.to_q``)."""
    return torch_key(path).rsplit(".", 1)[0]


def torch_shape(shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
    """Flax leaf shape -> PyTorch tensor shape (kernels: HWIO -> OIHW, (in, out) -> (out, in))."""
    if leaf == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if leaf == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


_BLOCK = 64  # rows per block: keeps both sides of a transposed copy in cache (~2x numpy's plain .T copy)


def to_flax_array(a: np.ndarray, leaf: str, dtype=None) -> np.ndarray:
    """:func:`fairjax.convert.core.torch_to_flax_array` (OIHW -> HWIO, (out, in) -> (in, out)) as a new
    C-contiguous array in ``dtype``, transposed in row blocks of the source."""
    dtype = np.dtype(dtype or a.dtype)
    perm = {2: (1, 0), 4: (2, 3, 1, 0)}.get(a.ndim) if leaf == "kernel" else None
    if perm is None:
        return np.array(a, dtype=dtype, order="C", copy=True)
    out = np.empty(tuple(a.shape[p] for p in perm), dtype)
    for i in range(0, a.shape[0], _BLOCK):
        out[..., i:i + _BLOCK] = a[i:i + _BLOCK].transpose(perm)
    return out


def to_torch_array(a: np.ndarray, leaf: str, dtype=None) -> np.ndarray:
    """Inverse of :func:`to_flax_array` (HWIO -> OIHW, (in, out) -> (out, in)), C-contiguous, in ``dtype``."""
    dtype = np.dtype(dtype or a.dtype)
    perm = {2: (1, 0), 4: (3, 2, 0, 1)}.get(a.ndim) if leaf == "kernel" else None
    if perm is None:
        return np.array(a, dtype=dtype, order="C", copy=True)
    out = np.empty(tuple(a.shape[p] for p in perm), dtype)
    for i in range(0, out.shape[0], _BLOCK):
        out[i:i + _BLOCK] = a[..., i:i + _BLOCK].transpose(perm)
    return out


class _Pipeline:
    """Computes tensor ``i+1 .. i+depth`` in worker threads while tensor ``i`` is written.

    numpy copies and file writes release the GIL, so reading / transposing overlaps
    with writing; at most ``depth + 1`` tensors are held at once.
    """

    def __init__(self, fns, depth: int = 3, workers: int = 2):
        self.fns, self.depth = fns, depth
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="fairjax-convert")
        self.futures: dict[int, Future] = {}

    def get(self, i: int) -> np.ndarray:
        for j in range(i, min(i + self.depth + 1, len(self.fns))):
            if j not in self.futures:
                self.futures[j] = self.pool.submit(self.fns[j])
        return self.futures.pop(i).result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.futures.clear()


class _Lazy:
    """A tensor computed only when the writer asks for it (``write_safetensors`` reads
    ``shape``/``dtype`` for the header, then ``np.asarray`` each item in turn)."""

    def __init__(self, fn, shape: tuple[int, ...], dtype):
        self._fn, self.shape, self.dtype = fn, tuple(shape), np.dtype(dtype)

    def __array__(self, dtype=None, copy=None):
        a = self._fn()
        return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)


def _pipelined(specs: list[tuple[str, object, tuple[int, ...], object]]) -> tuple[list, _Pipeline]:
    """``[(key, fn, shape, dtype)]`` -> (``[(key, _Lazy)]`` computed through one :class:`_Pipeline`, the pipeline)."""
    pipe = _Pipeline([fn for _, fn, _, _ in specs])
    items = [(key, _Lazy(lambda i=i: pipe.get(i), shape, dt)) for i, (key, _, shape, dt) in enumerate(specs)]
    return items, pipe


def _check_config(config: Mapping, where: str) -> None:
    from fairjax.models.unet import UNetConfig

    name = config.get("_class_name", CLASS_NAME)
    if name != CLASS_NAME:
        raise CheckpointError(f"{where} is a {name} folder, not a {CLASS_NAME} (unet) folder")
    UNetConfig.from_dict(config)


# ----------------------------------------------------------------------------- import

def open_weights(folder: str, variant: str | None = None) -> ShardedReader:
    """Open a diffusers ``unet/`` weight folder: one file or shards, plain or ``.fp16``/``.bf16`` variant.

    With ``variant=None`` the plain weights are preferred, then ``fp16``, then ``bf16``.
    """
    if variant is not None:
        return ShardedReader(folder, WEIGHTS_NAME, variant=variant)
    for v in (None, "fp16", "bf16"):
        names = ([f"{WEIGHTS_NAME}.{v}.safetensors", f"{WEIGHTS_NAME}.{v}.safetensors.index.json",
                  f"{WEIGHTS_NAME}.safetensors.index.{v}.json"] if v else
                 [f"{WEIGHTS_NAME}.safetensors", f"{WEIGHTS_NAME}.safetensors.index.json"])
        if any(os.path.isfile(os.path.join(folder, n)) for n in names):
            return ShardedReader(folder, WEIGHTS_NAME, variant=v)
    return ShardedReader(folder, WEIGHTS_NAME)  # raises: names the folder and what it holds


def lazy_flax_items(reader, shapes: Mapping[Path, tuple[int, ...]], dtype=None) -> tuple[list, _Pipeline]:
    """Plan the whole conversion from the headers: ``[('/'-joined flax path, lazy array)]`` and its pipeline.

    Raises :class:`CheckpointError` listing every missing, unexpected and
    mismatched key before anything is read. ``dtype=None`` keeps each tensor's
    dtype. Close the returned pipeline when done.
    """
    mapping = plan({k: reader.shape(k) for k in reader.keys()}, shapes)
    check_float(reader, mapping, reader.folder)
    specs = []
    for key, (path, leaf) in sorted(mapping.items(), key=lambda kv: kv[1][0]):
        dt = np.dtype(dtype if dtype is not None else reader.dtype(key))
        specs.append((path_str(path), lambda key=key, leaf=leaf, dt=dt: to_flax_array(reader[key], leaf, dt),
                      shapes[path], dt))
    return _pipelined(specs)


def convert_component(src: str, out: str, *, dtype=None, variant: str | None = None) -> dict:
    """diffusers ``unet/`` folder ``src`` -> fairjax component folder ``out`` (created).

    Writes ``out/config.json`` (the diffusers config as is) and
    ``out/params.safetensors`` (Flax paths and layout, ``dtype`` or the source
    dtype). Returns ``{'arrays': n, 'params': count}``. The caller owns atomicity
    (``atomic_output_dir``); on error ``out`` may hold partial files.
    """
    cfg_path = os.path.join(src, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{src}: no {CONFIG_FILE}; point at a diffusers unet/ folder (config.json + "
                              f"{WEIGHTS_NAME}*.safetensors)")
    config = read_json(cfg_path)
    _check_config(config, src)
    with open_weights(src, variant) as reader:  # the headers are checked before the model is traced
        shapes = target_shapes(config)
        try:
            items, pipe = lazy_flax_items(reader, shapes, dtype)
        except CheckpointError as e:
            raise CheckpointError(f"{src}: {e} (does its config.json belong to these weights?)") from None
        os.makedirs(out, exist_ok=True)
        try:
            write_safetensors(os.path.join(out, PARAMS_FILE), items,
                              {"format": "fairjax", "source": os.path.abspath(src)})
        finally:
            pipe.close()
    write_json(os.path.join(out, CONFIG_FILE), config)
    return {"arrays": len(items), "params": int(sum(np.prod(s) for s in shapes.values()))}


# ----------------------------------------------------------------------------- export

def merge_kernel(w: np.ndarray, entry: Mapping, alpha: float) -> np.ndarray:
    """``W + (alpha/r) (a @ b).reshape(W.shape)`` in float32 (:func:`fairjax.lora.merge`, one kernel)."""
    from fairjax import lora as lora_lib

    return np.asarray(w, np.float32) + np.asarray(lora_lib.delta(entry, tuple(w.shape), alpha), np.float32)


def lazy_torch_items(reader: SafetensorsReader, shapes: Mapping[Path, tuple[int, ...]], *, dtype=None,
                     lora: Mapping | None = None, alpha: float | None = None) -> tuple[list, _Pipeline]:
    """A fairjax ``params.safetensors`` (``reader``) as lazy ``(diffusers key, PyTorch-layout array)``.

    Every key and shape is checked against ``shapes`` (the model the config
    describes) first; kernels named in ``lora`` are merged on the fly.
    """
    want = {path_str(p): tuple(s) for p, s in shapes.items()}
    have = {k: reader.shape(k) for k in reader.keys()}
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    bad = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or unexpected or bad:
        raise CheckpointError(f"{reader.path} does not fit its config.json: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}, shape mismatch {bad[:5]} "
                              f"({len(missing)}/{len(unexpected)}/{len(bad)} in all)")
    check_float(reader, have, reader.path)
    lora = dict(lora or {})
    unknown = sorted(set(lora) - set(have))
    if unknown:
        raise CheckpointError(f"LoRA targets {unknown[:5]} are not params of this UNet; was it trained on "
                              f"another model?")
    if lora:
        from fairjax import lora as lora_lib

        lora_lib.check_fits(lora, have)  # before the first tensor is written
    specs = []
    for k in sorted(have):
        path = tuple(k.split("/"))
        leaf = path[-1]
        dt = np.dtype(dtype if dtype is not None else reader.dtype(k))

        def fn(k=k, leaf=leaf, dt=dt):
            a = reader[k]
            if k in lora:
                a = merge_kernel(a, lora[k], alpha)
            return to_torch_array(a, leaf, dt)

        specs.append((torch_key(path), fn, torch_shape(have[k], leaf), dt))
    return _pipelined(specs)


def read_component(folder: str) -> tuple[dict, dict[Path, tuple[int, ...]]]:
    """Config and target shapes of a fairjax unet component folder (validated)."""
    config = read_json(os.path.join(folder, CONFIG_FILE))
    _check_config(config, folder)
    return config, target_shapes(config)


def export_component(src: str, out: str, *, dtype=None, lora: Mapping | None = None,
                     alpha: float | None = None) -> dict:
    """fairjax unet component folder ``src`` -> diffusers ``unet/`` folder ``out`` (created).

    Writes ``config.json`` (as stored) and ``diffusion_pytorch_model.safetensors``
    that ``UNet2DConditionModel.from_pretrained`` loads with no missing or
    unexpected keys; ``lora`` (with ``alpha``) is merged into its kernels.
    """
    config, shapes = read_component(src)
    config.setdefault("_class_name", CLASS_NAME)
    with SafetensorsReader(os.path.join(src, PARAMS_FILE)) as reader:
        items, pipe = lazy_torch_items(reader, shapes, dtype=dtype, lora=lora, alpha=alpha)
        os.makedirs(out, exist_ok=True)
        try:
            write_safetensors(os.path.join(out, f"{WEIGHTS_NAME}.safetensors"), items, {"format": "pt"})
        finally:
            pipe.close()
    write_json(os.path.join(out, CONFIG_FILE), config)
    return {"arrays": len(items)}


def lora_state(lora: Mapping, alpha: float, kernel_shapes: Mapping[str, tuple[int, ...]], *,
               prefix: str | None = "unet", dtype=np.float32) -> Iterator[tuple[str, np.ndarray]]:
    """Yield a fairjax LoRA as diffusers / PEFT ``(key, array)`` pairs, ``alpha / r`` folded into ``lora_B``.

    ``lora`` is ``{'<flax kernel path>': {'a': (prod(K), r), 'b': (r, out)}}`` for a
    kernel of shape ``(*K, out)`` (:mod:`fairjax.lora`), merged in Flax as
    ``W + (alpha/r) (a @ b).reshape(W.shape)``; ``kernel_shapes`` gives ``W.shape``.
    PEFT computes ``W + (lora_alpha/r) B A``; writing ``A = a^T`` and
    ``B = (alpha/r) b^T`` makes PEFT's default ``lora_alpha = r`` (scale 1, what
    diffusers uses for a file without alphas) reproduce the Flax merge for any alpha.

    Dense ``(in, out)``: ``lora_A`` (r, in), ``lora_B`` (out, r). Conv HWIO
    ``(kh, kw, in, out)``: ``lora_A`` (r, in, kh, kw), ``lora_B`` (out, r, 1, 1).
    Keys are ``[prefix.]<module>.lora_A.weight``: ``prefix='unet'`` is the pipeline
    format (``pipe.load_lora_weights``, ``unet.load_lora_adapter(sd, prefix='unet')``),
    ``prefix=None`` the bare format (``unet.load_lora_adapter(sd, prefix=None)``).
    """
    head = f"{prefix}." if prefix else ""
    for key in sorted(lora):
        path = tuple(key.split("/"))
        if path[-1] != "kernel" or key not in kernel_shapes:
            raise CheckpointError(f"LoRA entry {key!r} is not a kernel of this UNet; was the LoRA trained "
                                  f"on another model?")
        kshape = tuple(kernel_shapes[key])
        a = np.asarray(lora[key]["a"], np.float32)
        b = np.asarray(lora[key]["b"], np.float32)
        r = a.shape[-1]
        if a.shape != (int(np.prod(kshape[:-1])), r) or b.shape != (r, kshape[-1]):
            raise CheckpointError(f"LoRA entry {key!r}: a {a.shape} / b {b.shape} do not fit the kernel {kshape}")
        lora_a = a.reshape(*kshape[:-1], r)             # (*K, r): lora_A in Flax layout
        lora_b = (b * np.float32(alpha / r)).T          # (out, r)
        if len(kshape) == 4:
            lora_a = lora_a.transpose(3, 2, 0, 1)       # HWIO -> OIHW with O = r
            lora_b = lora_b[:, :, None, None]
        elif len(kshape) == 2:
            lora_a = lora_a.T
        else:
            raise CheckpointError(f"LoRA entry {key!r}: a rank-{len(kshape)} kernel cannot be exported to PEFT")
        mod = head + module_name(path)
        yield f"{mod}.lora_A.weight", np.ascontiguousarray(lora_a, dtype=dtype)
        yield f"{mod}.lora_B.weight", np.ascontiguousarray(lora_b, dtype=dtype)


def export_lora(src: str, lora: Mapping, alpha: float, out_file: str, *, prefix: str | None = "unet",
                dtype=np.float32, meta: Mapping | None = None) -> dict:
    """Write ``lora`` (for the unet component folder ``src``) as a diffusers/PEFT LoRA file (atomic)."""
    _, shapes = read_component(src)
    kernel_shapes = {path_str(p): s for p, s in shapes.items()}
    items = list(lora_state(lora, alpha, kernel_shapes, prefix=prefix, dtype=dtype))
    ranks = sorted({int(np.shape(e["a"])[-1]) for e in lora.values()})
    metadata = {"format": "pt", "fairjax_alpha": str(float(alpha)), "fairjax_rank": ",".join(map(str, ranks)),
                "fairjax_note": "alpha/r is folded into lora_B; load with the default lora_alpha = r"}
    metadata.update({f"fairjax_{k}": str(v) for k, v in (meta or {}).items()})
    write_safetensors(out_file, items, metadata)
    return {"modules": len(lora), "tensors": len(items)}
