"""CLIP tokenization: ids and padding equal transformers' CLIPTokenizer as the SDXL pipeline calls it."""

import json
import os

import numpy as np
import pytest

import transformers

from fairjax.errors import CheckpointError  # noqa: E402
from fairjax.models.tokenizer import CLIPTokenizer, load_sdxl_tokenizers  # noqa: E402


def bytes_to_unicode():
    """GPT-2 / CLIP byte -> printable unicode table (the base alphabet of CLIP's vocab)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


# A made-up merge table over a few words; vocab laid out like CLIP's (bytes, bytes</w>, merges, specials).
MERGES = [("p", "h"), ("ph", "o"), ("t", "o</w>"), ("pho", "to</w>"), ("o", "f</w>"), ("c", "a"), ("ca", "t</w>"),
          ("d", "o"), ("do", "g</w>"), ("t", "h"), ("th", "e</w>"), ("'", "s</w>"), ("o", "n"), ("on", "e</w>")]


def tiny_vocab():
    base = bytes_to_unicode()
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in MERGES] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


def added(content, normalized):
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False,
            "special": True}


def write_folder(path, *, pad, style):
    """A tokenizer folder like SDXL's (``style="sdxl"``) or an older one with only special_tokens_map.json."""
    os.makedirs(path)
    vocab = tiny_vocab()
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                "pad_token": pad}
    with open(os.path.join(path, "special_tokens_map.json"), "w") as f:
        json.dump(specials, f)
    cfg = dict(specials, model_max_length=77, tokenizer_class="CLIPTokenizer", do_lower_case=True,
               add_prefix_space=False, errors="replace", clean_up_tokenization_spaces=True)
    if style == "sdxl":
        dec = {str(vocab["<|startoftext|>"]): added("<|startoftext|>", True),
               str(vocab["<|endoftext|>"]): added("<|endoftext|>", False)}
        if pad == "!":
            dec[str(vocab["!"])] = added("!", False)
        cfg["added_tokens_decoder"] = dec
    else:
        for k in specials:
            cfg.pop(k)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)
    return path


PROMPTS = [
    "a photo of a cat",
    "A  PHOTO\tof   the DOG!",
    "cat!dog, the one's",
    "<|endoftext|> a cat <|startoftext|>",
    "<|STARTOFTEXT|> one <|EndOfText|>",  # added tokens' `normalized` flag decides whether these match
    "ünïcode café 123 naïve",
    "",
    " ".join(["photo of the dog"] * 30),  # > 77 tokens: truncated, EOS kept
    "qz xw unknownword!!",
]


def reference_ids(folder, prompts):
    tok = transformers.CLIPTokenizer.from_pretrained(folder)
    out = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="np")
    return out.input_ids, tok


@pytest.mark.parametrize("pad,style", [("<|endoftext|>", "sdxl"), ("!", "sdxl"), ("!", "legacy")])
def test_ids_match_transformers(tmp_path, pad, style):
    folder = write_folder(os.path.join(tmp_path, "tok"), pad=pad, style=style)
    ref, ref_tok = reference_ids(folder, PROMPTS)
    ours = CLIPTokenizer.from_folder(folder)
    ids = ours(PROMPTS)
    assert ids.dtype == np.int32 and ids.shape == (len(PROMPTS), 77)
    np.testing.assert_array_equal(ids, ref)
    assert ours.pad_token_id == ref_tok.pad_token_id
    assert ours.eos_token_id == ref_tok.eos_token_id and ours.bos_token_id == ref_tok.bos_token_id
    assert (ids[:, 0] == ref_tok.bos_token_id).all()
    assert ids[7, -1] == ref_tok.eos_token_id  # truncated row still ends with EOS
    for p in PROMPTS[:3]:  # single prompts too
        np.testing.assert_array_equal(ours(p), reference_ids(folder, [p])[0])


def test_transformers5_saved_folder(tmp_path):
    """A folder written by transformers 5's save_pretrained (tokenizer.json based) reads the same."""
    src = write_folder(os.path.join(tmp_path, "src"), pad="!", style="sdxl")
    saved = os.path.join(tmp_path, "saved")
    transformers.CLIPTokenizer.from_pretrained(src).save_pretrained(saved)
    ref, _ = reference_ids(saved, PROMPTS)
    np.testing.assert_array_equal(CLIPTokenizer.from_folder(saved)(PROMPTS), ref)
    only_json = os.path.join(tmp_path, "only_json")
    os.makedirs(only_json)
    for name in os.listdir(saved):
        if name not in ("vocab.json", "merges.txt"):
            with open(os.path.join(saved, name), "rb") as f, open(os.path.join(only_json, name), "wb") as g:
                g.write(f.read())
    assert os.path.isfile(os.path.join(only_json, "tokenizer.json"))
    np.testing.assert_array_equal(CLIPTokenizer.from_folder(only_json)(PROMPTS), ref)


def test_sdxl_pair_pads_differently(tmp_path):
    write_folder(os.path.join(tmp_path, "pipe", "tokenizer"), pad="<|endoftext|>", style="sdxl")
    write_folder(os.path.join(tmp_path, "pipe", "tokenizer_2"), pad="!", style="sdxl")
    t1, t2 = load_sdxl_tokenizers(os.path.join(tmp_path, "pipe"))
    a, b = t1("a cat")[0], t2("a cat")[0]
    vocab = tiny_vocab()
    assert a[-1] == vocab["<|endoftext|>"] and b[-1] == vocab["!"] == 0
    np.testing.assert_array_equal(a[:4], b[:4])


def test_missing_or_broken_folder_is_one_line_error(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer folder not found") as e:
        CLIPTokenizer.from_folder(os.path.join(tmp_path, "nope"))
    assert "\n" not in str(e.value)
    empty = os.path.join(tmp_path, "empty")
    os.makedirs(empty)
    with pytest.raises(CheckpointError, match="no vocab.json \\+ merges.txt or tokenizer.json") as e:
        CLIPTokenizer.from_folder(empty)
    assert "\n" not in str(e.value)
    bad = write_folder(os.path.join(tmp_path, "bad"), pad="!", style="sdxl")
    with open(os.path.join(bad, "tokenizer_config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(CheckpointError, match="tokenizer_config.json: not valid JSON"):
        CLIPTokenizer.from_folder(bad)
