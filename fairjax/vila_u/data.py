"""VILA-U preference data: explicit BPO / DPO pairs, SFT image records and mDPO records, as TFDS
``array_record`` datasets written and read without TensorFlow (as :mod:`fairjax.data.prefs`).

Three kinds of record (every token sequence is a 1-D int32 array of any length; codes are the
image's residual codes in raster order, ``(N, D)`` = (16*16, 4) for vila-u-7b-256)::

    images  id, prompt, prompt_ids, codes, group                         (SFT: image-token cross-entropy)
    pairs   id, prompt, prompt_ids, codes_a, codes_b, group_a, group_b   (BPO: two demographic variants of
                                                                          one prompt; DPO: a = chosen, b = rejected)
    mdpo    id, pre_ids, post_ids, chosen_ids, rejected_ids, image (H, W, 3) uint8

A pair is one record: its two halves travel together through shuffling, batching and
sharding, so a batch of any size or order holds whole pairs. (The released BPO code
interleaves the halves with its collator and splits the batch in halves, which pairs
the right images only at batch size 1.)

Token layout (the vila-u vicuna_v1 template, ``vila_u/utils/tokenizer.py`` / ``data/dataset.py``), ids from
:func:`fairjax.models.vila_u_tokenizer.load_tokenizer` (vila-u's ``AutoTokenizer(use_fast=False, legacy=False)`` ids;
a :class:`~fairjax.models.vila_u_tokenizer.PromptTokenizer` is a :data:`Tokenize` callable with ``eos_id``):

* generation: ``prompt_ids = [bos] + tok("<system> USER: <caption> ASSISTANT: <im_start>")``, the text of
  :func:`fairjax.models.vila_u_tokenizer.conversation_prompt` (caption stripped; an empty caption is vila-u's
  unconditional CFG prompt ``"<system> USER:ASSISTANT: <im_start>"``, :func:`unconditional_ids`);
  the image follows as N positions, teacher-forced (:func:`fairjax.vila_u.logprobs.image_code_logprobs`);
* understanding (mDPO): vila-u's ``"<system> USER: <im_start><image><im_end>\\n<question> ASSISTANT: <answer></s>"``
  as ``tokenizer_image_token`` cuts it at ``<image>``: ``pre_ids = [bos] + tok("<system> USER: <im_start>")``,
  the N image positions, then ``tok("<im_end>\\n<question> ASSISTANT:")`` (``post_ids``; vila-u's tokenizer starts
  it with the ``"▁"`` piece unless ``<im_end>`` is one of the config's special tokens) and the response ``tok("<answer>") + [eos]``.
  The response is tokenised on its own; its leading ``"▁"`` is the space after ``ASSISTANT:``, so
  ``post_ids + response`` equals the ids of the whole chunk (tested against vila-u's tokenizer).

On disk: ``<out_dir>/fairjax_vila_u/1.0.0/`` with TFDS's files, ``fairjax_vila_u.json`` (kind,
counts, code shape, codebook size, largest token id, metadata) and ``lengths-<split>.npz``
(per-record sequence lengths, so a batch's padded shapes are known without reading
records). The whole dataset is built in a temporary directory and renamed into place.
Batches: :class:`fairjax.data.prefs.PreferenceBatches` (deterministic, epoch-aware, per-host).
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from fairjax.data.prefs import _quiet, _short, _tfds
from fairjax.errors import DataError
from fairjax.models.vila_u_tokenizer import IM_START, UNCONDITIONAL, VICUNA_SYSTEM, conversation_prompt

NAME = "fairjax_vila_u"
VERSION = "1.0.0"
INFO_FILE = "fairjax_vila_u.json"
KINDS = ("images", "pairs", "mdpo")

IM_END = "<im_end>"

#: token-sequence fields per kind (variable length) and their index columns
SEQ_FIELDS = {"images": ("prompt_ids",), "pairs": ("prompt_ids",),
              "mdpo": ("pre_ids", "post_ids", "chosen_ids", "rejected_ids")}
CODE_FIELDS = {"images": ("codes",), "pairs": ("codes_a", "codes_b"), "mdpo": ()}
TEXT_FIELDS = {"images": ("prompt", "group"), "pairs": ("prompt", "group_a", "group_b"), "mdpo": ()}


# ----------------------------------------------------------------------------- prompts

def generation_prompt(caption: str) -> str:
    """vila-u ``tokenize_conversation([human: caption], add_generation_prompt=True, image_generation=True)``
    before tokenisation: ``"<system> USER: <caption> ASSISTANT: <im_start>"`` (caption stripped;
    ``"<system> USER:ASSISTANT: <im_start>"`` when it is empty, e.g. vila-u's unconditional ``" "``)."""
    return conversation_prompt(caption)


def understanding_prompt(question: str) -> tuple[str, str]:
    """The text before and after the image of ``"<system> USER: <im_start><image><im_end>\\n<question>
    ASSISTANT:"`` (vila-u's ``preprocess_multimodal`` with ``mm_use_im_start_end``)."""
    return f"{VICUNA_SYSTEM} USER: {IM_START}", f"{IM_END}\n{question.strip()} ASSISTANT:"


Tokenize = Callable[[str, bool], Sequence[int]]  # (text, add_bos) -> ids, e.g. fairjax.models.vila_u_tokenizer.PromptTokenizer


class TinyTokenizer:
    """A deterministic word-level stand-in for tests and ``:tiny`` presets (no files): id 1 = BOS,
    2 = EOS, the 4 vila-u specials are the last 4 ids (``<im_start>`` = V-4, ``<im_end>`` = V-3), and
    every other whitespace-separated word maps to ``3 + crc32(word) % (V - 7)``."""

    def __init__(self, vocab_size: int):
        if vocab_size < 16:
            raise DataError(f"TinyTokenizer needs vocab_size >= 16, got {vocab_size}")
        self.vocab_size = vocab_size
        self.bos, self.eos = 1, 2
        self.special = {IM_START: vocab_size - 4, IM_END: vocab_size - 3, "<vi_start>": vocab_size - 2,
                        "<vi_end>": vocab_size - 1}

    def __call__(self, text: str, bos: bool = True) -> list[int]:
        for s in self.special:
            text = text.replace(s, f" {s} ")
        ids = [self.special[w] if w in self.special else 3 + zlib.crc32(w.encode()) % (self.vocab_size - 7)
               for w in text.split()]
        return ([self.bos] if bos else []) + ids


def generation_ids(tokenize: Tokenize, caption: str) -> np.ndarray:
    """``prompt_ids`` of a caption (:func:`generation_prompt`, with BOS)."""
    return np.asarray(tokenize(generation_prompt(caption), True), np.int32)


def unconditional_ids(tokenize: Tokenize) -> np.ndarray:
    """The ids of vila-u's unconditional CFG prompt (``generate_image_content``: human message ``" "``)."""
    return generation_ids(tokenize, UNCONDITIONAL)


def mdpo_ids(tokenize: Tokenize, eos_id: int, question: str, chosen: str, rejected: str) -> dict:
    """``pre_ids``, ``post_ids``, ``chosen_ids``, ``rejected_ids`` of one mDPO record (see module docstring)."""
    pre, post = understanding_prompt(question)
    ans = lambda t: np.asarray(list(tokenize(t.strip(), False)) + [eos_id], np.int32)  # noqa: E731
    return {"pre_ids": np.asarray(tokenize(pre, True), np.int32),
            "post_ids": np.asarray(tokenize(post, False), np.int32), "chosen_ids": ans(chosen),
            "rejected_ids": ans(rejected)}


# ----------------------------------------------------------------------------- pairs from halves

def pair_record(a: Mapping[str, Any], b: Mapping[str, Any], where: str = "pair") -> dict:
    """One explicit pair from its two halves ``{'id', 'prompt', 'prompt_ids', 'codes', 'group'}``.

    The halves must be two variants of ONE prompt: same ``id``, same ``prompt`` text and
    same ``prompt_ids``; otherwise a one-line :class:`DataError` naming ``where``.
    """
    for key in ("id", "prompt", "prompt_ids", "codes"):
        for name, h in (("a", a), ("b", b)):
            if key not in h:
                raise DataError(f"{where}: half {name} has no {key!r}; each half needs id, prompt, "
                                     "prompt_ids, codes (and group)")
    if a["id"] != b["id"]:
        raise DataError(f"{where}: the two halves have different ids ({a['id']!r} vs {b['id']!r}); "
                             "a pair is two variants of one prompt, so both halves carry that prompt's id")
    if str(a["prompt"]).strip() != str(b["prompt"]).strip():
        raise DataError(f"{where}: the two halves have different prompts ({a['prompt']!r} vs "
                             f"{b['prompt']!r}); both images of a pair must come from one neutral prompt")
    if not np.array_equal(np.asarray(a["prompt_ids"]), np.asarray(b["prompt_ids"])):
        raise DataError(f"{where}: the two halves have the same prompt but different prompt_ids; "
                             "tokenize the prompt once for both")
    return {"id": int(a["id"]), "prompt": str(a["prompt"]), "prompt_ids": np.asarray(a["prompt_ids"]),
            "codes_a": np.asarray(a["codes"]), "codes_b": np.asarray(b["codes"]),
            "group_a": str(a.get("group", "a")), "group_b": str(b.get("group", "b"))}


def pairs_from_sets(chosen: Iterable[Mapping], rejected: Iterable[Mapping]) -> list[dict]:
    """DPO pairs from chosen / rejected sets of image halves: per ``id`` the k-th chosen image with
    the k-th rejected one (the surplus of the larger side is dropped), in order of first appearance."""
    by_id: dict[Any, tuple[list, list]] = {}
    for side, halves in ((0, chosen), (1, rejected)):
        for h in halves:
            by_id.setdefault(h["id"], ([], []))[side].append(h)
    out = []
    for pid, (w, l) in by_id.items():
        for k, (hw, hl) in enumerate(zip(w, l)):
            out.append(pair_record(hw, hl, where=f"prompt id {pid!r}, pair {k}"))
    return out


def read_pair_manifest(path: str, tokenize: Tokenize, encode: Callable[[list[str]], np.ndarray] | None = None
                       ) -> list[dict]:
    """Pairs from a JSON-lines file, one pair per line::

        {"a": {"id": 3, "prompt": "a photo of a doctor", "group": "male", "image": "m/3_0.png"},
         "b": {"id": 3, "prompt": "a photo of a doctor", "group": "female", "codes": [[...], ...]}}

    A half gives ``codes`` (N x D ints) or ``image`` (a path, relative to the file's folder;
    encoded with ``encode(paths) -> (n, N, D)``). The prompt is tokenised with the
    generation template. Any bad line is a one-line error ``<path>:<line>: ...``.
    """
    base = os.path.dirname(os.path.abspath(path))
    try:
        with open(path) as f:
            lines = [(i + 1, ln) for i, ln in enumerate(f) if ln.strip()]
    except OSError as e:
        raise DataError(f"cannot read the pair file {path} ({e.strerror})") from None
    if not lines:
        raise DataError(f"the pair file {path} has no pairs; write one JSON object per line with 'a' and 'b'")
    halves = []
    for n, ln in lines:
        try:
            obj = json.loads(ln)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(obj, Mapping) or not all(isinstance(obj.get(k), Mapping) for k in ("a", "b")):
            raise DataError(f"{path}:{n}: a pair line needs two objects 'a' and 'b'")
        for name in ("a", "b"):
            h = obj[name]
            if ("codes" in h) == ("image" in h):
                raise DataError(f"{path}:{n}: half {name} needs exactly one of 'codes' or 'image'")
        halves.append((n, dict(obj["a"]), dict(obj["b"])))
    todo = [(n, h) for n, a, b in halves for h in (a, b) if "image" in h]
    if todo:
        if encode is None:
            raise DataError(f"{path}:{todo[0][0]}: halves give images but no encoder was given; pass the model "
                                 "dir so images are encoded to codes by its vision tower, or give codes")
        codes = encode([os.path.join(base, h["image"]) for _, h in todo])
        for (_, h), c in zip(todo, codes):
            h["codes"] = np.asarray(c)
    out = []
    for n, a, b in halves:
        for h in (a, b):
            h.setdefault("prompt", "")
            h["prompt_ids"] = generation_ids(tokenize, str(h["prompt"]))
        out.append(pair_record(a, b, where=f"{path}:{n}"))
    return out


# ----------------------------------------------------------------------------- writing

class _Schema:
    """Checks records of one kind against the first one (code shape, image shape)."""

    def __init__(self, kind: str, first: Mapping, codebook_size: int):
        if kind not in KINDS:
            raise DataError(f"unknown dataset kind {kind!r}; use one of {', '.join(KINDS)}")
        self.kind, self.codebook_size = kind, int(codebook_size)
        self.fields = {"id", *SEQ_FIELDS[kind], *CODE_FIELDS[kind], *TEXT_FIELDS[kind]} | (
            {"image"} if kind == "mdpo" else set())
        self.code_shape = tuple(np.shape(first.get(CODE_FIELDS[kind][0]))) if CODE_FIELDS[kind] else None
        self.image_shape = tuple(np.shape(first.get("image"))) if kind == "mdpo" else None
        self.max_token = 0

    def check(self, i: int, r: Mapping) -> dict:
        missing = sorted(self.fields - set(r))
        if missing:
            raise DataError(f"record {i} lacks {missing}; a {self.kind!r} record needs {sorted(self.fields)}")
        extra = sorted(set(r) - self.fields)
        if extra:
            raise DataError(f"record {i} has unknown fields {extra}; a {self.kind!r} record has {sorted(self.fields)}")
        if not isinstance(r["id"], (int, np.integer)) or isinstance(r["id"], bool):
            raise DataError(f"record {i}: id must be an int, got {r['id']!r}")
        out: dict[str, Any] = {"id": int(r["id"])}
        for k in TEXT_FIELDS[self.kind]:
            if not isinstance(r[k], str):
                raise DataError(f"record {i}: {k} must be a str, got {type(r[k]).__name__}")
            out[k] = r[k]
        for k in SEQ_FIELDS[self.kind]:
            a = np.asarray(r[k])
            if a.ndim != 1 or a.size == 0 or not np.issubdtype(a.dtype, np.integer) or a.min() < 0:
                raise DataError(f"record {i}: {k} must be a non-empty 1-D array of token ids >= 0, "
                                     f"got shape {a.shape} {a.dtype}")
            self.max_token = max(self.max_token, int(a.max()))
            out[k] = a.astype(np.int32)
        for k in CODE_FIELDS[self.kind]:
            out[k] = self._codes(i, k, r[k])
        if self.kind == "mdpo":
            img = np.asarray(r["image"])
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3 or img.shape != self.image_shape:
                raise DataError(f"record {i}: image must be uint8 (H, W, 3) like record 0's {self.image_shape}, "
                                     f"got {img.shape} {img.dtype}; resize images to the model's resolution first")
            out["image"] = img
        return out

    def _codes(self, i: int, k: str, c) -> np.ndarray:
        a = np.asarray(c)
        if not np.issubdtype(a.dtype, np.integer) or a.ndim != 2:
            raise DataError(f"record {i}: {k} must be an int array (positions, depth), got {a.shape} {a.dtype}")
        if a.shape != self.code_shape:
            raise DataError(f"record {i}: {k} has shape {a.shape}, record 0's has {self.code_shape}; "
                                 "every image must have the same number of positions and depths")
        bad = (a < 0) | (a >= self.codebook_size)
        if bad.any():
            raise DataError(f"record {i}: {k} holds code {int(a[bad][0])}, outside the codebook "
                                 f"[0, {self.codebook_size}); encode images with the model's own vision tower "
                                 "or fix codebook_size")
        return a.astype(np.int32)


def _features(schema: _Schema):
    tfds = _tfds()
    f: dict[str, Any] = {"id": tfds.features.Scalar(dtype=np.int64)}
    for k in TEXT_FIELDS[schema.kind]:
        f[k] = tfds.features.Text()
    for k in SEQ_FIELDS[schema.kind]:
        f[k] = tfds.features.Tensor(shape=(None,), dtype=np.int32)
    for k in CODE_FIELDS[schema.kind]:
        f[k] = tfds.features.Tensor(shape=schema.code_shape, dtype=np.int32)
    if schema.kind == "mdpo":
        f["image"] = tfds.features.Tensor(shape=schema.image_shape, dtype=np.uint8)
    return tfds.features.FeaturesDict(f)


def _builder_class():
    tfds = _tfds()

    class FairjaxVilaU(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """VILA-U preference records written by fairjax (see fairjax.vila_u.data)."""

        VERSION = tfds.core.Version(VERSION)
        name = NAME

        def __init__(self, *, feature_spec, records, description, **kwargs):
            self._feature_spec, self._records, self._description = feature_spec, records, description
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, description=self._description, features=self._feature_spec,
                                         disable_shuffling=True)

        def _split_generators(self, dl_manager):
            return {name: self._generate_examples(recs) for name, recs in self._records.items()}

        def _generate_examples(self, records):
            yield from records

    return FairjaxVilaU


def write_dataset(out_dir: str, kind: str, records: Iterable[Mapping[str, Any]], *, codebook_size: int,
                  split: str = "train", metadata: Mapping[str, Any] | None = None, overwrite: bool = False) -> int:
    """Write ``records`` of ``kind`` (see module docstring) to ``out_dir``; returns the record count.

    Every record is checked (fields, token ids, code shape and range ``[0, codebook_size)``,
    image shape) before it is written; any problem, an empty ``records`` or an existing
    ``out_dir`` (unless ``overwrite``) is a one-line :class:`DataError` and nothing is left.
    """
    tfds = _tfds()
    from fairjax.io.model_dir import atomic_output_dir

    out_dir = os.path.abspath(os.fspath(out_dir))
    if kind not in KINDS:
        raise DataError(f"unknown dataset kind {kind!r}; use one of {', '.join(KINDS)}")
    if os.path.exists(out_dir) and not overwrite:
        raise DataError(f"{out_dir} already exists; choose another directory or pass overwrite=True")
    it = iter(records)
    first = next(it, None)
    if first is None:
        raise DataError(f"no {kind!r} records to write to {out_dir}; a dataset needs at least one")
    schema = _Schema(kind, first, codebook_size)
    lengths: dict[str, list[int]] = {k: [] for k in SEQ_FIELDS[kind]}
    ids: list[int] = []

    def gen():
        for i, r in enumerate(_chain(first, it)):
            ex = schema.check(i, r)
            for k in lengths:
                lengths[k].append(len(ex[k]))
            ids.append(ex["id"])
            yield i, ex

    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        b = _builder_class()(feature_spec=_features(schema), records={split: gen()},
                             description=f"fairjax VILA-U {kind} records", data_dir=tmp, file_format="array_record")
        with _quiet(True):
            b.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
        vdir = os.path.join(tmp, NAME, VERSION)
        np.savez(os.path.join(vdir, f"lengths-{split}.npz"), id=np.asarray(ids, np.int64),
                 **{k: np.asarray(v, np.int64) for k, v in lengths.items()})
        info = {"format": NAME, "version": VERSION, "kind": kind, "counts": {split: len(ids)},
                "codebook_size": schema.codebook_size, "max_token_id": schema.max_token,
                "code_shape": list(schema.code_shape) if schema.code_shape else None,
                "image_shape": list(schema.image_shape) if schema.image_shape else None,
                "metadata": dict(metadata or {})}
        with open(os.path.join(vdir, INFO_FILE), "w") as f:
            json.dump(info, f, indent=2, default=str)
    return len(ids)


def _chain(first, rest):
    yield first
    yield from rest


# ----------------------------------------------------------------------------- reading

class VilaUData:
    """Random access to one split of a VILA-U dataset (``tfds.data_source``, no TensorFlow).

    ``kind``, ``info``, ``lengths`` (``{field: (n,)}``), ``len(data)``; :meth:`read` returns the
    records ``idx`` as ``{field: list}`` (token sequences ragged, codes / images stacked).
    Missing, empty or damaged datasets are a one-line :class:`DataError`.
    """

    def __init__(self, out_dir: str, split: str = "train"):
        self.out_dir, self.split = os.path.abspath(os.fspath(out_dir)), split
        self.dir = os.path.join(self.out_dir, NAME, VERSION)
        info_path = os.path.join(self.dir, INFO_FILE)
        if not os.path.isfile(info_path):
            raise DataError(f"no VILA-U dataset at {self.out_dir} (missing {info_path}); write one with "
                                 "fairjax.vila_u.data.write_dataset")
        try:
            with open(info_path) as f:
                self.info = json.load(f)
            self.kind = self.info["kind"]
            count = int(self.info["counts"][split]) if split in self.info["counts"] else None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{info_path} is corrupt ({_short(e)}); rewrite the dataset") from None
        if count is None:
            raise DataError(f"{self.out_dir} has no split {split!r}; it has {sorted(self.info['counts'])}")
        if count == 0:
            raise DataError(f"the {split!r} split of {self.out_dir} is empty; a dataset needs records")
        try:
            z = np.load(os.path.join(self.dir, f"lengths-{split}.npz"))
            self.ids = np.asarray(z["id"])
            self.lengths = {k: np.asarray(z[k]) for k in SEQ_FIELDS[self.kind]}
        except Exception as e:  # noqa: BLE001
            raise DataError(f"lengths-{split}.npz in {self.dir} is missing or corrupt ({_short(e)}); "
                                 "rewrite the dataset") from None
        tfds = _tfds()
        try:
            self.source = tfds.data_source(f"{NAME}:{VERSION}", split=split, data_dir=self.out_dir, download=False)
            n = len(self.source)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"cannot open the {split!r} split of {self.dir} ({_short(e)}); rewrite the dataset") from None
        if n != count or len(self.ids) != n:
            raise DataError(f"the {split!r} split of {self.dir} holds {n} records but {INFO_FILE} says {count}; "
                                 "rewrite the dataset")
        self._get([0, n - 1])  # a truncated array_record file fails here, not mid-training

    @property
    def code_shape(self) -> tuple[int, int] | None:
        cs = self.info.get("code_shape")
        return tuple(cs) if cs else None

    def __len__(self) -> int:
        return len(self.ids)

    def _get(self, idx: Sequence[int]) -> list[dict]:
        try:
            rows = self.source.__getitems__([int(i) for i in idx])
        except Exception as e:  # noqa: BLE001
            raise DataError(f"cannot read records {list(idx)[:4]} of {self.dir} ({_short(e)}); the array_record "
                                 "files are corrupt or truncated: rewrite the dataset") from None
        for r, i in zip(rows, idx):
            if any(r.get(k) is None for k in SEQ_FIELDS[self.kind] + CODE_FIELDS[self.kind]):
                raise DataError(f"record {i} of {self.dir} decodes incompletely; rewrite the dataset")
        return rows

    def read(self, idx: Sequence[int]) -> dict[str, Any]:
        rows = self._get(idx)
        out: dict[str, Any] = {"id": np.asarray([int(r["id"]) for r in rows], np.int64)}
        for k in SEQ_FIELDS[self.kind]:
            out[k] = [np.asarray(r[k], np.int32) for r in rows]
        for k in CODE_FIELDS[self.kind]:
            out[k] = np.stack([np.asarray(r[k], np.int32) for r in rows])
        for k in TEXT_FIELDS[self.kind]:
            out[k] = [r[k].decode("utf-8") if isinstance(r[k], bytes) else str(r[k]) for r in rows]
        if self.kind == "mdpo":
            out["image"] = np.stack([np.asarray(r["image"], np.uint8) for r in rows])
        return out


class SampleView:
    """The images of a ``pairs`` dataset as single samples for SFT: sample ``2p + h`` is half ``h``
    (0 = a, 1 = b) of pair ``p``; an ``images`` dataset is passed through. Same ``read`` interface
    as an ``images`` :class:`VilaUData` (``prompt_ids``, ``codes``, ``id``)."""

    def __init__(self, data: VilaUData):
        if data.kind not in ("images", "pairs"):
            raise DataError(f"{data.out_dir} holds {data.kind!r} records; SFT on image tokens needs an 'images' "
                                 "or 'pairs' dataset")
        self.data, self.out_dir, self.split = data, data.out_dir, data.split
        self.halves = 2 if data.kind == "pairs" else 1
        self.lengths = {"prompt_ids": np.repeat(data.lengths["prompt_ids"], self.halves)}

    def __len__(self) -> int:
        return len(self.data) * self.halves

    def read(self, idx: Sequence[int]) -> dict[str, Any]:
        idx = np.asarray(idx, np.int64)
        if self.halves == 1:
            return self.data.read(idx)
        rows = self.data.read(idx // 2)
        h = (idx % 2).astype(bool)
        return {"id": rows["id"], "prompt_ids": rows["prompt_ids"],
                "codes": np.where(h[:, None, None], rows["codes_b"], rows["codes_a"])}


# ----------------------------------------------------------------------------- padding

def left_pad(seqs: Sequence[np.ndarray], length: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(ids (n, length), mask (n, length))``, each sequence right-aligned (left padding)."""
    ids = np.full((len(seqs), length), pad_id, np.int32)
    mask = np.zeros((len(seqs), length), bool)
    for i, s in enumerate(seqs):
        if len(s) > length:
            raise DataError(f"a sequence of {len(s)} tokens does not fit the padded length {length}")
        if len(s):
            ids[i, length - len(s):], mask[i, length - len(s):] = s, True
    return ids, mask


def right_pad(seqs: Sequence[np.ndarray], length: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(ids (n, length), mask (n, length))``, each sequence left-aligned (right padding)."""
    ids = np.full((len(seqs), length), pad_id, np.int32)
    mask = np.zeros((len(seqs), length), bool)
    for i, s in enumerate(seqs):
        if len(s) > length:
            raise DataError(f"a sequence of {len(s)} tokens does not fit the padded length {length}")
        ids[i, :len(s)], mask[i, :len(s)] = s, True
    return ids, mask


# ----------------------------------------------------------------------------- tiny datasets

TINY_PROMPTS = ("a photo of a doctor", "a photo of a nurse", "a photo of a teacher", "a photo of a chef",
                "a photo of a pilot", "a photo of a farmer", "a photo of a lawyer", "a photo of a baker")


def tiny_group_codes(rng: np.random.Generator, group: int, code_shape: tuple[int, int], codebook_size: int,
                     strength: float = 1.5) -> np.ndarray:
    """Codes of a synthetic image of demographic ``group`` (0 or 1): each code drawn from
    ``softmax(strength * s)`` with ``s = +1`` on the group's half of the codebook, ``-1`` elsewhere."""
    half = (np.arange(codebook_size) < codebook_size // 2) == (group == 0)
    logits = np.where(half, strength, -strength)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    return rng.choice(codebook_size, size=code_shape, p=p).astype(np.int32)


def tiny_pair_records(tokenize: Tokenize, code_shape: tuple[int, int], codebook_size: int, *, per_prompt: int = 4,
                      prompts: Sequence[str] = TINY_PROMPTS, seed: int = 0) -> list[dict]:
    """``per_prompt`` pairs per prompt: half a from group 0 ("male"), half b from group 1 ("female")."""
    rng = np.random.default_rng(seed)
    out = []
    for pid, p in enumerate(prompts):
        ids = generation_ids(tokenize, p)
        for _ in range(per_prompt):
            a = {"id": pid, "prompt": p, "prompt_ids": ids, "group": "male",
                 "codes": tiny_group_codes(rng, 0, code_shape, codebook_size)}
            b = dict(a, group="female", codes=tiny_group_codes(rng, 1, code_shape, codebook_size))
            out.append(pair_record(a, b, where=f"tiny pair {len(out)}"))
    return out


def tiny_mdpo_records(tokenize: Tokenize, eos_id: int, image_size: int, *, prompts: Sequence[str] = TINY_PROMPTS,
                      per_prompt: int = 2, seed: int = 0) -> list[dict]:
    """Per prompt ``per_prompt`` random images; question "what is this person's job?", chosen = the
    prompt's occupation, rejected = the next prompt's."""
    rng = np.random.default_rng(seed)
    jobs = [p.split()[-1] for p in prompts]
    out = []
    for i, job in enumerate(jobs):
        for _ in range(per_prompt):
            img = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
            rec = mdpo_ids(tokenize, eos_id, "what is this person's job?", f"the person is a {job}",
                           f"the person is a {jobs[(i + 1) % len(jobs)]}")
            out.append({"id": len(out), "image": img, **rec})
    return out
