"""A tiny random VILA-U-shaped model dir and tiny datasets, built on a CPU in seconds (the ``:tiny``
presets of the VILA-U configs and the tests)."""

from __future__ import annotations

import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from fairjax.models import vila_u
from fairjax.vila_u import data as vdata

TINY = {
    "llm": dict(model_type="llama", vocab_size=68, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                tie_word_embeddings=False, hidden_act="silu"),
    "siglip": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                   patch_size=8, num_channels=3, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
    "rqvaesiglip": dict(embed_dim=32, n_embed=64, latent_shape=[4, 4, 32], code_shape=[4, 4, 4],
                        shared_codebook=True, pretrained_model="tiny-random-siglip",
                        ddconfig=dict(ch=32, out_ch=3, ch_mult=[1, 1, 1, 1], num_res_blocks=1, attn_resolutions=[],
                                      resolution=32, z_channels=8, dropout=0.0, double_z=False, in_channels=3)),
    "rqtransformer": dict(block_size=[4, 4, 4], input_embed_dim_1=32, input_embed_dim_2=64, embed_dim=32,
                          vocab_size=64, head={"block": {"n_head": 4}, "n_layer": 2}),
    "mm_projector": dict(mm_projector_type="mlp2x_gelu"),
}


def random_params(abstract, seed: int) -> dict:
    """Numpy params for a tree of shapes (no compilation): norm ``scale`` 1, ``bias`` 0, the rest
    ``N(0, 1 / fan_in)`` (fan_in = all dims but the last; codebook / embedding rows ``N(0, 1)``)."""
    from fairjax.io.tree import flatten, unflatten

    rng = np.random.default_rng(seed)
    out = {}
    for path, leaf in flatten(abstract).items():
        shape, name = tuple(leaf.shape), path[-1]
        if name == "scale":
            out[path] = np.ones(shape, np.float32)
        elif name == "bias":
            out[path] = np.zeros(shape, np.float32)
        else:
            fan_in = 1 if name == "embedding" or len(shape) < 2 else math.prod(shape[:-1])
            out[path] = (rng.standard_normal(shape) / math.sqrt(fan_in)).astype(np.float32)
    return unflatten(out)


def build_tiny_model_dir(out: str, seed: int = 0) -> None:
    """A random VILA-U-shaped fairjax model dir (same layout as ``tools/convert_vila_u.py`` writes)."""
    from fairjax.convert import vila_u as convert_vila_u
    from fairjax.io.model_dir import save_component, write_index

    t = TINY
    vt_cfg = {"rqvaesiglip": t["rqvaesiglip"], "rqtransformer": t["rqtransformer"], "hidden_size": 32,
              convert_vila_u.SIGLIP_KEY: t["siglip"]}
    vu = vila_u.build(t["llm"], vt_cfg, t["mm_projector"])
    tower = convert_vila_u.build_vision_tower(vt_cfg, t["siglip"])
    p = random_params(jax.eval_shape(vu.init, jax.random.key(0)), seed)
    s = t["siglip"]["image_size"]
    vis = random_params(jax.eval_shape(tower.init, jax.random.key(0), jnp.zeros((1, 3, s, s)))["params"], seed + 1)
    vis["quantizer"] = p["codebook"]
    os.makedirs(out)
    save_component(os.path.join(out, "llm"), t["llm"], p["llm"])
    save_component(os.path.join(out, "mm_projector"), t["mm_projector"], p["mm_projector"])
    save_component(os.path.join(out, "depth_transformer"), t["rqtransformer"], p["rqtransformer"])
    save_component(os.path.join(out, "vision_tower"), vt_cfg, vis)
    write_index(out, list(convert_vila_u.COMPONENTS), model_type="vila_u", source=f"fairjax tiny random, seed {seed}")


def ensure_tiny(root: str, seed: int = 0) -> dict[str, str]:
    """``{'model', 'pairs', 'mdpo'}`` dirs of the tiny model and datasets under ``root``, built once
    (deterministically from ``seed``) in a temp dir renamed into place."""
    root = os.path.abspath(root)
    dirs = {k: os.path.join(root, k) for k in ("model", "pairs", "mdpo")}
    if all(os.path.isdir(d) for d in dirs.values()):
        return dirs
    os.makedirs(os.path.dirname(root), exist_ok=True)
    tmp = os.path.join(os.path.dirname(root), f".{os.path.basename(root)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build_tiny_model_dir(os.path.join(tmp, "model"), seed)
        tok = vdata.TinyTokenizer(TINY["llm"]["vocab_size"])
        rq = TINY["rqtransformer"]
        shape = (rq["block_size"][0] * rq["block_size"][1], rq["block_size"][2])
        n_embed = TINY["rqvaesiglip"]["n_embed"]
        vdata.write_dataset(os.path.join(tmp, "pairs"), "pairs", vdata.tiny_pair_records(tok, shape, n_embed, seed=seed),
                            codebook_size=n_embed, metadata={"source": "tiny", "seed": seed})
        vdata.write_dataset(os.path.join(tmp, "mdpo"), "mdpo",
                            vdata.tiny_mdpo_records(tok, tok.eos, TINY["siglip"]["image_size"], seed=seed),
                            codebook_size=n_embed, metadata={"source": "tiny", "seed": seed})
        try:
            os.replace(tmp, root)
        except OSError:
            if not all(os.path.isdir(d) for d in dirs.values()):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dirs
