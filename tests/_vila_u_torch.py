"""PyTorch references for the VILA-U vision side, written in the tests from the public vila-u source
(``vila_u/model/multimodal_encoder/rqvaesigliptransformer/rqvaesiglip/{modules,quantizations}.py``),
and a synthetic ``vision_tower`` state dict under vila-u's real key names.

The decoder below is vila-u's taming ``Decoder`` (``ResnetBlock``, ``AttnBlock``,
``Upsample``) with one change: vila-u's ``Upsample`` casts its output to bfloat16
(the released model runs in bf16); here it stays float32 so the parity is exact.
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from _torch_util import randomize_  # noqa: F401,E402  (ref.randomize_ in the VILA-U tests)


def normalize(c):
    return nn.GroupNorm(num_groups=32, num_channels=c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.in_channels, self.out_channels = cin, cout
        self.norm1 = normalize(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2 = normalize(cout)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1, 1, 0)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = normalize(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1, 1, 0) for _ in range(4))

    def forward(self, x):
        h_ = self.norm(x)
        q, k, v = self.q(h_), self.k(h_), self.v(h_)
        b, c, h, w = q.shape
        q = q.reshape(b, c, h * w).permute(0, 2, 1)
        k = k.reshape(b, c, h * w)
        w_ = torch.bmm(q, k) * (int(c) ** (-0.5))
        w_ = F.softmax(w_, dim=2)
        v = v.reshape(b, c, h * w)
        h_ = torch.bmm(v, w_.permute(0, 2, 1)).reshape(b, c, h, w)
        return x + self.proj_out(h_)


class Upsample(nn.Module):
    def __init__(self, c, with_conv):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class Decoder(nn.Module):
    def __init__(self, *, ch, out_ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels,
                 resamp_with_conv=True, **ignore):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in)
        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(AttnBlock(block_in))
            up = nn.Module()
            up.block, up.attn = block, attn
            if i_level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                curr_res *= 2
            self.up.insert(0, up)
        self.norm_out = normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, 1, 1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for i_level in reversed(range(self.num_resolutions)):
            for i_block in range(self.num_res_blocks + 1):
                h = self.up[i_level].block[i_block](h)
                if len(self.up[i_level].attn) > 0:
                    h = self.up[i_level].attn[i_block](h)
            if i_level != 0:
                h = self.up[i_level].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def np_residual_quantize(x, tables):
    """float64 reference of ``RQBottleneck.quantize`` (eval): at each depth the nearest (squared L2) of the
    table's first n_embed rows to the residual; returns codes (..., D) and the sum of the chosen rows."""
    r = np.asarray(x, np.float64).copy()
    agg = np.zeros_like(r)
    codes = []
    for t in tables:
        t = np.asarray(t, np.float64)
        d = ((r[..., None, :] - t[None, :-1]) ** 2).sum(-1)
        c = d.argmin(-1)
        r -= t[c]
        agg += t[c]
        codes.append(c)
    return np.stack(codes, -1), agg


def np_to_code_shape(x, rh, rw):
    """``RQBottleneck.to_code_shape`` in numpy."""
    b, h, w, d = x.shape
    return x.reshape(b, h // rh, rh, w // rw, rw, d).transpose(0, 1, 3, 2, 4, 5).reshape(b, h // rh, w // rw, -1)


def siglip_model(vision_cfg, text_cfg, seed):
    """A transformers ``SiglipModel`` (same state-dict names as vila-u's copy: ``vision_model.*``,
    ``text_model.*``, ``logit_scale``, ``logit_bias``), random weights."""
    import transformers

    cfg = transformers.SiglipConfig(text_config=text_cfg, vision_config=vision_cfg)
    cfg._attn_implementation = "eager"
    cfg.vision_config._attn_implementation = "eager"
    return randomize_(transformers.SiglipModel(cfg), seed)


def vision_tower_state(sig, decoder, codebook, *, embed_dim, z_channels, depth, shared=True, seed=0,
                       rqtransformer=()):
    """A vila-u ``vision_tower`` state dict (numpy), keys as ``RQVAESIGLIPTransformer.state_dict()`` names them.

    ``rqvaesiglip.siglip_model.*`` (whole SigLIP incl. text model), ``rqvaesiglip.logit_scale/bias``,
    ``rqvaesiglip.quantizer.codebooks.N.{weight, cluster_size_ema, embed_ema}`` (the shared table under
    every depth index), ``rqvaesiglip.post_quant_conv.*``, ``rqvaesiglip.decoder.*``, plus the
    ``(key, array)`` pairs in ``rqtransformer``.
    """
    rng = np.random.default_rng(seed)
    sd = {f"rqvaesiglip.siglip_model.{k}": v.detach().numpy() for k, v in sig.state_dict().items()}
    sd["rqvaesiglip.logit_scale"] = sd["rqvaesiglip.siglip_model.logit_scale"]
    sd["rqvaesiglip.logit_bias"] = sd["rqvaesiglip.siglip_model.logit_bias"]
    tables = [codebook] * depth if shared else codebook
    for i, t in enumerate(tables):
        sd[f"rqvaesiglip.quantizer.codebooks.{i}.weight"] = np.asarray(t, np.float32)
        sd[f"rqvaesiglip.quantizer.codebooks.{i}.cluster_size_ema"] = np.ones(t.shape[0] - 1, np.float32)
        sd[f"rqvaesiglip.quantizer.codebooks.{i}.embed_ema"] = np.asarray(t[:-1], np.float32)
    sd["rqvaesiglip.post_quant_conv.weight"] = (rng.normal(size=(z_channels, embed_dim, 1, 1))
                                                / np.sqrt(embed_dim)).astype(np.float32)
    sd["rqvaesiglip.post_quant_conv.bias"] = (0.1 * rng.normal(size=(z_channels,))).astype(np.float32)
    sd.update({f"rqvaesiglip.decoder.{k}": v.detach().numpy() for k, v in decoder.state_dict().items()})
    sd.update({k: np.asarray(v) for k, v in rqtransformer})
    return {k: np.ascontiguousarray(v) for k, v in sd.items()}


def rqtransformer_shapes(cfg):
    """``rqtransformer.*`` state-dict names and shapes of vila-u's ``RQTransformer`` for a config dict
    (``in_mlp_1/2``, ``pos_emb_d``, ``head_transformer.blocks.N.{ln1, ln2, attn.{query,key,value,proj},
    mlp.0, mlp.2}``, ``classifier_mlp.{layer_norm, linear}``)."""
    e, v, d = cfg["embed_dim"], cfg["vocab_size"], cfg["block_size"][2]
    s = {"in_mlp_1.weight": (e, cfg["input_embed_dim_1"]), "in_mlp_1.bias": (e,),
         "in_mlp_2.weight": (e, cfg["input_embed_dim_2"]), "in_mlp_2.bias": (e,), "pos_emb_d": (1, d, e)}
    for i in range(cfg["head"]["n_layer"]):
        p = f"head_transformer.blocks.{i}."
        for n in ("ln1", "ln2"):
            s.update({f"{p}{n}.weight": (e,), f"{p}{n}.bias": (e,)})
        for n in ("query", "key", "value", "proj"):
            s.update({f"{p}attn.{n}.weight": (e, e), f"{p}attn.{n}.bias": (e,)})
        s.update({f"{p}mlp.0.weight": (4 * e, e), f"{p}mlp.0.bias": (4 * e,), f"{p}mlp.2.weight": (e, 4 * e),
                  f"{p}mlp.2.bias": (e,)})
    s.update({"classifier_mlp.layer_norm.weight": (e,), "classifier_mlp.layer_norm.bias": (e,),
              "classifier_mlp.linear.weight": (v, e), "classifier_mlp.linear.bias": (v,)})
    return {f"rqtransformer.{k}": v for k, v in s.items()}


# ----------------------------------------------------------------------------- vila-u's LLaMA tokenizer

SPIECE_UNDERLINE = "\u2581"
VILA_U_SPECIALS = ("<im_start>", "<im_end>", "<vi_start>", "<vi_end>")  # added by vila-u's model builder
TOKENIZER_CORPUS = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions.",
    "USER: a photo of a doctor ASSISTANT: a nurse, a teacher, a person smiling",
    "portrait of a firefighter in the city at night", "the quick brown fox jumps over the lazy dog",
    "what is this person's job? the person is a doctor 2024 12345",
)


def write_sentencepiece_tokenizer(folder, vocab_size=400, corpus=TOKENIZER_CORPUS):
    """vila-u's ``llm/`` tokenizer files on a tiny model: a sentencepiece ``tokenizer.model`` trained here with
    LLaMA's trainer settings (BPE, byte fallback, split digits, dummy prefix, whitespace kept, identity
    normalisation, <unk> <s> </s> = 0 1 2), and ``tokenizer_config.json`` / ``special_tokens_map.json`` as
    transformers' ``save_pretrained`` writes them after vila-u's ``add_tokens(<im_start> ..., special_tokens=True)``
    (the 4 tokens right after the sentencepiece pieces). Returns the size with the added tokens."""
    import io
    import json
    import os

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(corpus) * 20), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        allow_whitespace_only_pieces=True, character_coverage=1.0, num_threads=1, minloglevel=2)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
        f.write(buf.getvalue())

    def added(content):
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                "special": True}

    decoder = {"0": added("<unk>"), "1": added("<s>"), "2": added("</s>")}
    decoder.update({str(vocab_size + i): added(t) for i, t in enumerate(VILA_U_SPECIALS)})
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": decoder, "bos_token": "<s>",
                   "clean_up_tokenization_spaces": False, "eos_token": "</s>", "legacy": False,
                   "model_max_length": 4096, "pad_token": "<unk>", "padding_side": "right", "sp_model_kwargs": {},
                   "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>", "use_default_system_prompt": False}, f)
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": added("<s>"), "eos_token": added("</s>"), "pad_token": added("<unk>"),
                   "unk_token": added("<unk>")}, f)
    return vocab_size + len(VILA_U_SPECIALS)


def vila_u_slow_tokenizer(llm_dir):
    """vila-u's tokenizer as it loads it, ``AutoTokenizer.from_pretrained(llm, use_fast=False, legacy=False)``:
    transformers 4.36's sentencepiece ``LlamaTokenizer`` (vila-u pins that version and ships its
    ``tokenization_llama.py`` in ``vila_u/train/transformers_replace``). transformers 5 has no slow LLaMA class;
    its ``SentencePieceBackend`` is the same sentencepiece machinery (``add_dummy_prefix`` switched off for
    ``legacy=False``, the ``<unk>``-prefix ``_tokenize``, split at added tokens), and the ``tokenize`` override
    below is vila-u's file's ``LlamaTokenizer.tokenize``. (Checked once against transformers 4.46.3's slow
    ``LlamaTokenizer`` on this module's tiny model: the same ids for 600 random strings of words, spaces, tabs,
    newlines, ``▁``, emoji and added tokens.)"""
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    class VilaULlamaTokenizer(SentencePieceBackend):
        def __init__(self, add_prefix_space=True, **kwargs):
            self.add_prefix_space = add_prefix_space
            super().__init__(**kwargs)

        def tokenize(self, text, **kwargs):
            if self.legacy or len(text) == 0:
                return super().tokenize(text, **kwargs)
            text = text.replace(SPIECE_UNDERLINE, " ")
            if self.add_prefix_space:
                text = SPIECE_UNDERLINE + text
            tokens = super().tokenize(text, **kwargs)
            if len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE and tokens[1] in self.all_special_tokens:
                tokens = tokens[1:]
            return tokens

    return VilaULlamaTokenizer.from_pretrained(llm_dir, legacy=False)


def tokenizer_image_token(tok, text):
    """vila-u ``mm_utils.tokenizer_image_token`` for text without ``<image>``: ``[bos] + tok(text).input_ids[1:]``
    (the slow tokenizer adds BOS itself; here it is added explicitly, as the first id either way)."""
    return [tok.bos_token_id] + tok(text, add_special_tokens=False).input_ids
