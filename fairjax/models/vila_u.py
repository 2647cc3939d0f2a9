"""VILA-U's image-generation head in Flax: residual codebook embedding, mm_projector,
depth transformer (``RQTransformer``), and the generation loop around the LLaMA decoder.

Ported from the public vila-u code (``vila_u/model/multimodal_encoder/
rqvaesigliptransformer/rqtransformer/*``, ``rqvaesiglip/quantizations.py``,
``multimodal_projector/base_projector.py``, and the generation path of
``transformers_replace/models/llama/modeling_llama.py`` + ``vila_u_arch.py``).
Module names follow the checkpoint keys, so conversion is the generic rule of
:mod:`fairjax.convert.core` plus a prefix (see :mod:`fairjax.convert.llama`)::

    rqtransformer.head_transformer.blocks.2.attn.query.weight -> head_transformer/blocks_2/attn/query/kernel
    rqtransformer.classifier_mlp.linear.weight                -> classifier_mlp/linear/kernel
    rqvaesiglip.quantizer.codebooks.0.weight                  -> codebooks_0/embedding
    (mm_projector) layers.0.weight / layers.2.weight           -> layers_0/kernel / layers_2/kernel

An image is a ``h x w`` grid of positions with ``D`` residual codes each
(vila-u-7b-256: 16 x 16 x 4, one shared codebook of 16384 (+1 padding row) x 1024).

* LLM input for an image position: ``mm_projector(sum_d emb(code_d))``,
  mm_projector = ``Linear(C, H) -> GELU -> Linear(H, H)`` (``mlp2x_gelu``).
* Depth transformer, for LLM output ``h_t`` (after the final norm) and codes
  ``c_0..c_{D-1}`` of position t+1::

      x_0 = in_mlp_2(h_t),  x_d = in_mlp_1(sum_{j<d} emb(c_j))   (d >= 1)
      logits_d = classifier_mlp(blocks(x + pos_emb_d)[d])        (causal over d)

  blocks: pre-LN GPT blocks, biased q/k/v/proj, MLP 4E with exact GELU;
  classifier_mlp = LayerNorm -> Linear(E, vocab).
* Generation (classifier-free guidance): the batch is N conditional rows then
  N unconditional rows; at each depth ``l = u + cfg (c - u)``, sample with
  temperature, top-k then top-p, and write the same code into both halves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fairjax import parallel
from fairjax.errors import CheckpointError
from fairjax.models import llama
from fairjax.models import transformer as transformer_mod
from fairjax.models.layers import Dense, layer_norm, remat_wrap, scan_stack
from fairjax.models.transformer import ACTIVATIONS, SelfAttention, feed_forward

Dtype = Any


_gelu = ACTIVATIONS["gelu"]  # torch ``nn.GELU()``: exact ``0.5 x (1 + erf(x / sqrt 2))``

#: the ``tensor``-axis rules of a VILA-U param tree (:func:`fairjax.parallel.tensor_rules`): the LLaMA's,
#: the depth transformer's (attn query/key/value and mlp_0 column-parallel, attn proj and mlp_2
#: row-parallel) and the SigLIP vision tower's
PARTITION_RULES = (llama.PARTITION_RULES
                   + parallel.tensor_rules(column=(r"attn/(query|key|value)", r"mlp_0"), row=(r"attn/proj", r"mlp_2"))
                   + transformer_mod.PARTITION_RULES)


# ----------------------------------------------------------------------------- configs

@dataclasses.dataclass(frozen=True)
class RQTransformerConfig:
    """vila-u ``RQTransformerConfig`` (the ``rqtransformer`` dict of ``vision_tower/config.json``)."""

    block_size: tuple[int, int, int]  # (h, w, depth)
    input_embed_dim_1: int  # codebook dim C
    input_embed_dim_2: int  # LLM hidden size
    embed_dim: int
    vocab_size: int
    n_head: int
    n_layer: int
    layer_norm_eps: float = 1e-5  # torch nn.LayerNorm default (not in the config)

    @property
    def depth(self) -> int:
        return self.block_size[2]

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "RQTransformerConfig":
        """Parse the ``rqtransformer`` config dict (``head = {"block": {"n_head"}, "n_layer"}``)."""
        need = ("block_size", "input_embed_dim_1", "input_embed_dim_2", "embed_dim", "vocab_size", "head")
        missing = [k for k in need if cfg.get(k) is None]
        if missing:
            raise CheckpointError(f"rqtransformer config: missing {', '.join(missing)} "
                                  f"(expected the 'rqtransformer' dict of vision_tower/config.json)")
        head = cfg["head"]
        try:
            n_head, n_layer = int(head["block"]["n_head"]), int(head["n_layer"])
        except (KeyError, TypeError):
            raise CheckpointError("rqtransformer config: head must be {'block': {'n_head': int}, 'n_layer': int}, "
                                  f"got {head!r}") from None
        bs = tuple(int(x) for x in cfg["block_size"])
        if len(bs) != 3:
            raise CheckpointError(f"rqtransformer config: block_size must be [h, w, depth], got {list(bs)}")
        if int(cfg["embed_dim"]) % n_head:
            raise CheckpointError(f"rqtransformer config: embed_dim {cfg['embed_dim']} is not divisible by "
                                  f"head.block.n_head {n_head}")
        return cls(block_size=bs, input_embed_dim_1=int(cfg["input_embed_dim_1"]),
                   input_embed_dim_2=int(cfg["input_embed_dim_2"]), embed_dim=int(cfg["embed_dim"]),
                   vocab_size=int(cfg["vocab_size"]), n_head=n_head, n_layer=n_layer)


@dataclasses.dataclass(frozen=True)
class CodebookConfig:
    """The residual-quantizer codebook(s) of vila-u's ``RQBottleneck``.

    ``embed_dim = prod(latent_shape[:2]) / prod(code_shape[:2]) * latent_shape[2]``;
    each codebook has ``n_embed + 1`` rows (the last is ``padding_idx``).
    """

    n_embed: int
    embed_dim: int
    depth: int
    shared_codebook: bool = False  # vila-u's RQBottleneck default

    @property
    def num_codebooks(self) -> int:
        return 1 if self.shared_codebook else self.depth

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "CodebookConfig":
        """Parse the ``rqvaesiglip`` config dict (``n_embed``, ``latent_shape``, ``code_shape``, ``shared_codebook``)."""
        missing = [k for k in ("n_embed", "latent_shape", "code_shape") if cfg.get(k) is None]
        if missing:
            raise CheckpointError(f"rqvaesiglip config: missing {', '.join(missing)} "
                                  f"(expected the 'rqvaesiglip' dict of vision_tower/config.json)")
        lat, code = list(cfg["latent_shape"]), list(cfg["code_shape"])
        if len(lat) != 3 or len(code) != 3 or lat[0] % code[0] or lat[1] % code[1]:
            raise CheckpointError(f"rqvaesiglip config: incompatible latent_shape {lat} / code_shape {code}")
        n = cfg["n_embed"]
        shared = bool(cfg.get("shared_codebook", False))
        if isinstance(n, (list, tuple)):
            if len(set(n)) != 1:
                raise CheckpointError(f"rqvaesiglip config: n_embed {n} with different sizes per depth is not "
                                      f"supported")
            n = n[0]
        dim = (lat[0] * lat[1]) // (code[0] * code[1]) * lat[2]
        return cls(n_embed=int(n), embed_dim=int(dim), depth=int(code[2]), shared_codebook=shared)


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
    """vila-u ``MultimodalProjector``: ``mm_projector_type`` with ``mm_hidden_size -> hidden_size``."""

    mm_hidden_size: int
    hidden_size: int
    mm_projector_type: str = "mlp2x_gelu"

    @property
    def mlp_depth(self) -> int:
        """Number of Linear layers (0 for identity)."""
        t = self.mm_projector_type
        if t == "identity":
            return 0
        if t == "linear":
            return 1
        if t.startswith("mlp") and t.endswith("x_gelu") and t[3:-6].isdigit():
            return int(t[3:-6])
        raise CheckpointError(f"mm_projector config: mm_projector_type {t!r} is not supported; use 'identity', "
                              f"'linear' or 'mlp<N>x_gelu'")

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any], *, mm_hidden_size: int, hidden_size: int) -> "ProjectorConfig":
        """``cfg`` is ``mm_projector/config.json``; the sizes come from the codebook dim and the LLM config."""
        out = cls(mm_hidden_size=int(mm_hidden_size), hidden_size=int(hidden_size),
                  mm_projector_type=cfg.get("mm_projector_type") or "mlp2x_gelu")
        if out.mlp_depth == 0 and out.mm_hidden_size != out.hidden_size:
            raise CheckpointError(f"mm_projector config: mm_projector_type 'identity' needs the codebook dim "
                                  f"{out.mm_hidden_size} to equal the LLM hidden size {out.hidden_size}")
        return out


# ----------------------------------------------------------------------------- modules

class RQCodebook(nn.Module):
    """``codebooks_i/embedding`` of shape (n_embed + 1, C); one shared table or one per depth.

    ``__call__(codes (..., D)) -> (..., D, C)``: ``emb_d = codebook_d[codes[..., d]]``.
    """

    config: CodebookConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, codes):
        c = self.config
        tables = [nn.Embed(c.n_embed + 1, c.embed_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                           embedding_init=nn.initializers.normal(1.0), name=f"codebooks_{i}")
                  for i in range(c.num_codebooks)]
        if c.shared_codebook:
            return tables[0](codes)
        return jnp.stack([tables[d](codes[..., d]) for d in range(codes.shape[-1])], axis=-2)


class MultimodalProjector(nn.Module):
    """``layers``: Linear(C, H) [-> GELU -> Linear(H, H)] * (N - 1) for ``mlp<N>x_gelu``."""

    config: ProjectorConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n = c.mlp_depth
        if n == 0:
            return x.astype(self.dtype)
        if c.mm_projector_type == "linear":
            return Dense(c.hidden_size, name="layers", **kw)(x)
        x = Dense(c.hidden_size, name="layers_0", **kw)(x)
        for i in range(1, n):
            x = Dense(c.hidden_size, name=f"layers_{2 * i}", **kw)(_gelu(x))
        return x


class AttentionBlock(nn.Module):
    """``x = x + attn(ln1(x)); x = x + mlp_2(gelu(mlp_0(ln2(x))))``: the shared pre-LN block
    (:mod:`fairjax.models.transformer`), causal, with vila-u's names (``attn/query|key|value|proj``,
    ``mlp_0``/``mlp_2`` held by the block itself) and a 4x exact-GELU MLP."""

    config: RQTransformerConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layer_norm(c.layer_norm_eps, name="ln1", **kw)(x)
        x = x + SelfAttention(c.n_head, causal=True, names=("query", "key", "value", "proj"),
                              attention_impl=self.attention_impl, name="attn", **kw)(h)
        h = layer_norm(c.layer_norm_eps, name="ln2", **kw)(x)
        return x + feed_forward(h, 4 * c.embed_dim, _gelu, names=("mlp_0", "mlp_2"), **kw)


class AttentionStack(nn.Module):
    """``blocks_0 .. blocks_{n_layer-1}`` (:class:`AttentionBlock`), or with ``scan_layers`` one ``blocks``
    under ``nn.scan`` whose params have a leading layer axis."""

    config: RQTransformerConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    remat: bool | str = False
    scan_layers: bool = False

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, attention_impl=self.attention_impl)
        if self.scan_layers:
            block = remat_wrap(AttentionBlock, self.remat, prevent_cse=False)(self.config, name="blocks", **kw)
            return scan_stack(block, self.config.n_layer, x)[0]
        block = remat_wrap(AttentionBlock, self.remat)
        for i in range(self.config.n_layer):
            x = block(self.config, name=f"blocks_{i}", **kw)(x)
        return x


class RQTransformer(nn.Module):
    """The depth transformer. ``__call__(embed_from_body (B,S,H_llm), code_embeds (B,S,D,C)) -> logits (B,S,D,V)``.

    ``code_embeds[..., d, :] = emb(c_d)`` for the codes of the *same* position
    (the target codes); logits at depth d see only ``h`` and ``c_0..c_{d-1}``,
    so entries at depths >= the one being sampled may hold anything.
    """

    config: RQTransformerConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    remat: bool | str = False
    scan_layers: bool = False

    @nn.compact
    def __call__(self, embed_from_body, code_embeds):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, s, d, _ = code_embeds.shape
        ctx = Dense(c.embed_dim, name="in_mlp_1", **kw)(jnp.cumsum(code_embeds, axis=-2))
        body = Dense(c.embed_dim, name="in_mlp_2", **kw)(embed_from_body)
        x = jnp.concatenate([body[:, :, None, :], ctx[:, :, :-1, :]], axis=-2).reshape(b * s, d, c.embed_dim)
        pos = self.param("pos_emb_d", nn.initializers.normal(0.02), (1, c.depth, c.embed_dim), self.param_dtype)
        x = x + pos[:, :d].astype(self.dtype)
        x = AttentionStack(c, attention_impl=self.attention_impl, remat=self.remat, scan_layers=self.scan_layers,
                           name="head_transformer", **kw)(x)
        x = ClassifierMLP(c, name="classifier_mlp", **kw)(x)
        return x.reshape(b, s, d, -1).astype(jnp.float32)


class ClassifierMLP(nn.Module):
    """``linear(layer_norm(x))``."""

    config: RQTransformerConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = layer_norm(c.layer_norm_eps, name="layer_norm", **kw)(x)
        return Dense(c.vocab_size, name="linear", **kw)(x)


# ----------------------------------------------------------------------------- the whole head

@dataclasses.dataclass(frozen=True)
class VilaU:
    """The modules of VILA-U's generation path; params are ``{'llm', 'mm_projector', 'rqtransformer', 'codebook'}``."""

    llm: llama.LlamaForCausalLM
    mm_projector: MultimodalProjector
    rqtransformer: RQTransformer
    codebook: RQCodebook

    @property
    def depth(self) -> int:
        return self.rqtransformer.config.depth

    @property
    def image_tokens(self) -> int:
        h, w, _ = self.rqtransformer.config.block_size
        return h * w

    @property
    def scan_layers(self) -> bool:
        return bool(self.llm.scan_layers)

    def with_scan_layers(self, scan: bool) -> "VilaU":
        """The same model with the LLaMA and depth-transformer layers scanned (or not); convert its params
        with :func:`stack_params` / :func:`unstack_params`."""
        return dataclasses.replace(self, llm=self.llm.clone(scan_layers=bool(scan)),
                                   rqtransformer=self.rqtransformer.clone(scan_layers=bool(scan)))

    def init(self, rng) -> dict:
        """Random params (for tests and shape checks)."""
        k = jax.random.split(rng, 4)
        d, c = self.depth, self.codebook.config
        codes = jnp.zeros((1, 1, d), jnp.int32)
        emb = jnp.zeros((1, 1, d, c.embed_dim), jnp.float32)
        return {
            "llm": self.llm.init(k[0], jnp.zeros((1, 1), jnp.int32))["params"],
            "mm_projector": self.mm_projector.init(k[1], emb[:, :, 0]).get("params", {}),  # identity: none
            "rqtransformer": self.rqtransformer.init(
                k[2], jnp.zeros((1, 1, self.llm.config.hidden_size), jnp.float32), emb)["params"],
            "codebook": self.codebook.init(k[3], codes)["params"],
        }


def stack_params(params: Mapping) -> dict:
    """VILA-U params (``{'llm', 'mm_projector', 'rqtransformer', 'codebook'}``, the files' unrolled layout) ->
    the ``scan_layers`` layout: ``llm/model/layers`` and ``rqtransformer/head_transformer/blocks`` stacked
    (the projector's ``layers_0``, ``layers_2`` are not a layer stack and stay as they are)."""
    from fairjax.io.tree import stack_layers

    return dict(params, llm=stack_layers(params["llm"], ("layers",)),
                rqtransformer=stack_layers(params["rqtransformer"], ("blocks",)))


def unstack_params(params: Mapping) -> dict:
    """Inverse of :func:`stack_params` (unrolled params pass through)."""
    from fairjax.io.tree import unstack_layers

    return dict(params, llm=unstack_layers(params["llm"], ("layers",)),
                rqtransformer=unstack_layers(params["rqtransformer"], ("blocks",)))


def build(llm_config: Mapping[str, Any], vision_tower_config: Mapping[str, Any],
          mm_projector_config: Mapping[str, Any] | None = None, *, dtype: Dtype = jnp.float32,
          param_dtype: Dtype = jnp.float32, attention_impl: str | None = None, remat: bool | str = False,
          scan_layers: bool = False) -> VilaU:
    """Modules from ``llm/config.json``, ``vision_tower/config.json`` and ``mm_projector/config.json`` dicts;
    ``scan_layers`` scans the LLaMA layers and the depth transformer's blocks."""
    for k in ("rqtransformer", "rqvaesiglip"):
        if not isinstance(vision_tower_config.get(k), Mapping):
            raise CheckpointError(f"vision_tower config: no '{k}' dict; expected vila-u's "
                                  f"vision_tower/config.json (RQVAESIGLIPTransformerConfig)")
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    lm = llama.from_config(llm_config, attention_impl=attention_impl, remat=remat, scan_layers=scan_layers, **kw)
    rq = RQTransformerConfig.from_dict(vision_tower_config["rqtransformer"])
    cb = CodebookConfig.from_dict(vision_tower_config["rqvaesiglip"])
    pj = ProjectorConfig.from_dict(mm_projector_config or {}, mm_hidden_size=cb.embed_dim,
                                   hidden_size=lm.config.hidden_size)
    if rq.input_embed_dim_1 != cb.embed_dim or rq.input_embed_dim_2 != lm.config.hidden_size:
        raise CheckpointError(f"rqtransformer config: input_embed_dim_1/2 = {rq.input_embed_dim_1}/"
                              f"{rq.input_embed_dim_2} do not match the codebook dim {cb.embed_dim} / LLM hidden "
                              f"size {lm.config.hidden_size}")
    if rq.depth != cb.depth or rq.vocab_size != cb.n_embed:
        raise CheckpointError(f"rqtransformer config: block_size depth {rq.depth} / vocab_size {rq.vocab_size} do "
                              f"not match the codebook's code_shape depth {cb.depth} / n_embed {cb.n_embed}")
    return VilaU(llm=lm, mm_projector=MultimodalProjector(pj, **kw),
                 rqtransformer=RQTransformer(rq, attention_impl=attention_impl, remat=remat, scan_layers=scan_layers,
                                             **kw),
                 codebook=RQCodebook(cb, **kw))


def code_embeds(vu: VilaU, params, codes: jax.Array) -> jax.Array:
    """Per-depth code embeddings: codes (..., D) int -> (..., D, C)."""
    return vu.codebook.apply({"params": params["codebook"]}, codes)


def image_features(vu: VilaU, params, codes: jax.Array) -> jax.Array:
    """``sum_d emb(c_d)``: codes (..., D) -> (..., C); reshaped to (N, h, w, C) this is the decoder's latent."""
    return code_embeds(vu, params, codes).sum(axis=-2)


def image_embeds(vu: VilaU, params, codes: jax.Array) -> jax.Array:
    """LLM input embeddings of image positions: ``mm_projector(sum_d emb(c_d))``, (..., D) -> (..., H)."""
    return vu.mm_projector.apply({"params": params["mm_projector"]}, image_features(vu, params, codes))


def depth_logits(vu: VilaU, params, hidden: jax.Array, codes: jax.Array) -> jax.Array:
    """Teacher-forced depth-transformer logits (float32): hidden (B,S,H) of the positions *before*
    the image positions whose codes (B,S,D) are given -> (B,S,D,V) (vila-u ``RQTransformer.forward``)."""
    return vu.rqtransformer.apply({"params": params["rqtransformer"]}, hidden, code_embeds(vu, params, codes))


def filtered_probs(logits: jax.Array, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None) -> jax.Array:
    """vila-u ``sample_from_logits`` up to the draw: the probabilities it samples from (float32).

    ``l = logits / T``; top-k keeps ``l >= k-th largest`` (ties kept; k above the vocabulary
    keeps all); ``p = softmax(l)``;
    top-p sorts ``p`` descending and drops every entry whose preceding cumulative
    sum already reached ``top_p`` (the first is always kept); renormalise.
    """
    lg = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(lg, min(top_k, lg.shape[-1]))[0][..., -1:]
        lg = jnp.where(lg < kth, -jnp.inf, lg)
    lg = jnp.where(jnp.isnan(lg), -jnp.inf, lg)
    p = jax.nn.softmax(lg, axis=-1)
    if top_p is not None:
        order = jnp.argsort(-p, axis=-1, stable=True)
        sp = jnp.take_along_axis(p, order, axis=-1)
        cum = jnp.cumsum(sp, axis=-1)
        drop_sorted = jnp.concatenate([jnp.zeros_like(cum[..., :1], bool), (cum >= top_p)[..., :-1]], axis=-1)
        inv = jnp.argsort(order, axis=-1)
        drop = jnp.take_along_axis(drop_sorted, inv, axis=-1)
        p = jnp.where(drop, 0.0, p)
        p = p / p.sum(axis=-1, keepdims=True)
    return p


def sample_from_logits(rng, logits: jax.Array, temperature: float = 1.0, top_k: int | None = None,
                       top_p: float | None = None) -> jax.Array:
    """Draw one index per row from :func:`filtered_probs` (int32)."""
    p = filtered_probs(logits, temperature, top_k, top_p)
    return jax.random.categorical(rng, jnp.log(p), axis=-1).astype(jnp.int32)


def guided_logits(logits: jax.Array, cfg: float) -> jax.Array:
    """Classifier-free guidance over a [conditional; unconditional] batch: ``u + cfg (c - u)``."""
    n = logits.shape[0] // 2
    c, u = logits[:n], logits[n:]
    return u + cfg * (c - u)


def sample_depth_codes(vu: VilaU, params, hidden: jax.Array, rng, *, cfg: float = 3.0, temperature: float = 1.0,
                       top_k: int | None = 900, top_p: float | None = 0.96) -> jax.Array:
    """Codes of the next image position, depth by depth (vila-u ``RQTransformer.generate``).

    ``hidden`` (2N, H) is the LLM's final-norm hidden state of the previous
    position for N conditional then N unconditional rows; returns (N, D) int32.
    """
    n2 = hidden.shape[0]
    d_total = vu.depth
    codes = jnp.zeros((n2 // 2, d_total), jnp.int32)
    keys = jax.random.split(rng, d_total)
    for d in range(d_total):
        both = jnp.concatenate([codes, codes], axis=0)[:, None, :]  # (2N, 1, D); depths >= d are ignored
        logits = depth_logits(vu, params, hidden[:, None, :], both)[:, 0, d]
        new = sample_from_logits(keys[d], guided_logits(logits, cfg), temperature, top_k, top_p)
        codes = codes.at[:, d].set(new)
    return codes


def generate_image_codes(vu: VilaU, params, input_ids: jax.Array, attention_mask: jax.Array, rng, *,
                         num_tokens: int | None = None, cfg: float = 3.0, temperature: float = 1.0,
                         top_k: int | None = 900, top_p: float | None = 0.96, cache_dtype: Dtype | None = None):
    """Autoregressive image generation (vila-u ``generate_image_content`` up to the codes).

    ``input_ids``/``attention_mask`` (2N, S): N conditional prompts then N
    unconditional ones (left padded, see :func:`cfg_batch`), each ending with
    ``<im_start>``. Per image position: sample codes from the last hidden state
    (:func:`sample_depth_codes`), feed ``mm_projector(sum_d emb)`` to both halves,
    decode one step. Returns codes (N, num_tokens, D); jit with the keyword
    arguments static.
    """
    num_tokens = num_tokens or vu.image_tokens
    s = input_ids.shape[1]
    _, h, cache = llama.prefill(vu.llm, params["llm"], input_ids, attention_mask, max_len=s + num_tokens - 1,
                                cache_dtype=cache_dtype, logits=False)
    keys = jax.random.split(rng, num_tokens)
    kw = dict(cfg=cfg, temperature=temperature, top_k=top_k, top_p=top_p)

    def step(carry, key):
        cache, h = carry
        codes = sample_depth_codes(vu, params, h, key, **kw)
        emb = image_embeds(vu, params, jnp.concatenate([codes, codes], axis=0))
        _, h, cache = llama.decode_step(vu.llm, params["llm"], cache, inputs_embeds=emb, logits=False)
        return (cache, h), codes

    (_, h), codes = jax.lax.scan(step, (cache, h), keys[:-1])
    last = sample_depth_codes(vu, params, h, keys[-1], **kw)
    return jnp.concatenate([jnp.swapaxes(codes, 0, 1), last[:, None]], axis=1)


def cfg_batch(cond_ids: Sequence[int], uncond_ids: Sequence[int], n: int, pad_id: int = 0):
    """Left-padded (2N, S) ids and mask: N copies of the prompt, then N of the unconditional prompt."""
    rows = [list(cond_ids)] * n + [list(uncond_ids)] * n
    s = max(len(r) for r in rows)
    ids = np.full((2 * n, s), pad_id, np.int32)
    mask = np.zeros((2 * n, s), bool)
    for i, r in enumerate(rows):
        ids[i, s - len(r):] = r
        mask[i, s - len(r):] = True
    return ids, mask


def image_grid_features(vu: VilaU, params, codes: jax.Array) -> jax.Array:
    """codes (N, h*w, D) -> decoder latent (N, h, w, C) = ``sum_d emb(c_d)`` on the ``block_size`` grid."""
    h, w, _ = vu.rqtransformer.config.block_size
    if codes.shape[1] != h * w:
        raise ValueError(f"codes have {codes.shape[1]} positions; the image grid is {h}x{w} = {h * w}")
    return image_features(vu, params, codes).reshape(codes.shape[0], h, w, -1)
