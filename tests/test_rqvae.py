"""VILA-U tokenizer: taming decoder vs diffusers' ``Decoder`` and vs vila-u's decoder (torch, from its
source); residual quantizer vs a numpy reference; encode -> codes -> decode end to end vs transformers
SigLIP + the torch decoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch
import diffusers
import transformers

import _vila_u_torch as ref  # noqa: E402
from _torch_util import DictReader, randomize_  # noqa: E402
from diffusers.models.autoencoders.vae import Decoder as DiffusersDecoder  # noqa: E402
from fairjax.convert.core import convert_checkpoint  # noqa: E402
from fairjax.io.tree import shapes_of  # noqa: E402
from fairjax.errors import CheckpointError  # noqa: E402
from fairjax.convert.vila_u import rename_vision_tower_key  # noqa: E402
from fairjax.models import rqvae  # noqa: E402
from fairjax.models.vila_u import CodebookConfig  # noqa: E402

# one diffusers-compatible shape (no attention in the up blocks) and one with attention at two levels
DEC_A = dict(ch=32, out_ch=3, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], resolution=16, z_channels=8)
DEC_B = dict(ch=32, out_ch=3, ch_mult=[1, 1, 2], num_res_blocks=1, attn_resolutions=[4, 16], resolution=16,
             z_channels=4)


def decoder_params(dec_cfg, taming_sd):
    """vila-u ``decoder.*`` state dict -> Flax Decoder params, through the converter's key rename."""
    model = rqvae.Decoder(rqvae.DecoderConfig.from_dict(dec_cfg))
    r = dec_cfg["resolution"] // 2 ** (len(dec_cfg["ch_mult"]) - 1)
    z = jax.ShapeDtypeStruct((1, r, r, dec_cfg["z_channels"]), jnp.float32)
    shapes = shapes_of(jax.eval_shape(lambda a: model.init(jax.random.key(0), a), z)["params"])
    pre = "rqvaesiglip.decoder."
    sd = {rename_vision_tower_key(pre + k, True)[len(pre):]: v for k, v in taming_sd.items()}
    return model, convert_checkpoint(DictReader(sd), shapes)


def run_decoder(model, params, z_nchw):
    f = jax.jit(lambda p, z: model.apply({"params": p}, jnp.transpose(z, (0, 2, 3, 1))))
    return np.asarray(f(params, z_nchw)).transpose(0, 3, 1, 2)


def assert_decoder_matches(torch_decoder, dec_cfg, taming_sd, z_nchw, rel):
    """The Flax decoder on ``taming_sd`` (converted) reproduces ``torch_decoder`` on ``z`` (2 x 3 x 16 x 16 out)."""
    model, params = decoder_params(dec_cfg, taming_sd)
    with torch.no_grad():
        want = torch_decoder(torch.from_numpy(z_nchw)).numpy()
    got = run_decoder(model, params, z_nchw)
    assert got.shape == want.shape == (2, 3, 16, 16)
    assert rel(got, want) < 1e-5


def diffusers_to_taming(key, n_levels):
    """diffusers ``Decoder`` state-dict name -> the taming name of the same weight."""
    k = key.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
    k = k.replace("mid_block.attentions.0.", "mid.attn_1.").replace("group_norm.", "norm.")
    for a, b in (("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")):
        k = k.replace(a, b)
    k = k.replace("conv_norm_out.", "norm_out.").replace("conv_shortcut.", "nin_shortcut.")
    if k.startswith("up_blocks."):
        _, i, rest = k.split(".", 2)
        rest = rest.replace("resnets.", "block.").replace("upsamplers.0.", "upsample.")
        k = f"up.{n_levels - 1 - int(i)}.{rest}"
    return k


def test_decoder_matches_diffusers_decoder(rel):
    """Where the structures agree (no up-block attention) the taming decoder is diffusers' VAE Decoder."""
    c = DEC_A
    chans = tuple(c["ch"] * m for m in c["ch_mult"])
    td = randomize_(DiffusersDecoder(
        in_channels=c["z_channels"], out_channels=c["out_ch"], up_block_types=("UpDecoderBlock2D",) * len(chans),
        block_out_channels=chans, layers_per_block=c["num_res_blocks"], norm_num_groups=32), seed=0)
    sd = {}
    for k, v in td.state_dict().items():
        v = v.numpy()
        if ".attentions.0.to_" in k and k.endswith("weight"):
            v = v[:, :, None, None]  # Linear over channels == 1x1 conv
        sd[diffusers_to_taming(k, len(chans))] = v
    z = np.random.default_rng(1).normal(size=(2, c["z_channels"], 8, 8)).astype(np.float32)
    assert_decoder_matches(td, c, sd, z, rel)


@pytest.mark.parametrize("resamp", [True, False])
def test_decoder_matches_vila_u_decoder_with_up_block_attention(rel, resamp):
    c = dict(DEC_B, resamp_with_conv=resamp)
    td = randomize_(ref.Decoder(**c), seed=2)
    assert any(".attn." in k for k in td.state_dict()) and any("nin_shortcut" in k for k in td.state_dict())
    z = np.random.default_rng(3).normal(size=(2, c["z_channels"], 4, 4)).astype(np.float32)
    assert_decoder_matches(td, c, td.state_dict(), z, rel)


def test_residual_quantize_matches_numpy_reference(rel):
    rng = np.random.default_rng(4)
    n, c, depth = 40, 16, 4
    x = rng.normal(size=(2, 3, 5, c)).astype(np.float32)
    shared = rng.normal(size=(n + 1, c)).astype(np.float32)
    shared[-1] = x[0, 0, 0]  # the padding row is the exact input: it must never be chosen
    per_depth = [(rng.normal(size=(n + 1, c)) / (d + 1)).astype(np.float32) for d in range(depth)]
    for tables in ([shared] * depth, per_depth):
        codes, z = jax.jit(rqvae.residual_quantize)(x, tables)
        want_codes, want_z = ref.np_residual_quantize(x, tables)
        assert codes.shape == (2, 3, 5, depth) and codes.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(codes), want_codes)
        assert int(codes.max()) < n
        assert rel(z, want_z) < 1e-6
    # an exact codebook entry quantizes to itself at depth 1
    codes, z = rqvae.residual_quantize(shared[[7, 3]], [shared])
    assert np.asarray(codes)[:, 0].tolist() == [7, 3] and rel(z, shared[[7, 3]]) < 1e-6


def test_codebook_tables_follow_the_generation_head_layout():
    cb = {"codebooks_0": {"embedding": np.zeros((5, 2))}}
    cfg = CodebookConfig(n_embed=4, embed_dim=2, depth=3, shared_codebook=True)
    assert len(rqvae.codebook_tables(cb, cfg)) == 3
    cfg2 = CodebookConfig(n_embed=4, embed_dim=2, depth=2, shared_codebook=False)
    cb2 = {"codebooks_0": {"embedding": np.zeros((5, 2))}, "codebooks_1": {"embedding": np.ones((5, 2))}}
    assert [float(t[0, 0]) for t in rqvae.codebook_tables(cb2, cfg2)] == [0.0, 1.0]


def test_code_and_latent_shapes_match_rq_bottleneck():
    x = np.arange(2 * 4 * 6 * 3, dtype=np.float32).reshape(2, 4, 6, 3)
    got = rqvae.to_code_shape(x, (2, 3))
    np.testing.assert_array_equal(np.asarray(got), ref.np_to_code_shape(x, 2, 3))
    assert got.shape == (2, 2, 2, 18)
    np.testing.assert_array_equal(np.asarray(rqvae.to_latent_shape(got, (2, 3))), x)


@pytest.mark.parametrize("size", [(6, 6), (3, 5)])
def test_resize_bilinear_matches_torch(rel, size):
    x = np.random.default_rng(5).normal(size=(2, 3, 4, 4)).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(x), size=size, mode="bilinear").numpy()
    got = np.asarray(rqvae.resize_bilinear(jnp.transpose(x, (0, 2, 3, 1)), size)).transpose(0, 3, 1, 2)
    assert rel(got, want) < 1e-6


# ----------------------------------------------------------------------------- whole tokenizer

SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=32,
              patch_size=8)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=64,
            max_position_embeddings=8, bos_token_id=1, eos_token_id=2, pad_token_id=0)
RQ = dict(embed_dim=32, n_embed=24, latent_shape=[4, 4, 32], code_shape=[4, 4, 4], shared_codebook=True,
          restart_unused_codes=True, ddconfig=dict(DEC_B, double_z=False, in_channels=3, dropout=0.0),
          pretrained_model="google/siglip-large-patch16-256")


@pytest.fixture(scope="module")
def tokenizer():
    """torch pieces (transformers SigLIP, taming decoder), their vila-u state dict, and the Flax tokenizer."""
    sig = ref.siglip_model(SIGLIP, TEXT, seed=6)
    dec = randomize_(ref.Decoder(**RQ["ddconfig"]), seed=7)
    codebook = np.random.default_rng(8).normal(size=(RQ["n_embed"] + 1, 32)).astype(np.float32)
    sd = ref.vision_tower_state(sig, dec, codebook, embed_dim=32, z_channels=DEC_B["z_channels"], depth=4)
    model = rqvae.from_config(RQ, SIGLIP)
    sd = {k: v for k, v in sd.items() if not k.startswith("rqtransformer.")}
    from fairjax.convert.vila_u import vision_tower_rules

    ignore, rename = vision_tower_rules(sd.keys(), model)
    shapes = {("rqvaesiglip",) + p: s for p, s in rqvae.param_shapes(model).items()}
    params = convert_checkpoint(DictReader(sd), shapes, ignore=ignore, rename=rename)["rqvaesiglip"]
    return sig, dec, sd, model, params


def test_encode_image_codes_match_transformers_features_and_numpy_quantizer(tokenizer, rel):
    sig, _, sd, model, params = tokenizer
    x = np.random.default_rng(9).uniform(-1, 1, size=(2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        feats = sig.vision_model(pixel_values=torch.from_numpy(x), output_hidden_states=True).hidden_states[3]
    feats = feats.numpy().reshape(2, 4, 4, 32)
    want_codes, want_z = ref.np_residual_quantize(feats, [sd["rqvaesiglip.quantizer.codebooks.0.weight"]] * 4)
    f = jax.jit(lambda p, x: (model.apply({"params": p}, x, method=model.encode_features),
                              model.apply({"params": p}, x, method=model.encode_image)))
    got_feats, (codes, z_q) = f(params, x)
    assert rel(got_feats, feats) < 1e-5
    assert codes.shape == (2, 4, 4, 4) and z_q.shape == (2, 4, 4, 32)
    np.testing.assert_array_equal(np.asarray(codes), want_codes)
    assert rel(z_q, want_z) < 1e-5


def test_decode_codes_matches_post_quant_conv_and_vila_u_decoder(tokenizer, rel):
    _, dec, sd, model, params = tokenizer
    codes = np.random.default_rng(10).integers(0, RQ["n_embed"], size=(2, 4, 4, 4)).astype(np.int32)
    table = sd["rqvaesiglip.quantizer.codebooks.0.weight"]
    z = table[codes].sum(-2)  # (B, h, w, C): vila-u's cumsum(embed_code_with_depth)[..., -1, :]
    with torch.no_grad():
        zt = torch.nn.functional.conv2d(torch.from_numpy(z).permute(0, 3, 1, 2),
                                        torch.from_numpy(sd["rqvaesiglip.post_quant_conv.weight"]),
                                        torch.from_numpy(sd["rqvaesiglip.post_quant_conv.bias"]))
        want = dec(zt)
        want_px = want.add(1).mul(127.5).clamp(0, 255).numpy()
    f = jax.jit(lambda p, c, z: (model.apply({"params": p}, c, method=model.decode_codes),
                                 model.apply({"params": p}, z, method=model.decode)))
    img, img_z = f(params, codes, z)
    assert img.shape == (2, 3, 16, 16)
    assert rel(img, want.numpy()) < 1e-5
    assert rel(img_z, want.numpy()) < 1e-5
    px = rqvae.to_pixels(img)
    assert rel(px, want_px) < 1e-5 and float(px.min()) >= 0 and float(px.max()) <= 255
    u8 = rqvae.to_uint8_hwc(px)
    assert u8.shape == (2, 16, 16, 3) and u8.dtype == np.uint8
    want_u8 = want_px.transpose(0, 2, 3, 1).astype(np.uint8)  # vila-u's save_image truncates
    # A pixel within float32 noise of an integer may truncate to either side of it (CI once saw 107 for
    # torch's 108.0000x); every other pixel must truncate to exactly torch's value.
    v = want_px.transpose(0, 2, 3, 1)
    near = ((v % 1.0 < 1e-2) | (v % 1.0 > 1 - 1e-2)) & (v > 0) & (v < 255)  # 0 and 255: both clamp
    assert near.sum() < 0.1 * near.size
    np.testing.assert_array_equal(u8[~near], want_u8[~near])
    assert np.abs(u8.astype(int) - want_u8.astype(int)).max() <= 1


def test_reconstruction_shapes_and_decoder_latent_shape(tokenizer):
    _, _, _, model, params = tokenizer
    x = jnp.zeros((1, 3, 32, 32))
    assert jax.eval_shape(lambda p: model.apply({"params": p}, x), params).shape == (1, 3, 16, 16)
    resized = rqvae.from_config(dict(RQ, decoder_latent_shape=[2, 2]), SIGLIP)
    out = jax.eval_shape(lambda p: resized.apply({"params": p}, x), params)
    assert out.shape == (1, 3, 8, 8)  # the latent is resized to 2x2 before the 4x decoder


def test_config_errors():
    with pytest.raises(CheckpointError, match="latent_shape .* does not match the SigLIP encoder"):
        rqvae.from_config(dict(RQ, latent_shape=[8, 8, 32], code_shape=[8, 8, 4]), SIGLIP)
    with pytest.raises(CheckpointError, match="not divisible by the decoder's 32 norm groups"):
        rqvae.from_config(dict(RQ, ddconfig=dict(RQ["ddconfig"], ch=16)), SIGLIP)
    with pytest.raises(CheckpointError, match="ddconfig: missing z_channels"):
        rqvae.from_config(dict(RQ, ddconfig={k: v for k, v in RQ["ddconfig"].items() if k != "z_channels"}),
                          SIGLIP)
    with pytest.raises(CheckpointError, match="no 'ddconfig' dict"):
        rqvae.from_config({k: v for k, v in RQ.items() if k != "ddconfig"}, SIGLIP)


def test_param_tree_layout(tokenizer):
    _, _, _, model, params = tokenizer
    assert set(params) == {"vision_model", "quantizer", "post_quant_conv", "decoder"}
    assert params["quantizer"]["codebooks_0"]["embedding"].shape == (RQ["n_embed"] + 1, 32)
    assert set(params["vision_model"]["encoder"]) == {"layers_0", "layers_1", "layers_2"}  # L-1 of 4 layers
