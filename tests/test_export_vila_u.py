"""tools/export_vila_u.py: a fairjax LoRA over VILA-U's LLaMA -> a PEFT adapter that
``PeftModel.from_pretrained(LlamaForCausalLM, dir)`` loads as is and that moves the PyTorch logits as
``fairjax.lora.merge`` moves the Flax ones (alpha != r, two ranks, a LoRA on some layers only); the merged
LLaMA folder for transformers; bad input as one-line errors with nothing written."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest

import torch
import transformers
import peft

import jax  # noqa: E402

from fairjax import lora as lora_lib  # noqa: E402
from fairjax.convert.llama import load_hf_llama  # noqa: E402
from fairjax.io.model_dir import save_component, write_index  # noqa: E402
from fairjax.models import llama  # noqa: E402

LLM = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
ALPHA = 6.0  # != either rank
TOKENIZER_CONFIG = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>"}


def _tool():
    path = os.path.join(os.path.dirname(__file__), "..", "tools", "export_vila_u.py")
    spec = importlib.util.spec_from_file_location("export_vila_u", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


tool = _tool()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A transformers LLaMA folder, the fairjax model dir holding it as llm/, a LoRA file (rank 4 on layer 0's
    q/v, rank 2 on every MLP projection, random nonzero b) and the merged Flax params."""
    root = tmp_path_factory.mktemp("export_vila_u")
    torch.manual_seed(0)
    hf_dir = str(root / "hf_llm")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLM)).eval().save_pretrained(hf_dir)
    cfg, params = load_hf_llama(hf_dir)
    model_dir = str(root / "model")
    save_component(os.path.join(model_dir, "llm"), cfg, params)
    with open(os.path.join(model_dir, "llm", "tokenizer_config.json"), "w") as f:
        json.dump(TOKENIZER_CONFIG, f)
    write_index(model_dir, ["llm"], model_type="vila_u", source=str(root / "vila-u"))
    lora = lora_lib.init(params, r"layers_0/self_attn/(q|v)_proj/kernel$", 4, ALPHA, jax.random.key(0))
    lora.update(lora_lib.init(params, r"mlp/(gate|up|down)_proj/kernel$", 2, ALPHA, jax.random.key(1)))
    rng = np.random.default_rng(0)
    lora = {k: {"a": np.asarray(e["a"]), "b": (0.5 * rng.normal(size=e["b"].shape)).astype(np.float32)}
            for k, e in lora.items()}
    lora_path = str(root / "lora.safetensors")
    lora_lib.save(lora_path, lora, alpha=ALPHA, targets=["test"])
    merged = lora_lib.merge(params, lora, ALPHA)
    return {"root": root, "hf": hf_dir, "model": model_dir, "lora": lora, "lora_path": lora_path,
            "params": params, "merged": merged, "cfg": cfg}


IDS = np.random.default_rng(1).integers(0, LLM["vocab_size"], size=(2, 9))


def flax_logits(cfg, params):
    model = llama.from_config(cfg)
    return np.asarray(model.apply({"params": params}, IDS).logits)


def torch_logits(model):
    with torch.no_grad():
        return model(torch.from_numpy(IDS)).logits.numpy()


def test_peft_adapter_loads_and_moves_logits_like_the_flax_merge(setup, tmp_path, rel):
    out = str(tmp_path / "adapter")
    assert tool.main([setup["model"], out, "--lora", setup["lora_path"]]) == 0
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]

    base = transformers.LlamaForCausalLM.from_pretrained(setup["hf"]).eval()
    base_t = torch_logits(base)
    model = peft.PeftModel.from_pretrained(base, out).eval()
    got_t = torch_logits(model)
    base_f = flax_logits(setup["cfg"], setup["params"])
    got_f = flax_logits(setup["cfg"], setup["merged"])
    assert rel(got_f, got_t) <= 1e-5
    assert rel(got_f - base_f, got_t - base_t) <= 1e-4
    assert np.abs(got_t - base_t).max() > 0.1 * np.abs(base_t).max()  # the LoRA moves the logits a lot

    # exactly the LoRA's modules are adapted, each with PEFT's scale alpha / r of its own rank
    from peft.tuners.lora import LoraLayer

    adapted = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    want = {"base_model.model." + tool.module_name(p): lora_lib.rank_of(e) for p, e in setup["lora"].items()}
    assert set(adapted) == set(want)
    for name, layer in adapted.items():
        assert layer.r["default"] == want[name] and layer.scaling["default"] == pytest.approx(ALPHA / want[name])
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert cfg["lora_alpha"] == ALPHA and isinstance(cfg["target_modules"], str)  # layer 1's q/v not adapted


def test_adapter_over_every_layer_lists_the_projection_names(setup, tmp_path, rel):
    lora = lora_lib.init(setup["params"], r"self_attn/(q|k|v|o)_proj/kernel$", 3, 5.0, jax.random.key(2))
    lora = {k: {"a": e["a"], "b": 0.3 * jax.random.normal(jax.random.key(i), e["b"].shape)}
            for i, (k, e) in enumerate(sorted(lora.items()))}
    path = str(tmp_path / "lora.safetensors")
    lora_lib.save(path, lora, alpha=5.0)
    out = str(tmp_path / "adapter")
    assert tool.main([setup["model"], out, "--lora", path, "--dtype", "float32"]) == 0
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert cfg["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"] and cfg["r"] == 3
    assert cfg["rank_pattern"] == {}
    model = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(setup["hf"]).eval(), out)
    assert rel(flax_logits(setup["cfg"], lora_lib.merge(setup["params"], lora, 5.0)), torch_logits(model)) <= 1e-5


def test_merged_llm_loads_in_transformers(setup, tmp_path, rel):
    out = str(tmp_path / "llm")
    assert tool.main([setup["model"], out, "--lora", setup["lora_path"], "--merge"]) == 0
    model, info = transformers.LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert rel(flax_logits(setup["cfg"], setup["merged"]), torch_logits(model.eval())) <= 1e-5
    assert json.load(open(os.path.join(out, "tokenizer_config.json"))) == TOKENIZER_CONFIG

    out = str(tmp_path / "llm_bf16")  # no LoRA: the base weights, cast
    assert tool.main([setup["model"], out, "--dtype", "bfloat16"]) == 0
    model = transformers.LlamaForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    want = torch.from_numpy(np.asarray(setup["params"]["model"]["layers_1"]["mlp"]["up_proj"]["kernel"]).T)
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, want.to(torch.bfloat16))


def _bad(capsys, *argv):
    assert tool.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_bad_input_is_one_line_error_and_writes_nothing(setup, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    for extra in (["--lora", setup["lora_path"]], ["--lora", setup["lora_path"], "--merge"], []):
        assert "already exists" in _bad(capsys, setup["model"], out, *extra)
        assert os.listdir(out) == ["keep.txt"]
    shutil.rmtree(out)

    other = {"model/layers_7/self_attn/q_proj/kernel": {"a": np.zeros((32, 2), np.float32),
                                                        "b": np.zeros((2, 32), np.float32)}}
    lora_lib.save(str(tmp_path / "other.safetensors"), other, alpha=2.0)
    for extra in ([], ["--merge"]):
        err = _bad(capsys, setup["model"], out, "--lora", tmp_path / "other.safetensors", *extra)
        assert "layers_7" in err and not out.exists()

    empty = tmp_path / "no_llm"
    shutil.copytree(setup["model"], empty)
    shutil.rmtree(empty / "llm")
    assert "'llm'" in _bad(capsys, empty, out, "--lora", setup["lora_path"]) and not out.exists()
    assert "not found" in _bad(capsys, setup["model"], out, "--lora", tmp_path / "nope.safetensors")
    assert "--merge needs --lora" in _bad(capsys, setup["model"], out, "--merge") and not out.exists()
