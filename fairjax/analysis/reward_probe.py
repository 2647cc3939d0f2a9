"""Where a preference-tuned diffusion model puts its implicit reward: per group and per timestep.

    python -m fairjax.analysis.reward_probe --data PREFS --tuned RUN/model [--base MODEL] [--lora F] --out DIR

For every record of a preference dataset (:mod:`fairjax.data.build_prefs`: latents, caption,
attribute labels) and ``--draws`` shared ``(eps, t)`` draws, the probe computes the reward the
PopAlign / Diffusion-DPO losses train (:mod:`fairjax.tasks.diffusion_pref`)::

    g = mse_base(x_t, t, c) - mse_tuned(x_t, t, c)        (the same eps and t for both models)

and averages it per attribute class (``label_<attr>`` of the record) and per side (winners,
losers) within ``--buckets`` equal timestep ranges, with the standard error over records, plus
the mean over all records (the *common* part, which PopAlign's centred loss is blind to), and the
same class rows within each prompt's set (``--by-prompt`` prints them): the loss asks for a
different direction per prompt when occupations are biased different ways. A tuned model whose reward favours the
winning set's groups at the timesteps where the attribute is decided (mid to high noise) samples
them more often; a large negative common part is a model that got worse on every image.

Writes ``probe.json`` (everything), ``probe.csv`` (one row per prompt or pooled, attribute, class and bucket) and
``reward_<attr>.png`` (reward against timestep, one line per class) under ``--out``, and prints
the table. Each draw's timestep is stratified (``t`` uniform within every bucket in turn), so every
bucket gets the same number of draws. SIGTERM / SIGINT stop it between batches with one line and exit status
128 + the signal number, writing nothing; a re-run starts over.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence

import numpy as np

from fairjax.errors import UserError
from fairjax.io import fs


def bucket_edges(num_train_timesteps: int, buckets: int) -> np.ndarray:
    """``buckets + 1`` integer edges splitting ``[0, T)`` into equal ranges."""
    if not 1 <= buckets <= num_train_timesteps:
        raise UserError(f"--buckets {buckets} must be between 1 and the {num_train_timesteps} training timesteps")
    return np.round(np.linspace(0, num_train_timesteps, buckets + 1)).astype(np.int64)


def _time_ids(model_dir: str, latent_shape: Sequence[int]) -> np.ndarray:
    """SDXL micro-conditioning for the dataset's resolution, in pixels (latent size x 8, or x 1 for
    a pixel-space model such as the toy world's)."""
    from fairjax.diffusion.generator import is_pixel_space
    from fairjax.diffusion.pipeline import add_time_ids

    f = 1 if is_pixel_space(model_dir) else 8
    return add_time_ids(int(latent_shape[-2]) * f, int(latent_shape[-1]) * f)


def load_models(base: str, tuned: str | None, lora: str | None):
    """``(unet module, base params, tuned params)``; tuned = ``tuned``'s UNet, or base + ``lora``."""
    from fairjax.diffusion.pipeline import merge_lora
    from fairjax.models import unet

    if (tuned is None) == (lora is None):
        raise UserError("pass exactly one of --tuned (a fine-tuned model dir) and --lora (a LoRA on --base)")
    mod, base_params = unet.load(base)
    if lora is not None:
        tuned_params = merge_lora(base_params, lora)  # a missing file is merge_lora's one-line error
    else:
        tmod, tuned_params = unet.load(tuned)
        if tmod.config != mod.config:
            raise UserError(f"{tuned}: its UNet config differs from the base's ({base}); probe a model against "
                             "the base it was tuned from")
    return mod, base_params, tuned_params


def probe(data_dir: str, base: str, tuned: str | None = None, lora: str | None = None, *, split: str = "train",
          draws: int = 8, buckets: int = 5, batch_size: int = 256, max_records: int = 0, seed: int = 0) -> dict:
    """Mean reward per attribute class and timestep bucket (module docstring); returns the result dict."""
    import jax
    import jax.numpy as jnp

    from fairjax.data.prefs import PreferenceData
    from fairjax.diffusion import schedules, text_embeds
    from fairjax.diffusion.rewards import per_sample_mse
    from fairjax.io.model_dir import read_json

    if draws < 1:
        raise UserError(f"--draws {draws} must be >= 1")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size} must be >= 1")
    data = PreferenceData(data_dir, split)
    classes = data.info.get("metadata", {}).get("classes") or {}
    if not data.label_names:
        raise UserError(f"{data_dir} has no attribute labels; the probe groups records by them "
                         "(build the set with fairjax.data.build_prefs)")
    mod, p_base, p_tuned = load_models(base, tuned, lora)
    sched = schedules.ddpm_schedule(read_json(os.path.join(base, "scheduler", "scheduler_config.json")))
    T = sched.num_train_timesteps
    edges = bucket_edges(T, buckets)
    n = len(data) if not max_records else min(len(data), int(max_records))
    rec = data.read(np.arange(n))
    latents = np.asarray(rec["latents"], np.float32)
    caps = [str(c) for c in rec["caption"]]
    table = text_embeds.cached_table(base, sorted(set(caps)), None)
    if latents.shape[1] != mod.config["in_channels"]:
        raise UserError(f"the dataset's latents have {latents.shape[1]} channels but the UNet takes "
                         f"{mod.config['in_channels']}; the dataset was made with another model")
    cond = table.gather(table.ids(caps))
    tids = _time_ids(base, latents.shape[1:]) if "text_embeds" in cond else None

    @jax.jit
    def rewards(x0, ctx, emb, key, lo, hi):
        k1, k2 = jax.random.split(key)
        eps = jax.random.normal(k1, x0.shape, jnp.float32)
        t = jax.random.randint(k2, (x0.shape[0],), lo, hi)
        xt = schedules.add_noise(sched, x0, eps, t)
        target = schedules.training_target(sched, x0, eps, t)
        added = None if emb is None else {"text_embeds": emb,
                                          "time_ids": jnp.broadcast_to(jnp.asarray(tids), (x0.shape[0], 6))}

        def mse(p):
            return per_sample_mse(mod.apply({"params": p}, xt, t, ctx, added), target)

        return mse(p_base) - mse(p_tuned)

    from fairjax.checkpoint import raise_if_stopped

    key = jax.random.key(seed)
    g = np.zeros((n, buckets), np.float64)  # per record and bucket: mean over draws
    for b in range(buckets):
        for d in range(draws):
            for s in range(0, n, batch_size):
                raise_if_stopped(f"while probing (bucket {b + 1} of {buckets}, draw {d + 1} of {draws}): nothing "
                                 "written; run the same command again to start over")
                sl = slice(s, min(n, s + batch_size))
                k = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, b), d), s)
                out = rewards(jnp.asarray(latents[sl]), jnp.asarray(cond["encoder_hidden_states"][sl]),
                              None if tids is None else jnp.asarray(cond["text_embeds"][sl]), k,
                              int(edges[b]), int(edges[b + 1]))
                g[sl, b] += np.asarray(out, np.float64) / draws

    def stats(rows):
        m = g[rows].mean(0)
        se = g[rows].std(0, ddof=1) / math.sqrt(len(rows)) if len(rows) > 1 else np.full(buckets, np.nan)
        return {"n": int(len(rows)), "mean": m.tolist(), "se": se.tolist()}

    result = {"data": os.path.abspath(data_dir), "base": os.path.abspath(base),
              "tuned": os.path.abspath(tuned) if tuned else None, "lora": os.path.abspath(lora) if lora else None,
              "draws": draws, "records": n, "bucket_edges": edges.tolist(),
              "common": stats(np.arange(n)), "attributes": {}}
    win = np.asarray(rec["is_winner"], bool)
    result["sides"] = {side: stats(np.flatnonzero(win == (side == "winner")))
                       for side in ("winner", "loser") if np.any(win == (side == "winner"))}
    # per caption (a neutral prompt's set) as well: PopAlign's demand differs by prompt (one
    # occupation's losers over-represent one gender, another's the other), which pooled rows average away
    in_prompt = {cap: np.asarray(caps, dtype=object) == cap for cap in sorted(set(caps))}
    result["prompts"] = {cap: {"n": int(m.sum()), "attributes": {}} for cap, m in in_prompt.items()}
    for attr in data.label_names:
        lab = np.asarray(rec[f"label_{attr}"])
        names = list(classes.get(attr) or [str(i) for i in range(int(lab.max()) + 1)])
        result["attributes"][attr] = {names[c]: stats(np.flatnonzero(lab == c))
                                      for c in range(len(names)) if np.any(lab == c)}
        for cap, m in in_prompt.items():
            result["prompts"][cap]["attributes"][attr] = {
                names[c]: stats(np.flatnonzero(m & (lab == c))) for c in range(len(names)) if np.any(m & (lab == c))}
    return result


def table_rows(result: dict) -> list[dict]:
    edges = result["bucket_edges"]
    rows = []
    groups = ([("", "all", "all", result["common"])] + [("", "side", c, s) for c, s in result["sides"].items()]
              + [("", a, c, s) for a, cls in result["attributes"].items() for c, s in cls.items()]
              + [(p, a, c, s) for p, by in result["prompts"].items() for a, cls in by["attributes"].items()
                 for c, s in cls.items()])
    for prompt, attr, cls, s in groups:
        for b in range(len(edges) - 1):
            rows.append({"prompt": prompt, "attribute": attr, "class": cls, "t_from": edges[b], "t_to": edges[b + 1],
                         "n": s["n"], "reward": s["mean"][b], "se": s["se"][b]})
    return rows


def summary_lines(result: dict, by_prompt: bool = False) -> list[str]:
    edges = result["bucket_edges"]
    head = "  ".join(f"t {edges[b]:>4}-{edges[b + 1]:<4}" for b in range(len(edges) - 1))
    lines = [f"reward g = mse_base - mse_tuned (x1e4, mean ± s.e. over records; {result['draws']} draws per "
             f"bucket and record)", f"{'':18s} {head}"]

    def fmt(s):
        return "  ".join(f"{m * 1e4:+7.2f}±{se * 1e4:<4.2f}" for m, se in zip(s["mean"], s["se"]))

    lines.append(f"{'all records':18s} {fmt(result['common'])}")
    for side, s in result["sides"].items():
        lines.append(f"{side + 's':18s} {fmt(s)}")
    for attr, cls in result["attributes"].items():
        for c, s in cls.items():
            lines.append(f"{attr + ':' + c:18s} {fmt(s)}")
    if by_prompt:
        for prompt, by in result["prompts"].items():
            lines.append(f"{prompt} ({by['n']} records)")
            for attr, cls in by["attributes"].items():
                for c, s in cls.items():
                    lines.append(f"  {attr + ':' + c:16s} {fmt(s)}")
    return lines


def write_outputs(result: dict, out: str, overwrite: bool = False) -> None:
    """probe.json, probe.csv and reward_<attr>.png in ``out`` (written to a temp dir, then renamed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fairjax.fairness.report import write_csv
    from fairjax.io.model_dir import atomic_output_dir

    edges = np.asarray(result["bucket_edges"])
    mid = (edges[:-1] + edges[1:]) / 2
    with atomic_output_dir(out, overwrite) as tmp:
        with open(os.path.join(tmp, "probe.json"), "w") as f:
            json.dump(result, f, indent=2)
        write_csv(os.path.join(tmp, "probe.csv"), table_rows(result))
        for attr, cls in result["attributes"].items():
            fig, ax = plt.subplots(figsize=(6, 3.6))
            for c, s in cls.items():
                ax.errorbar(mid, np.asarray(s["mean"]) * 1e4, yerr=2 * np.asarray(s["se"]) * 1e4, marker="o",
                            capsize=3, label=f"{c} (n={s['n']})")
            ax.plot(mid, np.asarray(result["common"]["mean"]) * 1e4, "k--", label="all records")
            ax.axhline(0, color="grey", lw=0.5)
            ax.set_xlabel("timestep t")
            ax.set_ylabel("reward mse_base - mse_tuned (x1e4)")
            ax.set_title(f"implicit reward by {attr} (±2 s.e.)")
            ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(os.path.join(tmp, f"reward_{attr}.png"), dpi=100)
            plt.close(fig)


def main(argv=None) -> int:
    from fairjax.convert.resolve import add_model_args, resolve_args

    p = argparse.ArgumentParser(prog="python -m fairjax.analysis.reward_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="preference dataset dir (fairjax.data.build_prefs output)")
    p.add_argument("--tuned", default=None, help="fine-tuned model dir (a training run's model/)")
    p.add_argument("--lora", default=None, help="a fairjax LoRA file on --base (instead of --tuned)")
    p.add_argument("--base", default=None, help="the reference model dir (default: the base_model --tuned names)")
    p.add_argument("--out", required=True, help="output dir for probe.json, probe.csv, reward_<attr>.png")
    p.add_argument("--split", default="train")
    p.add_argument("--draws", type=int, default=8, help="(eps, t) draws per record and timestep bucket")
    p.add_argument("--buckets", type=int, default=5, help="equal timestep ranges")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-records", type=int, default=0, help="probe only the first N records (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--by-prompt", action="store_true", help="also print the rows of every prompt's set")
    p.add_argument("--overwrite", action="store_true")
    add_model_args(p)
    args = p.parse_args(argv)

    def body():  # SIGTERM / SIGINT: stop between batches, one line, exit 128 + the signal number
        check_args(args)
        with fs.locked(args.out, what="--out"):  # a second run on OUT is refused before it loads a model
            args.tuned, args.base = resolve_args(args.tuned, args), resolve_args(args.base, args)
            from fairjax import parallel

            parallel.enable_compilation_cache()
            _run(args)

    return fs.run_entry(body)


def check_args(args: argparse.Namespace) -> None:
    """The cheap checks, before a model is loaded: counts in range, ``--base`` (default: the one ``--tuned``
    names), OUT disjoint from every input."""
    if (args.tuned is None) == (args.lora is None):
        raise UserError("pass exactly one of --tuned (a fine-tuned model dir) and --lora (a LoRA on --base)")
    for name, lo in (("draws", 1), ("buckets", 1), ("batch_size", 1), ("max_records", 0)):
        if getattr(args, name) < lo:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= {lo}")
    if not 0 <= args.seed < 2**32:
        raise UserError(f"--seed must be in [0, 2**32) (got {args.seed})")
    if args.base is None:
        from fairjax.evaluate import base_of

        args.base = base_of(args.tuned) if args.tuned and os.path.isdir(args.tuned) else None
        if args.base is None:
            raise UserError("pass --base: the reference model dir (the tuned model's fairjax.json names none)")
    fs.check_output(args.out, what="--out", overwrite=args.overwrite,
                    inputs={"--data": args.data, "--tuned": args.tuned, "--lora": args.lora, "--base": args.base})


def _run(args: argparse.Namespace) -> None:
    res = probe(args.data, args.base, args.tuned, args.lora, split=args.split, draws=args.draws,
                buckets=args.buckets, batch_size=args.batch_size, max_records=args.max_records, seed=args.seed)
    write_outputs(res, args.out, args.overwrite)
    for line in summary_lines(res, by_prompt=args.by_prompt):
        print(line)
    print(f"wrote {args.out}/probe.json, probe.csv, reward_<attr>.png")


if __name__ == "__main__":
    sys.exit(main())
