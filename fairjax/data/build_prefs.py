"""Build a population-level preference dataset (PopAlign's winning and losing sets).

    python -m fairjax.data.build_prefs --config configs/toy_world.py --out runs/toy/prefs \\
        [--config.prefs.n_neutral=64] [--overwrite]

For each neutral prompt ``P`` (one preference set, ``set_id`` = its index):

1. generate ``prefs.n_neutral`` images for ``P`` and ``prefs.n_identity`` images for each
   identity prompt ``augment(P, gender, race)`` (every gender x race of ``prefs.keywords``),
   with the JAX pipeline of ``config.model.dir`` (latents kept);
2. label every image with the attribute classifier (``prefs.classifier``: ``toy`` = the toy
   world's exact decoder, ``deepface`` = DeepFace);
3. drop, and count by reason: ``corrupt`` / ``undecodable`` (not an image, non-finite
   latents), ``no_face`` (the classifier finds no face), ``mismatch`` (an identity image whose
   labels are not the identity its prompt asked for), ``surplus`` (identity images beyond the
   balanced count);
4. winners = identity images balanced over the (gender, race) groups (the same number per
   group, the largest that every group present can give, interleaved group by group);
   losers = ``P``'s own (biased) generations with a face. Every record is captioned ``P`` and
   keeps the prompt it was generated from (``prompt``: a winner's identity prompt), which the
   trainer's identity anchor (``config.anchor_weight``) conditions on.

Output (written to a temporary folder, renamed at the end): ``OUT`` is a
:mod:`fairjax.data.prefs` dataset (TFDS array_record: latents, PNG image, caption,
is_winner, set_id, labels as class indices, prompt) that ``python -m fairjax.train`` reads with
``--config.data.path=OUT``, plus ``OUT/summary.json``: kept / dropped counts by reason per set
and in total, group frequencies of winners and losers, prompts that are not identity-neutral.

A neutral prompt that names a gender or race is warned about and listed (it is kept); an
image batch in which the classifier finds no face at all is an error. Before any model is loaded:
the ``prefs`` / ``sample`` values are checked against :data:`RANGES` (and
:data:`SAMPLE_RANGES`), and an ``OUT`` that equals, contains or is inside ``model.dir``,
``prefs.lora`` or the config file is refused (also with ``--overwrite``); ``OUT`` is locked while
it is written.
SIGTERM / SIGINT stop it
between generation batches with one line and exit status 128 + the signal number; nothing is
written (the dataset appears only complete), so a re-run starts over.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import io
import json
import os
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from fairjax import config as config_lib
from fairjax.errors import UserError
from fairjax.fairness.classifiers import CORRUPT, AttributeClassifier
from fairjax.io import fs

MISMATCH = "mismatch"
SURPLUS = "surplus"
SUMMARY_FILE = "summary.json"

#: valid values of the ``sample`` keys (:func:`sample_options`; :mod:`fairjax.evaluate` samples with them too)
SAMPLE_RANGES = {
    "sample.sampler": config_lib.one_of("euler", "ddim"),
    "sample.steps": config_lib.ints(1),
    "sample.guidance_scale": config_lib.floats(note="<= 1: no guidance"),
    "sample.batch_size": config_lib.ints(1),
}
#: valid values of the ``prefs`` keys (``configs/toy_world.py`` sets their defaults)
RANGES = {
    "prefs.n_neutral": config_lib.ints(1),
    "prefs.n_identity": config_lib.ints(1),
    "prefs.seed": config_lib.SEED,
    "prefs.classifier": config_lib.one_of("toy", "deepface"),
}


@dataclasses.dataclass
class Generated:
    """One generated image: its set (neutral prompt index), prompt, the identity asked for
    (None: the neutral prompt itself), the image (HxWx3 uint8) and the final latents."""

    set_id: int
    prompt: str
    identity: Mapping[str, str] | None
    image: np.ndarray | None
    latents: np.ndarray | None


@dataclasses.dataclass
class Labelled:
    item: Generated
    labels: dict[str, str] | None
    reason: str | None  # why it is dropped (None: kept so far)


# ----------------------------------------------------------------------------- planning


def prompt_plan(neutral: Sequence[str], keywords, template: str, n_neutral: int, n_identity: int):
    """``[(set_id, prompt, identity | None, count)]``: each neutral prompt, then its identity prompts
    (race-major, gender-minor, as :func:`fairjax.data.prompts.identity_prompts`)."""
    from fairjax.data.prompts import _fields, augment

    if n_neutral < 1 or n_identity < 1:
        raise UserError(f"prefs.n_neutral ({n_neutral}) and prefs.n_identity ({n_identity}) must be >= 1")
    if not neutral:
        raise UserError("prefs.neutral_prompts is empty; give at least one identity-neutral prompt")
    blank = [i for i, p in enumerate(neutral) if not str(p).strip()]
    if blank:
        raise UserError(f"prefs.neutral_prompts[{blank[0]}] is empty; every neutral prompt must name a subject")
    missing = [f for f in ("race", "gender", "prompt") if f not in _fields(template)]
    if missing:
        raise UserError(f"prefs.identity_template={template!r} lacks {', '.join('{' + f + '}' for f in missing)}; "
                        "it needs {race}, {gender} and {prompt}")
    plan = []
    for s, p in enumerate(neutral):
        plan.append((s, p, None, int(n_neutral)))
        for race in keywords.races:
            for gender in keywords.genders:
                plan.append((s, augment(p, gender, race, template), {"gender": gender, "race": race}, int(n_identity)))
    return plan


# ----------------------------------------------------------------------------- labelling and sets


def label_items(items: Iterable[Generated], classifier: AttributeClassifier) -> list[Labelled]:
    """Classify every item; non-finite latents or a malformed image are 'corrupt', and the
    classifier's reasons ('no_face', 'corrupt', ...) are kept; an identity image whose labels
    differ from what its prompt asked for is 'mismatch'."""
    from fairjax.fairness.metrics import labels_match

    out = []
    for it in items:
        if it.latents is not None and not np.all(np.isfinite(np.asarray(it.latents, np.float64))):
            out.append(Labelled(it, None, CORRUPT))
            continue
        lab = classifier.classify([it.image])
        labels, reason = lab.labels[0], lab.reasons[0]
        if labels is not None and it.identity is not None:
            if not all(labels_match(labels[a], it.identity[a]) for a in it.identity):
                reason = MISMATCH
        out.append(Labelled(it, labels, reason))
    return out


def _group(labels: Mapping[str, str], attrs: Sequence[str]) -> tuple[str, ...]:
    return tuple(labels[a] for a in attrs)


def balance_winners(cands: list[Labelled], groups: Sequence[tuple[str, ...]], attrs: Sequence[str]):
    """``(winners, surplus, missing groups)``: ``m`` images of every group that has any, with
    ``m`` = the smallest non-zero group count, interleaved group by group (any prefix is balanced)."""
    by = collections.OrderedDict((g, []) for g in groups)
    for c in cands:
        by.setdefault(_group(c.labels, attrs), []).append(c)
    present = [g for g, v in by.items() if v]
    missing = [g for g, v in by.items() if not v]
    if not present:
        return [], [], missing
    m = min(len(by[g]) for g in present)
    winners = [by[g][i] for i in range(m) for g in present]
    surplus = [c for g in present for c in by[g][m:]]
    return winners, surplus, missing


def form_sets(labelled: list[Labelled], neutral: Sequence[str], classes: Mapping[str, Sequence[str]]):
    """``(records, summary)``: dataset records (winners then losers per set) and the counts."""
    attrs = list(classes)
    index = {a: {c: i for i, c in enumerate(cls)} for a, cls in classes.items()}
    groups = [tuple(x) for x in _product([classes[a] for a in attrs])]
    records, sets = [], []
    dropped_total: collections.Counter = collections.Counter()
    n_faces = sum(x.labels is not None for x in labelled)
    if n_faces == 0:
        raise UserError(f"the classifier found no face in any of the {len(labelled)} generated images; nothing to "
                        "build sets from (check the model, the sampling settings and the classifier)")
    for s, prompt in enumerate(neutral):
        mine = [x for x in labelled if x.item.set_id == s]
        ident = [x for x in mine if x.item.identity is not None]
        neut = [x for x in mine if x.item.identity is None]
        dropped: collections.Counter = collections.Counter(x.reason for x in mine if x.reason is not None)
        cands = [x for x in ident if x.reason is None]
        winners, surplus, missing = balance_winners(cands, groups, attrs)
        for x in surplus:
            x.reason = SURPLUS
        if surplus:
            dropped[SURPLUS] += len(surplus)
        losers = [x for x in neut if x.reason is None]
        if missing:
            warnings.warn(f"set {s} ({prompt!r}): no usable identity image for group(s) "
                          f"{['/'.join(g) for g in missing]}; its winners are balanced over the other groups",
                          UserWarning, stacklevel=2)
        if not winners or not losers:
            warnings.warn(f"set {s} ({prompt!r}) has {len(winners)} winners and {len(losers)} losers; it forms no "
                          "pair and is left out", UserWarning, stacklevel=2)
        else:
            for x, is_w in [(w, True) for w in winners] + [(l, False) for l in losers]:
                records.append(_record(x, prompt, s, is_w, index))
        dropped_total.update(dropped)
        sets.append({
            "set_id": s, "prompt": prompt, "generated": {"neutral": len(neut), "identity": len(ident)},
            "winners": len(winners), "losers": len(losers), "dropped": dict(sorted(dropped.items())),
            "missing_groups": ["/".join(g) for g in missing],
            "winner_groups": _freqs([w.labels for w in winners], classes),
            "loser_groups": _freqs([l.labels for l in losers], classes),
        })
    kept_w = [x.labels for x in labelled if x.item.identity is not None and x.reason is None]
    kept_l = [x.labels for x in labelled if x.item.identity is None and x.reason is None]
    summary = {
        "generated": len(labelled),
        "records": len(records),
        "winners": sum(r["is_winner"] for r in records),
        "losers": sum(not r["is_winner"] for r in records),
        "dropped": dict(sorted(dropped_total.items())),
        "winner_frequencies": _freqs(kept_w, classes),
        "loser_frequencies": _freqs(kept_l, classes),
        "sets": sets,
    }
    return records, summary


def _product(lists):
    import itertools

    return itertools.product(*lists)


def _freqs(labels: list, classes: Mapping[str, Sequence[str]]) -> dict:
    """``{attr: {class: frequency}}`` over the labelled images (all classes listed, 0 when absent)."""
    out = {}
    for a, cls in classes.items():
        n = len(labels)
        cnt = collections.Counter(lab[a] for lab in labels)
        out[a] = {c: (cnt[c] / n if n else 0.0) for c in cls}
    return out


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _record(x: Labelled, caption: str, set_id: int, is_winner: bool, index) -> dict:
    return {"latents": np.asarray(x.item.latents, np.float32), "caption": caption, "is_winner": bool(is_winner),
            "set_id": int(set_id), "image": png_bytes(x.item.image), "prompt": str(x.item.prompt),
            "labels": {a: int(index[a][v]) for a, v in x.labels.items()}}


# ----------------------------------------------------------------------------- classifier / generation


def make_classifier(kind: str, model_dir: str | None = None, *, detector: str = "yunet"
                    ) -> tuple[AttributeClassifier, dict]:
    """``(classifier, classes)``: ``toy`` = the toy world of ``model_dir`` (its ``toy_world.json``)
    read back exactly; ``deepface`` = :class:`fairjax.fairness.classifiers.DeepFaceClassifier` with the
    face ``detector`` (its default, ``yunet``, is PopAlign's evaluation's)."""
    from fairjax.fairness.classifiers import DeepFaceClassifier, ExactClassifier

    if kind == "toy":
        from fairjax.toy.world import load_toy_world

        world = load_toy_world(model_dir)
        return ExactClassifier(world.decode, world.classes), world.classes
    if kind == "deepface":
        clf = DeepFaceClassifier(detector_backend=detector)
        return clf, dict(clf.classes)
    raise UserError(f"classifier {kind!r} is not one of toy, deepface")


def sample_options(c) -> "object":
    from fairjax.diffusion.pipeline import SampleOptions

    s = c.sample
    return SampleOptions(sampler=str(s.sampler), steps=int(s.steps), guidance_scale=float(s.guidance_scale))


def generate_plan(generator, plan, seed: int, progress=None) -> list[Generated]:
    """Run ``plan`` through a :class:`fairjax.diffusion.generator.Generator`."""
    prompts = [p for _, p, _, _ in plan]
    counts = [n for *_, n in plan]
    out = []
    for p, _, img, lat in generator.run(prompts, counts, seed):
        s, prompt, ident, _ = plan[p]
        out.append(Generated(s, prompt, ident, img, lat))
        if progress is not None:
            progress(len(out), sum(counts))
    return out


# ----------------------------------------------------------------------------- entry point


def build_prefs(config, out: str, *, overwrite: bool = False, log=print) -> dict:
    """Generate, label, form the sets and write the dataset ``out`` (see module docstring);
    returns the summary (also in ``out/summary.json``)."""
    c = config
    pc = c.prefs
    config_lib.validate(c, SAMPLE_RANGES, RANGES)
    out = fs.check_output(out, what="--out", overwrite=overwrite,
                          inputs={"config.model.dir": str(c.model.dir), "config.prefs.lora": str(pc.get("lora") or "")})
    with fs.locked(out, what="--out"):  # a second run on OUT is refused before it loads a model
        return _build(c, out, overwrite=overwrite, log=log)


def _build(c, out: str, *, overwrite: bool, log) -> dict:
    from fairjax.data import prefs as prefs_data
    from fairjax.data.prompts import keywords_from, warn_not_neutral
    from fairjax.diffusion.generator import Generator, load_any_pipeline
    from fairjax.io.model_dir import atomic_output_dir
    from fairjax.progress import Rate

    pc = c.prefs
    neutral = [str(p) for p in pc.neutral_prompts]
    keywords = keywords_from(dict(pc.keywords))
    not_neutral = warn_not_neutral(neutral, keywords)
    classifier, classes = make_classifier(str(pc.classifier), str(c.model.dir))
    if tuple(classes["gender"]) != tuple(keywords.genders) or tuple(classes["race"]) != tuple(keywords.races):
        raise UserError(f"prefs.keywords {dict(pc.keywords)} differ from the classifier's classes {classes}; "
                        "identity prompts must name classes the classifier can report")
    plan = prompt_plan(neutral, keywords, str(pc.identity_template), int(pc.n_neutral), int(pc.n_identity))
    pipe = load_any_pipeline(str(c.model.dir), lora=str(pc.lora) or None)
    gen = Generator(pipe, sample_options(c), batch_size=int(c.sample.batch_size))
    total = sum(n for *_, n in plan)
    log(f"build_prefs: generating {total} images for {len(neutral)} neutral prompts "
        f"({pc.n_neutral} each) and {len(plan) - len(neutral)} identity prompts ({pc.n_identity} each)")
    rate = Rate(total)

    def progress(done, n):
        if done % 1000 == 0 or done == n:
            log(f"  {rate.line(done, 'images')}")

    items = generate_plan(gen, plan, int(pc.seed), progress=progress)
    labelled = label_items(items, classifier)
    records, summary = form_sets(labelled, neutral, classes)
    if not records:
        raise UserError("no preference set has both winners and losers; generate more images per prompt")
    summary.update({"model_dir": os.path.abspath(str(c.model.dir)), "classifier": str(pc.classifier),
                    "classes": {k: list(v) for k, v in classes.items()},
                    "not_neutral": [{"prompt": p, "words": w} for p, w in not_neutral],
                    "sample": c.sample.to_dict(), "seed": int(pc.seed)})
    meta = {"classes": summary["classes"], "neutral_prompts": neutral, "builder": "fairjax.data.build_prefs"}
    with atomic_output_dir(out, overwrite) as tmp:
        prefs_data.write_preference_dataset(tmp, records, metadata=meta, overwrite=True)
        with open(os.path.join(tmp, SUMMARY_FILE), "w") as f:
            json.dump(summary, f, indent=2)
            f.write("\n")
    log(f"build_prefs: {summary['winners']} winners, {summary['losers']} losers in {len(neutral)} sets; "
        f"dropped {summary['dropped']}; dataset and {SUMMARY_FILE} in {out}")
    return summary


def read_summary(path: str) -> dict:
    from fairjax.io.model_dir import read_json

    return read_json(os.path.join(path, SUMMARY_FILE))


def main(argv=None) -> int:
    """Exit status: 0, 2 bad input, 128 + the signal's number when SIGTERM / SIGINT stopped it (between
    generation batches; nothing is written, a re-run starts over)."""
    argv = sys.argv[1:] if argv is None else argv
    return fs.run_entry(lambda: _main(argv))


def _main(argv) -> int:
    from fairjax.config import apply_overrides, load_config_file, split_overrides
    from fairjax.convert.resolve import add_model_args, resolve_args

    rest, overrides = split_overrides(argv)
    p = argparse.ArgumentParser(prog="python -m fairjax.data.build_prefs",
                                description="Generate, label and pair images into a PopAlign preference dataset.",
                                epilog="Override any config key with --config.KEY=VALUE (e.g. --config.prefs.n_neutral=32).")
    p.add_argument("--config", required=True, help="config file[:preset] with sample/prefs sections, "
                                                   "e.g. configs/toy_world.py")
    p.add_argument("--out", required=True, help="dataset folder to write (the trainer's --config.data.path)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_model_args(p)
    args = p.parse_args(rest)
    cfg = load_config_file(args.config)
    apply_overrides(cfg, overrides)
    for key in ("prefs", "sample", "model"):
        if key not in cfg:
            raise UserError(f"config {args.config} has no '{key}' section; see configs/toy_world.py")
    fs.check_disjoint({"--out": args.out}, {"--config": args.config.partition(":")[0]})
    cfg.model.dir = resolve_args(str(cfg.model.dir), args)  # a diffusers folder or repo id: converted once
    from fairjax import parallel

    parallel.enable_compilation_cache()
    summary = build_prefs(cfg, args.out, overwrite=args.overwrite)
    print(json.dumps({k: summary[k] for k in ("generated", "records", "winners", "losers", "dropped")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
