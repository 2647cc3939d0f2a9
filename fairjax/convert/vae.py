"""diffusers ``AutoencoderKL`` checkpoints (``vae/``) <-> Flax.

Family rules on top of :mod:`fairjax.convert.core`:

* Old checkpoints name the mid-block attention projections ``query``, ``key``,
  ``value``, ``proj_attn``; diffusers renames them on load to ``to_q``,
  ``to_k``, ``to_v``, ``to_out.0`` and so do we (the removed diffusers Flax
  conversion missed the new names and dropped these weights).
* Export writes the current names, which ``AutoencoderKL.from_pretrained``
  loads with no missing or unexpected keys.
* No literal names: every Flax segment ending in ``_<digits>`` is a ModuleList
  index (``down_blocks_0``, ``resnets_1``, ``to_out_0``; ``conv1``/``norm2`` have no ``_``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import numpy as np

from fairjax.convert.core import convert_checkpoint, export_state
from fairjax.io.model_dir import CONFIG_FILE, read_json, write_json
from fairjax.io.safetensors import ShardedReader, write_safetensors
from fairjax.models import vae as vae_model

WEIGHTS_PREFIX = "diffusion_pytorch_model"
LITERAL: tuple[str, ...] = ()
_LEGACY_ATTN = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def rename_legacy_attention(key: str) -> str:
    """``…attentions.0.query.weight`` -> ``…attentions.0.to_q.weight`` (and key/value/proj_attn)."""
    return _LEGACY_ATTN.sub(lambda m: f"{m.group(1)}{_LEGACY_NAMES[m.group(2)]}.{m.group(3)}", key)


def convert_vae(folder: str, *, dtype=None, variant: str | None = None) -> tuple[dict, dict]:
    """A diffusers ``vae/`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) -> ``(config, params)``.

    ``config`` is the folder's config dict as is; ``params`` a nested dict of
    numpy arrays in Flax layout (checkpoint dtype unless ``dtype``). All keys
    and shapes are validated against the config's model before reading tensors.
    """
    config = read_json(os.path.join(folder, CONFIG_FILE))
    model = vae_model.from_config(config)
    with ShardedReader(folder, WEIGHTS_PREFIX, variant) as reader:
        params = convert_checkpoint(reader, vae_model.param_shapes(model), dtype=dtype,
                                    rename=rename_legacy_attention)
    return config, params


def export_vae_state(params: Mapping, *, dtype=None):
    """Yield ``(torch_key, array)`` for ``AutoencoderKL.load_state_dict``."""
    return export_state(params, literal=LITERAL, dtype=dtype)


def export_vae(folder: str, config: Mapping, params: Mapping, *, dtype=None) -> None:
    """Write ``config.json`` + ``diffusion_pytorch_model.safetensors`` for ``AutoencoderKL.from_pretrained``.

    Each file is written to a temp path and renamed; use
    :func:`fairjax.io.model_dir.atomic_output_dir` for the whole folder.
    """
    os.makedirs(folder, exist_ok=True)
    items = [(k, np.asarray(v)) for k, v in export_vae_state(params, dtype=dtype)]
    write_safetensors(os.path.join(folder, f"{WEIGHTS_PREFIX}.safetensors"), items, {"format": "pt"})
    write_json(os.path.join(folder, CONFIG_FILE), dict(config))
