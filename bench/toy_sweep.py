"""One row of the toy-world PopAlign sweep (README, toy world): train on a fixed preference set with
config overrides, then sample the evaluation prompts at a larger size than the main job and print
the pooled discrepancies, per-prompt bias, per-prompt frequencies and recall as one JSON line.

    python -m fairjax.data.build_prefs --config configs/toy_world.py --out runs/toy/prefs   # once
    python bench/toy_sweep.py NAME [--preset P] [--data runs/toy/prefs] [--n 400] [--ni 16] \\
        [--config.KEY=VALUE ...]          # NAME=base evaluates the shipped base model

Trains into ``runs/sweep/NAME`` (reused when it already holds the trained output) and appends the
row to ``runs/sweep/results.jsonl``. Every row samples the main job's evaluation prompts with the same
seeds (5000), so rows differ only by the model. Not a test: a sweep row is a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def evaluate(cfg, model: str, lora: str | None, n: int, ni: int, seed: int = 5000) -> dict:
    """The main job's evaluation prompts (``eval_jobs``) at ``n`` / ``ni`` images, labelled exactly,
    summarised with :mod:`fairjax.fairness.metrics` (pooled discrepancy, mean per-prompt bias, recall)."""
    from fairjax.data.build_prefs import make_classifier, sample_options
    from fairjax.diffusion.generator import Generator, load_any_pipeline
    from fairjax.evaluate import complete_model_dir, eval_jobs, generate_records
    from fairjax.fairness import metrics
    from fairjax.toy.model import default_model_dir

    base = default_model_dir()
    clf, classes = make_classifier("toy", base)
    ec = cfg.eval.copy_and_resolve_references()
    ec.n_neutral, ec.n_identity = n, ni
    jobs = eval_jobs(ec)
    with tempfile.TemporaryDirectory() as scratch:
        pipe = load_any_pipeline(complete_model_dir(model, base, scratch), lora=lora)
        gen = Generator(pipe, sample_options(cfg), batch_size=512)
        records = generate_records(gen, jobs, seed, clf, os.path.join(scratch, "images"), log=lambda _: None)
    neutral = metrics.neutral_metrics([r for r in records if r.identity is None], classes, n_resamples=1)
    recall = metrics.recall_metrics([r for r in records if r.identity is not None], classes, n_resamples=1)
    per_prompt = {row["prompt"]: {"faces": row["n_faces"] / row["n_images"],
                                  **{a: {c: round(row[f"{a}:{c}"] / max(row["n_faces"], 1), 3) for c in cls}
                                     for a, cls in classes.items()}}
                  for row in neutral["per_prompt"]}
    return {"discrepancy": neutral["summary"]["discrepancy"], "bias": neutral["summary"]["bias"],
            "recall": recall["summary"]["recall"], "per_prompt": per_prompt}


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
    cfg.model.dir = default_model_dir()
    cfg.data.path = os.path.abspath(args.data)
    t0 = time.perf_counter()
    if args.name == "base":
        model, lora = cfg.model.dir, None
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
