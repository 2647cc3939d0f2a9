"""VILA-U's prompt text and its LLaMA tokenizer, torch-free (the ``tokenizers`` library).

vila-u's conversation template (vicuna_v1) and its sentencepiece ``LlamaTokenizer`` as vila-u loads
it, reproduced on a ``tokenizer.json``; :func:`sentencepiece_tokenizer_json` writes that file from
vila-u's ``tokenizer.model`` once (transformers + sentencepiece, at conversion time only).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from fairjax.errors import CheckpointError, UserError
from fairjax.io.model_dir import read_json

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
IM_START = "<im_start>"
IMAGE_TOKEN = "<image>"
UNCONDITIONAL = " "  # vila-u's human message for the unconditional rows
PAD_ID = 0  # vila-u pads with zeros (masked out)
PAD_MULTIPLE = 32  # prompt ids are left padded to a multiple of this

TOKENIZER_FILE = "tokenizer.json"
SENTENCEPIECE_FILE = "tokenizer.model"
SPIECE_UNDERLINE = "\u2581"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"


# ----------------------------------------------------------------------------- prompt text and ids

def conversation_prompt(message: str) -> str:
    """vila-u ``tokenize_conversation([{'from': 'human', 'value': message}], add_generation_prompt=True,
    image_generation=True)`` before tokenisation (vicuna_v1, ``SeparatorStyle.TWO``, sep ``" "``)::

        "<system> USER: <message.strip()> ASSISTANT: <im_start>"
        "<system> USER:ASSISTANT: <im_start>"                      (message empty after strip)
    """
    msg = message.strip()
    user = f"USER: {msg} " if msg else "USER:"
    return f"{VICUNA_SYSTEM} {user}ASSISTANT: {IM_START}"


def _token_text(value) -> str | None:
    """A tokenizer-config token entry: a string or an ``AddedToken`` dict (``{"content": ...}``)."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value


@dataclasses.dataclass
class PromptTokenizer:
    """vila-u's LLaMA tokenizer as vila-u loads it (``AutoTokenizer(use_fast=False, legacy=False)``: the
    sentencepiece ``LlamaTokenizer`` of transformers 4.36 that vila-u pins), on the ``tokenizers`` library
    (the file's vocabulary, merges and added tokens; no normaliser; ``Metaspace('▁', prepend_scheme='never',
    split=False)``). :meth:`tokens` reproduces that tokenizer's ``tokenize`` for ``legacy=False``:

    * empty text -> no tokens;
    * ``text = "▁" + text.replace("▁", " ")`` (the prefix only when ``add_prefix_space``, default True);
    * split at added tokens (``<im_start>`` ...), each other piece byte-fallback BPE with spaces as ``▁``
      and no dummy prefix of its own (sentencepiece with ``add_dummy_prefix`` off);
    * a leading ``"▁"`` token is dropped when the next token is one of ``all_special_tokens``
      (bos / eos / unk / pad / ``additional_special_tokens`` of the config), kept otherwise: text that
      starts with ``<im_end>`` gets ``["▁", "<im_end>", ...]`` as in vila-u.

    ``encode(text) = [bos] + tokens(text)``: vila-u's ``tokenizer_image_token`` on text without
    ``<image>`` (BOS, then the tokenizer's ids without its own BOS).
    """

    tokenizer: Any  # tokenizers.Tokenizer
    bos_id: int
    im_start_id: int
    path: str
    eos_id: int | None = None
    add_prefix_space: bool = True
    prefix_id: int | None = None  # the id of the piece "▁"
    special_ids: frozenset = frozenset()  # ids of all_special_tokens

    def tokens(self, text: str) -> list[int]:
        """vila-u's ``tokenizer(text, add_special_tokens=False).input_ids``."""
        if not text:
            return []
        text = text.replace(SPIECE_UNDERLINE, " ")
        if self.add_prefix_space:
            text = SPIECE_UNDERLINE + text
        ids = list(self.tokenizer.encode(text, add_special_tokens=False).ids)
        if len(ids) > 1 and ids[0] == self.prefix_id and ids[1] in self.special_ids:
            ids = ids[1:]
        return ids

    def encode(self, text: str) -> list[int]:
        return [self.bos_id] + self.tokens(text)

    def __call__(self, text: str, bos: bool = True) -> list[int]:
        """``encode(text)`` or ``tokens(text)`` (the ``(text, add_bos) -> ids`` interface of
        :mod:`fairjax.vila_u.data`)."""
        return self.encode(text) if bos else self.tokens(text)

    def prompt_ids(self, message: str) -> list[int]:
        """Ids of :func:`conversation_prompt` (message); a message holding ``<image>`` is refused
        (vila-u would put an image placeholder there, which text-to-image has no image for)."""
        if IMAGE_TOKEN in message:
            raise UserError(f"prompt {message!r} contains {IMAGE_TOKEN}; remove it (text-to-image prompts take no "
                            f"image)")
        return self.encode(conversation_prompt(message))

    def unconditional_ids(self) -> list[int]:
        """Ids of vila-u's unconditional (CFG) prompt: the human message :data:`UNCONDITIONAL` (``" "``)."""
        return self.prompt_ids(UNCONDITIONAL)


def _tokenizer_config(llm_dir: str) -> dict:
    cfg = {}
    for name in (SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG):  # tokenizer_config.json wins
        p = os.path.join(llm_dir, name)
        if os.path.isfile(p):
            cfg.update({k: v for k, v in read_json(p).items() if v is not None})
    return cfg


def load_tokenizer(llm_dir: str, *, tokenizer_json: str | None = None) -> PromptTokenizer:
    """:class:`PromptTokenizer` from ``llm_dir/tokenizer.json`` (or the text ``tokenizer_json``) +
    ``tokenizer_config.json`` / ``special_tokens_map.json`` (BOS default ``<s>``, EOS default ``</s>``,
    ``add_prefix_space``, the special tokens).

    A folder with only vila-u's sentencepiece ``tokenizer.model`` is converted in memory
    (:func:`fairjax.convert.vila_u.sentencepiece_tokenizer_json`, needs transformers + sentencepiece);
    ``tools/convert_vila_u.py`` writes that ``tokenizer.json`` into the model dir once.
    """
    from tokenizers import Tokenizer, pre_tokenizers

    path = os.path.join(llm_dir, TOKENIZER_FILE)
    if tokenizer_json is None and not os.path.isfile(path):
        if os.path.isfile(os.path.join(llm_dir, SENTENCEPIECE_FILE)):
            tokenizer_json = sentencepiece_tokenizer_json(llm_dir)
            path = os.path.join(llm_dir, SENTENCEPIECE_FILE)
        else:
            raise UserError(f"{llm_dir}: no {TOKENIZER_FILE} or {SENTENCEPIECE_FILE}; copy the tokenizer files of the "
                            f"vila-u checkpoint's llm/ folder there (tools/convert_vila_u.py copies them)")
    try:
        tok = Tokenizer.from_str(tokenizer_json) if tokenizer_json is not None else Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 -- tokenizers raises plain Exceptions
        raise UserError(f"{path}: not a tokenizers file ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                        ) from None
    cfg = _tokenizer_config(llm_dir)
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPIECE_UNDERLINE, prepend_scheme="never", split=False)
    bos = _token_text(cfg.get("bos_token")) or "<s>"
    ids = {t: tok.token_to_id(t) for t in (bos, IM_START)}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise UserError(f"{path} has no token {', '.join(missing)}; use the tokenizer of vila-u's llm/ folder (it adds "
                        f"<im_start> <im_end> <vi_start> <vi_end>)")
    if tok.encode(IM_START, add_special_tokens=False).ids != [ids[IM_START]]:
        raise UserError(f"{path}: {IM_START} is in the vocabulary but not an added token, so text splits it; use the "
                        f"tokenizer of vila-u's llm/ folder")
    special = [_token_text(cfg.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")]
    special += [_token_text(t) for t in cfg.get("additional_special_tokens") or []]
    special_ids = frozenset(i for t in special if t and (i := tok.token_to_id(t)) is not None)
    eos = tok.token_to_id(_token_text(cfg.get("eos_token")) or "</s>")
    return PromptTokenizer(tok, int(ids[bos]), int(ids[IM_START]), path, eos_id=None if eos is None else int(eos),
                           add_prefix_space=bool(cfg.get("add_prefix_space", True)),
                           prefix_id=tok.token_to_id(SPIECE_UNDERLINE), special_ids=special_ids)


def sentencepiece_tokenizer_json(llm_dir: str) -> str:
    """The ``tokenizer.json`` text of the sentencepiece ``llm_dir/tokenizer.model`` and the added tokens of
    ``llm_dir``'s tokenizer config (``<im_start>`` ...): transformers' ``AutoTokenizer.from_pretrained(llm_dir,
    legacy=False)`` converts it (vocabulary and merges from sentencepiece) and its backend tokenizer is
    serialised. Only the vocabulary, merges and added tokens are used by
    :func:`fairjax.models.vila_u_tokenizer.load_tokenizer`, which sets the pre-tokenisation itself.
    Needs transformers and sentencepiece (``pip install 'fairjax[torch]'``), not torch."""
    path = os.path.join(llm_dir, "tokenizer.model")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file; copy the tokenizer files of vila-u's llm/ folder there")
    try:
        import sentencepiece  # noqa: F401
        from transformers import AutoTokenizer
    except ImportError as e:
        raise CheckpointError(f"{path}: writing tokenizer.json from it needs transformers and sentencepiece "
                              f"({e.name} is missing); pip install 'fairjax[torch]'") from None
    try:
        tok = AutoTokenizer.from_pretrained(llm_dir, legacy=False)
        backend = getattr(tok, "backend_tokenizer", None)
        text = backend.to_str() if backend is not None else None
    except Exception as e:  # noqa: BLE001 -- sentencepiece / protobuf / transformers raise many kinds
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: transformers cannot read it as a sentencepiece tokenizer ({msg[:200]}); "
                              f"use the tokenizer files of vila-u's llm/ folder") from None
    if text is None:
        raise CheckpointError(f"{path}: transformers loaded {type(tok).__name__}, which has no tokenizers backend to "
                              f"write tokenizer.json from; use the tokenizer files of vila-u's llm/ folder")
    return text
