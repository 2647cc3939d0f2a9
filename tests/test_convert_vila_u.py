"""vila-u folder converter: a synthetic ``vila-u-7b-256``-style folder (tiny random tensors under the real
key names) converts with no missing / unexpected keys and loads back; bad folders fail with one line
naming the problem; full-size key/shape maps checked on torch ``meta`` against ``jax.eval_shape``."""

import json
import os
import shutil

import numpy as np
import pytest

import torch
import transformers

import _vila_u_torch as ref  # noqa: E402
from fairjax.convert import vila_u as conv  # noqa: E402
from fairjax.convert.core import plan_conversion  # noqa: E402
from fairjax.errors import CheckpointError  # noqa: E402
from fairjax.io.safetensors import SafetensorsReader, write_safetensors  # noqa: E402
from fairjax.models import llama, vila_u  # noqa: E402

sys_path_tools = os.path.join(os.path.dirname(__file__), "..", "tools")

SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
              patch_size=8)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=64,
            max_position_embeddings=8, bos_token_id=1, eos_token_id=2, pad_token_id=0)
DEC = dict(ch=32, out_ch=3, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[4], resolution=8, z_channels=8,
           double_z=False, in_channels=3, dropout=0.0)
RQVAE = dict(embed_dim=32, n_embed=24, latent_shape=[4, 4, 32], code_shape=[4, 4, 4], shared_codebook=True,
             restart_unused_codes=True, decay=0.99, ddconfig=DEC, pretrained_model="google/siglip-tiny-test")
LLM = dict(vocab_size=40, hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
RQT = {"block_size": [4, 4, 4], "input_embed_dim_1": 32, "input_embed_dim_2": 48, "embed_dim": 32,
       "vocab_size": 24, "head": {"block": {"n_head": 4}, "n_layer": 1}}
VT_CFG = {"rqvaesiglip": RQVAE, "rqtransformer": RQT, "hidden_size": 32, "architectures": ["RQVAESIGLIPTransformer"],
          "model_type": "rqvaesigliptransformer_model"}


def write_folder(path, sd, config, shards=1):
    """``config.json`` + ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` + index)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    keys = sorted(sd)
    if shards == 1:
        write_safetensors(os.path.join(path, "model.safetensors"), [(k, sd[k]) for k in keys])
        return
    weight_map = {}
    for i, part in enumerate(np.array_split(np.array(keys), shards)):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(os.path.join(path, name), [(k, sd[k]) for k in part])
        weight_map.update({k: name for k in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A vila-u checkpoint folder: llm/ (transformers save_pretrained), vision_tower/, mm_projector/."""
    root = str(tmp_path_factory.mktemp("vila_u_src") / "vila-u-tiny")
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    llm = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLM)).eval()
    llm.save_pretrained(os.path.join(root, "llm"))
    sig = ref.siglip_model(SIGLIP, TEXT, seed=1)
    dec = ref.randomize_(ref.Decoder(**DEC), seed=2)
    codebook = rng.normal(size=(RQVAE["n_embed"] + 1, 32)).astype(np.float32)
    rqt = [(k, (0.1 * rng.normal(size=s)).astype(np.float32)) for k, s in ref.rqtransformer_shapes(RQT).items()]
    vt = ref.vision_tower_state(sig, dec, codebook, embed_dim=32, z_channels=DEC["z_channels"], depth=4,
                                rqtransformer=rqt)
    write_folder(os.path.join(root, "vision_tower"), vt, VT_CFG)
    pj = {"layers.0.weight": rng.normal(size=(48, 32)), "layers.0.bias": rng.normal(size=48),
          "layers.2.weight": rng.normal(size=(48, 48)), "layers.2.bias": rng.normal(size=48)}
    pj = {k: v.astype(np.float32) for k, v in pj.items()}
    write_folder(os.path.join(root, "mm_projector"), pj, {"mm_projector_type": "mlp2x_gelu",
                                                          "model_type": "v2l_projector"})
    return {"root": root, "vt": vt, "llm": {k: v.numpy() for k, v in llm.state_dict().items()}, "pj": pj}


def variant(src, tmp_path, *, vt=None, vt_cfg=None, shards=1, drop=None):
    """A copy of the source folder with a different vision tower (state dict / config / sharding) or a part
    removed."""
    root = str(tmp_path / "variant")
    shutil.copytree(src["root"], root)
    if vt is not None or vt_cfg is not None or shards != 1:
        shutil.rmtree(os.path.join(root, "vision_tower"))
        write_folder(os.path.join(root, "vision_tower"), src["vt"] if vt is None else vt, vt_cfg or VT_CFG, shards)
    if drop:
        shutil.rmtree(os.path.join(root, drop))
    return root


def test_converts_with_no_missing_or_unexpected_keys_and_loads_back(src, tmp_path, rel):
    out = str(tmp_path / "out")
    summary = conv.convert_vila_u(src["root"], out, dtype="float32", siglip_config=SIGLIP, log=lambda *_: None)
    index = json.load(open(os.path.join(out, "fairjax.json")))
    assert index["model_type"] == "vila_u" and set(index["components"]) == set(conv.COMPONENTS)
    vt = src["vt"]
    # every source tensor is used except the ones VILA-U does not run (counted from the key names)
    last = SIGLIP["num_hidden_layers"] - 1
    unused = ("text_model.", "logit_", "vision_model.post_layernorm.", "vision_model.head.",
              f"encoder.layers.{last}.", "_ema", "codebooks.1.", "codebooks.2.", "codebooks.3.")
    used = {k: v for k, v in vt.items() if not any(u in k for u in unused)}
    want = sum(v.size for k, v in used.items() if k.startswith("rqvaesiglip."))
    assert summary["vision_tower"] == want
    assert summary["depth_transformer"] == sum(v.size for k, v in used.items() if k.startswith("rqtransformer."))
    assert summary["llm"] == sum(v.size for v in src["llm"].values())
    assert summary["mm_projector"] == sum(v.size for v in src["pj"].values())

    vu, params, tower, vis = conv.load(out)
    assert params["codebook"] is vis["quantizer"]
    np.testing.assert_array_equal(vis["quantizer"]["codebooks_0"]["embedding"],
                                  vt["rqvaesiglip.quantizer.codebooks.0.weight"])
    np.testing.assert_array_equal(vis["decoder"]["up_0"]["block_0"]["conv_shortcut"]["kernel"],
                                  vt["rqvaesiglip.decoder.up.0.block.0.nin_shortcut.weight"].transpose(2, 3, 1, 0))
    fc1 = vt[f"rqvaesiglip.siglip_model.vision_model.encoder.layers.{last - 1}.mlp.fc1.weight"]
    np.testing.assert_array_equal(vis["vision_model"]["encoder"][f"layers_{last - 1}"]["mlp"]["fc1"]["kernel"], fc1.T)
    assert f"layers_{last}" not in vis["vision_model"]["encoder"]
    np.testing.assert_array_equal(params["rqtransformer"]["head_transformer"]["blocks_0"]["attn"]["query"]["kernel"],
                                  vt["rqtransformer.head_transformer.blocks.0.attn.query.weight"].T)
    np.testing.assert_array_equal(params["llm"]["model"]["embed_tokens"]["embedding"],
                                  src["llm"]["model.embed_tokens.weight"])
    np.testing.assert_array_equal(params["mm_projector"]["layers_2"]["kernel"], src["pj"]["layers.2.weight"].T)

    # the converted tokenizer decodes what the generation head's codebook embeds
    codes = np.random.default_rng(3).integers(0, RQVAE["n_embed"], size=(2, 16, 4)).astype(np.int32)
    lat = vila_u.image_grid_features(vu, params, codes)  # (2, 4, 4, 32)
    img_a = tower.apply({"params": vis}, lat, method=tower.decode)
    img_b = tower.apply({"params": vis}, codes.reshape(2, 4, 4, 4), method=tower.decode_codes)
    assert img_a.shape == (2, 3, 8, 8) and rel(img_a, img_b) < 1e-6
    emb = vila_u.image_embeds(vu, params, codes)
    assert emb.shape == (2, 16, 48)


def test_one_loader_reads_both_layouts(src, tmp_path):
    """conv.load on the vila-u folder (converted in memory) and on its converted dir: the same modules and
    the same arrays; vision_tower=False reads the generation path only; anything else is one line."""
    from fairjax.io.tree import flatten
    from fairjax.io.model_dir import write_index

    out = str(tmp_path / "out")
    conv.convert_vila_u(src["root"], out, siglip_config=SIGLIP, log=lambda *_: None)
    assert conv.layout(src["root"]) == conv.CHECKPOINT and conv.layout(out) == conv.MODEL_DIR
    vu_a, p_a, tower_a, vis_a = conv.load(src["root"], siglip_config=SIGLIP)
    vu_b, p_b, tower_b, vis_b = conv.load(out)
    assert vu_a == vu_b and tower_a == tower_b
    for a, b in ((p_a, p_b), (vis_a, vis_b)):
        fa, fb = flatten(a), flatten(b)
        assert fa.keys() == fb.keys()
        for k in fa:
            np.testing.assert_array_equal(fa[k], fb[k], err_msg=str(k))
    assert p_a["codebook"] is vis_a["quantizer"]
    np.testing.assert_array_equal(p_a["llm"]["model"]["embed_tokens"]["embedding"],
                                  src["llm"]["model.embed_tokens.weight"])

    # generation path only, in bfloat16, from both layouts
    import ml_dtypes

    for path in (src["root"], out):
        vu_c, p_c, tower_c, vis_c = conv.load(path, vision_tower=False, param_dtype="bfloat16")
        assert tower_c is None and vis_c is None and vu_c.llm.config == vu_a.llm.config
        fc, fa = flatten(p_c), flatten(p_a)
        assert fc.keys() == fa.keys()
        for k in fa:
            assert fc[k].dtype == ml_dtypes.bfloat16, k
            np.testing.assert_array_equal(fc[k], fa[k].astype(ml_dtypes.bfloat16), err_msg=str(k))

    with pytest.raises(CheckpointError, match="not a folder"):
        conv.load(str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match=r"no fairjax.json .* and missing mm_projector/;"):
        conv.load(variant(src, tmp_path, drop="mm_projector"))
    other = tmp_path / "sdxl"
    other.mkdir()
    write_index(str(other), ["unet"], model_type="sdxl")
    with pytest.raises(CheckpointError, match="model_type is 'sdxl', not 'vila_u'"):
        conv.load(str(other))
    with pytest.raises(CheckpointError, match="google/siglip-tiny-test"):  # the checkpoint's SigLIP is not built in
        conv.load(src["root"])


def test_as_stored_dtype_and_sharded_vision_tower(src, tmp_path):
    root = variant(src, tmp_path, shards=3)
    out = str(tmp_path / "out")
    conv.convert_vila_u(root, out, dtype="bfloat16", siglip_config=SIGLIP, log=lambda *_: None)
    with SafetensorsReader(os.path.join(out, "vision_tower", "params.safetensors")) as r:
        assert {str(r.dtype(k)) for k in r.keys()} == {"bfloat16"}
    cfg = json.load(open(os.path.join(out, "vision_tower", "config.json")))
    assert cfg[conv.SIGLIP_KEY] == SIGLIP and cfg["rqvaesiglip"] == RQVAE


def _error(root, tmp_path, **kw):
    out = str(tmp_path / "out_bad")
    with pytest.raises(CheckpointError) as e:
        conv.convert_vila_u(root, out, siglip_config=kw.pop("siglip_config", SIGLIP), log=lambda *_: None, **kw)
    assert not os.path.exists(out)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_shard_is_one_line_naming_it(src, tmp_path):
    root = variant(src, tmp_path, shards=2)
    os.remove(os.path.join(root, "vision_tower", "model-00002-of-00002.safetensors"))
    msg = _error(root, tmp_path)
    assert "vision_tower/" in msg and "model-00002-of-00002.safetensors" in msg


def test_unexpected_missing_and_mismatched_keys_listed_together(src, tmp_path):
    vt = dict(src["vt"])
    vt["rqvaesiglip.decoder.up.0.block.7.conv1.weight"] = np.zeros((32, 32, 3, 3), np.float32)
    del vt["rqvaesiglip.post_quant_conv.bias"]
    vt["rqtransformer.pos_emb_d"] = np.zeros((1, 5, 32), np.float32)
    msg = _error(variant(src, tmp_path, vt=vt), tmp_path)
    assert "rqvaesiglip.decoder.up.0.block.7.conv1.weight" in msg and "unexpected" in msg
    assert "rqvaesiglip/post_quant_conv/bias" in msg and "missing" in msg
    assert "rqtransformer.pos_emb_d (1, 5, 32)" in msg and "shape mismatch" in msg


def test_folder_and_config_errors(src, tmp_path):
    msg = _error(variant(src, tmp_path, drop="mm_projector"), tmp_path)
    assert "missing mm_projector/" in msg
    shutil.rmtree(tmp_path / "variant")
    msg = _error(src["root"], tmp_path, siglip_config=None)
    assert "'google/siglip-tiny-test'" in msg and "--siglip-config" in msg
    cfg = dict(VT_CFG, rqvaesiglip=dict(RQVAE, latent_shape=[8, 8, 32], code_shape=[8, 8, 4]))
    msg = _error(variant(src, tmp_path, vt_cfg=cfg), tmp_path)
    assert "latent_shape [8, 8, 32] does not match the SigLIP encoder" in msg
    assert conv.siglip_vision_config({"pretrained_model": "/ckpt/siglip-large-patch16-256/"})["hidden_size"] == 1024


def test_tokenizer_files(src, tmp_path):
    """llm/ tokenizer: none -> a note, weights still convert; tokenizer.json -> copied byte for byte;
    tokenizer.model only -> tokenizer.json written (ids: test_vila_u_generate); a tokenizer that does not
    fit the LLM or cannot be read -> one line, nothing written."""
    import sentencepiece  # noqa: F401
    from fairjax.vila_u import generate as vg

    notes = []
    conv.convert_vila_u(src["root"], str(tmp_path / "none"), siglip_config=SIGLIP, log=notes.append)
    assert any("no tokenizer.json or tokenizer.model" in n for n in notes)
    assert not {"tokenizer.json", "tokenizer.model"} & set(os.listdir(tmp_path / "none" / "llm"))

    root = variant(src, tmp_path)
    ref.write_sentencepiece_tokenizer(os.path.join(root, "llm"))  # 400 pieces + 4 added: more than vocab_size 40
    msg = _error(root, tmp_path)
    assert "404 tokens, more than the LLM's vocab_size 40" in msg

    # a 40-token LLM fits a tokenizer.json of <unk> <s> </s>, a few pieces and vila-u's 4 added tokens
    from tokenizers import Tokenizer, models

    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(24)] + ["\u2581", "a", "\u2581a", "b"]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(pieces)}, merges=[("\u2581", "a")],
                               unk_token="<unk>", byte_fallback=True))
    tok.add_special_tokens(["<im_start>", "<im_end>", "<vi_start>", "<vi_end>"])
    os.remove(os.path.join(root, "llm", "tokenizer.model"))
    tok.save(os.path.join(root, "llm", "tokenizer.json"))
    out = str(tmp_path / "json")
    conv.convert_vila_u(root, out, siglip_config=SIGLIP, log=lambda *_: None)
    with open(os.path.join(root, "llm", "tokenizer.json"), "rb") as a, open(os.path.join(out, "llm", "tokenizer.json"),
                                                                            "rb") as b:
        assert a.read() == b.read()
    # "▁a▁b▁a" + <im_start> (prefix "▁", spaces as "▁"): ▁a=29, ▁=27, b=30, ▁a=29, <im_start>=31 (first added id)
    assert vg.load_tokenizer(os.path.join(out, "llm")).tokens("a b a<im_start>") == [29, 27, 30, 29, 31]

    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(pieces)}, merges=[], unk_token="<unk>"))
    tok.save(os.path.join(root, "llm", "tokenizer.json"))  # no <im_start>
    with pytest.raises(vg.UserError, match="no token <im_start>"):
        conv.convert_vila_u(root, str(tmp_path / "bad"), siglip_config=SIGLIP, log=lambda *_: None)
    assert not os.path.exists(tmp_path / "bad")
    os.remove(os.path.join(root, "llm", "tokenizer.json"))
    with open(os.path.join(root, "llm", "tokenizer.model"), "wb") as f:
        f.write(b"not a sentencepiece model")
    msg = _error(root, tmp_path)
    assert "tokenizer.model" in msg and "cannot read" in msg


def test_tool_reports_one_line_and_refuses_existing_out(src, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_vila_u", os.path.join(sys_path_tools, "convert_vila_u.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main([src["root"], str(tmp_path / "o")]) == 2  # SigLIP config unknown for the tiny name
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "--siglip-config" in err
    sig = tmp_path / "siglip.json"
    sig.write_text(json.dumps({"vision_config": SIGLIP, "text_config": TEXT}))
    assert tool.main([src["root"], str(tmp_path / "o"), "--siglip-config", str(sig), "--dtype", "as-stored"]) == 0
    assert tool.main([src["root"], str(tmp_path / "o"), "--siglip-config", str(sig)]) == 2
    assert "already exists" in capsys.readouterr().err


# ----------------------------------------------------------------------------- full size, no weights

SIGLIP_LARGE_TEXT = dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                         num_attention_heads=16, max_position_embeddings=64)
# Not published outside the checkpoint: rq-vae-transformer's 256px decoder; the real one is read from
# vision_tower/config.json at conversion time.
ASSUMED_DDCONFIG = dict(ch=128, out_ch=3, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16],
                        resolution=256, z_channels=256, double_z=False, in_channels=3, dropout=0.0)
FULL_RQVAE = dict(embed_dim=1024, n_embed=16384, latent_shape=[16, 16, 1024], code_shape=[16, 16, 4],
                  shared_codebook=True, ddconfig=ASSUMED_DDCONFIG, pretrained_model="google/siglip-large-patch16-256")
FULL_RQT = {"block_size": [16, 16, 4], "input_embed_dim_1": 1024, "input_embed_dim_2": 4096, "embed_dim": 2560,
            "vocab_size": 16384, "head": {"block": {"n_head": 40}, "n_layer": 6}}
LLAMA_7B = dict(vocab_size=32004, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)


def test_full_size_vision_tower_keys_match_on_meta():
    """SigLIP-large (+ text model, as vila-u's checkpoint carries it), shared 16384x1024 codebook, decoder,
    depth transformer: every key on torch meta maps onto jax.eval_shape of our modules."""
    sig_cfg = conv.siglip_vision_config(FULL_RQVAE)
    with torch.device("meta"):
        sig = transformers.SiglipModel(transformers.SiglipConfig(text_config=SIGLIP_LARGE_TEXT, vision_config=sig_cfg))
        dec = ref.Decoder(**ASSUMED_DDCONFIG)
    src = {f"rqvaesiglip.siglip_model.{k}": tuple(v.shape) for k, v in sig.state_dict().items()}
    src.update({"rqvaesiglip.logit_scale": (1,), "rqvaesiglip.logit_bias": (1,),
                "rqvaesiglip.post_quant_conv.weight": (256, 1024, 1, 1), "rqvaesiglip.post_quant_conv.bias": (256,)})
    for i in range(4):
        src.update({f"rqvaesiglip.quantizer.codebooks.{i}.weight": (16385, 1024),
                    f"rqvaesiglip.quantizer.codebooks.{i}.cluster_size_ema": (16384,),
                    f"rqvaesiglip.quantizer.codebooks.{i}.embed_ema": (16384, 1024)})
    src.update({f"rqvaesiglip.decoder.{k}": tuple(v.shape) for k, v in dec.state_dict().items()})
    src.update(ref.rqtransformer_shapes(FULL_RQT))
    tower = conv.build_vision_tower({"rqvaesiglip": FULL_RQVAE, "rqtransformer": FULL_RQT}, sig_cfg)
    depth = vila_u.RQTransformer(vila_u.RQTransformerConfig.from_dict(FULL_RQT))
    ignore, rename = conv.vision_tower_rules(src.keys(), tower)
    targets = conv._tower_targets(tower, depth)
    plan = plan_conversion(src, targets, ignore=ignore, rename=rename)  # raises on any missing/unexpected/shape
    counts = {}
    for key, (path, _) in plan.items():
        part = path[1] if path[0] == "rqvaesiglip" else "rqtransformer"
        counts[part] = counts.get(part, 0) + int(np.prod(src[key]))
    h, f = 1024, 4096
    layer = 4 * h + 4 * (h * h + h) + (h * f + f) + (f * h + h)
    assert counts["vision_model"] == 16 * 16 * 3 * h + h + 256 * h + 23 * layer
    assert counts["quantizer"] == 16385 * 1024
    assert counts["decoder"] == sum(int(np.prod(s)) for k, s in src.items() if k.startswith("rqvaesiglip.decoder."))
    assert counts["rqtransformer"] == sum(int(np.prod(s)) for s in ref.rqtransformer_shapes(FULL_RQT).values())
    assert tower.config.siglip.grid == 16 and tower.config.decoder.upsample_factor == 16


def test_full_size_llama_7b_keys_match_on_meta():
    with torch.device("meta"):
        tm = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_7B))
    src = {k: tuple(v.shape) for k, v in tm.state_dict().items()}
    model = llama.from_config(LLAMA_7B)
    shapes = llama.param_shapes(model)
    plan_conversion(src, shapes, ignore=conv._llm_ignore(model))
    n = sum(int(np.prod(s)) for s in shapes.values())
    assert n == sum(int(np.prod(s)) for s in src.values())
    h, f, v, layers = 4096, 11008, 32004, 32
    assert n == 2 * v * h + layers * (4 * h * h + 3 * h * f + 2 * h) + h
