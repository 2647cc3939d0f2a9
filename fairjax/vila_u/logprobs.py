"""Teacher-forced log-probabilities of VILA-U's outputs, the per-sample terms the losses train on.

Pure and jittable; ``params = {'llm', 'mm_projector', 'rqtransformer', 'codebook'}`` as
:func:`fairjax.convert.vila_u.load` returns them; ``lora`` is a flat :mod:`fairjax.lora` tree over the
LLM's kernels, applied unmerged (:func:`fairjax.lora.lora_interceptor`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fairjax.errors import UserError
from fairjax.lora import lora_interceptor, lora_variables
from fairjax.models import llama, vila_u


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """``log softmax(logits)[target]`` in float32: ``logits[target] - logsumexp(logits)``."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def _llm_hidden(vu: vila_u.VilaU, llm_params, x, mask, lora, lora_alpha, dropout, row_keys):
    """Final-norm hidden states of the LLM on input embeddings ``x`` (LoRA applied when given, unmerged,
    as a ``'lora'`` variable collection: the same in the unrolled and the scanned layout)."""
    def run(variables):
        return vu.llm.apply(variables, inputs_embeds=x, attention_mask=mask, logits=False).hidden_states

    if not lora:
        return run({"params": llm_params})
    with nn.intercept_methods(lora_interceptor(dropout, row_keys)):
        return run({"params": llm_params, "lora": lora_variables(lora, llm_params, lora_alpha)})


def _embed(vu, params, ids):
    return vu.llm.apply({"params": params["llm"]}, ids, method=llama.LlamaForCausalLM.embed)


def code_logprobs(vu: vila_u.VilaU, params, hidden, codes, chunk: int = 0) -> jax.Array:
    """``log softmax(depth_logits(hidden, codes))[codes]``: (B, N, H), (B, N, D) -> (B, N, D) float32.

    ``chunk`` > 0 (dividing N): positions go through the depth transformer ``chunk`` at a time in a
    ``lax.map`` whose body is rematerialised, so only one chunk's (B, chunk, D, V) logits and
    block activations are ever live (forward and backward); the values are the same."""
    def one(h, c):
        return token_logprobs(vila_u.depth_logits(vu, params, h, c), c)

    b, n = codes.shape[:2]
    if not chunk or chunk >= n:
        return one(hidden, codes)
    if n % chunk:
        raise UserError(f"model.head_chunk={chunk} does not divide the {n} image positions")
    k = n // chunk
    split = lambda x: jnp.swapaxes(x.reshape((b, k, chunk) + x.shape[2:]), 0, 1)  # noqa: E731
    out = jax.lax.map(lambda xs: jax.checkpoint(one)(*xs), (split(hidden), split(codes)))
    return jnp.swapaxes(out, 0, 1).reshape(codes.shape)


def image_code_logprobs(vu: vila_u.VilaU, params, prompt_ids, prompt_mask, codes, *, lora=None, lora_alpha=1.0,
                        dropout=0.0, row_keys=None, reduce: str = "mean", head_chunk: int = 0) -> jax.Array:
    """Per-sample log-probability of ``codes (B, N, D)`` after ``prompt_ids (B, P)`` (left-padded,
    ``prompt_mask`` marks real tokens, the last real token is ``<im_start>``); see module docstring.
    ``reduce``: ``'mean'`` over the N x D codes or ``'sum'``; ``head_chunk``: see
    :func:`code_logprobs`. Returns (B,) float32."""
    b, p = prompt_ids.shape
    te = _embed(vu, params, prompt_ids)
    ie = vila_u.image_embeds(vu, params, codes[:, :-1]).astype(te.dtype)
    x = jnp.concatenate([te, ie], axis=1)
    mask = jnp.concatenate([prompt_mask.astype(bool), jnp.ones(codes.shape[:1] + (codes.shape[1] - 1,), bool)], 1)
    h = _llm_hidden(vu, params["llm"], x, mask, lora, lora_alpha, dropout, row_keys)[:, p - 1:]
    lp = code_logprobs(vu, params, h, codes, head_chunk)
    if reduce == "mean":
        return jnp.mean(lp, axis=(1, 2))
    if reduce == "sum":
        return jnp.sum(lp, axis=(1, 2))
    raise UserError(f"reduce={reduce!r} is not 'mean' or 'sum'")


def response_logprobs(vu: vila_u.VilaU, params, pre_ids, pre_mask, codes, rest_ids, rest_mask, rest_target, *,
                      lora=None, lora_alpha=1.0, dropout=0.0, row_keys=None) -> jax.Array:
    """``sum_j [rest_target_j] log p(rest_ids_j | pre, image, rest_<j)`` per row (B,) float32.

    ``pre_ids (B, P)`` left-padded (ends with ``<im_start>``), ``codes (B, N, D)`` the image,
    ``rest_ids (B, R)`` right-padded (``<im_end>``, the question, ``ASSISTANT:``, the answer,
    EOS), ``rest_target`` marks the answer tokens to score."""
    p, n, r = pre_ids.shape[1], codes.shape[1], rest_ids.shape[1]
    x = jnp.concatenate([_embed(vu, params, pre_ids), vila_u.image_embeds(vu, params, codes),
                         _embed(vu, params, rest_ids)], axis=1)
    mask = jnp.concatenate([pre_mask.astype(bool), jnp.ones(codes.shape[:2], bool), rest_mask.astype(bool)], 1)
    h = _llm_hidden(vu, params["llm"], x, mask, lora, lora_alpha, dropout, row_keys)[:, p + n - 1:p + n - 1 + r]
    logits = vu.llm.apply({"params": params["llm"]}, h, method=llama.LlamaForCausalLM.lm_logits)
    return jnp.sum(jnp.where(rest_target, token_logprobs(logits, rest_ids), 0.0), axis=-1)


def encode_codes(tower, params, pixels: jax.Array) -> jax.Array:
    """Pixels (B, 3, S, S) in [-1, 1] -> codes (B, h*w, D) (raster order) with the vision tower's
    SigLIP encoder and residual quantizer (``params['vision_model']``, ``params['codebook']``)."""
    v = {"params": {"vision_model": params["vision_model"], "quantizer": params["codebook"]}}
    codes, _ = tower.apply(v, pixels, method="encode_image")
    return codes.reshape(codes.shape[0], -1, codes.shape[-1])
