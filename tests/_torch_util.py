"""Helpers shared by the PyTorch-parity tests and the benchmarks (``bench/`` puts ``tests/`` on ``sys.path``).

* :func:`randomize_` -- every weight of a torch module random, so that a wrong key
  mapping or a wrong op cannot pass a parity check by luck (diffusers zero-inits
  ``conv_out`` and friends; transformers inits norms to exactly 1);
* :class:`DictReader` -- a torch state dict as the reader interface that
  :func:`fairjax.convert.core.convert_checkpoint` streams from;
* :data:`SDXL_UNET_CONFIG` -- the real SDXL base 1.0 ``unet/config.json``;
* :func:`timeit` / :func:`rel` -- the benchmarks' timing and parity measure.

torch is imported lazily: importing this file does not need it.
"""

from __future__ import annotations

import time

import numpy as np


def randomize_(model, seed: int, *, embedding_scale: float | None = None):
    """Every parameter of ``model`` random (in place); returns ``model.eval()``.

    Norm weights (``norm`` in the name) ``1 + 0.2 r``, biases ``0.2 r``, the rest
    ``r / sqrt(fan_in)`` with ``fan_in = prod(shape[1:])``, ``r ~ N(0, 1)`` from a
    generator seeded with ``seed``, drawn per parameter in ``named_parameters`` order.
    With ``embedding_scale``, parameters with ``embedding`` in the name get
    ``embedding_scale * r`` instead (token / position tables, whose fan-in is not ``shape[1:]``).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * r)
            elif name.endswith("bias"):
                p.copy_(0.2 * r)
            elif embedding_scale is not None and "embedding" in name:
                p.copy_(embedding_scale * r)
            else:
                p.copy_(r / np.sqrt(max(np.prod(p.shape[1:]), 1)))
    return model.eval()


class DictReader:
    """A state dict (torch tensors or arrays) as the reader interface ``convert_checkpoint`` streams from."""

    def __init__(self, state):
        self.state = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v))
                      for k, v in state.items()}

    def keys(self):
        return list(self.state)

    def shape(self, k):
        return tuple(self.state[k].shape)

    def dtype(self, k):
        return self.state[k].dtype

    def __getitem__(self, k):
        return self.state[k]


#: The real SDXL base 1.0 ``unet/config.json``.
SDXL_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0", "act_fn": "silu",
    "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "center_input_sample": False,
    "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
    "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
    "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}


def timeit(fn, iters: int) -> float:
    """Median wall seconds of ``iters`` calls of ``fn`` after one warm-up (compile) call."""
    fn()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def rel(a, b) -> float:
    """``max |a - b| / max |b|`` in float64 (``b`` is the reference)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())
