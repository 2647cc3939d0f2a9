"""CLIP text encoders: parity with transformers on random tiny configs, full-size shapes, conversion."""

import os

import jax
import numpy as np
import pytest

import torch
import transformers

from _torch_util import randomize_ as _randomize_  # noqa: E402
from fairjax.convert import clip as clip_convert  # noqa: E402
from fairjax.io.tree import flatten  # noqa: E402
from fairjax.convert.core import plan_conversion, flax_to_torch_key  # noqa: E402
from fairjax.errors import CheckpointError  # noqa: E402
from fairjax.io.safetensors import write_safetensors  # noqa: E402
from fairjax.models import clip_text  # noqa: E402

VOCAB = 1000
BOS, EOS = VOCAB - 2, VOCAB - 1


def tiny_config(**kw):
    cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
               max_position_embeddings=77, projection_dim=24, hidden_act="quick_gelu", layer_norm_eps=1e-5,
               bos_token_id=BOS, eos_token_id=2, pad_token_id=1)
    cfg.update(kw)
    return transformers.CLIPTextConfig(**cfg)


def randomize_(model, seed):
    """:func:`_torch_util.randomize_` with the token / position tables at ``0.5 N(0, 1)``."""
    return _randomize_(model, seed, embedding_scale=0.5)


def token_ids(pad_id, lengths, seed=0):
    """Rows like the SDXL tokenizers make them: BOS, words, EOS, then pad to 77."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in lengths:
        words = rng.integers(3, VOCAB - 2, size=n)
        row = np.concatenate([[BOS], words, [EOS]])
        rows.append(np.concatenate([row, np.full(77 - len(row), pad_id)]))
    return np.stack(rows).astype(np.int64)


def save_torch(model, tmp_path, name):
    folder = os.path.join(tmp_path, name)
    model.save_pretrained(folder)
    return folder


CASES = [
    # (class, hidden_act, eos_token_id, pad token): SDXL text_encoder pads with EOS, text_encoder_2 with '!' (id 0)
    ("CLIPTextModel", "quick_gelu", 2, EOS),
    ("CLIPTextModelWithProjection", "gelu", 2, 0),
    ("CLIPTextModelWithProjection", "gelu", EOS, EOS),  # non-legacy eos id: first EOS position
]


@pytest.mark.parametrize("cls_name,act,eos_id,pad", CASES)
def test_parity_with_transformers(tmp_path, rel, cls_name, act, eos_id, pad):
    cfg = tiny_config(hidden_act=act, eos_token_id=eos_id)
    tm = randomize_(getattr(transformers, cls_name)(cfg), seed=1)
    config, params = clip_convert.convert_clip_text(save_torch(tm, tmp_path, "te"))
    model = clip_text.from_config(config)
    assert model.config.with_projection == (cls_name == "CLIPTextModelWithProjection")

    ids = token_ids(pad, lengths=[5, 40, 75])
    with torch.no_grad():
        ref = tm(torch.from_numpy(ids), output_hidden_states=True)
        inner = tm if cls_name == "CLIPTextModel" else tm.text_model
        ref_pooled = inner(torch.from_numpy(ids)).pooler_output.numpy()
    out = model.apply({"params": params}, ids.astype(np.int32), output_hidden_states=True)

    assert len(out.hidden_states) == len(ref.hidden_states) == cfg.num_hidden_layers + 1
    for a, b in zip(out.hidden_states, ref.hidden_states):
        assert rel(a, b.numpy()) < 1e-5
    assert rel(out.hidden_states[-2], ref.hidden_states[-2].numpy()) < 1e-5  # what SDXL conditions on
    assert rel(out.last_hidden_state, ref.last_hidden_state.numpy()) < 1e-5
    assert rel(out.pooler_output, ref_pooled) < 1e-5
    if cls_name == "CLIPTextModelWithProjection":
        assert rel(out.text_embeds, ref.text_embeds.numpy()) < 1e-5
    else:
        assert out.text_embeds is None


def test_eos_position_rules():
    """Legacy eos id 2: argmax of ids; otherwise the first EOS (pad may equal EOS)."""
    ids = np.array([[BOS, 7, EOS, EOS, EOS], [BOS, EOS, 0, 0, 0]])
    ids_t = torch.from_numpy(ids)
    assert np.array_equal(clip_text.eos_positions(ids, 2), ids_t.argmax(-1).numpy())
    first = (ids_t == EOS).int().argmax(-1).numpy()
    assert np.array_equal(clip_text.eos_positions(ids, EOS), first)
    assert first.tolist() == [2, 1]


def test_parity_with_padding_mask(tmp_path, rel):
    cfg = tiny_config(hidden_act="gelu", eos_token_id=EOS)
    tm = randomize_(transformers.CLIPTextModel(cfg), seed=2)
    config, params = clip_convert.convert_clip_text(save_torch(tm, tmp_path, "te"))
    ids = token_ids(EOS, lengths=[3, 10], seed=3)[:, :16]
    mask = np.zeros_like(ids)
    mask[0, :5] = 1
    mask[1, :12] = 1
    with torch.no_grad():
        ref = tm(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    out = clip_text.from_config(config).apply({"params": params}, ids, attention_mask=mask)
    assert rel(out.last_hidden_state, ref.last_hidden_state.numpy()) < 1e-5
    assert rel(out.pooler_output, ref.pooler_output.numpy()) < 1e-5


def test_legacy_prefixed_checkpoint_converts_the_same(tmp_path):
    """SDXL's files (transformers 4) have `text_model.` keys and a position_ids buffer; transformers 5 has neither."""
    cfg = tiny_config()
    tm = randomize_(transformers.CLIPTextModel(cfg), seed=4)
    folder = save_torch(tm, tmp_path, "new")
    _, p_new = clip_convert.convert_clip_text(folder)
    legacy = os.path.join(tmp_path, "legacy")
    os.makedirs(legacy)
    items = {"text_model." + k: v.numpy() for k, v in tm.state_dict().items()}
    items["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    write_safetensors(os.path.join(legacy, "model.safetensors"), items, {"format": "pt"})
    with open(os.path.join(folder, "config.json")) as f, open(os.path.join(legacy, "config.json"), "w") as g:
        g.write(f.read())
    _, p_old = clip_convert.convert_clip_text(legacy)
    a, b = flatten(p_new), flatten(p_old)
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("cls_name", ["CLIPTextModel", "CLIPTextModelWithProjection"])
def test_export_loads_in_transformers_bit_exact(tmp_path, cls_name):
    cfg = tiny_config(hidden_act="gelu")
    tm = randomize_(getattr(transformers, cls_name)(cfg), seed=5)
    config, params = clip_convert.convert_clip_text(save_torch(tm, tmp_path, "src"))
    out = os.path.join(tmp_path, "exported")
    clip_convert.export_clip_text(out, config, params)
    back, info = getattr(transformers, cls_name).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ref_sd, new_sd = tm.state_dict(), back.state_dict()
    assert ref_sd.keys() == new_sd.keys()
    assert all(torch.equal(ref_sd[k], new_sd[k]) for k in ref_sd)
    _, params2 = clip_convert.convert_clip_text(out)  # Flax -> torch -> Flax is the identity
    a, b = flatten(params), flatten(params2)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# The text encoder configs of stabilityai/stable-diffusion-xl-base-1.0 (text_encoder/, text_encoder_2/).
SDXL_TEXT_ENCODER = dict(
    architectures=["CLIPTextModel"], attention_dropout=0.0, bos_token_id=0, dropout=0.0, eos_token_id=2,
    hidden_act="quick_gelu", hidden_size=768, initializer_factor=1.0, initializer_range=0.02,
    intermediate_size=3072, layer_norm_eps=1e-05, max_position_embeddings=77, model_type="clip_text_model",
    num_attention_heads=12, num_hidden_layers=12, pad_token_id=1, projection_dim=768, vocab_size=49408)
SDXL_TEXT_ENCODER_2 = dict(
    SDXL_TEXT_ENCODER, architectures=["CLIPTextModelWithProjection"], hidden_act="gelu", hidden_size=1280,
    intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, projection_dim=1280)


@pytest.mark.parametrize("cfg,count", [(SDXL_TEXT_ENCODER, 123_060_480), (SDXL_TEXT_ENCODER_2, 694_659_840)])
def test_full_size_shapes_match_transformers(cfg, count):
    cls = getattr(transformers, cfg["architectures"][0])
    tcfg = transformers.CLIPTextConfig(**{k: v for k, v in cfg.items() if k != "architectures"})
    with torch.device("meta"):
        tm = cls(tcfg)
    torch_shapes = {k: tuple(v.shape) for k, v in tm.state_dict().items()}
    flax_shapes = clip_text.param_shapes(clip_text.from_config(cfg))
    # Every torch key lands on one Flax leaf of the right shape, and none is left over.
    plan_conversion(torch_shapes, flax_shapes, ignore=clip_convert.IGNORE, rename=clip_convert.add_text_model_prefix)
    exported = {clip_convert.add_text_model_prefix(k) for k in torch_shapes}
    assert {flax_to_torch_key(p) for p in flax_shapes} == exported
    n_torch = sum(int(np.prod(s)) for s in torch_shapes.values())
    n_flax = sum(int(np.prod(s)) for s in flax_shapes.values())
    assert n_torch == n_flax == count


def test_defaults_are_transformers_defaults():
    ref = transformers.CLIPTextConfig()
    ours = clip_text.CLIPTextConfig()
    for f in ("vocab_size", "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
              "num_attention_heads", "max_position_embeddings", "hidden_act", "layer_norm_eps", "eos_token_id"):
        assert getattr(ours, f) == getattr(ref, f), f


def test_bad_config_and_missing_weights(tmp_path):
    with pytest.raises(CheckpointError, match="hidden_act 'swiglu'"):
        clip_text.from_config(dict(SDXL_TEXT_ENCODER, hidden_act="swiglu"))
    with pytest.raises(CheckpointError, match="model_type 'clip'"):
        clip_text.from_config({"model_type": "clip", "text_config": {}})
    folder = os.path.join(tmp_path, "text_encoder")
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        f.write("{}")
    with pytest.raises(CheckpointError, match=r"no model\.safetensors") as e:
        clip_convert.convert_clip_text(folder)
    assert "\n" not in str(e.value)


def test_mismatched_checkpoint_is_one_error(tmp_path):
    cfg = tiny_config()
    tm = randomize_(transformers.CLIPTextModel(cfg), seed=6)
    folder = save_torch(tm, tmp_path, "te")
    import json
    with open(os.path.join(folder, "config.json")) as f:
        c = json.load(f)
    c["intermediate_size"] = 64
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(c, f)
    with pytest.raises(CheckpointError, match="shape mismatch.*fc1"):
        clip_convert.convert_clip_text(folder)


def test_load_from_model_dir(tmp_path, rel):
    from fairjax.io.model_dir import save_component

    cfg = tiny_config(hidden_act="gelu")
    tm = randomize_(transformers.CLIPTextModelWithProjection(cfg), seed=7)
    config, params = clip_convert.convert_clip_text(save_torch(tm, tmp_path, "src"))
    save_component(os.path.join(tmp_path, "model", "text_encoder_2"), config, params)
    model, loaded = clip_text.load(os.path.join(tmp_path, "model"), "text_encoder_2")
    ids = token_ids(0, [4, 9], seed=8)
    out = jax.jit(lambda p, i: model.apply({"params": p}, i))(loaded, ids.astype(np.int32))
    with torch.no_grad():
        ref = tm(torch.from_numpy(ids))
    assert rel(out.text_embeds, ref.text_embeds.numpy()) < 1e-5
