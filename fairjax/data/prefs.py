"""Preference datasets: TFDS ``array_record`` files, written and read without TensorFlow.

A record is one generated sample::

    {"latents": float array (same shape in every record), "caption": str,
     "is_winner": bool, "set_id": int,
     "image": PNG bytes (optional; all records or none),
     "labels": {name: int} (optional; the same names in every record),
     "prompt": str (optional; all records or none: the prompt the sample was generated
               from, e.g. a winner's identity prompt, where the caption is its set's neutral prompt)}

Writing (:func:`write_preference_dataset`) goes through a ``tfds.core.GeneratorBasedBuilder``
with ``file_format='array_record'`` and ``disable_shuffling=True`` (record ``i`` of the
input is record ``i`` of the split): it needs tensorflow-datasets, array_record and
importlib_resources but not TensorFlow.  (``tfds.dataset_builders.store_as_tfds_dataset``
does need TensorFlow -- it checks ``isinstance(x, tf.data.Dataset)`` -- so it is not used.)
The whole dataset is built in a temporary directory and renamed into place.  Layout::

    <out_dir>/fairjax_preferences/1.0.0/{dataset_info.json, features.json,
        fairjax_preferences-<split>.array_record-0000X-of-0000N, fairjax_index.json,
        index-<split>.npz}

``fairjax_index.json`` holds the user's metadata and the field names; ``index-<split>.npz``
the ``set_id`` / ``is_winner`` columns, so pairs are formed without reading records.

Reading (:class:`PreferenceData`) uses ``tfds.data_source('fairjax_preferences:1.0.0',
data_dir=out_dir)`` -- random access, no TensorFlow -- with images left as PNG bytes
unless ``decode_images``.

Batching (:class:`PreferenceBatches`) is a pure function of the step: with ``U`` units
(records, or winner/loser pairs) and global batch ``B``, ``steps_per_epoch = U // B``
(the remainder of each epoch is dropped), ``epoch = step // steps_per_epoch``, the
epoch's order is ``np.random.default_rng([seed, epoch]).permutation(U)`` (or ``arange``
when ``shuffle=False``), global batch ``step`` is the ``step % steps_per_epoch``-th block of
``B`` units in it, and process ``i`` of ``n`` gets rows ``[i*B/n, (i+1)*B/n)`` of that batch.
Resuming at step ``s`` therefore reads exactly what an uninterrupted run reads.

Pairs: within a ``set_id`` the k-th winner (in record order) is paired with the k-th
loser; surplus records of the larger side are not used.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from fairjax.errors import DataError

log = logging.getLogger(__name__)

NAME = "fairjax_preferences"
VERSION = "1.0.0"
INDEX_FILE = "fairjax_index.json"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - environment problem
        raise DataError(
            f"preference datasets need tensorflow-datasets, array_record and importlib_resources ({e}); "
            "pip install 'fairjax[data]'"
        ) from None
    return tfds


def dataset_dir(out_dir: str) -> str:
    return os.path.join(os.path.abspath(os.fspath(out_dir)), NAME, VERSION)


# ----------------------------------------------------------------------------- writing


def _features(latent_shape, latent_dtype, label_names, has_image, has_prompt=False):
    tfds = _tfds()
    f = {
        "latents": tfds.features.Tensor(shape=tuple(latent_shape), dtype=latent_dtype),
        "caption": tfds.features.Text(),
        "is_winner": tfds.features.Scalar(dtype=np.bool_),
        "set_id": tfds.features.Scalar(dtype=np.int64),
    }
    if label_names:
        f["labels"] = tfds.features.FeaturesDict({n: tfds.features.Scalar(dtype=np.int64) for n in label_names})
    if has_image:
        f["image"] = tfds.features.Image(shape=(None, None, 3), encoding_format="png")
    if has_prompt:
        f["prompt"] = tfds.features.Text()
    return tfds.features.FeaturesDict(f)


class _Schema:
    """What every record must look like, taken from the first record."""

    def __init__(self, first: Mapping[str, Any], latent_dtype):
        if "latents" not in first:
            raise DataError("record 0 has no 'latents'; every record needs latents, caption, is_winner, set_id")
        self.latent_shape = np.shape(first["latents"])
        self.latent_dtype = np.dtype(latent_dtype)
        self.label_names = tuple(sorted((first.get("labels") or {}).keys()))
        self.has_image = first.get("image") is not None
        self.has_prompt = first.get("prompt") is not None

    def check(self, i: int, r: Mapping[str, Any]) -> dict:
        """Validate record ``i`` and return it in TFDS form."""
        missing = [k for k in ("latents", "caption", "is_winner", "set_id") if k not in r]
        if missing:
            raise DataError(f"record {i} lacks {missing}; every record needs latents, caption, is_winner, set_id")
        extra = sorted(set(r) - {"latents", "caption", "is_winner", "set_id", "image", "labels", "prompt"})
        if extra:
            raise DataError(f"record {i} has unknown fields {extra}; allowed: latents, caption, is_winner, set_id, "
                                 "image, labels, prompt")
        lat = np.asarray(r["latents"])
        if lat.shape != self.latent_shape:
            raise DataError(f"record {i}: latents shape {lat.shape} differs from record 0's {self.latent_shape}")
        if not np.issubdtype(lat.dtype, np.floating):
            raise DataError(f"record {i}: latents must be a float array, got {lat.dtype}")
        if not np.all(np.isfinite(lat)):
            raise DataError(f"record {i}: latents hold NaN/inf")
        if not isinstance(r["caption"], str):
            raise DataError(f"record {i}: caption must be a str, got {type(r['caption']).__name__}")
        if not isinstance(r["is_winner"], (bool, np.bool_)):
            raise DataError(f"record {i}: is_winner must be a bool, got {r['is_winner']!r}")
        if not isinstance(r["set_id"], (int, np.integer)) or isinstance(r["set_id"], bool):
            raise DataError(f"record {i}: set_id must be an int, got {r['set_id']!r}")
        out = {"latents": lat.astype(self.latent_dtype), "caption": r["caption"],
               "is_winner": bool(r["is_winner"]), "set_id": int(r["set_id"])}
        labels = r.get("labels") or {}
        if tuple(sorted(labels)) != self.label_names:
            raise DataError(f"record {i}: labels {sorted(labels)} differ from record 0's {list(self.label_names)}")
        if labels:
            bad = [k for k, v in labels.items() if not isinstance(v, (int, np.integer)) or isinstance(v, bool)]
            if bad:
                raise DataError(f"record {i}: labels {bad} must be ints")
            out["labels"] = {k: int(v) for k, v in labels.items()}
        img = r.get("image")
        if (img is not None) != self.has_image:
            raise DataError(f"record {i}: {'no' if img is None else 'an'} image, unlike record 0; give images for all records or none")
        if img is not None:
            if not isinstance(img, (bytes, bytearray)) or not bytes(img[:8]) == _PNG_MAGIC:
                raise DataError(f"record {i}: image must be PNG bytes")
            out["image"] = _png_rgb(bytes(img), i)
        prompt = r.get("prompt")
        if (prompt is not None) != self.has_prompt:
            raise DataError(f"record {i}: {'no' if prompt is None else 'a'} prompt, unlike record 0; give prompts "
                                 "for all records or none")
        if prompt is not None:
            if not isinstance(prompt, str):
                raise DataError(f"record {i}: prompt must be a str, got {type(prompt).__name__}")
            out["prompt"] = prompt
        return out


def _png_rgb(data: bytes, i: int) -> bytes:
    """PNG bytes as an RGB PNG (TFDS's Image feature stores 3 channels); unchanged if already RGB."""
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except Exception as e:  # noqa: BLE001
        raise DataError(f"record {i}: image is not a readable PNG ({type(e).__name__}: {e})") from None
    if im.mode == "RGB":
        return data
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def _builder_class():
    tfds = _tfds()

    class FairjaxPreferences(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Preference records written by fairjax (see fairjax.data.prefs)."""

        VERSION = tfds.core.Version(VERSION)
        name = NAME

        def __init__(self, *, feature_spec, split_records, description, **kwargs):
            self._feature_spec = feature_spec
            self._split_records = split_records
            self._description = description
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, description=self._description, features=self._feature_spec, disable_shuffling=True
            )

        def _split_generators(self, dl_manager):
            return {name: self._generate_examples(recs) for name, recs in self._split_records.items()}

        def _generate_examples(self, records):
            yield from records

    return FairjaxPreferences


def write_preference_dataset(
    out_dir: str,
    records: Iterable[Mapping[str, Any]] | Mapping[str, Iterable[Mapping[str, Any]]],
    *,
    split: str = "train",
    latent_dtype=np.float32,
    metadata: Mapping[str, Any] | None = None,
    description: str = "fairjax preference records (population-level preference pairs)",
    overwrite: bool = False,
    progress: bool = False,
) -> dict:
    """Write ``records`` (an iterable, streamed once; or ``{split: iterable}``) as a TFDS
    array_record dataset under ``out_dir``; returns ``{split: number of records}``.

    Every record is checked against the first (fields, latent shape, label names, image
    presence); a bad record, an empty split or an existing ``out_dir`` (unless
    ``overwrite``) is a one-line :class:`DataError` and nothing is left behind.
    ``progress``: show TFDS's progress bars and messages (off by default).
    """
    tfds = _tfds()
    from fairjax.io.model_dir import atomic_output_dir

    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not overwrite:
        raise DataError(f"{out_dir} already exists; choose another directory or pass overwrite=True")
    split_iters = dict(records) if isinstance(records, Mapping) else {split: records}
    if not split_iters:
        raise DataError("no splits given; pass an iterable of records")
    schema = None
    columns: dict[str, dict[str, list]] = {}
    gens = {}
    for name, recs in split_iters.items():
        it = iter(recs)
        first = next(it, None)
        if first is None:
            raise DataError(f"split {name!r} has no records; a preference dataset needs at least one")
        if schema is None:
            schema = _Schema(first, latent_dtype)
        columns[name] = {"set_id": [], "is_winner": []}
        gens[name] = _checked(schema, itertools.chain([first], it), columns[name])

    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        features = _features(schema.latent_shape, schema.latent_dtype, schema.label_names, schema.has_image,
                             schema.has_prompt)
        cls = _builder_class()
        b = cls(feature_spec=features, split_records=gens, description=description,
                data_dir=tmp, file_format="array_record")
        with _quiet(not progress):
            b.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
        vdir = os.path.join(tmp, NAME, VERSION)
        counts = {}
        for name, col in columns.items():
            np.savez(os.path.join(vdir, f"index-{name}.npz"), set_id=np.asarray(col["set_id"], np.int64),
                     is_winner=np.asarray(col["is_winner"], np.bool_))
            counts[name] = len(col["set_id"])
        info = {
            "format": "fairjax_preferences",
            "version": VERSION,
            "counts": counts,
            "latent_shape": list(schema.latent_shape),
            "latent_dtype": schema.latent_dtype.name,
            "label_names": list(schema.label_names),
            "has_image": schema.has_image,
            "has_prompt": schema.has_prompt,
            "metadata": dict(metadata or {}),
        }
        with open(os.path.join(vdir, INDEX_FILE), "w") as f:
            json.dump(info, f, indent=2, default=str)
    return counts


@contextlib.contextmanager
def _quiet(on: bool):
    """Silence TFDS's "Downloading and preparing" print and its tqdm bars (nothing is downloaded)."""
    if not on:
        yield
        return
    from tensorflow_datasets.core.utils import tqdm_utils

    was = tqdm_utils._active
    tqdm_utils.display_progress_bar(False)
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            yield
    finally:
        tqdm_utils.display_progress_bar(was)


def _checked(schema: _Schema, records: Iterator, columns: dict[str, list]):
    for i, r in enumerate(records):
        ex = schema.check(i, r)
        columns["set_id"].append(ex["set_id"])
        columns["is_winner"].append(ex["is_winner"])
        yield i, ex


# ----------------------------------------------------------------------------- reading


class PreferenceData:
    """Random access to one split of a preference dataset (``tfds.data_source``, no TensorFlow).

    ``data[i]`` is record ``i`` as written (caption ``str``, image PNG ``bytes`` unless
    ``decode_images``); :meth:`read` stacks several into arrays.  Missing, empty or
    unreadable files raise a one-line :class:`DataError`.
    """

    def __init__(self, out_dir: str, split: str = "train", decode_images: bool = False):
        self.out_dir = os.path.abspath(os.fspath(out_dir))
        self.split = split
        self.dir = dataset_dir(self.out_dir)
        info_path = os.path.join(self.dir, "dataset_info.json")
        if not os.path.isfile(info_path):
            raise DataError(
                f"no preference dataset at {self.out_dir} (missing {info_path}); write one with "
                "fairjax.data.prefs.write_preference_dataset"
            )
        try:
            with open(os.path.join(self.dir, INDEX_FILE)) as f:
                self.info = json.load(f)
        except (OSError, ValueError) as e:
            raise DataError(f"{os.path.join(self.dir, INDEX_FILE)} is missing or corrupt ({e}); rewrite the dataset") from None
        if split not in self.info["counts"]:
            raise DataError(f"{self.out_dir} has no split {split!r}; it has {sorted(self.info['counts'])}")
        self.has_image = bool(self.info["has_image"])
        self.has_prompt = bool(self.info.get("has_prompt", False))  # datasets written before the field: none
        self.label_names = list(self.info["label_names"])
        tfds = _tfds()
        decoders = {"image": tfds.decode.SkipDecoding()} if self.has_image and not decode_images else None
        self.decode_images = decode_images
        try:
            self.source = tfds.data_source(f"{NAME}:{VERSION}", split=split, data_dir=self.out_dir,
                                           download=False, decoders=decoders)
            n = len(self.source)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"cannot open the {split!r} split of {self.dir} ({_short(e)}); rewrite the dataset") from None
        if n == 0:
            raise DataError(f"the {split!r} split of {self.out_dir} is empty; a preference dataset needs records")
        if n != self.info["counts"][split]:
            raise DataError(
                f"the {split!r} split of {self.dir} holds {n} records but {INDEX_FILE} says {self.info['counts'][split]}; rewrite the dataset"
            )
        try:
            idx = np.load(os.path.join(self.dir, f"index-{split}.npz"))
            self.set_id, self.is_winner = np.asarray(idx["set_id"]), np.asarray(idx["is_winner"])
        except Exception as e:  # noqa: BLE001
            raise DataError(f"index-{split}.npz in {self.dir} is missing or corrupt ({_short(e)}); rewrite the dataset") from None
        if len(self.set_id) != n:
            raise DataError(f"index-{split}.npz in {self.dir} has {len(self.set_id)} rows for {n} records; rewrite the dataset")
        # touch both ends: a truncated array_record shard fails here, not mid-training
        self._get([0, n - 1])

    def __len__(self) -> int:
        return len(self.set_id)

    def __getitem__(self, i: int) -> dict:
        return self._get([int(i)])[0]

    def _get(self, idx: Sequence[int]) -> list[dict]:
        try:
            rows = self.source.__getitems__(list(idx))
        except Exception as e:  # noqa: BLE001
            raise DataError(
                f"cannot read records {list(idx)[:4]}... of {self.dir} ({_short(e)}); the array_record files are "
                "corrupt or truncated: rewrite the dataset"
            ) from None
        return [self._clean(r, i) for r, i in zip(rows, idx)]

    def _clean(self, r: Mapping[str, Any], i: int) -> dict:
        """Decoded record -> python values; a record that decodes to nothing (damaged file) is an error."""
        bad = [k for k in ("latents", "caption", "is_winner", "set_id") if r.get(k) is None]
        lat = r.get("latents")
        if not bad and tuple(np.shape(lat)) != tuple(self.info["latent_shape"]):
            bad = ["latents"]
        if bad:
            raise DataError(
                f"record {i} of {self.dir} decodes without {bad}; the array_record files are corrupt or truncated: "
                "rewrite the dataset"
            )
        out = dict(r)
        for key in ("caption", "prompt"):  # prompt: only in datasets that have it
            if key in out:
                out[key] = out[key].decode("utf-8") if isinstance(out[key], bytes) else str(out[key])
        out["is_winner"] = bool(out["is_winner"])
        out["set_id"] = int(out["set_id"])
        if "labels" in out:
            out["labels"] = {k: int(v) for k, v in out["labels"].items()}
        return out

    def read(self, idx: Sequence[int]) -> dict[str, np.ndarray]:
        """Records ``idx`` stacked: ``latents (n, ...)``, ``caption (n,) str``, ``is_winner (n,)``,
        ``set_id (n,)``, ``label_<name> (n,)``, ``image`` ((n,) PNG bytes, or (n, H, W, 3) uint8 decoded),
        ``prompt (n,) str`` (when the dataset has prompts)."""
        rows = self._get(idx)
        out = {
            "latents": np.stack([r["latents"] for r in rows]),
            "caption": np.asarray([r["caption"] for r in rows], dtype=object),
            "is_winner": np.asarray([r["is_winner"] for r in rows], np.bool_),
            "set_id": np.asarray([r["set_id"] for r in rows], np.int64),
        }
        for name in self.label_names:
            out[f"label_{name}"] = np.asarray([r["labels"][name] for r in rows], np.int64)
        if self.has_prompt:
            out["prompt"] = np.asarray([r["prompt"] for r in rows], dtype=object)
        if self.has_image:
            imgs = [r["image"] for r in rows]
            out["image"] = np.stack(imgs) if self.decode_images else np.asarray(imgs, dtype=object)
        return out

    def pairs(self) -> np.ndarray:
        """``(P, 2)`` record indices ``[winner, loser]``: per set_id the k-th winner with the k-th loser."""
        out = []
        for sid in np.unique(self.set_id):
            rows = np.flatnonzero(self.set_id == sid)
            w, l = rows[self.is_winner[rows]], rows[~self.is_winner[rows]]
            k = min(len(w), len(l))
            out.append(np.stack([w[:k], l[:k]], axis=1))
        return np.concatenate(out, 0) if out else np.zeros((0, 2), np.int64)


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg[:200]}" if msg else type(e).__name__


class PreferenceBatches:
    """Deterministic, epoch-aware, per-host batches of a :class:`PreferenceData` (see module docstring).

    ``unit='record'``: a batch is ``data.read(indices)``.
    ``unit='pair'``: a batch is ``{'w_<field>': ..., 'l_<field>': ...}`` for winner/loser pairs.
    """

    def __init__(self, data: PreferenceData, batch_size: int, seed: int = 0, shuffle: bool = True, unit: str = "record"):
        if unit not in ("record", "pair"):
            raise DataError(f"unit={unit!r} is not 'record' or 'pair'")
        self.data, self.batch_size, self.seed, self.shuffle, self.unit = data, int(batch_size), int(seed), shuffle, unit
        self._pairs = data.pairs() if unit == "pair" else None
        n = len(self._pairs) if unit == "pair" else len(data)
        if n == 0:
            raise DataError(f"{data.out_dir} ({data.split}) has no winner/loser pairs: no set_id has both a winner and a loser")
        if self.batch_size <= 0 or n < self.batch_size:
            raise DataError(
                f"{data.out_dir} ({data.split}) has {n} {unit}s, fewer than the global batch {self.batch_size}; "
                "lower batch_size or add data"
            )
        self.num_units = n
        self.steps_per_epoch = n // self.batch_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_units)
        return np.random.default_rng([self.seed, int(epoch)]).permutation(self.num_units)

    def global_indices(self, step: int) -> np.ndarray:
        """Unit indices of global batch ``step`` (``epoch = step // steps_per_epoch``)."""
        epoch, i = divmod(int(step), self.steps_per_epoch)
        return self.epoch_order(epoch)[i * self.batch_size:(i + 1) * self.batch_size]

    def batch(self, step: int, process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
        """This process's rows ``[i*B/n, (i+1)*B/n)`` of global batch ``step``."""
        if self.batch_size % process_count:
            raise DataError(f"global batch {self.batch_size} does not divide over {process_count} processes")
        per = self.batch_size // process_count
        units = self.global_indices(step)[process_index * per:(process_index + 1) * per]
        if self.unit == "record":
            return self.data.read(units)
        pairs = self._pairs[units]
        w, l = self.data.read(pairs[:, 0]), self.data.read(pairs[:, 1])
        return {**{f"w_{k}": v for k, v in w.items()}, **{f"l_{k}": v for k, v in l.items()}}
