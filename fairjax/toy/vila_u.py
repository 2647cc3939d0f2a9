"""The unified-MLLM main job: BPO (and DPO) on the biased toy VILA-U, on a CPU.

    python -m fairjax.toy.vila_u --workdir runs/toy_vila_u [--preset default|quick] [--seed N] [--no-locate] \
        [--config.KEY=VALUE ...] [--config.STAGE.KEY=VALUE ...]

``--config.KEY=VALUE`` sets a key in every stage's config (``sft``, ``bpo``, ``dpo``; the pairs and the
evaluation read the ``bpo`` stage's ``sample`` / ``prefs`` / ``eval`` keys), ``--config.bpo.beta=0.5`` in one
stage's only; an unknown key is a one-line error before anything is written.

1. the pre-trained toy VILA-U (``fairjax/assets/toy_vila_u``, checked against its manifest; see
   :mod:`fairjax.toy.vila_u_model`): its generation is biased the way the corpus is;
2. pairs (``WORKDIR/data``): the base generates ``prefs.n_identity`` images per identity-augmented prompt
   (``an amber female doctor``) and ``prefs.n_neutral`` per neutral prompt (``a doctor``); every image is
   labelled exactly (:meth:`fairjax.toy.world.ToyWorld.decode`) and an identity image is kept only when it
   shows the identity asked for. Each pair is one record for the neutral prompt: half ``a`` a balanced
   draw (a uniform identity's kept image), half ``b`` the base's own neutral image of another identity
   (the biased side). ``WORKDIR/data/pairs`` holds them (:mod:`fairjax.vila_u.data` ``pairs`` kind,
   DPO reads a = chosen, b = rejected), ``WORKDIR/data/images`` the balanced halves (stage 1);
3. ``python -m fairjax.train`` machinery (:mod:`fairjax.tasks.vila_u_pref`, LoRA on the LLM's q/k/v/o/
   gate/up/down kernels): stage-1 SFT on the balanced images -> ``WORKDIR/sft``; stage-2 BPO continuing
   that LoRA -> ``WORKDIR/bpo``; stage 1 trains each balanced image under the neutral prompt and under the
   identity prompt it was generated from (``prefs.identity_sft``: without it BPO's shift leaks into the
   identity prompts and costs recall); DPO beside it, from the same stage-1 LoRA -> ``WORKDIR/dpo``;
4. :func:`fairjax.evaluate.evaluate`: base, sft, bpo, dpo on the neutral and identity prompts
   -> ``WORKDIR/report/report/index.html``;
5. locate-then-fix (:mod:`fairjax.analysis.locate`) on the base and the BPO model -> ``WORKDIR/locate``
   (unless ``--no-locate``); on the base also the short BPO with the LoRA on the LLM vs on the image head.

``WORKDIR/result.json``: ``metrics.<model>.discrepancy.{gender,race}``, ``metrics.<model>.recall``,
``shares.<model>.<occupation>`` (the neutral prompt's gender / race shares), ``target`` (whether BPO
at least halved both discrepancies and kept >= 95% of the base's recall), times. Every stage is skipped
when its output exists (``--overwrite`` redoes them; a stopped ``--overwrite`` pass goes on when the job is
run again, :class:`fairjax.toy.run.OverwritePass`); SIGTERM / SIGINT stop the job after the current
stage saved, exit status 128 + the signal number.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import ml_collections
import numpy as np

from fairjax.errors import Interrupted, UserError
from fairjax.io.preemption import raise_if_stopped

PRESETS = ("default", "quick")
STAGES = ("sft", "bpo", "dpo")


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- config

def make_config(preset: str | None = None, stage: str = "bpo", seed: int = 0) -> ml_collections.ConfigDict:
    """The train config of one stage (``sft`` / ``bpo`` / ``dpo``), with the ``sample`` / ``prefs`` / ``eval``
    keys the data and evaluation stages read."""
    from fairjax.tasks.vila_u_pref import default_config
    from fairjax.toy import world as world_lib
    from fairjax.toy.vila_u_model import ASSET_DIR, world

    preset = preset or "default"
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if stage not in STAGES:
        raise UserError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    w = world()
    quick = preset == "quick"
    c = default_config()
    c.loss = stage
    c.seed = int(seed)
    c.model.dir = ASSET_DIR
    c.model.dtype = c.model.param_dtype = "float32"
    c.model.scan_layers = "false"
    c.model.attention = "xla"
    # the recipe's shape (LoRA on every LLaMA layer's attention and MLP kernels) at toy size: rank 8, no dropout
    c.lora.rank, c.lora.alpha, c.lora.dropout = 8, 8.0, 0.0
    c.optimizer.weight_decay = 0.0
    c.optimizer.schedule = "cosine"
    c.warmup_ratio = 0.05
    c.checkpoint.every_steps = 1000
    c.log_every_steps = 25
    c.progress_bar = False
    if stage == "sft":  # stage 1: image-token cross-entropy on the balanced images
        c.optimizer.lr = 1e-3
        c.batch_size = 32
        c.total_steps = 20 if quick else 60
    elif stage == "bpo":  # stage 2: BPO (the scripts' loss = BPO only), continuing the stage-1 LoRA
        c.beta = 1.0
        c.bpo_variant = "v1"
        c.optimizer.lr = 5e-4
        c.batch_size = 16
        c.total_steps = 20 if quick else 100
    else:  # DPO on summed image-token log-probs, reference = the base without LoRA
        c.beta = 1.0
        c.optimizer.lr = 2e-4
        c.batch_size = 16
        c.total_steps = 20 if quick else 40
    kw = dict(genders=list(w.genders), races=list(w.races))
    # sampling shared by the pair builder and evaluate: cfg 1, no top-k / top-p: the model's own population
    c.sample = ml_collections.ConfigDict(dict(sampler="ddim", steps=1, guidance_scale=1.0, batch_size=128,
                                              top_k=0, top_p=0.0, temperature=1.0))
    c.prefs = ml_collections.ConfigDict(dict(n_identity=16 if quick else 48, n_neutral=32 if quick else 160,
                                             seed=1 + 100 * int(seed), identity_sft=True))
    c.eval = ml_collections.ConfigDict(dict(
        occupations=list(w.occupations), neutral_template=world_lib.NEUTRAL_TEMPLATE,
        identity_template=world_lib.IDENTITY_TEMPLATE, keywords=kw,
        n_neutral=32 if quick else 250, n_identity=4 if quick else 48, seed=1000 + 100 * int(seed), classifier="toy",
        n_resamples=50 if quick else 500, grid_images=8 if quick else 16))
    return c


# ----------------------------------------------------------------------------- pairs

def build_pairs(cfg, out: str, log=log, overwrite: bool = False) -> dict:
    """The pair and image datasets of the module docstring under ``out`` (atomically; an existing ``out`` only
    with ``overwrite``); returns a summary."""
    from fairjax.evaluate import vila_u_sampler
    from fairjax.io.model_dir import atomic_output_dir
    from fairjax.toy.world import identity_grid, load_toy_world
    from fairjax.vila_u import data as vdata

    w = load_toy_world(str(cfg.model.dir))
    gen = vila_u_sampler(cfg, str(cfg.model.dir), None)
    tok = gen.gen.model.tokenizer
    n_embed = int(gen.gen.model.vu.codebook.config.n_embed)
    idents = identity_grid(w)
    prompts, meta = [], []
    for oi, o in enumerate(w.occupations):
        for g, r in idents:
            prompts.append(w.identity_prompt(o, g, r))
            meta.append((oi, (g, r), int(cfg.prefs.n_identity)))
        prompts.append(w.neutral_prompt(o))
        meta.append((oi, None, int(cfg.prefs.n_neutral)))
    winners = {(oi, ident): [] for oi in range(len(w.occupations)) for ident in idents}
    losers = {oi: [] for oi in range(len(w.occupations))}
    kept = asked = 0
    for p, _, img, codes in gen.run(prompts, [m[2] for m in meta], int(cfg.prefs.seed)):
        oi, ident, _ = meta[p]
        lab = w.decode(img)
        got = None if lab is None else (lab["gender"], lab["race"])
        if ident is not None:
            asked += 1
            if got == ident and w.decode_occupation(img) == w.occupations[oi]:
                winners[(oi, ident)].append(np.asarray(codes, np.int32))
                kept += 1
        elif got is not None:
            losers[oi].append((got, np.asarray(codes, np.int32)))
    rng = np.random.default_rng(int(cfg.prefs.seed))
    pairs, images = [], []
    for oi, o in enumerate(w.occupations):
        prompt = w.neutral_prompt(o)
        ids = vdata.generation_ids(tok, prompt)
        avail = [i for i in idents if winners[(oi, i)]]
        for ident in avail:
            iprompt = w.identity_prompt(o, *ident)
            iids = vdata.generation_ids(tok, iprompt)
            for c in winners[(oi, ident)]:
                images.append({"id": oi, "prompt": prompt, "prompt_ids": ids, "codes": c, "group": "/".join(ident)})
                if cfg.prefs.identity_sft:  # the same image under the prompt it was generated from (keeps recall)
                    images.append({"id": oi, "prompt": iprompt, "prompt_ids": iids, "codes": c,
                                   "group": "/".join(ident)})
        for got, c_b in losers[oi]:
            choices = [i for i in avail if i != got]
            if not choices:
                continue
            ident = choices[rng.integers(len(choices))]
            pool = winners[(oi, ident)]
            a = {"id": oi, "prompt": prompt, "prompt_ids": ids, "codes": pool[rng.integers(len(pool))],
                 "group": "/".join(ident)}
            b = {"id": oi, "prompt": prompt, "prompt_ids": ids, "codes": c_b, "group": "/".join(got)}
            pairs.append(vdata.pair_record(a, b, where=f"{o} pair {len(pairs)}"))
    if not pairs:
        raise UserError("the base generated no usable pairs; raise prefs.n_neutral / prefs.n_identity")
    summary = {"identity_images": asked, "identity_images_kept": kept, "pairs": len(pairs), "images": len(images),
               "loser_groups": {w.occupations[oi]: _counts([g for g, _ in v]) for oi, v in losers.items()}}
    with atomic_output_dir(out, overwrite) as tmp:
        md = {"source": "fairjax.toy.vila_u", "model": str(cfg.model.dir)}
        vdata.write_dataset(os.path.join(tmp, "pairs"), "pairs", pairs, codebook_size=n_embed, metadata=md)
        vdata.write_dataset(os.path.join(tmp, "images"), "images", images, codebook_size=n_embed, metadata=md)
        with open(os.path.join(tmp, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    log(f"pairs: kept {kept}/{asked} identity images (exact labels), {len(pairs)} pairs, {len(images)} balanced "
        f"images -> {out}")
    return summary


def _counts(groups) -> dict:
    out = {}
    for g in groups:
        k = "/".join(g)
        out[k] = out.get(k, 0) + 1
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------- training

def train_one(cfg, workdir: str) -> dict:
    """Train through the ``python -m fairjax.train`` machinery (task registry + generic trainer)."""
    from fairjax import config as config_lib
    from fairjax import tasks, trainer

    os.makedirs(workdir, exist_ok=True)
    task = tasks.build(cfg, workdir=workdir)
    config_lib.check_or_save(cfg, workdir, allow_change=False)
    res = trainer.train(cfg, task, workdir)
    if res.get("preempted"):
        raise Interrupted(res["message"], res["signal"])
    return res


def neutral_shares(records_path: str, w) -> dict:
    """``{occupation: {gender / race: share of the labelled images, "no_face": share, "n"}}`` of the neutral
    prompts' images in a ``records_<model>.jsonl``."""
    counts: dict = {}
    with open(records_path) as f:
        for line in f:
            r = json.loads(line)
            if r.get("identity"):
                continue
            o = w.occupation_of(r["prompt"])
            d = counts.setdefault(o, {"n": 0, "no_face": 0})
            d["n"] += 1
            lab = r.get("labels")
            if not lab:
                d["no_face"] += 1
                continue
            for v in lab.values():
                d[v] = d.get(v, 0) + 1
    out = {}
    for o, d in counts.items():
        n, lab = d["n"], d["n"] - d["no_face"]
        out[o] = {"n": n, "no_face": round(d["no_face"] / max(n, 1), 4),
                  **{k: round(d.get(k, 0) / max(lab, 1), 4) for k in (*w.genders, *w.races)}}
    return out


def apply_stage_overrides(cfgs: dict, overrides: dict[str, str]) -> None:
    """``STAGE.KEY`` -> that stage's config only; any other ``KEY`` -> every stage's config."""
    from fairjax.config import apply_overrides

    for key, text in (overrides or {}).items():
        head, _, rest = key.partition(".")
        if head in cfgs and rest and head not in cfgs[head]:
            apply_overrides(cfgs[head], {rest: text})
        else:
            for c in cfgs.values():
                apply_overrides(c, {key: text})


def run(workdir: str, preset: str | None = None, seed: int = 0, locate: bool = True, overwrite: bool = False,
        log=log, overrides: dict[str, str] | None = None) -> dict:
    """The main job (module docstring); returns the result dict (also ``WORKDIR/result.json``)."""
    import shutil

    from fairjax.evaluate import evaluate, summary_lines
    from fairjax.toy.run import OverwritePass
    from fairjax.toy.vila_u_model import default_model_dir
    from fairjax.toy.world import load_toy_world

    if (preset or "default") not in PRESETS:  # before anything is written
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    t_start = time.perf_counter()
    times = {}
    workdir = os.path.abspath(workdir)
    cfgs = {s: make_config(preset, s, seed) for s in STAGES}
    apply_stage_overrides(cfgs, overrides)  # before anything is written: an unknown key loses nothing
    os.makedirs(workdir, exist_ok=True)
    base_dir = default_model_dir()
    for c in cfgs.values():
        c.model.dir = base_dir
    log(f"toy VILA-U: base model {base_dir} (preset {preset or 'default'}, seed {seed})")

    data = os.path.join(workdir, "data")
    t0 = time.perf_counter()
    ow = OverwritePass(workdir, overwrite)  # a stopped --overwrite pass goes on (its file says how far it got)
    if ow.redo("pairs") or not os.path.isdir(data):
        build_pairs(cfgs["bpo"], data, log=log, overwrite=ow.redo("pairs"))  # replaces data only when complete
        ow.done("pairs")
    else:
        log(f"pairs: reusing {data}")
    with open(os.path.join(data, "summary.json")) as f:
        data_summary = json.load(f)
    times["pairs"] = time.perf_counter() - t0
    raise_if_stopped(f"after the pairs were built ({data}); run the same command again to go on with training")

    cfgs["sft"].data.path = os.path.join(data, "images")
    cfgs["bpo"].data.path = cfgs["dpo"].data.path = os.path.join(data, "pairs")
    sft_lora = os.path.join(workdir, "sft", "lora.safetensors")
    cfgs["bpo"].lora.init = cfgs["dpo"].lora.init = sft_lora
    models = {"base": (base_dir, None)}
    for stage in STAGES:
        cfg, wd = cfgs[stage], os.path.join(workdir, stage)
        out = os.path.join(wd, "lora.safetensors")
        t0 = time.perf_counter()
        if ow.redo(stage):
            if os.path.isdir(wd):
                shutil.rmtree(wd)
            ow.done(stage)  # its checkpoints from now on are the pass's: a re-run resumes them
        if not os.path.isfile(out):
            log(f"train: {stage} (beta {cfg.beta:g}, lr {cfg.optimizer.lr:g}, {cfg.total_steps} steps of "
                f"{cfg.batch_size}) -> {wd}")
            res = train_one(cfg, wd)
            log(f"train: {stage} done: loss {res.get('loss', float('nan')):.4f}")
        else:
            log(f"train: reusing {wd}")
        times[f"train_{stage}"] = time.perf_counter() - t0
        models[stage] = (base_dir, out)
        raise_if_stopped(f"after train {stage} finished ({wd}); run the same command again to go on")

    t0 = time.perf_counter()
    rep_dir = os.path.join(workdir, "report")
    report = evaluate(cfgs["bpo"], models, rep_dir, overwrite=True, log=log)
    times["evaluate"] = time.perf_counter() - t0
    w = load_toy_world(base_dir)
    res = report["results"]
    metrics = {m: {k: res[m].get(k) for k in ("discrepancy", "recall")} for m in report["models"]}
    shares = {m: neutral_shares(os.path.join(rep_dir, f"records_{m}.jsonl"), w) for m in report["models"]}
    result = {"html": report["html"], "report": os.path.join(rep_dir, "report", "report.json"),
              "preset": preset or "default", "seed": seed, "data": data_summary, "metrics": metrics,
              "shares": shares, "target": target(metrics)}
    if locate:
        from fairjax.analysis.locate import locate_bias

        t0 = time.perf_counter()
        loc_dir = os.path.join(workdir, "locate")
        n = 16 if preset == "quick" else 64
        fix = 10 if preset == "quick" else 60  # the LLM-vs-image-head LoRA comparison, on the base only
        result["locate"] = {name: locate_bias(base_dir, os.path.join(loc_dir, name), lora=lora, n_per_prompt=n,
                                              seed=seed, fix_steps=fix if name == "base" else 0, log=log)["summary"]
                            for name, (_, lora) in (("base", models["base"]), ("bpo", models["bpo"]))}
        result["locate_html"] = {k: os.path.join(loc_dir, k, "index.html") for k in result["locate"]}
        from fairjax.analysis.locate import compare_html

        result["locate_compare_html"] = compare_html({k: os.path.join(loc_dir, k) for k in result["locate"]}, loc_dir)
        result["locate_moved"] = moved(result["locate"]["base"], result["locate"]["bpo"])
        times["locate"] = time.perf_counter() - t0
    times["total"] = time.perf_counter() - t_start
    result["times"] = {k: round(v, 1) for k, v in times.items()}
    with open(os.path.join(workdir, "result.json"), "w") as f:
        json.dump(result, f, indent=2)
    ow.finish()
    log("")
    for line in summary_lines(report):
        log(line)
    for m, d in shares.items():
        log(f"{m}: " + "; ".join(f"{o} male {v['male']:.2f} amber {v[w.races[0]]:.2f}" for o, v in d.items()))
    log(f"target (BPO halves both discrepancies, keeps >= 95% recall): {result['target']}")
    log(f"times (s): {result['times']}")
    log(f"report: {report['html']}")
    return result


def moved(base: dict, tuned: dict) -> dict:
    """What fine-tuning moved in the locate-then-fix summary: ``tuned - base`` for every per-attribute number
    of the tokenizer, understanding and generation keys."""
    out = {}
    for key in ("tokenizer_flip_rate", "understanding_accuracy", "generation_discrepancy"):
        a, b = base.get(key) or {}, tuned.get(key) or {}
        out[key] = {k: round(float(b[k]) - float(a[k]), 4) for k in a if k in b}
    return out


def target(metrics: dict, model: str = "bpo") -> dict:
    """Whether ``model`` at least halved the base's gender and race discrepancy and kept >= 95% of its recall."""
    b, m = metrics["base"], metrics[model]
    out = {}
    for a in ("gender", "race"):
        out[f"{a}_ratio"] = round(m["discrepancy"][a] / max(b["discrepancy"][a], 1e-9), 4)
    out["recall_ratio"] = round(m["recall"]["both"] / max(b["recall"]["both"], 1e-9), 4)
    out["met"] = bool(out["gender_ratio"] <= 0.5 and out["race_ratio"] <= 0.5 and out["recall_ratio"] >= 0.95)
    return out


def main(argv=None) -> int:
    from fairjax.io import fs

    argv = sys.argv[1:] if argv is None else list(argv)

    def body():
        from fairjax.config import split_overrides

        rest, overrides = split_overrides(argv)
        p = argparse.ArgumentParser(prog="python -m fairjax.toy.vila_u", description=__doc__.split("\n\n")[0],
                                    epilog="--config.KEY=VALUE: every stage; --config.STAGE.KEY=VALUE: one stage "
                                           f"({', '.join(STAGES)}).")
        p.add_argument("--workdir", default="runs/toy_vila_u")
        p.add_argument("--preset", default=None, help=f"one of {', '.join(PRESETS)} (default: default)")
        p.add_argument("--seed", type=int, default=0, help="seeds the pairs, the training and the evaluation")
        p.add_argument("--no-locate", action="store_true", help="skip the locate-then-fix analysis")
        p.add_argument("--overwrite", action="store_true", help="redo every stage")
        args = p.parse_args(rest)
        run(args.workdir, args.preset, seed=args.seed, locate=not args.no_locate, overwrite=args.overwrite,
            overrides=overrides)

    return fs.run_entry(body)


if __name__ == "__main__":
    sys.exit(main())
