"""Winner/loser pair sources and the deterministic, resumable order the trainer reads them in.

A source is an in-memory :class:`ArrayPrefs` (tests, small experiments) or a TFDS array_record
:class:`fairjax.data.prefs.PreferenceData`; both pair the k-th winner of a ``set_id`` with its k-th
loser. The order is an epoch-wise permutation that is a pure function of ``(seed, step)``, so a
resumed run reads exactly what an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from fairjax.errors import ConfigError, DataError


class PairSource(Protocol):
    """What the task reads: preference records with winner/loser pairs (:class:`ArrayPrefs`, or
    :class:`fairjax.data.prefs.PreferenceData` whose ``info['latent_shape']`` gives the shape)."""

    is_winner: np.ndarray

    def pairs(self) -> np.ndarray: ...  # (P, 2) record indices [winner, loser]

    def read(self, idx: Sequence[int]) -> dict[str, np.ndarray]: ...  # latents (n, ...), caption (n,)


class ArrayPrefs:
    """In-memory preference records (tests, small experiments), with the same pairing rule as
    :class:`fairjax.data.prefs.PreferenceData`: within a ``set_id`` the k-th winner is paired with
    the k-th loser."""

    def __init__(self, latents, captions, is_winner, set_id, prompts=None):
        self.latents = np.asarray(latents)
        self.captions = [str(c) for c in captions]
        self.prompts = None if prompts is None else [str(p) for p in prompts]
        self.is_winner = np.asarray(is_winner, bool)
        self.set_id = np.asarray(set_id, np.int64)
        n = len(self.latents)
        if not n:
            raise DataError("the preference dataset is empty; it needs winner and loser records")
        if not len(self.captions) == len(self.is_winner) == len(self.set_id) == (n if self.prompts is None else len(self.prompts)) == n:
            raise DataError(f"ArrayPrefs: {n} latents but {len(self.captions)} captions, "
                            f"{len(self.is_winner)} is_winner, {len(self.set_id)} set_id"
                            + ("" if self.prompts is None else f", {len(self.prompts)} prompts"))
        self.latent_shape = tuple(self.latents.shape[1:])

    @classmethod
    def from_records(cls, records: Sequence[dict]) -> "ArrayPrefs":
        if not records:
            raise DataError("the preference dataset is empty; it needs winner and loser records")
        prompts = [r["prompt"] for r in records] if all("prompt" in r for r in records) else None
        return cls(np.stack([r["latents"] for r in records]), [r["caption"] for r in records],
                   [r["is_winner"] for r in records], [r["set_id"] for r in records], prompts)

    @property
    def has_prompt(self) -> bool:
        return self.prompts is not None

    def __len__(self) -> int:
        return len(self.latents)

    def pairs(self) -> np.ndarray:
        out = []
        for sid in np.unique(self.set_id):
            rows = np.flatnonzero(self.set_id == sid)
            w, l = rows[self.is_winner[rows]], rows[~self.is_winner[rows]]
            k = min(len(w), len(l))
            out.append(np.stack([w[:k], l[:k]], axis=1))
        return np.concatenate(out, 0) if out else np.zeros((0, 2), np.int64)

    def read(self, idx) -> dict[str, np.ndarray]:
        idx = np.asarray(idx, np.int64)
        out = {"latents": self.latents[idx], "caption": np.asarray([self.captions[i] for i in idx], dtype=object)}
        if self.prompts is not None:
            out["prompt"] = np.asarray([self.prompts[i] for i in idx], dtype=object)
        return out

    def all_captions(self, prompts: bool = False) -> list[str]:
        caps = set(self.captions)
        if prompts:
            caps.update(p for p, w in zip(self.prompts or [], self.is_winner) if w)
        return sorted(caps)


def open_source(path: str, split: str = "train") -> PairSource:
    """A :class:`fairjax.data.prefs.PreferenceData` (TFDS array_record) at ``path``."""
    from fairjax.data import prefs

    if not path:
        raise ConfigError("config.data.path is empty; point it at a preference dataset "
                        "(fairjax.data.prefs.write_preference_dataset) or use the :tiny preset")
    return prefs.PreferenceData(path, split)


def latent_shape(source) -> tuple[int, ...]:
    """Per-record latent shape: ``source.latent_shape``, or the prefs dataset's index entry."""
    if hasattr(source, "latent_shape"):
        return tuple(source.latent_shape)
    return tuple(source.info["latent_shape"])


def all_captions(source, chunk: int = 256, prompts: bool = False) -> list[str]:
    """Every distinct caption of a source, and with ``prompts`` every winner's ``prompt`` too (its
    ``all_captions()`` when it has one, else one pass of reads)."""
    if hasattr(source, "all_captions"):
        return list(source.all_captions(prompts=prompts))
    caps: set[str] = set()
    win = np.asarray(source.is_winner, bool)
    n = len(win)
    for start in range(0, n, chunk):
        rec = source.read(np.arange(start, min(n, start + chunk)))
        caps.update(str(c) for c in rec["caption"])
        if prompts:
            caps.update(str(p) for p, w in zip(rec["prompt"], win[start:start + chunk]) if w)
    return sorted(caps)


def epoch_order(num_units: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """``default_rng([seed, epoch]).permutation(num_units)`` (``arange`` without shuffling)."""
    return np.random.default_rng([seed, int(epoch)]).permutation(num_units) if shuffle else np.arange(num_units)


def step_units(num_units: int, per_step: int, seed: int, step: int, shuffle: bool = True) -> np.ndarray:
    """Unit indices of global batch ``step``: block ``step % (U // B)`` of epoch ``step // (U // B)``'s order."""
    per_epoch = num_units // per_step
    epoch, i = divmod(int(step), per_epoch)
    return epoch_order(num_units, seed, epoch, shuffle)[i * per_step:(i + 1) * per_step]


def caption_dropout(seed: int, step: int, n: int, p: float) -> np.ndarray:
    """Bool (n,): which of global batch ``step``'s ``n`` units get the empty caption (``u < p``)."""
    return np.random.default_rng([seed, 1, int(step)]).random(n) < p
