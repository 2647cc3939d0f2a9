"""VILA-U text-to-image through ``python -m fairjax.generate``: a synthetic vila-u checkpoint (tiny random
LLaMA saved by transformers, a sentencepiece tokenizer.model trained here as vila-u's llm/ ships it, vision
tower under vila-u's key names) converted with tools/convert_vila_u.py (which writes tokenizer.json); prompt
ids vs vila-u's slow sentencepiece tokenizer on the original tokenizer.model (and vs transformers on a
tokenizer.json-only folder); files, determinism, batch-size / device-count invariance; cfg 1 vs a plain
conditional-only sampling loop."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import torch
import transformers
import sentencepiece  # noqa: F401

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import _vila_u_torch as ref  # noqa: E402
from fairjax import generate as cli_module  # noqa: E402
from fairjax import lora as lora_lib  # noqa: E402
from fairjax.vila_u import generate as vg  # noqa: E402
from fairjax.io.safetensors import SafetensorsReader  # noqa: E402
from fairjax.diffusion.pipeline import local_mesh  # noqa: E402
from fairjax.models import llama, vila_u  # noqa: E402
from fairjax.models import vila_u_tokenizer as vtok  # noqa: E402
from test_convert_vila_u import DEC, RQT, RQVAE, SIGLIP, TEXT, VT_CFG, write_folder  # noqa: E402

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")  # vila-u conv_vicuna_v1.system
SPECIALS = ["<im_start>", "<im_end>", "<vi_start>", "<vi_end>"]
PROMPTS = ["a photo of a doctor", "portrait of a firefighter at night"]
# the converter test's tiny vision tower with depth 2 (fewer ops to compile): 4x4 positions x 2 codes of 24
RQT_2 = dict(RQT, block_size=[4, 4, 2])
RQVAE_2 = dict(RQVAE, code_shape=[4, 4, 2])
VT_CFG_2 = dict(VT_CFG, rqvaesiglip=RQVAE_2, rqtransformer=RQT_2)
CORPUS = [SYSTEM, "USER: a photo of a doctor ASSISTANT: a nurse, a teacher, a person smiling",
          "portrait of a firefighter in the city at night", "the quick brown fox jumps over the lazy dog"]


def write_tokenizer(folder):
    """A LLaMA-style tokenizer.json (BPE with byte fallback, the 4 vila-u specials as added tokens), trained
    here with the tokenizers library, + tokenizer_config.json as LLaMA's. Returns its size."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=160, special_tokens=["<unk>", "<s>", "</s>"],
                                                        show_progress=False))
    # as LLaMA's: <unk> <s> </s>, the 256 byte tokens <0x00>..<0xFF> (byte fallback), then the merged pieces
    trained = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])[3:]
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + [t for t, _ in trained]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
              for m in json.loads(tok.to_str())["model"]["merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(pieces)}, merges=merges, unk_token="<unk>",
                               byte_fallback=True, fuse_unk=True))
    # the legacy Llama-2 tokenizer.json pipeline (what vila-u's llm/ would hold if converted by transformers 4)
    tok.pre_tokenizer = None
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "legacy": False,
                   "model_max_length": 2048}, f)
    return tok.get_vocab_size()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(source folder, converted model dir) of a tiny VILA-U: 4x4 image positions x depth 2, 24 codes, 8x8
    images, a 1-layer LLaMA."""
    root = tmp_path_factory.mktemp("vila_u_gen")
    src = str(root / "vila-u-tiny")
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(src, "llm"))
    vocab = ref.write_sentencepiece_tokenizer(os.path.join(src, "llm"))  # tokenizer.model, no tokenizer.json
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   rms_norm_eps=1e-5, initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    llm = transformers.LlamaForCausalLM(cfg).eval()
    llm.save_pretrained(os.path.join(src, "llm"))
    sig = ref.siglip_model(SIGLIP, TEXT, seed=1)
    dec = ref.randomize_(ref.Decoder(**DEC), seed=2)
    codebook = rng.normal(size=(RQVAE["n_embed"] + 1, 32)).astype(np.float32)
    rqt = [(k, (0.3 * rng.normal(size=s)).astype(np.float32)) for k, s in ref.rqtransformer_shapes(RQT_2).items()]
    vt = ref.vision_tower_state(sig, dec, codebook, embed_dim=32, z_channels=DEC["z_channels"], depth=2,
                                rqtransformer=rqt)
    write_folder(os.path.join(src, "vision_tower"), vt, VT_CFG_2)
    pj = {"layers.0.weight": rng.normal(size=(48, 32)), "layers.0.bias": rng.normal(size=48),
          "layers.2.weight": rng.normal(size=(48, 48)), "layers.2.bias": rng.normal(size=48)}
    write_folder(os.path.join(src, "mm_projector"), {k: (0.3 * v).astype(np.float32) for k, v in pj.items()},
                 {"mm_projector_type": "mlp2x_gelu"})
    sig_cfg = root / "siglip.json"
    sig_cfg.write_text(json.dumps(SIGLIP))
    model_dir = str(root / "model")
    tool = _load_tool("convert_vila_u")
    assert tool.main([src, model_dir, "--siglip-config", str(sig_cfg)]) == 0
    return {"src": src, "model": model_dir, "root": root}


def _load_tool(name):
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "tools", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def model(tiny):
    return vg.load_model(tiny["model"])


@pytest.fixture(scope="module")
def prompt_len(model):
    return vg.padded_length([len(model.tokenizer.prompt_ids(p)) for p in PROMPTS + [" "]])


def write_prompts(path, prompts):
    with open(path, "w") as f:
        f.write("# prompts\n" + "\n".join(prompts) + "\n")
    return str(path)


# ----------------------------------------------------------------------------- prompt ids


def test_converter_writes_tokenizer_json_with_vila_u_slow_tokenizer_ids(tiny):
    llm_src, llm_out = os.path.join(tiny["src"], "llm"), os.path.join(tiny["model"], "llm")
    assert not os.path.exists(os.path.join(llm_src, "tokenizer.json"))
    assert os.path.isfile(os.path.join(llm_out, "tokenizer.json"))  # written by tools/convert_vila_u.py
    tok = vg.load_tokenizer(llm_out)
    assert tok.path.endswith("tokenizer.json")
    slow = ref.vila_u_slow_tokenizer(llm_src)  # vila-u's tokenizer on the original tokenizer.model
    # vila-u tokenize_conversation text, written out from conv_vicuna_v1 (messages stripped; an empty human
    # message leaves "USER:" with no separator)
    cases = {
        "a photo of a doctor": f"{SYSTEM} USER: a photo of a doctor ASSISTANT: <im_start>",
        "  portrait  of a firefighter\t": f"{SYSTEM} USER: portrait  of a firefighter ASSISTANT: <im_start>",
        "caf\u00e9 \u00fcber \U0001f600 <im_end> x 2024": f"{SYSTEM} USER: caf\u00e9 \u00fcber \U0001f600 <im_end> x 2024 "
                                                           f"ASSISTANT: <im_start>",
        " ": f"{SYSTEM} USER:ASSISTANT: <im_start>",
        "zzq \u2581 \u03a9\u2248\n\nnight": f"{SYSTEM} USER: zzq \u2581 \u03a9\u2248\n\nnight ASSISTANT: <im_start>",
    }
    for message, text in cases.items():
        want = ref.tokenizer_image_token(slow, text)
        got = tok.prompt_ids(message)
        assert got == want, message
        assert got[0] == slow.bos_token_id and got[-1] == slow.convert_tokens_to_ids("<im_start>")
    assert vtok.conversation_prompt(" ") == cases[" "] and tok.unconditional_ids() == tok.prompt_ids(" ")
    # pieces vila-u tokenises on their own (the chunks around an <image>; answers), where the leading-space and
    # special-token rules of the slow tokenizer show: text starting with <im_end>, a space, "▁", or empty
    for text in ["<im_end>\nwhat is this person's job? ASSISTANT:", "the person is a doctor", " x", "   a\tb",
                 "\u2581x \u2581 y", "<im_start><im_end> a", "x<im_start>y", "", "</s> a", "2024 12345"]:
        assert tok(text, False) == slow(text, add_special_tokens=False).input_ids, text
        assert tok(text) == ref.tokenizer_image_token(slow, text), text
    assert tok.eos_id == slow.eos_token_id
    with pytest.raises(vg.UserError, match="<image>"):
        tok.prompt_ids("a <image> of a cat")
    # the same tokenizer read straight from the source folder (tokenizer.model converted in memory)
    assert vg.load_tokenizer(llm_src).prompt_ids("a photo of a doctor") == tok.prompt_ids("a photo of a doctor")


def test_tokenizer_json_folder_matches_transformers(tmp_path):
    """A llm/ folder with a tokenizer.json only (BPE + byte fallback trained with the tokenizers library):
    vila-u's template ids equal transformers' tokenizer on that file (where the fast and the slow
    tokenizer agree: text that starts with a word)."""
    folder = str(tmp_path / "llm")
    os.makedirs(folder)
    write_tokenizer(folder)
    tok = vg.load_tokenizer(folder)
    hf = transformers.AutoTokenizer.from_pretrained(folder, legacy=False)
    for message in ["a photo of a doctor", "  portrait  of a firefighter\t", "caf\u00e9 \U0001f600 <im_end> x", " "]:
        assert tok.prompt_ids(message) == hf(vtok.conversation_prompt(message)).input_ids, message


# ----------------------------------------------------------------------------- CLI and sampling


def cli(model_dir, prompts_file, out, *extra, cfg=3.0, batch_size=3):
    cfg = [] if cfg is None else ["--cfg", str(cfg)]
    return cli_module.main(["--model", model_dir, "--prompts", prompts_file, "--out", str(out), "--num-per-prompt",
                            "2", "--seed", "7", "--batch-size", str(batch_size), *cfg, *extra])


def read_png(path):
    from PIL import Image

    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def cli_run(tiny):
    """The CLI on 2 prompts x 2 images, one batch over the 8 test devices, codes saved."""
    prompts = write_prompts(tiny["root"] / "prompts.txt", PROMPTS)
    out = tiny["root"] / "out"
    assert cli(tiny["model"], prompts, out, "--save-latents") == 0
    rows = [json.loads(line) for line in open(out / "images.jsonl")]
    images = np.stack([read_png(out / r["file"]) for r in rows])
    codes = []
    for r in rows:
        with SafetensorsReader(str(out / r["codes"])) as rd:
            codes.append(np.asarray(rd["codes"]))
    return out, rows, images, np.stack(codes)


def test_cli_writes_pngs_index_and_codes(model, cli_run):
    out, rows, images, codes = cli_run
    jobs = [(p, i) for p in range(2) for i in range(2)]
    assert [(r["prompt_index"], r["index"]) for r in rows] == jobs
    assert [r["prompt"] for r in rows] == [PROMPTS[p] for p, _ in jobs] and all(r["seed"] == 7 for r in rows)
    assert sorted(os.listdir(out)) == sorted([r["file"] for r in rows] + ["images.jsonl", "generate.json", "codes"])
    assert images.shape == (4, 8, 8, 3) and images.dtype == np.uint8
    assert codes.shape == (4, 16, 2) and codes.dtype == np.int32
    assert codes.min() >= 0 and codes.max() < RQVAE["n_embed"]
    settings = json.load(open(out / "generate.json"))
    assert settings["model_type"] == "vila_u" and settings["image_tokens"] == 16 and settings["height"] == 8
    assert len({c.tobytes() for c in codes}) == 4  # every image its own draw

    # the PNGs are the decoder's output for the saved codes (vila-u: clamp((x + 1) * 127.5) truncated)
    z = vila_u.image_grid_features(model.vu, model.params, jnp.asarray(codes))
    x = model.tower.apply({"params": model.vis_params}, z, method=model.tower.decode)
    want = np.clip((np.asarray(x, np.float32) + 1) * 127.5, 0, 255).transpose(0, 2, 3, 1).astype(np.uint8)
    assert np.abs(want.astype(int) - images.astype(int)).max() <= 1


def test_deterministic_and_invariant_to_batch_size_and_device_count(model, cli_run, prompt_len):
    _, rows, images8, codes8 = cli_run  # 8 devices, one batch (4 images + 4 padding rows)
    one = local_mesh(jax.local_devices()[:1])
    batches = list(vg.generate(model, PROMPTS, num_per_prompt=2, seed=7, batch_size=1, mesh=one))
    assert [j for j, _, _ in batches] == [[(0, 0)], [(0, 1)], [(1, 0)], [(1, 1)]]
    codes1 = np.concatenate([c for _, _, c in batches])
    images1 = np.concatenate([im for _, im, _ in batches])
    np.testing.assert_array_equal(codes1, codes8)
    assert np.abs(images1.astype(int) - images8.astype(int)).max() <= 1
    # the same image asked for alone, out of order, again; another seed gives another image
    gen = vg.VilaUGenerator(model, batch_size=1, mesh=one, prompt_len=prompt_len)
    np.testing.assert_array_equal(gen([PROMPTS[1]], [1], [1], 7)[1][0], codes8[3])
    assert not np.array_equal(gen([PROMPTS[1]], [1], [1], 8)[1][0], codes8[3])


def np_filtered_probs(logits, temperature, top_k, top_p):
    """vila-u ``sample_from_logits`` up to the draw, in numpy: logits / T; keep the top k (ties kept);
    softmax; in descending order drop every entry whose preceding cumulative sum reached top_p; renormalise."""
    lg = np.asarray(logits, np.float64) / temperature
    kth = np.sort(lg)[-min(top_k, lg.size)]
    lg = np.where(lg < kth, -np.inf, lg)
    p = np.exp(lg - lg.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    before = np.concatenate([[0.0], np.cumsum(p[order])[:-1]])
    p[order[before >= top_p]] = 0.0
    return p / p.sum()


def reference_codes(vu, params, ids, mask, key, *, cfg=None, top_k=900, top_p=0.96, temperature=1.0):
    """A plain per-position loop (no scan, no vmap) on ONE conditional row (1, S), or with ``cfg`` on
    [cond; uncond] (2, S): prefill, then per position and depth the depth transformer's logits, guided
    as ``u + cfg (c - u)``, filtered in numpy and drawn as ``argmax(log p + gumbel(k_d))`` (what
    jax.random.categorical computes) with the key schedule of generate_image_codes (split(key, T) per
    position, split(k_t, D) per depth)."""
    t_total, d_total = vu.image_tokens, vu.depth
    rows = ids.shape[0]
    prefill = jax.jit(lambda p, i, m: llama.prefill(vu.llm, p, i, m, max_len=ids.shape[1] + t_total - 1,
                                                    logits=False))
    depth_logits = jax.jit(lambda p, h, c: vila_u.depth_logits(vu, p, h[:, None], c[:, None])[:, 0])
    step = jax.jit(lambda p, cache, c: llama.decode_step(vu.llm, p["llm"], cache,
                                                         inputs_embeds=vila_u.image_embeds(vu, p, c), logits=False))
    _, h, cache = prefill(params["llm"], jnp.asarray(ids), jnp.asarray(mask))
    out = []
    for t, kt in enumerate(jax.random.split(key, t_total)):
        codes = np.zeros((1, d_total), np.int32)
        for d, kd in enumerate(jax.random.split(kt, d_total)):
            logits = np.asarray(depth_logits(params, h, jnp.asarray(np.repeat(codes, rows, axis=0))))[:, d]
            if cfg is not None:
                logits = logits[1:] + np.float32(cfg) * (logits[:1] - logits[1:])
            p = np_filtered_probs(logits[0], temperature, top_k, top_p)
            with np.errstate(divide="ignore"):
                codes[0, d] = np.argmax(np.log(p) + np.asarray(jax.random.gumbel(kd, (1, p.size)))[0])
        out.append(codes[0])
        if t + 1 < t_total:
            _, h, cache = step(params, cache, jnp.asarray(np.repeat(codes, rows, axis=0)))
    return np.stack(out)


def test_cfg_one_equals_conditional_only_sampling_and_cfg_matches_a_plain_loop(model, cli_run, prompt_len):
    _, _, _, codes8 = cli_run
    one = local_mesh(jax.local_devices()[:1])
    tok = model.tokenizer
    cond = np.asarray([tok.prompt_ids(PROMPTS[1])], np.int32)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(7), 1), 0)  # image (1, 0)

    # cfg 1 (both halves run, guided u + 1 (c - u)) vs the conditional row alone, same keys
    gen = vg.VilaUGenerator(model, vg.SampleOptions(cfg=1.0), mesh=one, prompt_len=prompt_len)
    got = gen([PROMPTS[1]], [1], [0], 7)[1][0]
    want = reference_codes(model.vu, model.params, cond, np.ones(cond.shape, bool), key)
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, codes8[2])  # cfg 3 differs

    # the CLI's cfg 3 vs the plain loop on [cond; uncond]
    ids, mask = vila_u.cfg_batch(cond[0], tok.prompt_ids(" "), 1)
    want = reference_codes(model.vu, model.params, ids, mask, key, cfg=3.0)
    np.testing.assert_array_equal(codes8[2], want)


def test_cli_lora_is_merged_into_the_llm(tiny, model, cli_run, prompt_len, tmp_path):
    _, _, _, codes8 = cli_run
    lora = lora_lib.init(model.params["llm"], r"self_attn/(q|v)_proj/kernel$", 2, 4.0, jax.random.key(0))
    lora = {k: {"a": e["a"], "b": 2.0 * jax.random.normal(jax.random.key(i), e["b"].shape)}
            for i, (k, e) in enumerate(sorted(lora.items()))}
    path = str(tmp_path / "lora.safetensors")
    lora_lib.save(path, lora, alpha=4.0)
    prompts = write_prompts(tmp_path / "prompts.txt", PROMPTS)
    assert cli(tiny["model"], prompts, tmp_path / "out", "--save-latents", "--lora", path, cfg=None) == 0
    assert json.load(open(tmp_path / "out" / "generate.json"))["cfg"] == 3.0  # vila-u's default, not SDXL's 5
    rows = [json.loads(line) for line in open(tmp_path / "out" / "images.jsonl")]
    with SafetensorsReader(str(tmp_path / "out" / rows[2]["codes"])) as rd:
        got = np.asarray(rd["codes"])
    merged = dict(model.params, llm=lora_lib.merge(model.params["llm"], lora, 4.0))
    gen = vg.VilaUGenerator(model._replace(params=merged), mesh=local_mesh(jax.local_devices()[:1]),
                            prompt_len=prompt_len)
    np.testing.assert_array_equal(got, gen([PROMPTS[1]], [1], [0], 7)[1][0])
    assert not np.array_equal(got, codes8[2])


def _bad(capsys, model_dir, prompts, out, *extra):
    assert cli(model_dir, prompts, out, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_bad_input_is_one_line_error_and_writes_nothing(tiny, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "prompts.txt", PROMPTS)
    out = tmp_path / "out"
    broken = tmp_path / "model"
    shutil.copytree(tiny["model"], broken)
    shutil.rmtree(broken / "depth_transformer")
    err = _bad(capsys, str(broken), prompts, out)
    assert "depth_transformer" in err and not out.exists()

    shutil.rmtree(broken)
    shutil.copytree(tiny["model"], broken)
    os.remove(broken / "llm" / "tokenizer.json")
    os.remove(broken / "llm" / "tokenizer.model")
    err = _bad(capsys, str(broken), prompts, out)
    assert "tokenizer.json" in err and "llm" in err and not out.exists()
    (broken / "llm" / "tokenizer.model").write_bytes(b"\x00")
    err = _bad(capsys, str(broken), prompts, out)
    assert "tokenizer.model" in err and "cannot read" in err and not out.exists()

    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert "already exists" in _bad(capsys, tiny["model"], prompts, out)
    assert os.listdir(out) == ["keep.txt"]
    shutil.rmtree(out)
    assert "--height 16" in _bad(capsys, tiny["model"], prompts, out, "--height", "16") and not out.exists()
    bad_prompts = write_prompts(tmp_path / "bad.txt", ["a <image> of a dog"])
    assert "<image>" in _bad(capsys, tiny["model"], bad_prompts, out) and not out.exists()


def test_locate_bias_runs_on_a_converted_model_with_deepface(tiny, tmp_path, monkeypatch, capsys):
    """locate-then-fix on a converted (not toy-world) VILA-U: balanced images labelled by the real deepface code
    (tiny ONNX models made here: gender and race by colour, the 'skip' detector), neutral prompts, every key of
    locate.json, its plots and page; the balanced images' labels are deepface's, called here on its own."""
    from PIL import Image

    from fairjax.analysis.locate import main as locate_main
    from fairjax.fairness.classifiers import DeepFaceClassifier
    from test_classifiers import CASES, _image, write_home

    home = write_home(str(tmp_path / "deepface_home"))
    monkeypatch.setenv("DEEPFACE_HOME", home)
    imgs = tmp_path / "balanced"
    imgs.mkdir()
    for i, (rgb, _) in enumerate(CASES):
        Image.fromarray(_image(rgb, 32)).save(imgs / f"{i}.png")
    out = tmp_path / "locate"
    prompts = ["a photo of a doctor", "portrait of a firefighter"]
    rc = locate_main(["--model", tiny["model"], "--out", str(out), "--images", str(imgs), "--prompts", *prompts,
                      "--n", "4", "--detector", "skip"])
    assert rc == 0, capsys.readouterr().err
    with open(out / "locate.json") as f:
        res = json.load(f)
    s = res["summary"]
    assert set(s) >= {"tokenizer_flip_rate", "understanding_accuracy", "answer_bias", "generation_discrepancy",
                      "probe_accuracy"}
    # every balanced image has a face under 'skip', so all 6 are in (a) and (b)
    assert res["tokenizer"]["n"] == len(CASES)
    assert all(0.0 <= v <= 1.0 for v in s["tokenizer_flip_rate"].values())
    und = res["understanding"]["gender"]
    assert und["n"] == len(CASES) and 0.0 <= und["accuracy"] <= 1.0
    want = DeepFaceClassifier(detector_backend="skip", home=home).classify(
        [np.asarray(Image.open(imgs / f"{i}.png").convert("RGB")) for i in range(len(CASES))]).labels
    assert [lab["gender"] for lab in want] == [c[1]["gender"] for c in CASES]
    n_male = sum(lab["gender"] == "male" for lab in want)
    shares = und["answer_shares"]
    assert shares["male"] + shares["female"] == pytest.approx(1.0)
    assert und["answer_bias"]["male"] == pytest.approx(shares["male"] - n_male / len(CASES))
    gen = res["generation"]
    assert gen["n_per_prompt"] == 4 and set(gen["per_prompt"]) == set(prompts)
    assert set(s["generation_discrepancy"]) == {"gender", "race"}
    assert res["probe"]["layers"] == ["embed", "layer_0"]  # the tiny LLaMA has one decoder layer
    for name in ("probe.png", "shares.png", "index.html"):
        assert os.path.isfile(out / name), name

