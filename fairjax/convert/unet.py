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

from fairjax.convert.core import _flax_shape, flax_to_torch_key, plan_conversion, torch_to_flax_prefix
from fairjax.errors import CheckpointError
from fairjax.io.linked import LINK_FILE, link_json, linkable
from fairjax.io.model_dir import CONFIG_FILE, PARAMS_FILE, open_params, read_json, write_json
from fairjax.io.safetensors import SafetensorsReader, ShardedReader, check_float, write_safetensors
from fairjax.io.tree import Path, path_str

LITERAL = ("linear_1", "linear_2")
IGNORE: tuple[str, ...] = ()
WEIGHTS_NAME = "diffusion_pytorch_model"
CLASS_NAME = "UNet2DConditionModel"


# ----------------------------------------------------------------------------- names and shapes

def target_shapes(config: Mapping) -> dict[Path, tuple[int, ...]]:
    """``{flax path: shape}`` of the Flax UNet for a diffusers config dict (``jax.eval_shape``, no memory;
    traced once per config and process: :func:`fairjax.models.unet.config_shapes`)."""
    from fairjax.models.unet import config_shapes

    return config_shapes(config)


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


_BLOCK = 256  # rows per block: both sides of a transposed copy stay in cache (SDXL fp16 kernels: 6.8 s vs 10.1 s for
#              numpy's plain .T copy, 7.6 s at 64 rows; fewer blocks also mean fewer waits for the GIL)


def to_flax_array(a: np.ndarray, leaf: str, dtype=None) -> np.ndarray:
    """:func:`fairjax.convert.core.torch_to_flax_array` (OIHW -> HWIO, OIW -> WIO, (out, in) -> (in, out)) as a
    new C-contiguous array in ``dtype``, transposed in row blocks of the source."""
    dtype = np.dtype(dtype or a.dtype)
    perm = {2: (1, 0), 3: (2, 1, 0), 4: (2, 3, 1, 0)}.get(a.ndim) if leaf == "kernel" else None
    if perm is None:
        return np.array(a, dtype=dtype, order="C", copy=True)
    out = np.empty(tuple(a.shape[p] for p in perm), dtype)
    for i in range(0, a.shape[0], _BLOCK):
        out[..., i:i + _BLOCK] = a[i:i + _BLOCK].transpose(perm)
    return out


def to_torch_array(a: np.ndarray, leaf: str, dtype=None) -> np.ndarray:
    """Inverse of :func:`to_flax_array` (HWIO -> OIHW, (in, out) -> (out, in)), C-contiguous, in ``dtype``."""
    dtype = np.dtype(dtype or a.dtype)
    perm = {2: (1, 0), 3: (2, 1, 0), 4: (3, 2, 0, 1)}.get(a.ndim) if leaf == "kernel" else None
    if perm is None:
        return np.array(a, dtype=dtype, order="C", copy=True)
    out = np.empty(tuple(a.shape[p] for p in perm), dtype)
    for i in range(0, out.shape[0], _BLOCK):
        out[i:i + _BLOCK] = a[..., i:i + _BLOCK].transpose(perm)
    return out


class Prefetcher:
    """Computes tensors ``i+1 .. i+depth`` in worker threads while tensor ``i`` is written.

    ``pread``, numpy copies and file writes release the GIL, so reading and transposing
    overlap with writing; at most ``depth + 1`` tensors are held at once. ``check`` (if
    given) is called after each tensor, ``progress`` (a tqdm bar) counts bytes.
    """

    def __init__(self, fns, depth: int = 4, workers: int | None = None, check=None, progress=None):
        self.fns, self.depth, self.check, self.progress = fns, depth, check, progress
        workers = workers or max(2, min(4, os.cpu_count() or 2))
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="fairjax-convert")
        self.futures: dict[int, Future] = {}

    def get(self, i: int) -> np.ndarray:
        for j in range(i, min(i + self.depth + 1, len(self.fns))):
            if j not in self.futures:
                self.futures[j] = self.pool.submit(self.fns[j])
        a = self.futures.pop(i).result()
        if self.check is not None:
            self.check()
        if self.progress is not None:
            self.progress.update(a.nbytes)
        return a

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.futures.clear()
        if self.progress is not None:
            self.progress.close()


class _Lazy:
    """A tensor computed only when the writer asks for it (``write_safetensors`` reads
    ``shape``/``dtype`` for the header, then ``np.asarray`` each item in turn)."""

    def __init__(self, fn, shape: tuple[int, ...], dtype):
        self._fn, self.shape, self.dtype = fn, tuple(shape), np.dtype(dtype)

    def __array__(self, dtype=None, copy=None):
        a = self._fn()
        return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)


def pipelined(specs: list[tuple[str, object, tuple[int, ...], object]], *, check=None,
               desc: str | None = None) -> tuple[list, Prefetcher]:
    """``[(key, fn, shape, dtype)]`` -> (``[(key, _Lazy)]`` computed through one :class:`Prefetcher`, the pipeline);
    with ``desc``, a progress bar over the bytes (shown on a terminal only)."""
    bar = None
    if desc:
        from tqdm import tqdm

        total = sum(int(np.prod(shape)) * np.dtype(dt).itemsize for _, _, shape, dt in specs)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=None, leave=False)
    pipe = Prefetcher([fn for _, fn, _, _ in specs], check=check, progress=bar)
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


def lazy_flax_items(reader, shapes: Mapping[Path, tuple[int, ...]], dtype=None, *, check=None,
                    desc: str | None = None) -> tuple[list, Prefetcher]:
    """Plan the whole conversion from the headers: ``[('/'-joined flax path, lazy array)]`` and its pipeline.

    Raises :class:`CheckpointError` listing every missing, unexpected and
    mismatched key before anything is read. ``dtype=None`` keeps each tensor's
    dtype. Tensors are read with ``pread`` (``reader.read``: no file page stays
    mapped). Close the returned pipeline when done.
    """
    mapping = plan({k: reader.shape(k) for k in reader.keys()}, shapes)
    check_float(reader, mapping, reader.folder)
    specs = []
    for key, (path, leaf) in sorted(mapping.items(), key=lambda kv: kv[1][0]):
        dt = np.dtype(dtype if dtype is not None else reader.dtype(key))
        specs.append((path_str(path), lambda key=key, leaf=leaf, dt=dt: to_flax_array(reader.read(key), leaf, dt),
                      shapes[path], dt))
    return pipelined(specs, check=check, desc=desc)


def implied_shapes(source_shapes: Mapping[str, tuple[int, ...]]) -> dict[Path, tuple[int, ...]]:
    """The Flax params a diffusers UNet state dict implies by the key rules alone: ``a.0.b.weight`` ->
    ``a_0/b/scale`` for a 1-D weight (the norms), ``.../kernel`` otherwise (convs, linears; transposed
    shape), any other leaf as named. This is what :func:`target_shapes` traces for every diffusers UNet,
    and lets a conversion start before the trace ends (:func:`convert_component` compares the two)."""
    out = {}
    for key, shape in source_shapes.items():
        prefix = torch_to_flax_prefix(key)
        leaf = prefix[-1]
        if leaf == "weight":
            leaf = "scale" if len(shape) == 1 else "kernel"
        out[prefix[:-1] + (leaf,)] = tuple(_flax_shape(tuple(shape), leaf))
    return out


def write_linked(out: str, reader: ShardedReader, mapping: Mapping[str, tuple[Path, str]],
                 shapes: Mapping[Path, tuple[int, ...]], config: Mapping) -> dict:
    """Write component folder ``out`` as a link to ``reader``'s files (``params.link.json`` + ``config.json``;
    :mod:`fairjax.io.linked`) for a checked ``mapping`` (:func:`plan`); returns the converter's summary."""
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, LINK_FILE),
               link_json({path_str(p): (reader.file_of(k), k) for k, (p, _) in mapping.items()}))
    write_json(os.path.join(out, CONFIG_FILE), config)
    return {"arrays": len(mapping), "params": int(sum(np.prod(s) for s in shapes.values())), "linked": True}


class _Replan(Exception):
    """The model's params differ from the implied ones although the checkpoint fits them: convert again."""


def _write(reader, shapes, dtype, out: str, src: str, check=None) -> int:
    items, pipe = lazy_flax_items(reader, shapes, dtype, check=check, desc="unet")
    try:
        write_safetensors(os.path.join(out, PARAMS_FILE), items, {"format": "fairjax", "source": os.path.abspath(src)})
    finally:
        pipe.close()
    return len(items)


def convert_component(src: str, out: str, *, dtype=None, variant: str | None = None, link: bool = False) -> dict:
    """diffusers ``unet/`` folder ``src`` -> fairjax component folder ``out`` (created).

    Writes ``out/config.json`` (the diffusers config as is) and
    ``out/params.safetensors`` (Flax paths and layout, ``dtype`` or the source
    dtype). Returns ``{'arrays': n, 'params': count}``. The caller owns atomicity
    (``atomic_output_dir``); on error ``out`` may hold partial files.

    The model's shapes are traced (:func:`target_shapes`, seconds for SDXL) in a thread while
    tensors are already read, transposed and written in the layout the checkpoint implies
    (:func:`implied_shapes`); the two are compared as soon as the trace ends, and again before
    returning: a checkpoint that does not fit is the same one-line error as before any tensor
    was read, only later.

    ``link=True`` and no dtype change (the model cache): ``out/params.link.json`` instead of the params file,
    written once the trace has checked every key and shape; the tensors stay in the source, read and
    transposed when used (:mod:`fairjax.io.linked`).
    """
    cfg_path = os.path.join(src, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{src}: no {CONFIG_FILE}; point at a diffusers unet/ folder (config.json + "
                              f"{WEIGHTS_NAME}*.safetensors)")
    config = read_json(cfg_path)
    _check_config(config, src)
    with open_weights(src, variant) as reader, ThreadPoolExecutor(1, thread_name_prefix="fairjax-shapes") as ex:
        source = {k: reader.shape(k) for k in reader.keys()}
        traced = ex.submit(target_shapes, config)
        if link and linkable(reader, source, dtype):
            shapes = traced.result()
            try:
                mapping = plan(source, shapes)
            except CheckpointError as e:
                raise CheckpointError(f"{src}: {e} (does its config.json belong to these weights?)") from None
            check_float(reader, mapping, src)
            return write_linked(out, reader, mapping, shapes, config)
        implied = implied_shapes({k: s for k, s in source.items()})
        done: list[bool] = []

        def verify(block: bool = False) -> None:
            if done or not (block or traced.done()):
                return
            shapes = traced.result()
            if shapes != implied:
                try:
                    plan(source, shapes)
                except CheckpointError as e:
                    raise CheckpointError(f"{src}: {e} (does its config.json belong to these weights?)") from None
                raise _Replan()
            done.append(True)

        os.makedirs(out, exist_ok=True)
        try:
            n = _write(reader, implied, dtype, out, src, check=verify)
            verify(block=True)
        except _Replan:
            n = _write(reader, traced.result(), dtype, out, src)
        shapes = traced.result()
    write_json(os.path.join(out, CONFIG_FILE), config)
    return {"arrays": n, "params": int(sum(np.prod(s) for s in shapes.values()))}


# ----------------------------------------------------------------------------- export

def merge_kernel(w: np.ndarray, entry: Mapping, alpha: float) -> np.ndarray:
    """``W + (alpha/r) (a @ b).reshape(W.shape)`` in float32 (:func:`fairjax.lora.merge`, one kernel)."""
    from fairjax import lora as lora_lib

    return np.asarray(w, np.float32) + np.asarray(lora_lib.delta(entry, tuple(w.shape), alpha), np.float32)


def lazy_torch_items(reader: SafetensorsReader, shapes: Mapping[Path, tuple[int, ...]], *, dtype=None,
                     lora: Mapping | None = None, alpha: float | None = None) -> tuple[list, Prefetcher]:
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
    return pipelined(specs)


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
    with open_params(src) as reader:
        items, pipe = lazy_torch_items(reader, shapes, dtype=dtype, lora=lora, alpha=alpha)
        os.makedirs(out, exist_ok=True)
        try:
            write_safetensors(os.path.join(out, f"{WEIGHTS_NAME}.safetensors"), items, {"format": "pt"})
        finally:
            pipe.close()
    write_json(os.path.join(out, CONFIG_FILE), config)
    return {"arrays": len(items)}


def lora_factors(lora: Mapping, kernel_shapes: Mapping[str, tuple[int, ...]]
                 ) -> Iterator[tuple[str, np.ndarray, np.ndarray, int]]:
    """``(diffusers module path, down, up, r)`` per entry of a fairjax LoRA, in PyTorch layout, float32.

    ``lora`` is ``{'<flax kernel path>': {'a': (prod(K), r), 'b': (r, out)}}`` for a kernel of shape
    ``(*K, out)`` (:mod:`fairjax.lora`), merged in Flax as ``W + (alpha/r) (a @ b).reshape(W.shape)``;
    ``kernel_shapes`` gives ``W.shape``. Dense ``(in, out)``: ``down = a^T`` (r, in), ``up = b^T`` (out, r);
    conv HWIO ``(kh, kw, in, out)``: ``down`` (r, in, kh, kw), ``up`` (out, r, 1, 1). PyTorch's merge
    ``W + (alpha/r) up @ down`` then equals the Flax one.
    """
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
        down = a.reshape(*kshape[:-1], r)               # (*K, r): lora_A in Flax layout
        up = b.T                                        # (out, r)
        if len(kshape) == 4:
            down = down.transpose(3, 2, 0, 1)           # HWIO -> OIHW with O = r
            up = up[:, :, None, None]
        elif len(kshape) == 2:
            down = down.T
        else:
            raise CheckpointError(f"LoRA entry {key!r}: a rank-{len(kshape)} kernel cannot be exported to PyTorch")
        yield module_name(path), down, up, r


def lora_state(lora: Mapping, alpha: float, kernel_shapes: Mapping[str, tuple[int, ...]], *,
               prefix: str | None = "unet", dtype=np.float32) -> Iterator[tuple[str, np.ndarray]]:
    """Yield a fairjax LoRA as diffusers / PEFT ``(key, array)`` pairs, ``alpha / r`` folded into ``lora_B``.

    PEFT computes ``W + (lora_alpha/r) B A``; writing ``A = down`` and ``B = (alpha/r) up``
    (:func:`lora_factors`) makes PEFT's default ``lora_alpha = r`` (scale 1, what diffusers uses for a
    file without alphas) reproduce the Flax merge for any alpha.
    Keys are ``[prefix.]<module>.lora_A.weight``: ``prefix='unet'`` is the pipeline
    format (``pipe.load_lora_weights``, ``unet.load_lora_adapter(sd, prefix='unet')``),
    ``prefix=None`` the bare format (``unet.load_lora_adapter(sd, prefix=None)``).
    """
    head = f"{prefix}." if prefix else ""
    for mod, down, up, r in lora_factors(lora, kernel_shapes):
        yield f"{head}{mod}.lora_A.weight", np.ascontiguousarray(down, dtype=dtype)
        yield f"{head}{mod}.lora_B.weight", np.ascontiguousarray(up * np.float32(alpha / r), dtype=dtype)


#: modules whose kohya name is the original (SGM) one: diffusers' kohya loader turns ``add_embedding_linear_1``
#: into ``add.embedding.linear`` (it drops the digit of ``*emb*`` names) but maps ``label_emb_0_0`` back;
#: A1111 and ComfyUI read both names
KOHYA_SGM_NAMES = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def kohya_module(module: str) -> str:
    """diffusers module path -> kohya key stem: ``lora_unet_<module path with '.' -> '_'>``
    (``down_blocks.1.attentions.0.proj_in`` -> ``lora_unet_down_blocks_1_attentions_0_proj_in``)."""
    return "lora_unet_" + KOHYA_SGM_NAMES.get(module, module).replace(".", "_")


def lora_state_kohya(lora: Mapping, alpha: float, kernel_shapes: Mapping[str, tuple[int, ...]], *,
                     dtype=np.float32) -> Iterator[tuple[str, np.ndarray]]:
    """Yield a fairjax LoRA in the kohya format of A1111, ComfyUI and diffusers' ``load_lora_weights``:
    ``<stem>.lora_down.weight`` (= down), ``<stem>.lora_up.weight`` (= up) and ``<stem>.alpha`` (a float32
    scalar, ``alpha``) per module (:func:`kohya_module`, :func:`lora_factors`); the loaders merge
    ``W + (alpha / r) up @ down`` with ``r`` = ``lora_down``'s first dimension, the Flax merge."""
    for mod, down, up, _ in lora_factors(lora, kernel_shapes):
        stem = kohya_module(mod)
        yield f"{stem}.lora_down.weight", np.ascontiguousarray(down, dtype=dtype)
        yield f"{stem}.lora_up.weight", np.ascontiguousarray(up, dtype=dtype)
        yield f"{stem}.alpha", np.asarray(alpha, np.float32)


LORA_FORMATS = ("peft", "kohya")


def export_lora(src: str, lora: Mapping, alpha: float, out_file: str, *, prefix: str | None = "unet",
                dtype=np.float32, meta: Mapping | None = None, format: str = "peft") -> dict:
    """Write ``lora`` (for the unet component folder ``src``) as a LoRA file (atomic): ``format='peft'`` in the
    diffusers / PEFT key format (:func:`lora_state`, ``prefix``), ``'kohya'`` in the kohya format
    (:func:`lora_state_kohya`)."""
    if format not in LORA_FORMATS:
        raise CheckpointError(f"unknown LoRA format {format!r}; choose one of {', '.join(LORA_FORMATS)}")
    _, shapes = read_component(src)
    kernel_shapes = {path_str(p): s for p, s in shapes.items()}
    ranks = sorted({int(np.shape(e["a"])[-1]) for e in lora.values()})
    if format == "kohya":
        items = list(lora_state_kohya(lora, alpha, kernel_shapes, dtype=dtype))
        metadata = {"format": "pt", "ss_network_module": "networks.lora", "ss_network_alpha": f"{float(alpha):g}",
                    "ss_network_dim": str(ranks[0]) if len(ranks) == 1 else "dynamic",
                    "fairjax_alpha": str(float(alpha)), "fairjax_rank": ",".join(map(str, ranks))}
    else:
        items = list(lora_state(lora, alpha, kernel_shapes, prefix=prefix, dtype=dtype))
        metadata = {"format": "pt", "fairjax_alpha": str(float(alpha)), "fairjax_rank": ",".join(map(str, ranks)),
                    "fairjax_note": "alpha/r is folded into lora_B; load with the default lora_alpha = r"}
    metadata.update({f"fairjax_{k}": str(v) for k, v in (meta or {}).items()})
    write_safetensors(out_file, items, metadata)
    return {"modules": len(lora), "tensors": len(items), "format": format}
