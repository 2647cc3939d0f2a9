"""Whole diffusers pipeline folders <-> fairjax model directories.

A diffusers pipeline folder (``StableDiffusionXLPipeline.save_pretrained``) lists its parts in
``model_index.json`` as ``{"<subfolder>": ["<library>", "<class>"]}``. Each part is one of

* a network with a fairjax port: converted (``unet/`` by :mod:`fairjax.convert.unet`,
  ``vae/`` and ``text_encoder*/`` by the streaming converters here, which apply the family
  rules of :mod:`fairjax.convert.vae` and :mod:`fairjax.convert.clip`),
* a weight-free part (tokenizer, scheduler, image processor: class name ending in
  ``Tokenizer``, ``TokenizerFast``, ``Scheduler``, ``ImageProcessor``, ``FeatureExtractor``):
  its folder is copied verbatim, both ways,
* anything else (a safety checker, an image encoder): skipped and listed in ``fairjax.json``.

``model_index.json`` itself is copied into the model directory, and written back on export
with the entries of skipped parts set to ``[null, null]`` (what diffusers writes for a part
passed as ``None``), so ``DiffusionPipeline.from_pretrained`` loads the export as is.

Conversion and export stream: every key and shape is checked from the file headers first,
then tensors are read, transposed, cast and written one at a time.

:func:`convert_folder` turns a whole source folder (a pipeline, or one component folder) into a
model directory; ``tools/convert_diffusers.py`` and :mod:`fairjax.convert.resolve` call it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping

import ml_dtypes
import numpy as np

from fairjax.convert import clip as clip_convert
from fairjax.convert import unet as unet_convert
from fairjax.convert import vae as vae_convert
from fairjax.convert.core import flax_to_torch_array, flax_to_torch_key, plan_conversion
from fairjax.errors import CheckpointError, UserError
from fairjax.io.linked import linkable
from fairjax.io.model_dir import (CONFIG_FILE, PARAMS_FILE, atomic_output_dir, open_params, read_json, write_index,
                                  write_json)
from fairjax.io.safetensors import ShardedReader, check_float, write_safetensors
from fairjax.io.tree import Path, path_str

MODEL_INDEX = "model_index.json"
#: classes whose folder holds no weights and is copied verbatim
COPIED_CLASS = re.compile(r"(Tokenizer|TokenizerFast|Scheduler|ImageProcessor|FeatureExtractor)$")
#: folders copied when a model dir has no model_index.json (e.g. one built by fairjax.diffusion.tiny)
DEFAULT_COPIED = ("tokenizer", "tokenizer_2", "scheduler", "feature_extractor")
#: files a copied folder must hold (any one group of the list), by class-name suffix
REQUIRED_FILES = {
    "Scheduler": [("scheduler_config.json",)],
    "Tokenizer": [("vocab.json", "merges.txt"), ("tokenizer.json",), ("spiece.model",), ("tokenizer.model",)],
    "TokenizerFast": [("tokenizer.json",), ("vocab.json", "merges.txt")],
    "ImageProcessor": [("preprocessor_config.json",)],
    "FeatureExtractor": [("preprocessor_config.json",)],
}


# ----------------------------------------------------------------------------- model_index.json

def index_entries(folder: str) -> dict[str, tuple[str, str]]:
    """``{subfolder: (library, class)}`` of the parts ``folder/model_index.json`` names (null entries left out)."""
    index = read_json(os.path.join(folder, MODEL_INDEX))
    return {k: (v[0], v[1]) for k, v in sorted(index.items())
            if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0] is not None}


def is_copied_class(cls: str | None) -> bool:
    return bool(cls) and COPIED_CLASS.search(cls) is not None


def copied_parts(folder: str) -> dict[str, str | None]:
    """``{subfolder: class}`` copied verbatim: by model_index.json, else the :data:`DEFAULT_COPIED` present."""
    if os.path.isfile(os.path.join(folder, MODEL_INDEX)):
        return {n: c for n, (_, c) in index_entries(folder).items() if is_copied_class(c)}
    return {n: None for n in DEFAULT_COPIED if os.path.isdir(os.path.join(folder, n))}


def check_copied(folder: str, name: str, cls: str | None) -> None:
    """A copied part's folder exists, holds the files its class needs and its JSON files parse (one-line
    error otherwise: a corrupt scheduler_config.json or vocab.json is not copied into a model that fails later)."""
    sub = os.path.join(folder, name)
    what = f"{name} ({cls})" if cls else name
    if not os.path.isdir(sub):
        raise CheckpointError(f"{folder}: model_index.json names {what} but there is no {name}/ folder; "
                              f"copy it from the original pipeline")
    present = set(os.listdir(sub))
    suffix = COPIED_CLASS.search(cls).group(1) if cls and is_copied_class(cls) else None
    groups = REQUIRED_FILES.get(suffix)
    if groups is None:
        if not present:
            raise CheckpointError(f"{sub}: {what} folder is empty; copy it from the original pipeline")
    elif not any(all(f in present for f in g) for g in groups):
        need = " or ".join(" + ".join(g) for g in groups)
        raise CheckpointError(f"{sub}: {what} folder lacks {need} (found: {', '.join(sorted(present)[:8]) or 'nothing'}); "
                              f"copy it from the original pipeline")
    for f in sorted(present):
        if f.endswith(".json"):
            try:
                read_json(os.path.join(sub, f))
            except CheckpointError as e:
                raise CheckpointError(f"{e}; copy {name}/ from the original pipeline") from None


def copy_part(src: str, dst: str, name: str) -> None:
    """``src/name/`` -> ``dst/name/``, every file verbatim."""
    shutil.copytree(os.path.join(src, name), os.path.join(dst, name))


def write_export_index(model_dir: str, out: str, present: set[str]) -> list[str]:
    """Write ``out/model_index.json`` from ``model_dir``'s, with parts not in ``present`` set to
    ``[null, null]``; returns those parts. The file is copied byte for byte when nothing changes."""
    index = read_json(os.path.join(model_dir, MODEL_INDEX))
    dropped = [n for n in index_entries(model_dir) if n not in present]
    if not dropped:
        shutil.copyfile(os.path.join(model_dir, MODEL_INDEX), os.path.join(out, MODEL_INDEX))
        return []
    for n in dropped:
        index[n] = [None, None]
    write_json(os.path.join(out, MODEL_INDEX), index)
    return dropped


# ----------------------------------------------------------------------------- families

@dataclasses.dataclass(frozen=True)
class Family:
    """How one network family's checkpoint folder maps onto its Flax params."""

    weights_prefix: str  # diffusion_pytorch_model (diffusers) / model (transformers)
    shapes: Callable[[Mapping], dict[Path, tuple[int, ...]]]  # config dict -> {flax path: shape}
    ignore: tuple[str, ...] = ()
    rename: Callable[[str], str] | None = None
    literal: tuple[str, ...] = ()
    dtype_keys: tuple[str, ...] = ()  # config keys recording the weights' dtype (transformers)


def _vae_shapes(config: Mapping) -> dict[Path, tuple[int, ...]]:
    from fairjax.models import vae

    return vae.param_shapes(vae.from_config(config))


def _clip_shapes(config: Mapping) -> dict[Path, tuple[int, ...]]:
    from fairjax.models import clip_text

    return clip_text.param_shapes(clip_text.from_config(config))


VAE = Family(vae_convert.WEIGHTS_PREFIX, _vae_shapes, rename=vae_convert.rename_legacy_attention,
             literal=vae_convert.LITERAL)
CLIP_TEXT = Family(clip_convert.WEIGHTS_PREFIX, _clip_shapes, ignore=clip_convert.IGNORE,
                   rename=clip_convert.add_text_model_prefix, literal=clip_convert.LITERAL,
                   dtype_keys=("dtype", "torch_dtype"))


class LazyArray:
    """A tensor computed when the writer asks for it (``write_safetensors`` reads ``shape`` and
    ``dtype`` for the header, then ``np.asarray`` of each item in turn)."""

    def __init__(self, fn: Callable[[], np.ndarray], shape: tuple[int, ...], dtype):
        self._fn, self.shape, self.dtype = fn, tuple(shape), np.dtype(dtype)

    def __array__(self, dtype=None, copy=None):
        return np.ascontiguousarray(self._fn(), dtype=dtype or self.dtype)


def open_weights(folder: str, prefix: str, variant: str | None = None) -> ShardedReader:
    """A weight folder, single file or sharded; with ``variant=None`` plain weights, else ``fp16``, else ``bf16``."""
    if variant is not None:
        return ShardedReader(folder, prefix, variant=variant)
    for v in (None, "fp16", "bf16"):
        stem = f"{prefix}.{v}" if v else prefix
        names = [f"{stem}.safetensors", f"{stem}.safetensors.index.json"]
        if v:
            names.append(f"{prefix}.safetensors.index.{v}.json")
        if any(os.path.isfile(os.path.join(folder, n)) for n in names):
            return ShardedReader(folder, prefix, variant=v)
    return ShardedReader(folder, prefix)  # raises: names the folder and what it holds


def check_weights(folder: str, prefix: str, variant: str | None = None) -> None:
    """``folder`` has a ``config.json`` and readable weight files (headers only; one-line error naming it)."""
    if not os.path.isfile(os.path.join(folder, CONFIG_FILE)):
        raise CheckpointError(f"{folder}: no {CONFIG_FILE}; copy the component folder from the original pipeline")
    with open_weights(folder, prefix, variant):
        pass


def convert_component(family: Family, src: str, out: str, *, dtype=None, variant: str | None = None,
                      link: bool = False) -> dict:
    """A diffusers / transformers component folder ``src`` -> fairjax component folder ``out``.

    ``out/config.json`` is the source config as is; ``out/params.safetensors`` holds the Flax
    tree (``dtype``, or each tensor's own dtype). Tensors are read with ``pread`` and transposed in
    worker threads while earlier ones are written (:func:`fairjax.convert.unet.pipelined`).
    ``link=True`` and no dtype change: ``out/params.link.json`` instead, which reads the source's tensors in
    place (:mod:`fairjax.io.linked`; for the model cache, whose entries are keyed by the source's fingerprints).
    The caller owns atomicity (``atomic_output_dir``).
    """
    cfg_path = os.path.join(src, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{src}: no {CONFIG_FILE}; copy the component folder from the original pipeline")
    config = read_json(cfg_path)
    with open_weights(src, family.weights_prefix, variant) as reader:  # headers checked before the model is traced
        shapes = family.shapes(config)
        try:
            mapping = plan_conversion({k: reader.shape(k) for k in reader.keys()}, shapes,
                                      ignore=family.ignore, rename=family.rename)
        except CheckpointError as e:
            raise CheckpointError(f"{src}: {e} (does its config.json belong to these weights?)") from None
        check_float(reader, mapping, src)
        if link and linkable(reader, mapping, dtype):
            return unet_convert.write_linked(out, reader, mapping, shapes, config)
        specs = []
        for key, (path, leaf) in sorted(mapping.items(), key=lambda kv: kv[1][0]):
            dt = np.dtype(dtype or reader.dtype(key))
            fn = functools.partial(lambda k, lf, d: unet_convert.to_flax_array(reader.read(k), lf, d), key, leaf, dt)
            specs.append((path_str(path), fn, shapes[path], dt))
        items, pipe = unet_convert.pipelined(specs, desc=os.path.basename(os.path.normpath(out)))
        os.makedirs(out, exist_ok=True)
        try:
            write_safetensors(os.path.join(out, PARAMS_FILE), items,
                              {"format": "fairjax", "source": os.path.abspath(src)})
        finally:
            pipe.close()
    write_json(os.path.join(out, CONFIG_FILE), config)
    return {"arrays": len(items), "params": int(sum(np.prod(s) for s in shapes.values()))}


def torch_shape(shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
    """Flax leaf shape -> PyTorch shape (kernels HWIO -> OIHW, WIO -> OIW, (in, out) -> (out, in))."""
    s = tuple(shape)
    if leaf == "kernel" and len(s) == 4:
        return (s[3], s[2], s[0], s[1])
    if leaf == "kernel" and len(s) in (2, 3):
        return s[::-1]
    return s


def _check_params(reader, shapes: Mapping[Path, tuple[int, ...]]) -> None:
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


def export_component(family: Family, src: str, out: str, *, dtype=None) -> dict:
    """fairjax component folder ``src`` -> diffusers / transformers folder ``out`` that the library's
    ``from_pretrained`` loads with no missing or unexpected keys (``config.json`` +
    ``<prefix>.safetensors``, in ``dtype`` or as stored)."""
    config = read_json(os.path.join(src, CONFIG_FILE))
    shapes = family.shapes(config)
    with open_params(src) as reader:
        _check_params(reader, shapes)
        items, dtypes = [], set()
        for k in sorted(reader.keys()):
            path = tuple(k.split("/"))
            dt = np.dtype(dtype or reader.dtype(k))
            dtypes.add(dt)
            fn = functools.partial(lambda k, lf: flax_to_torch_array(reader[k], lf), k, path[-1])
            items.append((flax_to_torch_key(path, family.literal), LazyArray(fn, torch_shape(shapes[path], path[-1]), dt)))
        os.makedirs(out, exist_ok=True)
        write_safetensors(os.path.join(out, f"{family.weights_prefix}.safetensors"), items, {"format": "pt"})
    if len(dtypes) == 1:  # the config says what the file holds (transformers loads with dtype="auto")
        (dt,) = dtypes
        config.update({key: str(dt) for key in family.dtype_keys if key in config})
    write_json(os.path.join(out, CONFIG_FILE), config)
    return {"arrays": len(items)}


convert_vae = functools.partial(convert_component, VAE)
convert_clip_text = functools.partial(convert_component, CLIP_TEXT)
export_vae = functools.partial(export_component, VAE)
export_clip_text = functools.partial(export_component, CLIP_TEXT)


# ----------------------------------------------------------------------------- whole folders

#: pipeline subfolder name -> converter(src, out, *, dtype, variant) -> summary dict
CONVERTERS: dict[str, Callable[..., dict]] = {
    "unet": unet_convert.convert_component,
    "vae": convert_vae,
    "text_encoder": convert_clip_text,
    "text_encoder_2": convert_clip_text,
}
#: pipeline subfolder name -> weight file stem, to check every part's files before converting any
WEIGHTS_PREFIX: dict[str, str] = {
    "unet": unet_convert.WEIGHTS_NAME,
    "vae": VAE.weights_prefix,
    "text_encoder": CLIP_TEXT.weights_prefix,
    "text_encoder_2": CLIP_TEXT.weights_prefix,
}
#: class of a single component folder (diffusers ``_class_name``, transformers ``architectures[0]``)
#: -> the model dir's subfolder it becomes
CLASS_TO_COMPONENT: dict[str, str] = {
    "UNet2DConditionModel": "unet",
    "AutoencoderKL": "vae",
    "CLIPTextModel": "text_encoder",
    "CLIPTextModelWithProjection": "text_encoder_2",
}
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def component_class(config: Mapping) -> str | None:
    """The class a component ``config.json`` names (diffusers ``_class_name``, else transformers ``architectures``)."""
    arch = config.get("architectures")
    return config.get("_class_name") or (arch[0] if isinstance(arch, list) and arch else None)


def plan_pipeline(src: str, variant: str | None = None) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """``([(component, folder)] to convert, [folders to copy], [skipped])`` for a pipeline folder SRC.

    Every part model_index.json names that is converted or copied must be there (one-line error
    naming the first that is not), with its config.json and its weight files' headers; no tensor is read.
    """
    entries = index_entries(src)
    todo = [(n, os.path.join(src, n)) for n in entries if n in CONVERTERS]
    copied = [n for n, (_, c) in entries.items() if n not in CONVERTERS and is_copied_class(c)]
    skipped = [n for n in entries if n not in CONVERTERS and n not in copied]
    if not todo:
        raise UserError(f"{src}: none of its components ({', '.join(entries) or 'none'}) can be converted yet "
                        f"(supported: {', '.join(CONVERTERS)})")
    for name, folder in todo:
        if not os.path.isdir(folder):
            raise UserError(f"{src}: model_index.json names {name} ({entries[name][1]}) but there is no {name}/ "
                            f"folder; copy it from the original pipeline")
        check_weights(folder, WEIGHTS_PREFIX[name], variant)
    for name in copied:
        check_copied(src, name, entries[name][1])
    return todo, copied, skipped


def plan_sources(src: str, variant: str | None = None) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """``([(component, its source folder)], [copied folders], [unsupported components])`` for SRC."""
    if not os.path.isdir(src):
        raise UserError(f"{src}: not a folder; pass a diffusers pipeline folder or its unet/ folder")
    if os.path.isfile(os.path.join(src, MODEL_INDEX)):
        return plan_pipeline(src, variant)
    cfg = os.path.join(src, CONFIG_FILE)
    if not os.path.isfile(cfg):
        raise UserError(f"{src}: neither model_index.json nor config.json; pass a diffusers pipeline folder or "
                        f"a component folder such as unet/")
    cls = component_class(read_json(cfg))
    name = CLASS_TO_COMPONENT.get(cls)
    if name is None:
        supported = ", ".join(f"{c} ({n}/)" for c, n in CLASS_TO_COMPONENT.items())
        raise UserError(f"{src}: config.json is for {cls or 'an unnamed class'}, which has no converter "
                        f"(supported: {supported})")
    check_weights(src, WEIGHTS_PREFIX[name], variant)
    return [(name, src)], [], []


def convert_folder(src: str, out: str, *, dtype: str | None = "float32", variant: str | None = None,
                   overwrite: bool = False, link: bool = False, log=print, **index_extra) -> dict:
    """Convert SRC (a pipeline folder or one component folder) into the fairjax model dir OUT (atomic:
    written to a temp dir, renamed at the end). ``dtype`` None keeps each tensor's dtype; ``link=True``: a
    component whose dtype does not change links to SRC's files instead of copying them (model cache entries:
    :mod:`fairjax.io.linked`); ``index_extra`` goes into ``fairjax.json``. Returns ``{component: summary}``."""
    todo, copied, skipped = plan_sources(src, variant)
    np_dtype = DTYPES[dtype] if dtype else None
    done = {}
    with atomic_output_dir(out, overwrite) as tmp:
        for name, folder in todo:
            t0 = time.time()
            done[name] = CONVERTERS[name](folder, os.path.join(tmp, name), dtype=np_dtype, variant=variant, link=link)
            log(f"{name}: {done[name]} in {time.time() - t0:.1f}s")
        for name in copied:
            copy_part(src, tmp, name)
        if copied:
            log(f"copied: {', '.join(copied)}")
        if os.path.isfile(os.path.join(src, MODEL_INDEX)):
            shutil.copyfile(os.path.join(src, MODEL_INDEX), os.path.join(tmp, MODEL_INDEX))
        write_index(tmp, [n for n, _ in todo], **{"source": os.path.abspath(src), "dtype": dtype or "as stored",
                                                  "copied": copied, "not_converted": skipped, **index_extra})
    if skipped:
        log(f"not yet supported, skipped: {', '.join(skipped)}")
    log(f"wrote {out}")
    return done
