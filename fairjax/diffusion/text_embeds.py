"""Text conditioning computed once per caption with the frozen encoders, cached in a file.

Fine-tuning never trains the text encoders, so every caption's conditioning is a
constant: it is computed here once, before training, and the train step only
gathers rows of a table (it never runs an encoder).  As the diffusers pipelines
compute it:

* SDXL (a model dir with ``text_encoder/`` and ``text_encoder_2/``)::

      encoder_hidden_states = concat(text_encoder(ids).hidden_states[-2],
                                     text_encoder_2(ids_2).hidden_states[-2])   (T, 768 + 1280)
      text_embeds           = text_encoder_2(ids_2).text_embeds                  (1280,)

* SD 1.x / 2.x (only ``text_encoder/``)::

      encoder_hidden_states = text_encoder(ids).last_hidden_state                (T, 768 | 1024)

``ids`` / ``ids_2`` come from the model dir's ``tokenizer/`` / ``tokenizer_2/``
(:mod:`fairjax.models.tokenizer`, 77 tokens).  Row 0 of every table is the empty
caption ``""`` (the conditioning of a dropped caption: the reference trainers
replace a dropped caption by ``""`` and encode it, they do not zero it).

Cache file (safetensors, written atomically): tensors ``encoder_hidden_states``
``(N, T, D)`` and, for SDXL, ``text_embeds`` ``(N, P)``; metadata ``format``,
``fingerprint`` (of the encoder/tokenizer files and the compute dtype) and
``captions`` (JSON list, row order).  A cache is reused when its fingerprint
matches and it holds every caption asked for; otherwise it is recomputed and
replaced.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fairjax.errors import CheckpointError, DataError
from fairjax.io.safetensors import SafetensorsReader, write_safetensors

log = logging.getLogger(__name__)

FORMAT = "fairjax.diffusion.text_embeds"
EMPTY = ""


# ----------------------------------------------------------------------------- the table


@dataclasses.dataclass
class TextTable:
    """Per-caption conditioning: row ``i`` belongs to ``captions[i]``; ``captions[0] == ""``.

    ``text_embeds`` is None for models without pooled conditioning (SD 1.x / 2.x).
    """

    captions: list[str]
    encoder_hidden_states: np.ndarray  # (N, T, D)
    text_embeds: np.ndarray | None = None  # (N, P)

    def __post_init__(self):
        if not self.captions or self.captions[0] != EMPTY:
            raise DataError('a text-embedding table must start with the empty caption ""')
        self.index = {c: i for i, c in enumerate(self.captions)}
        if len(self.index) != len(self.captions):
            raise DataError("a text-embedding table lists a caption twice")
        n = len(self.captions)
        if self.encoder_hidden_states.shape[0] != n or (
                self.text_embeds is not None and self.text_embeds.shape[0] != n):
            raise DataError(f"text-embedding table: {n} captions but encoder_hidden_states "
                                 f"{self.encoder_hidden_states.shape} / text_embeds "
                                 f"{None if self.text_embeds is None else self.text_embeds.shape}")

    @property
    def context_shape(self) -> tuple[int, int]:
        """``(T, D)`` of one caption's ``encoder_hidden_states``."""
        return tuple(self.encoder_hidden_states.shape[1:])

    @property
    def pooled_dim(self) -> int | None:
        return None if self.text_embeds is None else int(self.text_embeds.shape[1])

    def ids(self, captions: Sequence[str]) -> np.ndarray:
        """Row index of each caption (int32); a caption not in the table is a one-line error."""
        try:
            return np.asarray([self.index[str(c)] for c in captions], np.int32)
        except KeyError as e:
            raise DataError(f"caption {e.args[0]!r} has no precomputed text embedding; "
                                 "recompute the cache (delete it) for this dataset") from None

    def gather(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """``{'encoder_hidden_states': (n, T, D), 'text_embeds': (n, P)}`` (the latter only for SDXL)."""
        out = {"encoder_hidden_states": self.encoder_hidden_states[ids]}
        if self.text_embeds is not None:
            out["text_embeds"] = self.text_embeds[ids]
        return out


def table_captions(captions: Sequence[str]) -> list[str]:
    """``[""] + sorted(distinct non-empty captions)``: the row order of a table."""
    return [EMPTY] + sorted({str(c) for c in captions} - {EMPTY})


# ----------------------------------------------------------------------------- encoders


@dataclasses.dataclass
class Encoders:
    """The frozen text encoders of a model dir (modules, params, tokenizers)."""

    kind: str  # "sdxl" | "single"
    modules: list
    params: list
    tokenizers: list
    fingerprint: str


def _file_digest(path: str, h) -> None:
    """Feed ``path``'s identity into ``h``: its size, and for big files the first and last
    MiB plus the safetensors header (cheap; a changed weight file changes its bytes)."""
    size = os.path.getsize(path)
    h.update(f"{os.path.basename(path)}:{size}:".encode())
    with open(path, "rb") as f:
        if size <= 4 << 20:
            h.update(f.read())
            return
        h.update(f.read(1 << 20))
        f.seek(size // 2)
        h.update(f.read(1 << 20))
        f.seek(size - (1 << 20))
        h.update(f.read(1 << 20))


def encoders_fingerprint(model_dir: str, components: Sequence[str], tokenizer_dirs: Sequence[str]) -> str:
    """sha256 over the encoder configs/params and the tokenizer files (see :func:`_file_digest`)."""
    from fairjax.io.model_dir import CONFIG_FILE, component_dir, params_file

    h = hashlib.sha256()
    for comp in components:
        folder = component_dir(model_dir, comp)
        for path in (os.path.join(folder, CONFIG_FILE), params_file(folder)):  # a link names its sources' size+mtime
            _file_digest(path, h)
    for tdir in tokenizer_dirs:
        for name in sorted(os.listdir(tdir)):
            p = os.path.join(tdir, name)
            if os.path.isfile(p):
                _file_digest(p, h)
    return h.hexdigest()


def encoder_layout(model_dir: str) -> tuple[list[str], list[str]]:
    """``(encoder components, tokenizer folders)``: SDXL's two when ``text_encoder_2/`` exists,
    else SD 1.x / 2.x's one; a missing folder is a one-line error."""
    model_dir = os.fspath(model_dir)
    has2 = os.path.isdir(os.path.join(model_dir, "text_encoder_2"))
    comps = ["text_encoder", "text_encoder_2"] if has2 else ["text_encoder"]
    tdirs = [os.path.join(model_dir, "tokenizer" + c[len("text_encoder"):]) for c in comps]
    for c, t in zip(comps, tdirs):
        if not os.path.isdir(os.path.join(model_dir, c)) or not os.path.isdir(t):
            raise DataError(f"{model_dir}: text conditioning needs {c}/ and {os.path.basename(t)}/ "
                                 "(convert the pipeline's text encoders and copy its tokenizer folders there)")
    return comps, tdirs


def load_encoders(model_dir: str) -> Encoders:
    """SDXL encoders when the model dir has ``text_encoder_2/`` + ``tokenizer_2/``, else the single
    ``text_encoder/`` + ``tokenizer/`` of SD 1.x / 2.x.  Float32 (run once, kept exact)."""
    from fairjax.models import clip_text
    from fairjax.models.tokenizer import CLIPTokenizer

    comps, tdirs = encoder_layout(model_dir)
    has2 = len(comps) == 2
    try:
        loaded = [clip_text.load(model_dir, c) for c in comps]
        toks = [CLIPTokenizer.from_folder(t) for t in tdirs]
    except CheckpointError as e:
        raise DataError(str(e)) from None
    if has2 and not loaded[1][0].config.with_projection:
        raise DataError(f"{model_dir}/text_encoder_2 is not a CLIPTextModelWithProjection; SDXL needs its "
                             "pooled text_embeds")
    return Encoders("sdxl" if has2 else "single", [m for m, _ in loaded], [p for _, p in loaded], toks,
                    encoders_fingerprint(model_dir, comps, tdirs))


def encode_ids(enc: Encoders, params: list, ids: list[jax.Array]) -> tuple[jax.Array, jax.Array | None]:
    """Pure: token ids (one (B, T) array per encoder) -> ``(encoder_hidden_states, text_embeds | None)``."""
    if enc.kind == "single":
        out = enc.modules[0].apply({"params": params[0]}, ids[0])
        return out.last_hidden_state, None
    o1 = enc.modules[0].apply({"params": params[0]}, ids[0], output_hidden_states=True)
    o2 = enc.modules[1].apply({"params": params[1]}, ids[1], output_hidden_states=True)
    return jnp.concatenate([o1.hidden_states[-2], o2.hidden_states[-2]], axis=-1), o2.text_embeds


def encode_captions(enc: Encoders, captions: Sequence[str], batch_size: int = 16) -> TextTable:
    """The table for ``table_captions(captions)``, encoded ``batch_size`` captions at a time
    (the last batch padded, so one program is compiled)."""
    rows = table_captions(captions)
    fn = jax.jit(lambda p, ids: encode_ids(enc, p, ids))
    ehs, pooled = [], []
    bs = max(1, int(batch_size))
    for start in range(0, len(rows), bs):
        chunk = rows[start:start + bs]
        padded = chunk + [EMPTY] * (bs - len(chunk))
        ids = [jnp.asarray(t(padded)) for t in enc.tokenizers]
        e, p = fn(enc.params, ids)
        ehs.append(np.asarray(e, np.float32)[:len(chunk)])
        if p is not None:
            pooled.append(np.asarray(p, np.float32)[:len(chunk)])
    return TextTable(rows, np.concatenate(ehs), np.concatenate(pooled) if pooled else None)


# ----------------------------------------------------------------------------- the cache file


def read_cache(path: str) -> tuple[TextTable, str]:
    """``(table, fingerprint)`` from a cache file (one-line error if it is not one)."""
    try:
        with SafetensorsReader(path) as r:
            md = dict(r.metadata)
            if md.get("format") != FORMAT:
                raise DataError(f"{path} is not a fairjax text-embedding cache (format "
                                     f"{md.get('format')!r}) and is left as it is; choose another path for the cache")
            ehs = np.array(r["encoder_hidden_states"])
            te = np.array(r["text_embeds"]) if "text_embeds" in r else None
    except CheckpointError as e:
        raise DataError(f"unreadable text-embedding cache ({e}); it is left as it is: delete it if it is an old cache, "
                        "else choose another path for the cache") from None
    try:
        captions = json.loads(md["captions"])
    except (KeyError, json.JSONDecodeError):
        raise DataError(f"{path}: corrupt text-embedding cache metadata; delete it") from None
    return TextTable(captions, ehs, te), md.get("fingerprint", "")


def write_cache(path: str, table: TextTable, fingerprint: str) -> None:
    items = [("encoder_hidden_states", np.ascontiguousarray(table.encoder_hidden_states))]
    if table.text_embeds is not None:
        items.append(("text_embeds", np.ascontiguousarray(table.text_embeds)))
    write_safetensors(path, items, {"format": FORMAT, "fingerprint": fingerprint,
                                    "captions": json.dumps(table.captions)})


def cached_table(model_dir: str, captions: Sequence[str], path: str | None, *, batch_size: int = 16,
                 write: bool | None = None) -> TextTable:
    """The table for ``captions``: read from ``path`` when it is a matching cache, else encode
    with ``model_dir``'s encoders and (when ``write``, default: on process 0) save it there.

    A cache matches when its fingerprint is that of ``model_dir``'s encoder/tokenizer files
    and it holds every caption (it may hold more).  ``path=None``: no cache, always encode.
    """
    want = table_captions(captions)
    comps, tdirs = encoder_layout(model_dir)
    try:
        fp = encoders_fingerprint(model_dir, comps, tdirs)
    except (CheckpointError, OSError) as e:
        raise DataError(f"{model_dir}: cannot read the text encoders ({e})") from None
    if path and os.path.isfile(path):
        table, old_fp = read_cache(path)
        if old_fp == fp and set(want) <= set(table.captions):
            log.info("text embeddings: %d captions from %s", len(want), path)
            return table
        log.info("text embeddings: %s is stale (other encoders or captions); recomputing", path)
    enc = load_encoders(model_dir)
    table = encode_captions(enc, want, batch_size)
    if path and (jax.process_index() == 0 if write is None else write):
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        write_cache(path, table, fp)
        log.info("text embeddings: %d captions written to %s", len(want), path)
    return table
