"""CLIP text encoder checkpoints (SDXL ``text_encoder/``, ``text_encoder_2/``) <-> Flax.

Family rules on top of :mod:`fairjax.convert.core`:

* ``position_ids`` is a non-persistent buffer some checkpoints still carry: ignored.
* transformers 5 saves a bare ``CLIPTextModel`` without the ``text_model.``
  prefix that transformers 4 (and every SDXL release) used; both are accepted,
  the Flax tree always has ``text_model/`` (``rename`` adds the prefix).
* Export writes the prefixed keys (``text_model.…``, ``text_projection.weight``),
  which ``CLIPTextModel`` / ``CLIPTextModelWithProjection.from_pretrained`` of
  transformers 4 and 5 load with no missing or unexpected keys.
* No literal names: no Flax segment of this family ends in ``_<digits>``
  except the ModuleList ``layers_N``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from fairjax.convert.core import convert_checkpoint, export_state
from fairjax.io.model_dir import CONFIG_FILE, read_json, write_json
from fairjax.io.safetensors import ShardedReader, write_safetensors
from fairjax.models import clip_text

WEIGHTS_PREFIX = "model"  # model.safetensors / model.safetensors.index.json
IGNORE = (r"(^|\.)position_ids$",)
LITERAL: tuple[str, ...] = ()


def add_text_model_prefix(key: str) -> str:
    """``embeddings.x`` -> ``text_model.embeddings.x``; prefixed keys and ``text_projection.*`` unchanged."""
    if key.startswith("text_model.") or key.startswith("text_projection."):
        return key
    return "text_model." + key


def convert_clip_text(folder: str, *, dtype=None, variant: str | None = None) -> tuple[dict, dict]:
    """A transformers text-encoder folder (``config.json`` + ``model.safetensors``) -> ``(config, params)``.

    ``config`` is the folder's config dict as is; ``params`` a nested dict of
    numpy arrays in Flax layout (checkpoint dtype unless ``dtype``). Every key
    and shape is checked against the model the config describes before any
    tensor is read.
    """
    config = read_json(os.path.join(folder, CONFIG_FILE))
    model = clip_text.from_config(config)
    with ShardedReader(folder, WEIGHTS_PREFIX, variant) as reader:
        params = convert_checkpoint(reader, clip_text.param_shapes(model), dtype=dtype,
                                    ignore=IGNORE, rename=add_text_model_prefix)
    return config, params


def export_clip_text_state(params: Mapping, *, dtype=None):
    """Yield ``(torch_key, array)`` for ``CLIPTextModel(WithProjection).load_state_dict``."""
    return export_state(params, literal=LITERAL, dtype=dtype)


def export_clip_text(folder: str, config: Mapping, params: Mapping, *, dtype=None) -> None:
    """Write ``config.json`` + ``model.safetensors`` that transformers' ``from_pretrained`` loads.

    Each file is written to a temp path and renamed; use
    :func:`fairjax.io.model_dir.atomic_output_dir` for the whole folder.
    """
    os.makedirs(folder, exist_ok=True)
    items = [(k, np.asarray(v)) for k, v in export_clip_text_state(params, dtype=dtype)]
    write_safetensors(os.path.join(folder, f"{WEIGHTS_PREFIX}.safetensors"), items, {"format": "pt"})
    write_json(os.path.join(folder, CONFIG_FILE), dict(config))
