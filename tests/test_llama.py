"""LLaMA port vs transformers ``LlamaForCausalLM`` (float32, tiny random configs), KV-cached
decoding vs full recompute and transformers ``generate``, full-size shapes on the torch meta
device, and the HF folder converter (round trip, sharding, one-line errors)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch
import transformers

from fairjax.convert.core import convert_checkpoint, export_state, plan_conversion  # noqa: E402
from fairjax.convert.llama import export_hf_llama, load_hf_llama  # noqa: E402
from fairjax.errors import CheckpointError  # noqa: E402
from fairjax.io.safetensors import SafetensorsReader, write_safetensors  # noqa: E402
from fairjax.models import llama  # noqa: E402

TOL = 1e-5


class DictReader(dict):
    """In-memory stand-in for a safetensors reader (torch state dict as numpy)."""

    def shape(self, k):
        return tuple(self[k].shape)


def tiny_hf(**overrides):
    cfg = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
    cfg.update(overrides)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    with torch.no_grad():  # non-trivial norm weights
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


def to_flax(hf_model, scan_layers=False, **kw):
    """The Flax module and the converted params (with ``scan_layers``: the scanned module, params stacked)."""
    module = llama.from_config(hf_model.config.to_dict(), **kw)
    sd = DictReader({k: v.detach().numpy() for k, v in hf_model.state_dict().items()})
    ignore = [r"^lm_head\.weight$"] if module.config.tie_word_embeddings else []
    params = convert_checkpoint(sd, llama.param_shapes(module), ignore=ignore)
    if scan_layers:
        return module.clone(scan_layers=True), llama.stack_params(params)
    return module, params


def hf_logits(hf_model, ids, mask=None, position_ids=None):
    with torch.no_grad():
        kw = {}
        if mask is not None:
            kw["attention_mask"] = torch.tensor(np.asarray(mask, np.int64))
        if position_ids is not None:
            kw["position_ids"] = torch.tensor(np.asarray(position_ids, np.int64))
        return hf_model(torch.tensor(np.asarray(ids, np.int64)), **kw).logits.numpy()


def generate_positions(mask):
    """transformers ``generate``: ``cumsum(mask) - 1``, 0 at padding."""
    return np.where(mask, np.cumsum(mask, -1) - 1, 0)


def padded_batch(b=3, s=12, vocab=96, seed=0):
    rs = np.random.RandomState(seed)
    ids = rs.randint(0, vocab, (b, s))
    mask = np.ones((b, s), bool)
    mask[1, :4] = False  # left padding
    mask[2, -3:] = False  # right padding
    return ids, mask


CONFIGS = {
    "gqa_linear_rope": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "mha_default_rope_tied_bias": dict(num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True,
                                       mlp_bias=True, rope_theta=500.0),
    "llama3_rope": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                        rope_theta=10000.0),
    "mqa_head_dim_remat": dict(num_key_value_heads=1, head_dim=24),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name, rel):
    hf = tiny_hf(**CONFIGS[name])
    module, params = to_flax(hf, remat=name.endswith("remat"))
    ids, mask = padded_batch()
    pos = generate_positions(mask)
    ref = hf_logits(hf, ids, mask, pos)
    out = module.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert rel(np.asarray(out.logits)[mask], ref[mask]) < TOL
    # no mask: plain causal LM over arange positions
    ref = hf_logits(hf, ids)
    out = module.apply({"params": params}, jnp.asarray(ids))
    assert rel(out.logits, ref) < TOL


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scan_layers"])
def test_gradients_match_torch_with_remat(rel, scan_layers):
    """d/dtheta sum(logits * r) over real tokens, every parameter, remat on (the training path); with
    scan_layers the 3 layers run under nn.scan (remat per layer) on the stacked params."""
    hf = tiny_hf(rope_scaling={"rope_type": "linear", "factor": 2.0}, num_hidden_layers=3)
    module, params = to_flax(hf, scan_layers, remat="dots_saveable" if scan_layers else True)
    ids, mask = padded_batch(b=3, s=8)
    r = np.random.RandomState(5).randn(3, 8, 96).astype(np.float32) * mask[..., None]
    hf.zero_grad()
    out = hf(torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)),
             position_ids=torch.tensor(generate_positions(mask))).logits
    (out * torch.tensor(r)).sum().backward()

    def loss(p):
        lg = module.apply({"params": p}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits
        return (lg * r).sum(), lg

    grads, logits = jax.jit(jax.grad(loss, has_aux=True))(params)
    assert rel(np.asarray(logits)[mask], out.detach().numpy()[mask]) < TOL
    grads = dict(export_state(llama.unstack_params(grads)))
    ref = {k: v.grad.numpy() for k, v in hf.named_parameters()}
    assert set(grads) == set(ref)
    for k in ref:
        assert rel(grads[k], ref[k]) < TOL, k


def test_bf16_compute_close_to_float32_reference(rel):
    hf = tiny_hf()
    module, params = to_flax(hf, dtype=jnp.bfloat16)
    ids, mask = padded_batch()
    ref = hf_logits(hf, ids, mask, generate_positions(mask))
    out = module.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert out.logits.dtype == jnp.float32 and out.hidden_states.dtype == jnp.bfloat16
    assert rel(np.asarray(out.logits)[mask], ref[mask]) < 5e-2


def test_dynamic_rope_beyond_max_positions(rel):
    hf = tiny_hf(max_position_embeddings=8, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    module, params = to_flax(hf)
    ids = np.random.RandomState(1).randint(0, 96, (2, 14))
    out = module.apply({"params": params}, jnp.asarray(ids))
    assert rel(out.logits, hf_logits(hf, ids)) < TOL


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scan_layers"])
def test_kv_cache_matches_full_recompute_and_transformers(rel, scan_layers):
    """Prefill + decode steps (with scan_layers the cache's layer axis is scanned with the layers)."""
    hf = tiny_hf(rope_scaling={"rope_type": "linear", "factor": 2.0})
    module, params = to_flax(hf, scan_layers)
    ids = np.random.RandomState(0).randint(0, 96, (2, 11))
    mask = np.ones((2, 11), bool)
    mask[1, :3] = False  # left padded prompt, then 4 decoded tokens
    n_prompt = 7
    pos = generate_positions(mask)
    ref = hf_logits(hf, ids, mask, pos)
    full = np.asarray(module.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)
    prefill = jax.jit(llama.prefill, static_argnums=0, static_argnames="max_len")
    step = jax.jit(llama.decode_step, static_argnums=0)
    lg, h, cache = prefill(module, params, jnp.asarray(ids[:, :n_prompt]), jnp.asarray(mask[:, :n_prompt]),
                           max_len=ids.shape[1])
    assert rel(lg, ref[:, n_prompt - 1]) < TOL
    assert rel(lg, full[:, n_prompt - 1]) < TOL
    emb = module.apply({"params": params}, jnp.asarray(ids), method=llama.LlamaForCausalLM.embed)
    cache_e = cache
    for t in range(n_prompt, ids.shape[1]):
        lg, h, cache = step(module, params, cache, jnp.asarray(ids[:, t]))
        assert rel(lg, ref[:, t]) < TOL
        assert rel(lg, full[:, t]) < TOL
        lg_e, _, cache_e = step(module, params, cache_e, inputs_embeds=emb[:, t])  # VILA-U feeds embeddings
        assert rel(lg_e, ref[:, t]) < TOL
    assert int(cache.index) == ids.shape[1]
    np.testing.assert_array_equal(np.asarray(cache.positions), mask.sum(-1))
    lg, _, _ = step(module, params, cache, jnp.asarray(ids[:, 0]))  # no free slot left: loud, not wrong
    assert np.isnan(np.asarray(lg)).all()


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scan_layers"])
def test_greedy_generate_matches_transformers_generate(scan_layers):
    """The same tokens as transformers' generate, unrolled and with the layers (and the cache) scanned."""
    hf = tiny_hf()
    module, params = to_flax(hf, scan_layers)
    ids = np.random.RandomState(3).randint(0, 96, (3, 9))
    mask = np.ones((3, 9), bool)
    mask[1, :4] = False  # generate needs left padding
    mask[2, :2] = False
    n_new = 8
    with torch.no_grad():
        kw = dict(attention_mask=torch.tensor(mask.astype(np.int64)), max_new_tokens=n_new, do_sample=False,
                  pad_token_id=0)
        ref = hf.generate(torch.tensor(ids), eos_token_id=None, **kw)[:, ids.shape[1]:].numpy()
    gen = jax.jit(llama.greedy_generate, static_argnums=0, static_argnames=("max_new_tokens", "eos_token_id"))
    out = gen(module, params, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=n_new)
    np.testing.assert_array_equal(np.asarray(out), ref)
    eos = int(ref[0, 2])  # a token row 0 emits: rows stop there and pad afterwards
    with torch.no_grad():
        ref_eos = hf.generate(torch.tensor(ids), eos_token_id=eos, **kw)[:, ids.shape[1]:].numpy()
    out = np.asarray(gen(module, params, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=n_new, eos_token_id=eos))
    np.testing.assert_array_equal(out[:, :ref_eos.shape[1]], ref_eos)
    assert (out[:, ref_eos.shape[1]:] == 0).all()


@pytest.mark.parametrize("vocab", [32000, 32004])
def test_full_size_llama2_7b_shapes_match_meta(vocab):
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=4096, intermediate_size=11008,
                                   num_hidden_layers=32, num_attention_heads=32, max_position_embeddings=4096)
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(cfg)
    torch_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    jax_shapes = llama.param_shapes(llama.from_config(cfg.to_dict()))
    plan = plan_conversion(torch_shapes, jax_shapes)  # raises on any missing / unexpected / mismatched key
    assert len(plan) == len(torch_shapes) == len(jax_shapes)
    n_torch = sum(p.numel() for p in hf.parameters())
    assert sum(int(np.prod(s)) for s in jax_shapes.values()) == n_torch
    if vocab == 32000:
        assert n_torch == 6_738_415_616  # LLaMA-2-7B as published


def test_config_errors():
    with pytest.raises(CheckpointError, match=r"rope_scaling\.rope_type 'yarn'"):
        llama.LlamaConfig.from_dict({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(CheckpointError, match=r"rope_parameters\.factor is missing"):
        llama.LlamaConfig.from_dict({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}})
    with pytest.raises(CheckpointError, match="hidden_act 'gelu'"):
        llama.LlamaConfig.from_dict({"hidden_act": "gelu"})
    c = llama.LlamaConfig.from_dict({"rope_scaling": {"type": "linear", "factor": 4.0}, "rope_theta": 5e5})
    assert (c.rope_type, c.rope_factor, c.rope_theta) == ("linear", 4.0, 5e5)


# ----------------------------------------------------------------------------- converter

def _save_tiny(tmp_path, name="hf", **save_kw):
    hf = tiny_hf()
    hf.save_pretrained(tmp_path / name, **save_kw)
    return hf, tmp_path / name


def _hf_tensors(folder):
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            with SafetensorsReader(folder / f) as r:
                out.update({k: np.array(r[k]) for k in r.keys()})
    return out


def test_converter_round_trip_bit_exact(tmp_path, rel):
    hf, src = _save_tiny(tmp_path)
    cfg, params = load_hf_llama(str(src))
    module = llama.from_config(cfg)
    ids = np.random.RandomState(2).randint(0, 96, (2, 6))
    assert rel(module.apply({"params": params}, jnp.asarray(ids)).logits, hf_logits(hf, ids)) < TOL
    original = _hf_tensors(src)
    for shard, name in [(5 * 1024**3, "out"), (60_000, "out_sharded")]:
        out = tmp_path / name
        export_hf_llama(params, cfg, str(out), max_shard_bytes=shard)
        back = _hf_tensors(out)
        assert set(back) == set(original)
        for k, v in original.items():
            assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k
        if name == "out_sharded":
            index = json.loads((out / "model.safetensors.index.json").read_text())
            assert len(set(index["weight_map"].values())) > 1 and set(index["weight_map"]) == set(original)
        loaded, info = transformers.LlamaForCausalLM.from_pretrained(str(out), output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        assert rel(hf_logits(loaded.eval(), ids), hf_logits(hf, ids)) == 0.0
    from fairjax.errors import OutputError

    with pytest.raises(OutputError, match="already exists"):
        export_hf_llama(params, cfg, str(tmp_path / "out"))


def test_converter_export_bf16_records_dtype(tmp_path):
    _, src = _save_tiny(tmp_path)
    cfg, params = load_hf_llama(str(src))
    export_hf_llama(params, cfg, str(tmp_path / "bf16"), dtype="bfloat16")
    loaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "bf16"))
    assert loaded.dtype == torch.bfloat16
    w = loaded.model.layers[0].mlp.up_proj.weight.detach().float().numpy()
    ref = torch.tensor(np.asarray(params["model"]["layers_0"]["mlp"]["up_proj"]["kernel"]).T).bfloat16()
    assert np.array_equal(w, ref.float().numpy())


def test_converter_reads_sharded_and_names_missing_shard(tmp_path):
    _, src = _save_tiny(tmp_path, max_shard_size="100KB")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    cfg, params = load_hf_llama(str(src))
    assert params["model"]["layers_1"]["mlp"]["down_proj"]["kernel"].shape == (112, 64)
    os.remove(src / shards[-1])
    with pytest.raises(CheckpointError, match=shards[-1]) as e:
        load_hf_llama(str(src))
    assert "\n" not in str(e.value)


def test_converter_names_unexpected_and_missing_keys(tmp_path):
    _, src = _save_tiny(tmp_path)
    with SafetensorsReader(src / "model.safetensors") as r:
        items = {k: np.array(r[k]) for k in r.keys()}
    for i in range(2):  # old checkpoints carry the rotary buffers: ignored
        items[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    write_safetensors(src / "model.safetensors", items)
    _, params = load_hf_llama(str(src))
    assert "rotary_emb" not in params["model"]["layers_0"]["self_attn"]
    items["model.layers.0.self_attn.extra_proj.weight"] = np.zeros((2, 2), np.float32)
    del items["model.layers.1.mlp.gate_proj.weight"]
    write_safetensors(src / "model.safetensors", items)
    with pytest.raises(CheckpointError) as e:
        load_hf_llama(str(src))
    msg = str(e.value)
    assert "\n" not in msg
    assert "model.layers.0.self_attn.extra_proj.weight" in msg and "model/layers_1/mlp/gate_proj/kernel" in msg
