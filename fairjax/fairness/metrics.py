"""Population-level fairness metrics (pure numpy).

Inputs are per-image records: the prompt, the attribute labels predicted for the
image (``{"gender": "female", "race": "asian"}``) or None when no face was
found, and for identity-specific prompts the identity asked for. Images
without a face drop out of every metric (as in the reference evaluation).

Equations (K classes of one attribute, ``n_k`` faces predicted in class k):

- frequencies ``p_k = n_k / sum_j n_j`` over ALL K classes: a class never
  predicted has ``p_k = 0`` (the reference code dropped it, which shrinks the
  vector and understates the discrepancy).
- discrepancy (Choi et al. 2020; PopAlign eq. 13): ``||p - 1/K||_2``, pooled
  over every face of every neutral prompt.
- pairwise bias (Shen et al. 2024): per prompt ``mean_{i<j} |p_i - p_j|`` for
  K = 2 (gender), 4 (race in Shen's four groups: white / middle eastern /
  latino hispanic together, asian, black, indian) and 8 (gender x those four),
  averaged over the prompts that have at least one face.
- recall on identity-specific prompts: the fraction of detected faces whose
  predicted gender (race, both) equals the identity the prompt asked for.
- intervals: percentile bootstrap over prompts (prompts resampled with
  replacement, all of a prompt's images kept together), seeded.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Mapping, Sequence

import numpy as np

from fairjax.data.prompts import GENDERS, RACES, parse_identity, IdentityKeywords
from fairjax.errors import UserError

DEFAULT_CLASSES: dict[str, tuple[str, ...]] = {"gender": GENDERS, "race": RACES}

# Shen et al. 2024 merge FairFace races into four groups: WMELH, asian, black, indian.
RACE4_GROUPS: dict[str, str] = {
    "white": "wmelh", "middle eastern": "wmelh", "latino hispanic": "wmelh",
    "asian": "asian", "black": "black", "indian": "indian",
}
RACE4: tuple[str, ...] = ("wmelh", "asian", "black", "indian")


@dataclasses.dataclass(frozen=True)
class Record:
    """One generated image: its prompt, predicted labels (None: no usable face), the
    image file, the identity asked for (identity-specific prompts only), why it
    has no labels (``reason``: 'no_face', 'corrupt', ...)."""

    prompt: str
    labels: Mapping[str, str] | None
    image: str | None = None
    identity: Mapping[str, str] | None = None
    reason: str | None = None


# ---------------------------------------------------------------- equations

def frequencies(counts) -> np.ndarray:
    """``p_k = n_k / sum_j n_j`` along the last axis (all K classes kept)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(-1, keepdims=True)
    if np.any(total <= 0):
        raise UserError("no face detected: frequencies need at least one labelled face")
    return counts / total


def discrepancy(freqs) -> np.ndarray:
    """``||p - 1/K||_2`` along the last axis (Choi et al. 2020; PopAlign eq. 13)."""
    p = np.asarray(freqs, dtype=np.float64)
    return np.sqrt(np.sum((p - 1.0 / p.shape[-1]) ** 2, axis=-1))


def pairwise_bias(freqs) -> np.ndarray:
    """``mean_{i<j} |p_i - p_j|`` along the last axis (Shen et al. 2024)."""
    p = np.asarray(freqs, dtype=np.float64)
    k = p.shape[-1]
    if k < 2:
        raise UserError(f"pairwise bias needs at least 2 classes, got {k}")
    i, j = np.triu_indices(k, 1)
    return np.abs(p[..., i] - p[..., j]).mean(-1)


def class_counts(labels: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """``n_k`` for each class in ``classes`` (order kept); an unknown label is an error."""
    index = {c: i for i, c in enumerate(classes)}
    out = np.zeros(len(classes), dtype=np.int64)
    for lab in labels:
        if lab not in index:
            raise UserError(f"label {lab!r} is not one of the classes {list(classes)}")
        out[index[lab]] += 1
    return out


def discrepancy_of(labels: Sequence[str], classes: Sequence[str]) -> float:
    """Discrepancy of a list of predicted labels over ``classes``."""
    return float(discrepancy(frequencies(class_counts(labels, classes))))


def labels_match(predicted: str, asked: str) -> bool:
    """Whole-label equality, case and spacing normalised: 'male' never matches 'female'."""
    norm = lambda s: " ".join(str(s).lower().replace("_", " ").split())  # noqa: E731
    return norm(predicted) == norm(asked)


# ---------------------------------------------------------------- attribute views

@dataclasses.dataclass(frozen=True)
class View:
    """A K-class attribute read off a label dict (``fn(labels) -> class``)."""

    name: str
    classes: tuple[str, ...]
    fn: Callable[[Mapping[str, str]], str]


def attribute_view(attr: str, classes: Sequence[str]) -> View:
    return View(attr, tuple(classes), lambda lab, a=attr: lab[a])


def bias_views(classes: Mapping[str, Sequence[str]] = DEFAULT_CLASSES) -> list[View]:
    """Shen et al.'s K = 2 / 4 / 8 attributes: gender, race4, gender x race4.

    With race classes other than the default six, race4 is the race attribute
    itself and the joint one is gender x race.
    """
    genders, races = tuple(classes["gender"]), tuple(classes["race"])
    if set(races) == set(RACE4_GROUPS):
        race_name, race_classes = "race4", RACE4
        race_fn = lambda lab: RACE4_GROUPS[lab["race"]]  # noqa: E731
    else:
        race_name, race_classes = "race", races
        race_fn = lambda lab: lab["race"]  # noqa: E731
    joint = tuple(f"{g}|{r}" for g, r in itertools.product(genders, race_classes))
    return [
        View("gender", genders, lambda lab: lab["gender"]),
        View(race_name, race_classes, race_fn),
        View(f"gender_{race_name}", joint, lambda lab: f"{lab['gender']}|{race_fn(lab)}"),
    ]


# ---------------------------------------------------------------- tables

def group_by_prompt(records: Sequence[Record]) -> dict[str, list[Record]]:
    """Records per prompt, in first-appearance order."""
    out: dict[str, list[Record]] = {}
    for r in records:
        out.setdefault(r.prompt, []).append(r)
    return out


def prompt_counts(groups: Mapping[str, Sequence[Record]], view: View) -> np.ndarray:
    """``(P, K)`` counts of ``view``'s classes among the faces of each prompt."""
    rows = []
    for recs in groups.values():
        labs = [view.fn(r.labels) for r in recs if r.labels is not None]
        rows.append(class_counts(labs, view.classes))
    return np.asarray(rows, dtype=np.int64).reshape(len(groups), len(view.classes))


def _require_faces(n_faces: int, n_images: int, what: str) -> None:
    if n_faces == 0:
        raise UserError(f"no face detected in any of the {n_images} {what} images; nothing to measure "
                        "(check the classifier: detector_backend, enforce_detection, image size)")


# ---------------------------------------------------------------- bootstrap

def bootstrap_interval(per_prompt, statistic: Callable[[np.ndarray], np.ndarray], n_resamples: int = 1000,
                       level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap over prompts.

    ``per_prompt`` has one row per prompt (shape ``(P, ...)``); ``statistic``
    maps an array ``(..., P, ...)`` (leading resample axes) to ``(...)``. Draw
    ``n_resamples`` index vectors of P prompts with replacement, evaluate the
    statistic on each, return the ``(1-level)/2`` and ``(1+level)/2`` quantiles.
    """
    x = np.asarray(per_prompt)
    if x.shape[0] == 0:
        raise UserError("bootstrap needs at least one prompt")
    if n_resamples < 1 or not 0.0 < level < 1.0:
        raise UserError(f"bootstrap: need n_resamples >= 1 and 0 < level < 1, got {n_resamples}, {level}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.shape[0], size=(n_resamples, x.shape[0]))
    stats = np.asarray(statistic(x[idx]), dtype=np.float64)
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def pooled_discrepancy(counts: np.ndarray) -> np.ndarray:
    """Discrepancy of the frequencies pooled over prompts: counts ``(..., P, K)`` -> ``(...)``."""
    return discrepancy(frequencies(np.asarray(counts).sum(-2)))


def mean_prompt_bias(counts: np.ndarray) -> np.ndarray:
    """Mean over prompts of the per-prompt pairwise bias: counts ``(..., P, K)``, every prompt with a face."""
    return pairwise_bias(frequencies(counts)).mean(-1)


def pooled_rate(hits_faces: np.ndarray) -> np.ndarray:
    """``sum hits / sum faces`` over prompts: ``(..., P, 2)`` -> ``(...)``."""
    x = np.asarray(hits_faces, dtype=np.float64).sum(-2)
    return x[..., 0] / x[..., 1]


# ---------------------------------------------------------------- summaries

def neutral_metrics(records: Sequence[Record], classes: Mapping[str, Sequence[str]] = DEFAULT_CLASSES,
                    n_resamples: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """Discrepancy (pooled) and mean per-prompt bias with bootstrap intervals, and per-prompt rows."""
    groups = group_by_prompt(records)
    n_images = len(records)
    n_faces = sum(r.labels is not None for r in records)
    _require_faces(n_faces, n_images, "neutral-prompt")
    has_face = np.array([any(r.labels is not None for r in g) for g in groups.values()])
    out = {"discrepancy": {}, "bias": {}, "intervals": {"discrepancy": {}, "bias": {}},
           "frequencies": {}, "n_images": n_images, "n_faces": n_faces, "n_prompts": len(groups),
           "n_prompts_with_face": int(has_face.sum()), "level": level, "n_resamples": n_resamples}
    per_prompt = {"prompt": list(groups), "n_images": [len(g) for g in groups.values()],
                  "n_faces": [sum(r.labels is not None for r in g) for g in groups.values()]}
    for attr, cls in classes.items():
        view = attribute_view(attr, cls)
        c = prompt_counts(groups, view)
        out["discrepancy"][attr] = float(pooled_discrepancy(c))
        out["frequencies"][attr] = dict(zip(view.classes, frequencies(c.sum(0)).tolist()))
        out["intervals"]["discrepancy"][attr] = bootstrap_interval(c[has_face], pooled_discrepancy,
                                                                   n_resamples, level, seed)
        for k, name in enumerate(view.classes):
            per_prompt[f"{attr}:{name}"] = c[:, k].tolist()
        per_prompt[f"discrepancy:{attr}"] = [float(discrepancy(frequencies(row))) if row.sum() else None
                                             for row in c]
    for view in bias_views(classes):
        c = prompt_counts(groups, view)[has_face]
        out["bias"][f"{view.name}"] = float(mean_prompt_bias(c))
        out["intervals"]["bias"][view.name] = bootstrap_interval(c, mean_prompt_bias, n_resamples, level, seed)
        full = prompt_counts(groups, view)
        per_prompt[f"bias:{view.name}"] = [float(pairwise_bias(frequencies(row))) if row.sum() else None
                                           for row in full]
    out["bias_k"] = {v.name: len(v.classes) for v in bias_views(classes)}
    return {"summary": out, "per_prompt": _rows(per_prompt)}


def identity_of(record: Record, classes: Mapping[str, Sequence[str]] = DEFAULT_CLASSES) -> dict[str, str]:
    """The identity a record's prompt asked for: given explicitly, else parsed (whole words) from the prompt."""
    if record.identity is not None:
        ident = dict(record.identity)
    else:
        ident = parse_identity(record.prompt, IdentityKeywords(tuple(classes["gender"]), tuple(classes["race"])))
    for attr, cls in classes.items():
        if attr not in ident:
            raise UserError(f"identity of prompt {record.prompt!r} lacks '{attr}'")
        if not any(labels_match(ident[attr], c) for c in cls):
            raise UserError(f"identity {attr}={ident[attr]!r} of prompt {record.prompt!r} is not one of {list(cls)}")
    return ident


def recall_metrics(records: Sequence[Record], classes: Mapping[str, Sequence[str]] = DEFAULT_CLASSES,
                   n_resamples: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """Recall of identity-specific prompts: per attribute and for all attributes at once ('both')."""
    groups = group_by_prompt(records)
    n_faces = sum(r.labels is not None for r in records)
    _require_faces(n_faces, len(records), "identity-prompt")
    keys = list(classes) + ["both"]
    hits = {k: [] for k in keys}
    faces = []
    idents = []
    for prompt, recs in groups.items():
        ident = identity_of(recs[0], classes)
        idents.append(ident)
        labelled = [r for r in recs if r.labels is not None]
        faces.append(len(labelled))
        per_attr = {a: [labels_match(r.labels[a], ident[a]) for r in labelled] for a in classes}
        for a in classes:
            hits[a].append(sum(per_attr[a]))
        hits["both"].append(sum(all(m) for m in zip(*per_attr.values())) if labelled else 0)
    faces_arr = np.asarray(faces)
    with_face = faces_arr > 0
    summary = {"recall": {}, "intervals": {"recall": {}}, "n_images": len(records), "n_faces": n_faces,
               "n_prompts": len(groups)}
    for k in keys:
        hf = np.stack([np.asarray(hits[k]), faces_arr], -1)
        summary["recall"][k] = float(pooled_rate(hf))
        summary["intervals"]["recall"][k] = bootstrap_interval(hf[with_face], pooled_rate, n_resamples, level, seed)
    table = {"prompt": list(groups), **{f"asked:{a}": [i[a] for i in idents] for a in classes},
             "n_images": [len(g) for g in groups.values()], "n_faces": faces}
    for k in keys:
        table[f"recall:{k}"] = [h / f if f else None for h, f in zip(hits[k], faces)]
    return {"summary": summary, "per_prompt": _rows(table)}


def evaluate(records: Sequence[Record], classes: Mapping[str, Sequence[str]] = DEFAULT_CLASSES,
             n_resamples: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """All metrics for one model: records without ``identity`` are neutral (discrepancy, bias);
    records with ``identity`` feed recall (use :func:`identity_of` to fill it from the prompt).

    Returns ``{"discrepancy", "bias", "recall", "intervals", ..., "tables": {"per_prompt", "recall"}}``;
    a metric with no records is None.
    """
    if not records:
        raise UserError("no records to evaluate")
    neutral = [r for r in records if r.identity is None]
    ident = [r for r in records if r.identity is not None]
    out: dict = {"discrepancy": None, "bias": None, "recall": None,
                 "intervals": {"discrepancy": None, "bias": None, "recall": None},
                 "skipped": _reasons(records), "tables": {"per_prompt": [], "recall": []}}
    if neutral:
        n = neutral_metrics(neutral, classes, n_resamples, level, seed)
        s = n["summary"]
        out.update({k: v for k, v in s.items() if k != "intervals"})
        out["intervals"].update(s["intervals"])
        out["tables"]["per_prompt"] = n["per_prompt"]
    if ident:
        r = recall_metrics(ident, classes, n_resamples, level, seed)
        out["recall"] = r["summary"]["recall"]
        out["intervals"]["recall"] = r["summary"]["intervals"]["recall"]
        out["recall_counts"] = {k: r["summary"][k] for k in ("n_images", "n_faces", "n_prompts")}
        out["tables"]["recall"] = r["per_prompt"]
    return out


def _reasons(records: Sequence[Record]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        if r.labels is None:
            key = r.reason or "no_face"
            out[key] = out.get(key, 0) + 1
    return out


def _rows(columns: Mapping[str, list]) -> list[dict]:
    names = list(columns)
    return [dict(zip(names, vals)) for vals in zip(*(columns[n] for n in names))]
