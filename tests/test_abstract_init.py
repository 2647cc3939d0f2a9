"""``param_shapes`` of every model comes from :func:`fairjax.models.layers.abstract_init` (no initialiser traced;
the UNet traced in its scanned form and unstacked). The trees must be exactly what flax's own ``init`` gives,
traced here the slow way (``jax.eval_shape`` of ``model.init``, real initialisers, unrolled layers): same paths,
shapes and dtypes. Against PyTorch the same shapes are checked in each model's parity tests
(test_unet.py's full-size SDXL check, test_convert_unet.py's shapes cache)."""

import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fairjax.io.tree import shapes_of
from fairjax.models import clip_text, llama, siglip, unet, vae
from fairjax.models.layers import abstract_init


def _real(model, *inputs):
    return jax.eval_shape(lambda *a: model.init(jax.random.key(0), *a)["params"], *inputs)


def _same(a, b):
    fa = {k: (v.shape, v.dtype) for k, v in jax.tree_util.tree_flatten_with_path(a)[0]}
    fb = {k: (v.shape, v.dtype) for k, v in jax.tree_util.tree_flatten_with_path(b)[0]}
    assert fa.keys() == fb.keys(), sorted(set(fa) ^ set(fb))[:5]
    bad = [k for k in fa if fa[k] != fb[k]]
    assert not bad, [(jax.tree_util.keystr(k), fa[k], fb[k]) for k in bad[:5]]
    return len(fa)


def _sd15_like():
    return {"sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": [8, 16, 16],
            "layers_per_block": 1, "norm_num_groups": 4, "cross_attention_dim": 12, "attention_head_dim": 4,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}


@pytest.mark.parametrize("which", ["sdxl_deep", "sd15_like", "bf16"])
def test_unet_shapes_equal_flax_init(which):
    from fairjax.diffusion import tiny as sdxl_tiny

    kw = {}
    if which == "sd15_like":
        cfg = _sd15_like()
    else:
        cfg = dict(sdxl_tiny.unet_config("tiny"))
        if which == "sdxl_deep":  # stacks of 1, 2 and 3 layers (SDXL's are 1, 2 and 10)
            cfg["transformer_layers_per_block"] = [1, 2, 3][: len(cfg["block_out_channels"])]
        if which == "bf16":
            kw["param_dtype"] = jnp.bfloat16
    model = unet.UNet2DConditionModel.from_config(cfg, **kw)
    fast = unet.param_shapes(model)
    n = _same(fast, _real(model, *unet.dummy_inputs(model.config)))
    assert n > 50
    if which == "bf16":
        assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(fast))
    # the scanned model's own tree is flax's scanned init
    scanned = model.clone(scan_layers=True)
    _same(unet.param_shapes(scanned), _real(scanned, *unet.dummy_inputs(model.config)))


def test_other_models_shapes_equal_flax_init():
    from fairjax.diffusion import tiny as sdxl_tiny
    from fairjax.vila_u.tiny import TINY

    vae_cfg = dict(block_out_channels=[8, 16], layers_per_block=1, down_block_types=["DownEncoderBlock2D"] * 2,
                   up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=4, scaling_factor=0.13)
    v = vae.from_config(vae_cfg)
    assert vae.param_shapes(v) == shapes_of(_real(v, jax.ShapeDtypeStruct((1, 3, 4, 4), jnp.float32)))
    c = clip_text.from_config(sdxl_tiny.clip_config("tiny", 1, 100))
    ids = jax.ShapeDtypeStruct((1, c.config.max_position_embeddings), jnp.int32)
    assert clip_text.param_shapes(c) == shapes_of(_real(c, ids))
    s = siglip.vila_u_encoder(siglip.SiglipVisionConfig.from_dict(TINY["siglip"]))
    x = jax.ShapeDtypeStruct((1, s.config.num_channels, s.config.image_size, s.config.image_size), jnp.float32)
    assert siglip.param_shapes(s) == shapes_of(_real(s, x))
    m = llama.from_config(TINY["llm"])
    assert llama.param_shapes(m) == shapes_of(_real(m, jax.ShapeDtypeStruct((1, 1), jnp.int32)))


class _Small(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(5)(x)
        return x * self.param("gain", nn.initializers.normal(1.0), (5,), jnp.float32)


def test_abstract_init_leaves_real_init_alone():
    """Only the thread inside ``abstract_init`` sees zeros: ``init`` before, after and on another thread at the
    same time draws the random initialisers as always."""
    model, x = _Small(), jnp.ones((2, 3))
    init = lambda k: model.init(k, x)["params"]  # noqa: E731  (eager: every call goes through Scope.param)
    before = init(jax.random.key(3))
    assert abstract_init(model, x) == {"Dense_0": {"kernel": jax.ShapeDtypeStruct((3, 5), jnp.float32),
                                                   "bias": jax.ShapeDtypeStruct((5,), jnp.float32)},
                                       "gain": jax.ShapeDtypeStruct((5,), jnp.float32)}
    after = init(jax.random.key(3))
    assert float(jnp.abs(after["gain"]).sum()) > 0 and float(jnp.abs(after["Dense_0"]["kernel"]).sum()) > 0
    jax.tree.map(np.testing.assert_array_equal, before, after)

    seen, go = {}, threading.Barrier(2)

    def other():
        go.wait()
        for _ in range(20):
            seen.setdefault("p", []).append(init(jax.random.key(3)))

    t = threading.Thread(target=other)
    t.start()
    go.wait()
    for _ in range(20):
        abstract_init(model, x)
    t.join()
    for p in seen["p"]:
        jax.tree.map(np.testing.assert_array_equal, p, before)
