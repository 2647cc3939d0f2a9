"""Measure a text-to-image model's demographic bias, alone or beside a base model.

    python -m fairjax.evaluate --model DIR [--lora FILE] --out DIR [--base DIR [--base-lora FILE]]
        [--config FILE[:preset]] [--config.eval.n_neutral=100 ...] [--overwrite] [--variant fp16] [--no-cache]

``--model`` and ``--base`` may also be diffusers folders or Hugging Face repo ids, converted once into the
model cache (:mod:`fairjax.convert.resolve`).

For each model: generate ``eval.n_neutral`` images per neutral evaluation prompt
(``eval.neutral_template`` over ``eval.occupations``; SDXL default: ``best quality, a
realistic photo of {occupation}`` over the shipped held-out occupations) and ``eval.n_identity``
per identity prompt (``eval.identity_template``, every gender x race of ``eval.keywords``),
label them with the attribute classifier (``eval.classifier``: ``deepface``, or ``toy`` for the
toy world), and write the report of :func:`fairjax.fairness.report.write_report`: discrepancy and
pairwise bias over the neutral prompts, recall on the identity prompts, bootstrap intervals
over prompts, per-prompt tables, frequency charts, image grids, ``report.json``, ``index.html``.
With ``--base`` the base model comes first and every metric gets its change (base and model use
the same seeds, so their grids show the same initial noise).

``--model`` may be a full fine-tuning output that holds only ``unet/`` (``python -m
fairjax.train`` writes ``<workdir>/model``): its other components come from ``--base`` or from
the ``base_model`` its ``fairjax.json`` names. Without ``--config`` a toy-world model (one with
``toy_world.json``) uses :func:`fairjax.toy.config.make_config`, any other model the SDXL
defaults of :func:`default_config`.

A VILA-U model dir (``model_type: vila_u``, e.g. the toy VILA-U ``fairjax/assets/toy_vila_u``) is sampled
through :class:`fairjax.vila_u.generate.RecordGenerator` (:func:`vila_u_sampler`: ``sample.guidance_scale`` is
vila-u's cfg; ``--lora`` is merged into its LLM).

``OUT`` (written to a temporary folder, renamed at the end, locked while it is written): ``report/``
(index.html, report.json, CSVs, charts, grids), ``images/<name>/`` (every generated image),
``records_<name>.jsonl`` (prompt, labels, image, identity, reason per image). An ``OUT`` that equals,
contains or is inside a model, a LoRA or the config file is refused (also with ``--overwrite``), and
the ``sample`` / ``eval`` values are checked against their ranges before any model is loaded.
SIGTERM / SIGINT stop it between generation batches with one line and exit status 128 + the signal
number; the temporary folder is removed, so a re-run starts over.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence

import ml_collections
import numpy as np

from fairjax import config as config_lib
from fairjax.errors import UserError
from fairjax.io import fs

REPORT_DIR = "report"
NEEDED = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def default_config() -> ml_collections.ConfigDict:
    """SDXL evaluation defaults (PopAlign's protocol: 100 images per held-out occupation, DeepFace)."""
    from fairjax.data.prompts import EVAL_IDENTITY_TEMPLATE, EVAL_TEMPLATE, GENDERS, RACES, eval_occupations

    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dict(dir=""))
    c.sample = ml_collections.ConfigDict(dict(sampler="euler", steps=50, guidance_scale=5.0, batch_size=8))
    c.eval = ml_collections.ConfigDict(dict(
        occupations=eval_occupations(), neutral_template=EVAL_TEMPLATE, identity_template=EVAL_IDENTITY_TEMPLATE,
        keywords=dict(genders=list(GENDERS), races=list(RACES)), n_neutral=100, n_identity=10, seed=1000,
        classifier="deepface", n_resamples=1000, grid_images=16))
    return c


#: valid values of the ``eval`` keys (the ``sample`` keys: :data:`fairjax.data.build_prefs.SAMPLE_RANGES`)
RANGES = {
    "eval.n_neutral": config_lib.ints(1),
    "eval.n_identity": config_lib.ints(0, note="0 = no recall"),
    "eval.seed": config_lib.SEED,
    "eval.classifier": config_lib.one_of("deepface", "toy"),
    "eval.n_resamples": config_lib.ints(1),
    "eval.grid_images": config_lib.ints(0),
}


# ----------------------------------------------------------------------------- prompts / models


def eval_jobs(ec) -> list[tuple[str, dict | None, int]]:
    """``[(prompt, identity | None, count)]``: the neutral prompts, then the identity prompts."""
    from fairjax.data.prompts import eval_identity_prompts, eval_prompts, keywords_from

    occ = [str(o) for o in ec.occupations]
    if not occ:
        raise UserError("eval.occupations is empty; give at least one occupation")
    if int(ec.n_neutral) < 1 or int(ec.n_identity) < 0:
        raise UserError(f"eval.n_neutral ({ec.n_neutral}) must be >= 1 and eval.n_identity ({ec.n_identity}) >= 0")
    jobs = [(p, None, int(ec.n_neutral)) for p in eval_prompts(occ, str(ec.neutral_template))]
    if int(ec.n_identity):
        kw = keywords_from(dict(ec.keywords))
        for d in eval_identity_prompts(occ, kw, str(ec.identity_template)):
            jobs.append((d["prompt"], {"gender": d["gender"], "race": d["race"]}, int(ec.n_identity)))
    return jobs


def base_of(model_dir: str) -> str | None:
    """The ``base_model`` a fine-tuning output's ``fairjax.json`` names (None if it names none)."""
    from fairjax.io.model_dir import INDEX_FILE, read_json

    index = os.path.join(model_dir, INDEX_FILE)
    return read_json(index).get("base_model") if os.path.isfile(index) else None


def complete_model_dir(model_dir: str, base: str | None, scratch: str) -> str:
    """``model_dir`` itself when it has every component; else a folder in ``scratch`` linking its
    ``unet/`` and the base's other components (text encoders, tokenizers, scheduler, vae)."""
    if not os.path.isdir(model_dir):
        raise UserError(f"{model_dir}: model directory not found")
    missing = [n for n in NEEDED if not os.path.exists(os.path.join(model_dir, n))]
    if not missing:
        return model_dir
    base = base or base_of(model_dir)
    if not base:
        raise UserError(f"{model_dir} lacks {missing} and names no base model; pass --base DIR (the model it was "
                        "fine-tuned from)")
    if not os.path.isdir(base):
        raise UserError(f"{model_dir}: its base model {base} is not a directory; pass --base DIR")
    out = os.path.join(scratch, f"model-{abs(hash(os.path.abspath(model_dir)))}")
    os.makedirs(out)
    for name in os.listdir(base):
        src = os.path.join(model_dir, name) if os.path.exists(os.path.join(model_dir, name)) and name == "unet" \
            else os.path.join(base, name)
        os.symlink(os.path.abspath(src), os.path.join(out, name))
    if not os.path.exists(os.path.join(out, "unet")):
        os.symlink(os.path.abspath(os.path.join(model_dir, "unet")), os.path.join(out, "unet"))
    return out


def _same_tree(a, b) -> bool:
    import jax

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(np.shape(x) == np.shape(y) and np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


# ----------------------------------------------------------------------------- generating + labelling


def generate_records(generator, jobs, seed: int, classifier, image_dir: str, log=print):
    """Generate every job's images, save them as PNG under ``image_dir``, label them;
    returns :class:`fairjax.fairness.metrics.Record` s in job order."""
    from PIL import Image

    from fairjax.fairness.metrics import Record
    from fairjax.progress import Rate

    os.makedirs(image_dir, exist_ok=True)
    prompts = [p for p, _, _ in jobs]
    counts = [n for _, _, n in jobs]
    total, recs = sum(counts), []
    rate = Rate(total)
    for p, i, img, lat in generator.run(prompts, counts, seed):
        path = os.path.join(image_dir, f"{p:05d}_{i:04d}.png")
        lab = classifier.classify([img])
        reason = lab.reasons[0]
        if not np.all(np.isfinite(lat)):
            labels, reason = None, "corrupt"
        else:
            labels = lab.labels[0]
        Image.fromarray(img).save(path)
        recs.append(Record(prompt=prompts[p], labels=labels, image=path, identity=jobs[p][1], reason=reason))
        if len(recs) % 1000 == 0:
            log(f"  {rate.line(len(recs), 'images')}")
    return recs


def evaluate(config, models: dict[str, tuple[str, str | None]], out: str, *, base_dir: str | None = None,
             overwrite: bool = False, log=print) -> dict:
    """Evaluate ``{name: (model_dir, lora file | None)}`` (the first is the baseline of the deltas)
    and write ``out`` (see module docstring); returns the report dict."""
    from fairjax.data.build_prefs import SAMPLE_RANGES

    ec = config.eval
    config_lib.validate(config, SAMPLE_RANGES, RANGES)
    inputs = {"--base": base_dir}
    for name, (model_dir, lora) in models.items():
        inputs[f"model {name!r}"], inputs[f"LoRA of {name!r}"] = model_dir, lora
        if os.path.isdir(model_dir):
            inputs[f"the base of {name!r}"] = base_of(model_dir)
    out = fs.check_output(out, what="--out", overwrite=overwrite, inputs=inputs)
    for name, (model_dir, lora) in models.items():
        if not os.path.isdir(model_dir):
            raise UserError(f"{model_dir}: model directory not found (model {name!r})")
        if lora and not os.path.isfile(lora):
            raise UserError(f"{lora}: LoRA file not found (model {name!r})")
    with fs.locked(out, what="--out"):  # a second run on OUT is refused before it loads a model
        return _evaluate(config, models, out, jobs=eval_jobs(ec), base_dir=base_dir, overwrite=overwrite, log=log)


def _evaluate(config, models, out: str, *, jobs, base_dir, overwrite, log) -> dict:
    from fairjax.data.build_prefs import make_classifier, sample_options
    from fairjax.diffusion.generator import Generator, load_any_pipeline
    from fairjax.fairness.report import write_records, write_report
    from fairjax.io.model_dir import atomic_output_dir

    ec = config.eval
    first_dir = next(iter(models.values()))[0]
    classifier, classes = make_classifier(str(ec.classifier), first_dir)
    runs = {}
    vila = _is_vila_u(first_dir)
    with tempfile.TemporaryDirectory() as scratch, atomic_output_dir(out, overwrite) as tmp:
        gen, gen_pipe = None, None
        for name, (model_dir, lora) in models.items():
            if vila:  # VILA-U: the image-token sampler (guidance_scale = vila-u's cfg), LoRA merged into the LLM
                gen = vila_u_sampler(config, model_dir, lora)
                n = sum(c for *_, c in jobs)
                log(f"evaluate: {name}: generating {n} images ({len(jobs)} prompts)")
                slug = _slug(name)
                recs = generate_records(gen, jobs, int(ec.seed), classifier, os.path.join(tmp, "images", slug), log)
                write_records(os.path.join(tmp, f"records_{slug}.jsonl"), [_moved(r, tmp, out) for r in recs])
                runs[name] = recs
                continue
            path = complete_model_dir(model_dir, base_dir, scratch)
            pipe = load_any_pipeline(path, lora=lora or None)
            if gen is not None and _same_tree(
                    {k: v for k, v in pipe.params.items() if k != "unet"},
                    {k: v for k, v in gen_pipe.params.items() if k != "unet"}) \
                    and pipe.unet.config == gen_pipe.unet.config:
                gen.set_unet_params(pipe.params["unet"])  # same program, other UNet weights
            else:
                gen, gen_pipe = Generator(pipe, sample_options(config), batch_size=int(config.sample.batch_size)), pipe
            n = sum(c for *_, c in jobs)
            log(f"evaluate: {name}: generating {n} images ({len(jobs)} prompts)")
            slug = _slug(name)
            recs = generate_records(gen, jobs, int(ec.seed), classifier, os.path.join(tmp, "images", slug), log)
            # the JSONL names the images where they will be once the folder is in place
            write_records(os.path.join(tmp, f"records_{slug}.jsonl"), [_moved(r, tmp, out) for r in recs])
            runs[name] = recs
        report = write_report(os.path.join(tmp, REPORT_DIR), runs, classes=classes, n_resamples=int(ec.n_resamples),
                              seed=0, grid_images=int(ec.grid_images), title="fairjax fairness report")
    report["out"] = out
    report["html"] = os.path.join(out, REPORT_DIR, "index.html")
    return report


def _is_vila_u(model_dir: str) -> bool:
    from fairjax.vila_u.generate import is_vila_u

    return os.path.isdir(model_dir) and is_vila_u(model_dir)


def vila_u_sampler(config, model_dir: str, lora: str | None):
    """A VILA-U model's sampler for :func:`generate_records`: ``sample.guidance_scale`` is vila-u's cfg
    (1 = conditional sampling), ``sample.top_k`` / ``sample.top_p`` (0 = off, the default: the model's own
    population) and ``sample.temperature`` (default 1)."""
    from fairjax.vila_u.generate import RecordGenerator, SampleOptions, load_model

    s = config.sample
    top_k, top_p = int(s.get("top_k", 0)), float(s.get("top_p", 0.0))
    opts = SampleOptions(cfg=float(s.guidance_scale), temperature=float(s.get("temperature", 1.0)),
                         top_k=top_k or None, top_p=top_p or None)
    return RecordGenerator(load_model(model_dir, lora=lora or None), opts, batch_size=int(s.batch_size))


def _slug(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "model"


def _moved(r, old: str, new: str):
    import dataclasses

    if r.image and r.image.startswith(old + os.sep):
        return dataclasses.replace(r, image=new + r.image[len(old):])
    return r


def summary_lines(report: dict) -> list[str]:
    """Headline numbers per model: pooled discrepancy, mean per-prompt bias (which a shift common to
    every prompt cannot lower the way it can lower the pooled discrepancy), recall."""
    lines = []
    res = report["results"]
    models = report["models"]
    for key, subs in (("discrepancy", ("gender", "race")), ("bias", ("gender", "race")),
                      ("recall", ("gender", "race", "both"))):
        for sub in subs:
            vals = [(m, (res[m].get(key) or {}).get(sub)) for m in models]
            if all(v is None for _, v in vals):
                continue
            txt = "  ".join(f"{m} {v:.3f}" for m, v in vals if v is not None)
            lines.append(f"{key} ({sub}): {txt}")
    return lines


# ----------------------------------------------------------------------------- CLI


def load_eval_config(spec: str | None, model_dir: str, overrides: dict) -> ml_collections.ConfigDict:
    from fairjax.config import apply_overrides, load_config_file

    if spec:
        cfg = load_config_file(spec)
    elif _is_toy(model_dir):
        from fairjax.toy.config import make_config

        cfg = make_config()
    else:
        cfg = default_config()
    for key in ("sample", "eval"):
        if key not in cfg:
            raise UserError(f"config {spec} has no '{key}' section; see configs/toy_world.py or "
                            "fairjax.evaluate.default_config")
    apply_overrides(cfg, overrides)
    return cfg


def _is_toy(model_dir: str) -> bool:
    from fairjax.toy.world import load_toy_world

    try:
        load_toy_world(model_dir)
        return True
    except UserError:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0, 2 bad input, 128 + the signal's number when SIGTERM / SIGINT stopped it (between
    generation batches; OUT is not written, a re-run starts over)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return fs.run_entry(lambda: _main(argv))


def _main(argv: list[str]) -> int:
    from fairjax.config import split_overrides
    from fairjax.convert.resolve import add_model_args, resolve_args

    rest, overrides = split_overrides(argv)
    p = argparse.ArgumentParser(prog="python -m fairjax.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="fairjax model dir (or a fine-tuned unet-only output), diffusers "
                                                  "folder or Hugging Face repo id ORG/NAME[@REVISION]")
    p.add_argument("--lora", default=None, help="fairjax LoRA file merged into --model's UNet")
    p.add_argument("--out", required=True, help="output folder (report/ inside)")
    p.add_argument("--base", default=None, help="base model (dir, diffusers folder or repo id), evaluated first, "
                                                "side by side")
    p.add_argument("--base-lora", default=None, help="LoRA merged into --base")
    p.add_argument("--name", default=None, help="name of --model in the report (default: tuned, or model)")
    p.add_argument("--base-name", default="base", help="name of --base in the report")
    p.add_argument("--config", default=None, help="config file[:preset] with sample/eval sections")
    p.add_argument("--overwrite", action="store_true")
    add_model_args(p)
    args = p.parse_args(rest)
    args.model, args.base = resolve_args(args.model, args), resolve_args(args.base, args)
    cfg = load_eval_config(args.config, args.base or args.model, overrides)
    from fairjax import parallel

    parallel.enable_compilation_cache()
    models = {}
    if args.base:
        models[args.base_name] = (args.base, args.base_lora)
    name = args.name or ("tuned" if args.base else "model")
    if name in models:
        raise UserError(f"--name {name!r} is also the base's name; pass another --name")
    models[name] = (args.model, args.lora)
    if args.config:
        fs.check_disjoint({"--out": args.out}, {"--config": args.config.partition(":")[0]})
    report = evaluate(cfg, models, args.out, base_dir=args.base, overwrite=args.overwrite)
    for line in summary_lines(report):
        print(line)
    print(f"report: {report['html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
