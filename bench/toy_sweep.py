"""One row of the toy-world PopAlign sweep (README, toy world): train on a fixed preference set with
config overrides, then sample the evaluation prompts at a larger size than the main job and print
the pooled discrepancies, per-occupation frequencies and recall as one JSON line.

    python -m fairjax.data.build_prefs --config configs/toy_world.py --out runs/toy/prefs   # once
    python bench/toy_sweep.py NAME [--preset P] [--data runs/toy/prefs] [--n 400] [--ni 16] \\
        [--config.KEY=VALUE ...]          # NAME=base evaluates the shipped base model

Trains into ``runs/sweep/NAME`` (reused when it already holds the trained output) and appends the
row to ``runs/sweep/results.jsonl``. Every row samples the same evaluation seeds (5000), so rows
differ only by the model. Not a test: a sweep row is a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def evaluate(cfg, model: str, lora: str | None, n: int, ni: int, seed: int = 5000) -> dict:
    from fairjax.data.build_prefs import make_classifier, sample_options
    from fairjax.data.prompts import fill_template, with_article
    from fairjax.evaluate import complete_model_dir
    from fairjax.toy import world as W
    from fairjax.toy.model import default_model_dir
    from fairjax.toy.pipeline import Generator, load_any_pipeline

    base = default_model_dir()
    clf, _ = make_classifier("toy", base)
    occ = list(W.OCCUPATIONS)
    idents = [(fill_template(W.IDENTITY_TEMPLATE, race=r, gender=g, occupation=o), g, r)
              for o in occ for g in W.GENDERS for r in W.RACES]
    prompts = [with_article(o) for o in occ] + [p for p, _, _ in idents]
    counts = [n] * len(occ) + [ni] * len(idents)
    labels = [[] for _ in prompts]
    with tempfile.TemporaryDirectory() as scratch:
        pipe = load_any_pipeline(complete_model_dir(model, base, scratch), lora=lora)
        for p, _, img, _ in Generator(pipe, sample_options(cfg), batch_size=512).run(prompts, counts, seed):
            labels[p].append(clf.classify([img]).labels[0])
    out = {"per_occupation": {}}
    pooled = {"gender": np.zeros(len(W.GENDERS)), "race": np.zeros(len(W.RACES))}
    for k, o in enumerate(occ):
        faces = [lab for lab in labels[k] if lab is not None]
        row = {"faces": len(faces) / n}
        for attr, classes in (("gender", W.GENDERS), ("race", W.RACES)):
            c = np.array([sum(lab[attr] == x for lab in faces) for x in classes], np.float64)
            pooled[attr] += c
            row[attr] = dict(zip(classes, np.round(c / max(c.sum(), 1), 3).tolist()))
        out["per_occupation"][o] = row
    for attr, c in pooled.items():
        f = c / c.sum()
        out[f"discrepancy_{attr}"] = float(np.linalg.norm(f - 1.0 / len(f)))
    hits = {"gender": 0, "race": 0, "both": 0}
    faces = 0
    for j, (_, g, r) in enumerate(idents):
        for lab in labels[len(occ) + j]:
            if lab is None:
                continue
            faces += 1
            hits["gender"] += lab["gender"] == g
            hits["race"] += lab["race"] == r
            hits["both"] += lab["gender"] == g and lab["race"] == r
    out["recall"] = {k: v / faces for k, v in hits.items()}
    return out


def main(argv=None) -> int:
    from fairjax.config import apply_overrides, split_overrides
    from fairjax.toy.config import make_config
    from fairjax.toy.model import default_model_dir
    from fairjax.toy.run import train_one, tuned_model

    rest, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name")
    p.add_argument("--preset", default=None)
    p.add_argument("--data", default=os.path.join("runs", "toy", "prefs"))
    p.add_argument("--n", type=int, default=400, help="images per neutral prompt")
    p.add_argument("--ni", type=int, default=16, help="images per identity prompt")
    p.add_argument("--out", default=os.path.join("runs", "sweep"))
    args = p.parse_args(rest)
    cfg = make_config(args.preset)
    apply_overrides(cfg, overrides)
    cfg.model_dir = default_model_dir()
    cfg.data.path = os.path.abspath(args.data)
    t0 = time.perf_counter()
    if args.name == "base":
        model, lora = cfg.model_dir, None
    else:
        wd = os.path.join(args.out, args.name)
        model, lora = tuned_model(cfg, wd)
        if not os.path.exists(lora or model):
            train_one(cfg, wd)
    t1 = time.perf_counter()
    row = {"name": args.name, "preset": args.preset, "overrides": overrides,
           **evaluate(cfg, model, lora, args.n, args.ni),
           "train_s": round(t1 - t0), "eval_s": round(time.perf_counter() - t1)}
    print(json.dumps(row))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
