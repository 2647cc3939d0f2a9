"""SigLIP vision encoder: parity with transformers ``SiglipVisionModel`` (full and truncated as VILA-U
uses it), full-size SigLIP-large shapes on torch ``meta``, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch
import transformers

from _torch_util import DictReader, randomize_  # noqa: E402
from fairjax.convert.core import convert_checkpoint, plan_conversion  # noqa: E402
from fairjax.errors import CheckpointError  # noqa: E402
from fairjax.convert.vila_u import SIGLIP_VISION_CONFIGS  # noqa: E402
from fairjax.models import rqvae, siglip  # noqa: E402

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=32,
            patch_size=8, layer_norm_eps=1e-6)


def torch_siglip(cfg, seed=0, act="gelu_pytorch_tanh"):
    tcfg = transformers.SiglipVisionConfig(**cfg, hidden_act=act)
    tcfg._attn_implementation = "eager"
    return randomize_(transformers.SiglipVisionModel(tcfg), seed)


def convert(tm, model):
    """transformers state dict -> params of ``model`` (the pooling head and layers the model does not run
    are left out)."""
    n = model.num_layers if model.num_layers is not None else model.config.num_hidden_layers
    ignore = [r"^head\.", rf"^encoder\.layers\.({'|'.join(str(i) for i in range(n, 64))})\."]
    if not model.post_layernorm:
        ignore.append(r"^post_layernorm\.")
    return convert_checkpoint(DictReader(tm.state_dict()), siglip.param_shapes(model), ignore=ignore)


@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "gelu"])
def test_vision_model_matches_transformers(rel, act):
    tm = torch_siglip(TINY, seed=0, act=act)
    cfg = siglip.SiglipVisionConfig.from_dict(dict(TINY, hidden_act=act))
    model = siglip.SiglipVisionTransformer(cfg)
    params = convert(tm, model)
    x = np.random.default_rng(1).uniform(-1, 1, size=(2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = tm(pixel_values=torch.from_numpy(x), output_hidden_states=True)
    last, states = jax.jit(lambda p, x: model.apply({"params": p}, x, output_hidden_states=True))(params, x)
    assert last.shape == (2, 16, 32)
    assert rel(last, ref.last_hidden_state.numpy()) < 1e-5
    assert len(states) == len(ref.hidden_states) == 5
    for ours, theirs in zip(states, ref.hidden_states):
        assert rel(ours, theirs.numpy()) < 1e-5


def test_vila_u_encoder_is_hidden_state_of_layer_l_minus_2(rel):
    """VILA-U stops after layer index L-2 with no post-layernorm: transformers' hidden_states[L-1]."""
    tm = torch_siglip(TINY, seed=2)
    model = siglip.vila_u_encoder(siglip.SiglipVisionConfig.from_dict(TINY))
    params = convert(tm, model)
    assert "post_layernorm" not in params and set(params["encoder"]) == {"layers_0", "layers_1", "layers_2"}
    x = np.random.default_rng(3).uniform(-1, 1, size=(3, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        states = tm(pixel_values=torch.from_numpy(x), output_hidden_states=True).hidden_states
    ref = states[TINY["num_hidden_layers"] - 1]
    out = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x)
    assert rel(out, ref.numpy()) < 1e-5


def test_preprocess_matches_siglip_image_processor(rel):
    imgs = np.random.default_rng(4).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    proc = transformers.SiglipImageProcessor(size={"height": 32, "width": 32}, do_resize=False)
    ref = proc(images=list(imgs), return_tensors="np")["pixel_values"]
    assert rel(siglip.preprocess(imgs), ref) < 1e-6


def test_full_size_siglip_large_shapes_match_transformers_meta():
    """SigLIP-large-patch16-256 on torch meta vs jax.eval_shape: every key maps; VILA-U's part is 23 layers."""
    cfg = SIGLIP_VISION_CONFIGS["siglip-large-patch16-256"]
    with torch.device("meta"):
        tm = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**cfg))
    src = {k: tuple(v.shape) for k, v in tm.state_dict().items()}
    full = siglip.SiglipVisionTransformer(siglip.SiglipVisionConfig.from_dict(cfg))
    full_shapes = siglip.param_shapes(full)
    plan_conversion(src, full_shapes, ignore=[r"^head\."])  # raises on any missing / unexpected / mismatch
    vila = siglip.vila_u_encoder(siglip.SiglipVisionConfig.from_dict(cfg))
    vila_shapes = siglip.param_shapes(vila)
    plan_conversion(src, vila_shapes, ignore=[r"^head\.", r"^post_layernorm\.", r"^encoder\.layers\.23\."])
    n_torch_no_head = sum(int(np.prod(s)) for k, s in src.items() if not k.startswith("head."))
    h, f, p = 1024, 4096, 16
    embeddings = p * p * 3 * h + h + (256 // p) ** 2 * h
    layer = 2 * 2 * h + 4 * (h * h + h) + (h * f + f) + (f * h + h)  # 2 LayerNorms, q/k/v/out, fc1, fc2
    assert rqvae.num_params(full_shapes) == n_torch_no_head == embeddings + 24 * layer + 2 * h
    assert rqvae.num_params(vila_shapes) == embeddings + 23 * layer  # 290,762,752
    assert vila_shapes[("embeddings", "patch_embedding", "kernel")] == (16, 16, 3, 1024)


def test_bad_input():
    with pytest.raises(CheckpointError, match="hidden_act 'relu6' is not supported"):
        siglip.SiglipVisionConfig.from_dict(dict(TINY, hidden_act="relu6"))
    with pytest.raises(CheckpointError, match="not divisible by num_attention_heads"):
        siglip.SiglipVisionConfig.from_dict(dict(TINY, num_attention_heads=5))
    model = siglip.SiglipVisionTransformer(siglip.SiglipVisionConfig.from_dict(TINY))
    with pytest.raises(ValueError, match="images are 24x24 but the model takes 32x32"):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x), jnp.zeros((1, 3, 24, 24)))
