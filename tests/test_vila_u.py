"""VILA-U generation head vs PyTorch: depth-transformer blocks vs transformers ``GPT2Block``;
the depth transformer, codebook and mm_projector vs a small torch re-implementation of the
vila-u source's equations (loaded through the converter from checkpoint-style keys); the
sampling filter vs vila-u's top-k / top-p; and the whole CFG image-token loop (greedy, so it
is deterministic) vs the same loop run with transformers' LlamaForCausalLM."""

import json
import math
from collections import OrderedDict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch
import transformers
tnn = torch.nn
F = torch.nn.functional

from _torch_util import DictReader  # noqa: E402
from fairjax.convert.core import convert_checkpoint, plan_conversion  # noqa: E402
from fairjax.io.tree import flatten  # noqa: E402
from fairjax.convert.llama import (  # noqa: E402
    convert_codebook, convert_projector, convert_rqtransformer, rqtransformer_shapes)
from fairjax.convert.vila_u import load  # noqa: E402
from fairjax.errors import CheckpointError  # noqa: E402
from fairjax.io.safetensors import ShardedReader, write_safetensors  # noqa: E402
from fairjax.models import vila_u  # noqa: E402

TOL = 1e-5

# ----------------------------------------------------------------------------- torch reference (vila-u equations)


class RefSelfAttention(tnn.Module):
    """Causal MHA: softmax(q k^T / sqrt(d) + causal) v, then proj; all Linear layers biased."""

    def __init__(self, e, heads):
        super().__init__()
        self.key, self.query, self.value, self.proj = (tnn.Linear(e, e) for _ in range(4))
        self.heads = heads

    def forward(self, x):
        b, t, e = x.shape
        split = lambda y: y.view(b, t, self.heads, e // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        att = q @ k.transpose(-1, -2) / math.sqrt(e // self.heads)
        att = att.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, e))


class RefBlock(tnn.Module):
    def __init__(self, e, heads):
        super().__init__()
        self.ln1, self.ln2 = tnn.LayerNorm(e), tnn.LayerNorm(e)
        self.attn = RefSelfAttention(e, heads)
        self.mlp = tnn.Sequential(tnn.Linear(e, 4 * e), tnn.GELU(), tnn.Linear(4 * e, e))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class RefStack(tnn.Module):
    def __init__(self, e, heads, layers):
        super().__init__()
        self.blocks = tnn.ModuleList([RefBlock(e, heads) for _ in range(layers)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


class RefRQTransformer(tnn.Module):
    """x_0 = in_mlp_2(h); x_d = in_mlp_1(sum_{j<d} emb_j); logits = classifier(blocks(x + pos_emb_d))."""

    def __init__(self, c1, c2, e, heads, layers, depth, vocab):
        super().__init__()
        self.in_mlp_1, self.in_mlp_2 = tnn.Linear(c1, e), tnn.Linear(c2, e)
        self.head_transformer = RefStack(e, heads, layers)
        self.pos_emb_d = tnn.Parameter(0.02 * torch.randn(1, depth, e))
        self.classifier_mlp = tnn.Sequential(OrderedDict(layer_norm=tnn.LayerNorm(e), linear=tnn.Linear(e, vocab)))

    def logits_at(self, h, emb, n):
        """Logits of depth n-1 from h (B,H) and per-depth embeddings emb (B,D,C), on a length-n sequence."""
        ctx = self.in_mlp_1(torch.cumsum(emb, dim=1))[:, : n - 1]
        x = torch.cat([self.in_mlp_2(h)[:, None], ctx], dim=1) + self.pos_emb_d[:, :n]
        return self.classifier_mlp(self.head_transformer(x))

    def forward(self, h, emb):
        """Teacher forcing: h (B,S,H), emb (B,S,D,C) -> (B,S,D,V)."""
        b, s, d, c = emb.shape
        return self.logits_at(h.reshape(b * s, -1), emb.reshape(b * s, d, c), d).reshape(b, s, d, -1)


def ref_top_k_top_p_probs(logits, temperature, top_k, top_p):
    """vila-u sample_from_logits up to the draw, from its equations."""
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p is not None:
        sp, si = torch.sort(probs, dim=-1, descending=True)
        remove = torch.cumsum(sp, -1) >= top_p
        remove = torch.cat([torch.zeros_like(remove[:, :1]), remove[:, :-1]], dim=-1)
        probs = probs.masked_fill(remove.scatter(-1, si, remove), 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


# ----------------------------------------------------------------------------- tiny VILA-U

LLM = dict(vocab_size=40, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
RQ = {"block_size": [2, 3, 4], "input_embed_dim_1": 16, "input_embed_dim_2": 48, "embed_dim": 32,
      "vocab_size": 50, "head": {"block": {"n_head": 4}, "n_layer": 2}}
RQVAE = {"n_embed": 50, "latent_shape": [2, 3, 16], "code_shape": [2, 3, 4], "shared_codebook": True,
         "embed_dim": 16}


def tiny_torch_parts(seed=0):
    torch.manual_seed(seed)
    rq = RefRQTransformer(16, 48, 32, 4, 2, 4, 50).eval()
    with torch.no_grad():
        for m in rq.modules():
            if isinstance(m, tnn.LayerNorm):
                m.weight.copy_(1 + 0.2 * torch.randn_like(m.weight))
                m.bias.copy_(0.2 * torch.randn_like(m.bias))
    codebook = torch.randn(51, 16)  # n_embed + 1 rows (padding_idx = n_embed)
    proj = tnn.Sequential(tnn.Linear(16, 48), tnn.GELU(), tnn.Linear(48, 48)).eval()
    llm = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLM)).eval()
    return llm, rq, codebook, proj


def vision_tower_state(rq, codebook):
    """Checkpoint-style keys: rqtransformer.*, the shared codebook under every depth index, plus distractors."""
    sd = {f"rqtransformer.{k}": v.detach().numpy() for k, v in rq.state_dict().items()}
    for i in range(4):
        sd[f"rqvaesiglip.quantizer.codebooks.{i}.weight"] = codebook.numpy()
        sd[f"rqvaesiglip.quantizer.codebooks.{i}.embed_ema"] = codebook[:-1].numpy()
        sd[f"rqvaesiglip.quantizer.codebooks.{i}.cluster_size_ema"] = np.ones(50, np.float32)
    sd["rqvaesiglip.post_quant_conv.weight"] = np.zeros((3, 16, 1, 1), np.float32)
    sd["rqvaesiglip.siglip_model.vision_model.embeddings.patch_embedding.bias"] = np.zeros(8, np.float32)
    return sd


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A vila-u-shaped folder (llm/, vision_tower/, mm_projector/) from the torch parts."""
    root = tmp_path_factory.mktemp("vila_u")
    llm, rq, codebook, proj = tiny_torch_parts()
    llm.save_pretrained(root / "llm")
    (root / "vision_tower").mkdir()
    write_safetensors(root / "vision_tower" / "model.safetensors", vision_tower_state(rq, codebook))
    (root / "vision_tower" / "config.json").write_text(json.dumps(
        {"rqtransformer": RQ, "rqvaesiglip": RQVAE, "hidden_size": 16}))
    (root / "mm_projector").mkdir()
    write_safetensors(root / "mm_projector" / "model.safetensors",
                      {f"layers.{k}": v.detach().numpy() for k, v in proj.state_dict().items()})
    (root / "mm_projector" / "config.json").write_text(json.dumps({"mm_projector_type": "mlp2x_gelu"}))
    vu, params, _, _ = load(str(root), vision_tower=False)
    out = _Checkpoint(((llm, rq, codebook, proj), vu, params))
    out.root = root
    return out


class _Checkpoint(tuple):
    """``(torch parts, vu, params)`` with the folder they were loaded from as ``.root``."""

    root = None


def checkpoint_root(checkpoint):
    return checkpoint.root


# ----------------------------------------------------------------------------- tests


def test_attention_block_matches_gpt2_block(rel):
    cfg = transformers.GPT2Config(n_embd=32, n_head=4, n_layer=1, activation_function="gelu", resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5)
    cfg._attn_implementation = "eager"
    torch.manual_seed(1)
    blk = transformers.models.gpt2.modeling_gpt2.GPT2Block(cfg, layer_idx=0).eval()
    with torch.no_grad():
        for p in blk.parameters():
            p.copy_(0.2 * torch.randn_like(p))
    w = {k: v.detach().numpy() for k, v in blk.named_parameters()}
    e = 32
    qkv_w, qkv_b = w["attn.c_attn.weight"], w["attn.c_attn.bias"]  # Conv1D: x @ W + b, W (in, out); q|k|v
    dense = lambda k, b: {"kernel": k, "bias": b}  # noqa: E731
    params = {
        "ln1": {"scale": w["ln_1.weight"], "bias": w["ln_1.bias"]},
        "ln2": {"scale": w["ln_2.weight"], "bias": w["ln_2.bias"]},
        "attn": {n: dense(qkv_w[:, i * e:(i + 1) * e], qkv_b[i * e:(i + 1) * e])
                 for i, n in enumerate(("query", "key", "value"))} | {
            "proj": dense(w["attn.c_proj.weight"], w["attn.c_proj.bias"])},
        "mlp_0": dense(w["mlp.c_fc.weight"], w["mlp.c_fc.bias"]),
        "mlp_2": dense(w["mlp.c_proj.weight"], w["mlp.c_proj.bias"]),
    }
    x = np.random.RandomState(0).randn(3, 5, e).astype(np.float32)
    causal = torch.full((5, 5), torch.finfo(torch.float32).min).triu(1)[None, None]
    with torch.no_grad():
        ref = blk(torch.tensor(x), attention_mask=causal)
    ref = (ref[0] if isinstance(ref, tuple) else ref).numpy()
    block = vila_u.AttentionBlock(vila_u.RQTransformerConfig.from_dict(RQ))  # embed_dim 32, 4 heads
    assert rel(block.apply({"params": params}, jnp.asarray(x)), ref) < TOL


def test_depth_transformer_codebook_projector_match_reference(checkpoint, rel):
    (_, rq, codebook, proj), vu, params = checkpoint
    rs = np.random.RandomState(0)
    h = rs.randn(2, 3, 48).astype(np.float32)
    codes = rs.randint(0, 50, (2, 3, 4))
    emb = F.embedding(torch.tensor(codes), codebook)
    with torch.no_grad():
        ref = rq(torch.tensor(h), emb).numpy()
        ref_in = proj(emb.sum(-2)).numpy()
    assert rel(vila_u.depth_logits(vu, params, jnp.asarray(h), jnp.asarray(codes)), ref) < TOL
    assert rel(vila_u.code_embeds(vu, params, jnp.asarray(codes)), emb.numpy()) == 0.0
    assert rel(vila_u.image_embeds(vu, params, jnp.asarray(codes)), ref_in) < TOL
    grid = vila_u.image_grid_features(vu, params, jnp.asarray(codes.reshape(1, 6, 4)))  # row-major 2 x 3 grid
    assert rel(grid, emb.sum(-2).numpy().reshape(1, 2, 3, 16)) < TOL


def test_scanned_depth_transformer_outputs_and_gradients_match_reference(checkpoint, rel):
    """``load(..., scan_layers=True)``: the depth transformer's blocks under nn.scan (remat per layer) on the
    stacked params give the torch reference's logits and parameter gradients (and the LLaMA is scanned too)."""
    (_, rq, codebook, _), vu, params = checkpoint
    svu, sp, _, _ = load(str(checkpoint_root(checkpoint)), vision_tower=False, scan_layers=True, remat="dots_saveable")
    assert svu.scan_layers and sp["rqtransformer"]["head_transformer"]["blocks"]["attn"]["query"]["kernel"].shape == (
        2, 32, 32)
    assert sp["llm"]["model"]["layers"]["mlp"]["up_proj"]["kernel"].shape == (2, 48, 64)
    np.testing.assert_array_equal(vila_u.unstack_params(sp)["llm"]["model"]["layers_1"]["mlp"]["up_proj"]["kernel"],
                                  params["llm"]["model"]["layers_1"]["mlp"]["up_proj"]["kernel"])
    rs = np.random.RandomState(1)
    h = rs.randn(2, 3, 48).astype(np.float32)
    codes = rs.randint(0, 50, (2, 3, 4))
    r = rs.randn(2, 3, 4, 50).astype(np.float32)
    emb = F.embedding(torch.tensor(codes), codebook)
    rq.zero_grad()
    ref = rq(torch.tensor(h), emb)
    (ref * torch.tensor(r)).sum().backward()

    def loss(p):
        lg = vila_u.depth_logits(svu, dict(sp, rqtransformer=p), jnp.asarray(h), jnp.asarray(codes))
        return jnp.sum(lg * r), lg

    g, logits = jax.jit(jax.grad(loss, has_aux=True))(sp["rqtransformer"])
    assert rel(logits, ref.detach().numpy()) < TOL
    got = flatten(vila_u.unstack_params(dict(sp, rqtransformer=g))["rqtransformer"])
    want = flatten(convert_checkpoint(DictReader({k: p.grad.numpy() for k, p in rq.named_parameters()}),
                                      rqtransformer_shapes(vu.rqtransformer)))  # torch grads in the Flax layout
    assert set(got) == set(want)
    keys = sorted(want)  # all params as one vector: attn/key/bias has a zero gradient (softmax ignores it)
    vec = lambda t: np.concatenate([np.ravel(t[k]) for k in keys])  # noqa: E731
    assert rel(vec(got), vec(want)) < TOL
    for k in keys:
        if np.abs(want[k]).max() > 1e-4:
            assert rel(got[k], want[k]) < 5e-5, k


def test_filtered_probs_match_vila_u(rel):
    logits = np.random.RandomState(0).randn(4, 300).astype(np.float32) * 3
    for t, k, p in [(1.0, 900, 0.96), (1.0, 40, 0.8), (0.7, None, 0.5), (1.3, 10, None)]:
        ref = ref_top_k_top_p_probs(torch.tensor(logits), t, min(k, 300) if k else None, p).numpy()
        out = vila_u.filtered_probs(jnp.asarray(logits), t, min(k, 300) if k else None, p)
        assert rel(out, ref) < 1e-6
        assert ((np.asarray(out) > 0) == (ref > 0)).all()


def test_sampling_follows_filtered_probs():
    logits = jnp.asarray([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0]])
    ref = ref_top_k_top_p_probs(torch.tensor(np.asarray(logits)), 1.0, 4, 0.9).numpy()[0]
    keys = jax.random.split(jax.random.key(0), 20000)
    draws = np.asarray(jax.vmap(lambda k: vila_u.sample_from_logits(k, logits, 1.0, 4, 0.9))(keys))[:, 0]
    freq = np.bincount(draws, minlength=6) / draws.size
    assert (freq[ref == 0] == 0).all()
    assert np.abs(freq - ref).max() < 0.015


def ref_generate(llm, rq, codebook, proj, ids, mask, n_tokens, cfg):
    """vila-u's image loop with transformers' LLaMA (DynamicCache), greedy (top_k = 1) depth sampling."""
    n = ids.shape[0] // 2
    am = torch.tensor(mask.astype(np.int64))
    pos = torch.tensor(np.where(mask, mask.cumsum(-1) - 1, 0))
    with torch.no_grad():
        out = llm.model(input_ids=torch.tensor(ids), attention_mask=am, position_ids=pos, use_cache=True)
        h, pkv = out.last_hidden_state[:, -1], out.past_key_values
        all_codes = []
        for t in range(n_tokens):
            code = torch.zeros(n, 4, dtype=torch.long)
            for d in range(4):
                emb = F.embedding(code.repeat(2, 1), codebook)
                lg = rq.logits_at(h, emb, d + 1)[:, -1]
                guided = lg[n:] + cfg * (lg[:n] - lg[n:])
                code[:, d] = guided.argmax(-1)
            all_codes.append(code.clone())
            if t == n_tokens - 1:
                break
            x = proj(F.embedding(code.repeat(2, 1), codebook).sum(-2))[:, None]
            am = torch.cat([am, torch.ones(2 * n, 1, dtype=am.dtype)], dim=1)
            out = llm.model(inputs_embeds=x, attention_mask=am, position_ids=am.sum(-1, keepdim=True) - 1,
                            past_key_values=pkv, use_cache=True)
            h, pkv = out.last_hidden_state[:, -1], out.past_key_values
    return torch.stack(all_codes, 1).numpy()


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scan_layers"])
def test_generate_image_codes_matches_reference_loop(checkpoint, scan_layers):
    """Greedy CFG image tokens = the torch loop; with scan_layers the LLaMA (and its KV cache) and the depth
    transformer run scanned."""
    (llm, rq, codebook, proj), vu, params = checkpoint
    if scan_layers:
        vu, params = vu.with_scan_layers(True), vila_u.stack_params(params)
    ids, mask = vila_u.cfg_batch([1, 5, 7, 9, 11, 13, 2], [1, 5, 3, 2], n=2)
    ids[1, -3] = 17  # two different conditional prompts
    ref = ref_generate(llm, rq, codebook, proj, ids, mask, vu.image_tokens, cfg=3.0)
    gen = jax.jit(vila_u.generate_image_codes, static_argnums=0,
                  static_argnames=("num_tokens", "top_k", "top_p", "temperature", "cfg"))
    out = gen(vu, params, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0), top_k=1, top_p=None)
    assert out.shape == (2, 6, 4)
    np.testing.assert_array_equal(np.asarray(out), ref)


def test_full_size_depth_transformer_shapes_match_reference():
    # the vila-u source's AttentionBlockConfig / AttentionStackConfig defaults (2560 wide, 40 heads, 6 layers),
    # 16 x 16 x 4 codes of a 16384-entry, 1024-wide codebook, LLaMA-2-7B hidden size
    c = vila_u.RQTransformerConfig(block_size=(16, 16, 4), input_embed_dim_1=1024, input_embed_dim_2=4096,
                                   embed_dim=2560, vocab_size=16384, n_head=40, n_layer=6)
    with torch.device("meta"):
        ref = RefRQTransformer(c.input_embed_dim_1, c.input_embed_dim_2, c.embed_dim, c.n_head, c.n_layer,
                               c.depth, c.vocab_size)
    torch_shapes = {f"rqtransformer.{k}": tuple(v.shape) for k, v in ref.state_dict().items()}
    shapes = rqtransformer_shapes(vila_u.RQTransformer(c))
    plan = plan_conversion(torch_shapes, shapes, rename=lambda k: k[len("rqtransformer."):])
    assert len(plan) == len(shapes)
    assert sum(int(np.prod(s)) for s in shapes.values()) == sum(p.numel() for p in ref.parameters())


def test_converter_errors(tmp_path):
    _, rq, codebook, _ = tiny_torch_parts()
    sd = vision_tower_state(rq, codebook)
    del sd["rqtransformer.head_transformer.blocks.1.mlp.2.bias"]
    sd["rqtransformer.head_transformer.blocks.1.extra.weight"] = np.zeros((2, 2), np.float32)
    write_safetensors(tmp_path / "model.safetensors", sd)
    vu = vila_u.build(LLM, {"rqtransformer": RQ, "rqvaesiglip": RQVAE})
    with ShardedReader(tmp_path, "model") as r:
        with pytest.raises(CheckpointError) as e:
            convert_rqtransformer(r, vu.rqtransformer)
        msg = str(e.value)
        assert "head_transformer/blocks_1/mlp_2/bias" in msg and "blocks.1.extra.weight" in msg and "\n" not in msg
        assert convert_codebook(r, vu.codebook)["codebooks_0"]["embedding"].shape == (51, 16)
    with pytest.raises(CheckpointError, match="no 'rqtransformer' dict"):
        vila_u.build(LLM, {"rqvaesiglip": RQVAE})
    with pytest.raises(CheckpointError, match="head must be"):
        vila_u.RQTransformerConfig.from_dict(dict(RQ, head={"n_layer": 2}))
    with pytest.raises(CheckpointError, match="mm_projector_type 'mlp2x_relu'"):
        vila_u.ProjectorConfig.from_dict({"mm_projector_type": "mlp2x_relu"}, mm_hidden_size=16, hidden_size=48)
    with pytest.raises(CheckpointError, match="missing llm/, vision_tower/, mm_projector/"):
        load(str(tmp_path), vision_tower=False)
    write_safetensors(tmp_path / "model.safetensors", {"layers.0.weight": np.zeros((48, 16), np.float32)})
    with ShardedReader(tmp_path, "model") as r, pytest.raises(CheckpointError, match="layers_2/kernel"):
        convert_projector(r, vu.mm_projector)


def test_identity_projector():
    """vila-u's ``mm_projector_type='identity'``: no params, the codebook features pass through unchanged;
    it needs the codebook dim to equal the LLM hidden size."""
    llm = dict(LLM, hidden_size=16, num_attention_heads=4, num_key_value_heads=2)
    vu = vila_u.build(llm, {"rqtransformer": dict(RQ, input_embed_dim_2=16), "rqvaesiglip": RQVAE},
                      {"mm_projector_type": "identity"})
    params = vu.init(jax.random.key(0))
    assert params["mm_projector"] == {}
    x = np.random.default_rng(0).normal(size=(2, 3, 16)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(vu.mm_projector.apply({"params": params["mm_projector"]}, x)), x)
    with pytest.raises(CheckpointError, match="'identity' needs the codebook dim 16 to equal the LLM hidden size 48"):
        vila_u.build(LLM, {"rqtransformer": RQ, "rqvaesiglip": RQVAE}, {"mm_projector_type": "identity"})
