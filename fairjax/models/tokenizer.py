"""CLIP tokenization for SDXL from the tokenizer files in a local pipeline folder.

Built on the ``tokenizers`` library only (no transformers, no torch, no hub):
the backend is assembled exactly as transformers 5's ``CLIPTokenizer`` builds
it, and called as the SDXL pipeline calls it::

    tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)

i.e. NFC + whitespace squeeze + lowercase, CLIP's split regex, byte-level BPE
with the ``</w>`` end-of-word suffix, then ``<|startoftext|> ids <|endoftext|>``
truncated to ``model_max_length`` (77) and right-padded with the folder's
``pad_token``. The two SDXL tokenizers differ only in their files:
``tokenizer/`` pads with ``<|endoftext|>`` (49407), ``tokenizer_2/`` with ``!``
(id 0, also a special added token there, so a literal ``!`` in a prompt
encodes as 0, as it does in diffusers).

Files read from a tokenizer folder: ``vocab.json`` + ``merges.txt`` (or a
``tokenizer.json`` holding them, as transformers 5 saves), and when present
``tokenizer_config.json`` (special tokens, ``added_tokens_decoder``,
``model_max_length``) and the legacy ``special_tokens_map.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fairjax.errors import CheckpointError

# transformers' CLIPTokenizer defaults
DEFAULT_SPECIAL = {"unk_token": "<|endoftext|>", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                   "pad_token": "<|endoftext|>"}
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
DEFAULT_MAX_LENGTH = 77  # CLIP's context length; used when tokenizer_config.json has no model_max_length
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_ADDED_TOKEN_FIELDS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None


def _token_str(value) -> str | None:
    """A special token as tokenizer files store it: a string or an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and "content" in value:
        return value["content"]
    raise CheckpointError(f"unreadable special token entry {value!r}")


def _added_token(entry: Mapping):
    from tokenizers import AddedToken

    kw = {k: entry[k] for k in _ADDED_TOKEN_FIELDS if k in entry}
    return AddedToken(kw.pop("content"), **kw)


def _vocab_and_merges(folder: str) -> tuple[dict, list, list]:
    """``(vocab, merges, added_tokens_from_tokenizer_json)`` from vocab.json/merges.txt or tokenizer.json."""
    from tokenizers.models import BPE

    vocab_file, merges_file = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    tok_json = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(vocab_file) and os.path.isfile(merges_file):
        try:
            vocab, merges = BPE.read_file(vocab_file, merges_file)
        except Exception as e:  # the Rust reader raises plain Exceptions
            raise CheckpointError(f"{folder}: cannot read vocab.json/merges.txt ({e})") from None
        added = _read_json(tok_json).get("added_tokens", []) if os.path.isfile(tok_json) else []
        return vocab, merges, added
    if os.path.isfile(tok_json):
        data = _read_json(tok_json)
        model = data.get("model") or {}
        if model.get("type") != "BPE" or "vocab" not in model or "merges" not in model:
            raise CheckpointError(f"{tok_json}: not a BPE tokenizer (model type {model.get('type')!r})")
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        return dict(model["vocab"]), merges, data.get("added_tokens", [])
    present = sorted(os.listdir(folder))
    raise CheckpointError(f"{folder}: no vocab.json + merges.txt or tokenizer.json (found: "
                          f"{', '.join(present[:8]) or 'nothing'}); point at a pipeline's tokenizer/ folder")


def build_backend(vocab: Mapping[str, int], merges: Sequence[tuple[str, str]], special: Mapping[str, str | None],
                  added_tokens: Sequence = ()):
    """The ``tokenizers.Tokenizer`` that transformers' ``CLIPTokenizer.__init__`` builds."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(vocab=dict(vocab), merges=list(merges), dropout=None, continuing_subword_prefix="",
                        end_of_word_suffix="</w>", fuse_unk=False, unk_token=special["unk_token"]))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    # added tokens first (in id order), then any named special token not among them, as transformers does
    to_add = list(added_tokens)
    known = {str(t.content) for t in to_add}
    for key in SPECIAL_KEYS:
        value = special.get(key)
        if value is not None and value not in known:
            to_add.append(AddedToken(value, special=True))
            known.add(value)
    if to_add:
        tok.add_tokens(to_add)
    ids = {k: tok.token_to_id(special[k]) for k in ("bos_token", "eos_token")}
    if ids["bos_token"] is None or ids["eos_token"] is None:
        raise CheckpointError(f"tokenizer vocabulary has no {special['bos_token']!r} / {special['eos_token']!r}")
    tok.post_processor = processors.RobertaProcessing((special["eos_token"], ids["eos_token"]),
                                                      (special["bos_token"], ids["bos_token"]), False, False)
    return tok


class CLIPTokenizer:
    """Tokenize prompts to fixed-length int32 ids, as the SDXL pipeline does.

    ``tok(["a photo of a cat"]) -> (1, model_max_length)`` array: BOS, tokens,
    EOS, right-padded with ``pad_token_id``; over-long prompts are truncated to
    keep BOS/EOS.
    """

    def __init__(self, backend, *, model_max_length: int, special: Mapping[str, str | None], folder: str = ""):
        self.backend = backend
        self.model_max_length = int(model_max_length)
        self.special = dict(special)
        self.folder = folder
        self.pad_token_id = self._id("pad_token")
        self.bos_token_id = self._id("bos_token")
        self.eos_token_id = self._id("eos_token")

    def _id(self, key: str) -> int:
        i = self.backend.token_to_id(self.special[key])
        if i is None:
            raise CheckpointError(f"{self.folder}: {key} {self.special[key]!r} is not in the vocabulary")
        return i

    @classmethod
    def from_folder(cls, folder: str) -> "CLIPTokenizer":
        """Read a ``tokenizer/`` or ``tokenizer_2/`` folder of a diffusers pipeline (local files only)."""
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise CheckpointError(f"{folder}: tokenizer folder not found; pass the pipeline's tokenizer/ or "
                                  f"tokenizer_2/ folder (vocab.json + merges.txt)")
        cfg_file = os.path.join(folder, "tokenizer_config.json")
        cfg = _read_json(cfg_file) if os.path.isfile(cfg_file) else {}
        special = dict(DEFAULT_SPECIAL)
        special.update({k: _token_str(cfg[k]) for k in SPECIAL_KEYS if k in cfg})
        vocab, merges, json_added = _vocab_and_merges(folder)
        if "added_tokens_decoder" in cfg:
            entries = sorted(cfg["added_tokens_decoder"].items(), key=lambda kv: int(kv[0]))
            added = [_added_token(e) for _, e in entries]
        else:  # legacy folders: special_tokens_map.json overrides, tokenizer.json lists added tokens
            map_file = os.path.join(folder, "special_tokens_map.json")
            if os.path.isfile(map_file):
                smap = _read_json(map_file)
                special.update({k: _token_str(smap[k]) for k in SPECIAL_KEYS if k in smap})
            added = [_added_token(e) for e in sorted(json_added, key=lambda e: e.get("id", 0))]
        backend = build_backend(vocab, merges, special, added)
        max_len = cfg.get("model_max_length")
        if not isinstance(max_len, int) or max_len > 10**6:  # transformers' "very large integer" means unset
            max_len = DEFAULT_MAX_LENGTH
        return cls(backend, model_max_length=max_len, special=special, folder=folder)

    def __call__(self, prompts: str | Sequence[str], max_length: int | None = None) -> np.ndarray:
        """``(B, max_length)`` int32 ids (``max_length`` defaults to ``model_max_length``)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        n = self.model_max_length if max_length is None else int(max_length)
        self.backend.enable_truncation(max_length=n, strategy="longest_first", direction="right")
        self.backend.enable_padding(length=n, pad_id=self.pad_token_id, pad_token=self.special["pad_token"],
                                    direction="right")
        encs = self.backend.encode_batch(list(prompts), add_special_tokens=True)
        return np.asarray([e.ids for e in encs], dtype=np.int32).reshape(len(prompts), n)


def load_sdxl_tokenizers(pipeline_dir: str) -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """``(tokenizer, tokenizer_2)`` from a diffusers SDXL pipeline folder."""
    return (CLIPTokenizer.from_folder(os.path.join(pipeline_dir, "tokenizer")),
            CLIPTokenizer.from_folder(os.path.join(pipeline_dir, "tokenizer_2")))
