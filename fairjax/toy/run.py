"""The main job: the whole population pipeline on the toy world, on a CPU.

    python -m fairjax.toy.run --workdir runs/toy [--preset popalign|full|quick|smoke] [--no-sft] [--calibrated]

1. the pre-trained toy model (``fairjax/assets/toy``, checked against its manifest; a biased
   tiny SDXL-architecture pixel-space model, see :mod:`fairjax.toy.model`);
2. ``python -m fairjax.data.build_prefs``: winning (identity-balanced) and losing (the base's
   own, biased) sets per neutral prompt -> ``WORKDIR/prefs``;
3. ``python -m fairjax.train`` machinery (:mod:`fairjax.tasks.diffusion_pref`): PopAlign
   -> ``WORKDIR/popalign``, the SFT baseline -> ``WORKDIR/sft`` (unless ``--no-sft``), and with
   ``--calibrated`` PopAlign with the calibrated beta -> ``WORKDIR/popalign_calibrated``;
4. ``python -m fairjax.evaluate``: the base and every tuned model side by side
   -> ``WORKDIR/report/report/index.html``; the before/after discrepancy is printed.

Every stage is skipped when its output already exists (re-run to resume; ``--overwrite`` to redo:
the pass is kept in ``WORKDIR/.overwrite.json`` until the job finishes, so that a re-run after a stop
goes on with it, see :class:`OverwritePass`).
SIGTERM / SIGINT stop the whole job once the current stage has saved: training at the next step
(checkpoint saved, the stage's output not written, so it is not taken as done), image generation
between batches (the stage writes nothing), or after a stage finished; one line says where, the
exit status is 128 + the signal number (143 / 130), and re-running resumes the interrupted stage.
The calibrated beta: ``fairjax.losses.calibrate_beta`` on the base's group frequencies (the
losing sets: the base's own neutral generations), the winners' and the losers', converted from
the exact-likelihood scale to the diffusion loss's by :func:`diffusion_beta_scale`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import numpy as np

from fairjax.errors import Interrupted, UserError
from fairjax.io import fs, host
from fairjax.io.preemption import raise_if_stopped


def log(msg: str) -> None:
    print(msg, flush=True)


def diffusion_beta_scale(scheduler_config: dict, latent_shape) -> float:
    """``T * D * mean_t w_t``: the factor between an exact log-likelihood ratio and the diffusion
    reward ``g = mse_ref - mse_policy`` at a uniform timestep.

    DDPM's bound (Ho et al. 2020, eq. 12, ``sigma_t^2 = beta_t``) gives
    ``log p(x) ~ -sum_t w_t * D * mse_t`` with ``w_t = beta_t / (2 alpha_t (1 - abar_t))`` and ``D``
    the number of latent values, so ``log p_pol - log p_ref ~ T * D * E_t[w_t g_t] ~ T * D * mean(w) * g``
    (the last step treats ``g_t`` as uncorrelated with ``w_t``: an approximation). A PopAlign
    beta of ``b`` on exact likelihoods is then ``b * T * D * mean(w)`` on ``g``.
    """
    from fairjax.diffusion.schedules import alphas_cumprod_from_betas, betas_from_config

    betas = betas_from_config(scheduler_config).astype(np.float64)
    abar = alphas_cumprod_from_betas(betas).astype(np.float64)
    w = betas / (2 * (1 - betas) * (1 - abar))
    return float(len(betas) * int(np.prod(latent_shape)) * w.mean())


def calibrated_beta(summary: dict, scheduler_config: dict, latent_shape) -> dict:
    """The calibrated beta (exact and diffusion scale) from a build_prefs summary, per attribute
    and joint (gender x race groups pooled through both attributes' frequencies)."""
    from fairjax import losses

    out = {}
    for attr in summary["winner_frequencies"]:
        cls = list(summary["winner_frequencies"][attr])
        w = np.array([summary["winner_frequencies"][attr][c] for c in cls])
        l = np.array([summary["loser_frequencies"][attr][c] for c in cls])
        keep = (w > 0) & (l > 0)
        out[attr] = float(losses.calibrate_beta(l[keep], w[keep], l[keep]))
    exact = float(np.exp(np.mean(np.log(list(out.values())))))  # geometric mean over the attributes
    scale = diffusion_beta_scale(scheduler_config, latent_shape)
    return {"exact_per_attribute": out, "exact": exact, "scale": scale, "beta": exact * scale}


def train_one(cfg, workdir: str) -> dict:
    """Train through the ``python -m fairjax.train`` machinery (task registry + generic trainer)."""
    from fairjax import config as config_lib
    from fairjax import tasks, trainer

    os.makedirs(workdir, exist_ok=True)
    task = tasks.build(cfg, workdir=workdir)
    config_lib.check_or_save(cfg, workdir, allow_change=False)
    res = trainer.train(cfg, task, workdir)
    if res.get("preempted"):  # saved, not finished: the job stops here (finish() wrote no output)
        raise Interrupted(res["message"], res["signal"])
    return res


def tuned_model(cfg, workdir: str) -> tuple[str, str | None]:
    """``(model dir, lora file | None)`` that a finished training run wrote."""
    if int(cfg.lora.rank):
        return str(cfg.model.dir), os.path.join(workdir, "unet_lora.safetensors")
    return os.path.join(workdir, "model"), None


def _done(path: str) -> bool:
    return os.path.exists(path)


class OverwritePass:
    """``--overwrite``: redo every stage once. From the first stage it redoes (a training stage: from its
    start, its checkpoints are the pass's) until the job finishes, the pass is kept in
    ``WORKDIR/.overwrite.json``, and ``WORKDIR/result.json`` of the run before is removed. So when a signal
    stops the pass, the same command (with or without ``--overwrite``) goes on with it: the stages it redid
    are reused, its training resumes from its checkpoint, and no output of the run before the pass is taken
    as done. Without ``--overwrite`` and no pass under way, nothing is redone."""

    FILE = ".overwrite.json"

    def __init__(self, workdir: str, overwrite: bool):
        self.path = os.path.join(workdir, self.FILE)
        self.result = os.path.join(workdir, "result.json")
        self.stages: list[str] | None = [] if overwrite else None  # None: no pass under way
        if os.path.isfile(self.path):
            with open(self.path) as f:
                self.stages = list(json.load(f)["redone"])

    def redo(self, stage: str) -> bool:
        """Whether ``stage``'s existing output (if any) predates the pass and must be redone."""
        return self.stages is not None and stage not in self.stages

    def done(self, stage: str) -> None:
        """``stage`` was redone (or, training, begun) in this pass."""
        if not self.redo(stage):
            return
        if not os.path.isfile(self.path) and os.path.exists(self.result):  # the pass's first change
            os.remove(self.result)
        self.stages.append(stage)
        tmp = f"{self.path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"redone": self.stages}, f)
        os.replace(tmp, self.path)

    def finish(self) -> None:
        if os.path.exists(self.path):
            os.remove(self.path)


def _sample_units(cfg, n_prompts: int, n_neutral: int, n_identity: int, n_models: int = 1) -> float:
    """UNet forward passes of one image that generating a neutral + identity prompt grid takes."""
    n_ident = len(cfg.prefs.keywords.genders) * len(cfg.prefs.keywords.races)
    images = n_prompts * (int(n_neutral) + n_ident * int(n_identity)) * n_models
    cfg_pass = 2 if float(cfg.sample.guidance_scale) > 1.0 else 1
    return float(images * int(cfg.sample.steps) * cfg_pass)


def _train_units(cfg) -> float:
    """A training run's work in the same unit (a rough FLOP count: backward ~ 1 forward for a LoRA,
    whose frozen kernels need no weight gradient, ~ 2 forwards for the full UNet; the reference
    model's forward 1; the identity anchor runs both on half the batch)."""
    policy = 2.0 if int(cfg.lora.rank) else 3.0
    if str(cfg.loss) == "sft":
        per_image = policy * int(cfg.get("noise_draws", 1))
    else:
        per_image = (policy + 1.0) * int(cfg.get("noise_draws", 1))
        if float(cfg.get("anchor_weight", 0.0)):
            per_image += 0.5 * (policy + 1.0)
    return float(int(cfg.total_steps) * int(cfg.batch_size) * per_image)


def run(workdir: str, preset: str | None = None, sft: bool = True, calibrated: bool = False,
        overwrite: bool = False, overrides: dict | None = None) -> dict:
    """The main job (module docstring); returns ``{"report", "html", "beta", "times", ...}``."""
    from fairjax.config import apply_overrides
    from fairjax.data.build_prefs import build_prefs, read_summary
    from fairjax.evaluate import evaluate, summary_lines
    from fairjax.progress import StagePlan, format_seconds
    from fairjax.toy.config import make_config
    from fairjax.toy.model import SCHEDULER_CONFIG, default_model_dir

    t_start = time.perf_counter()
    times = {}
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    base = make_config(preset)
    if overrides:
        apply_overrides(base, overrides)
    if base.model.dir == make_config().model.dir:
        base.model.dir = default_model_dir()  # the shipped model, verified against its manifest
    log(f"toy world: base model {base.model.dir}")

    prefs_dir = os.path.join(workdir, "prefs")
    runs = {"popalign": copy.deepcopy(base)}
    runs["popalign"].loss = "popalign"
    if sft:  # the SFT baseline on the same data, with its own preset's rate and steps
        sft_preset = {"quick": "quick_sft", "quick_sft": "quick_sft", "smoke": "smoke_sft", "smoke_sft": "smoke_sft"}
        runs["sft"] = make_config(sft_preset.get(preset or "", "sft"))
        if overrides:
            apply_overrides(runs["sft"], overrides)
        runs["sft"].model.dir = base.model.dir
        runs["sft"].loss = "sft"
    if calibrated:
        runs["popalign_calibrated"] = copy.deepcopy(base)
        runs["popalign_calibrated"].loss = "popalign"
    n_prompts = len(base.prefs.neutral_prompts)
    plan = StagePlan(
        [("build_prefs", "sample", _sample_units(base, n_prompts, base.prefs.n_neutral, base.prefs.n_identity))]
        + [(f"train_{name}", "train", _train_units(cfg)) for name, cfg in runs.items()]
        + [("evaluate", "sample", _sample_units(base, len(base.eval.occupations), base.eval.n_neutral,
                                                base.eval.n_identity, n_models=1 + len(runs)))])
    log(f"stages: {', '.join(n for n, _, _ in plan.stages)} (time left is estimated after each stage)")

    def stage_done(name: str, seconds: float, reused: bool = False) -> None:
        if reused:
            plan.skip(name)
            return
        plan.done(name, seconds)
        left = plan.line()
        if left:
            log(f"{name}: {format_seconds(seconds)}; {left}")

    ow = OverwritePass(workdir, overwrite)
    t0 = time.perf_counter()
    reused = not ow.redo("build_prefs") and _done(prefs_dir)
    if not reused:
        build_prefs(base, prefs_dir, overwrite=ow.redo("build_prefs"), log=log)
        ow.done("build_prefs")
    else:
        log(f"build_prefs: reusing {prefs_dir}")
        _check_prompts(prefs_dir, float(base.get("anchor_weight", 0.0)))
    summary = read_summary(prefs_dir)
    times["build_prefs"] = time.perf_counter() - t0
    stage_done("build_prefs", times["build_prefs"], reused)
    raise_if_stopped(f"after build_prefs finished ({prefs_dir}); run the same command again to go on with training")

    cal = calibrated_beta(summary, SCHEDULER_CONFIG, _latent_shape(prefs_dir))
    log(f"calibrate_beta: exact-likelihood beta {cal['exact']:.3f} (per attribute "
        f"{ {k: round(v, 3) for k, v in cal['exact_per_attribute'].items()} }) x scale {cal['scale']:.0f} "
        f"= {cal['beta']:.0f} on the diffusion reward (config beta {base.beta:g})")
    if calibrated:
        runs["popalign_calibrated"].beta = float(round(cal["beta"], 1))
    models = {"base": (str(base.model.dir), None)}
    for name, cfg in runs.items():
        wd = os.path.join(workdir, name)
        cfg.data.path = prefs_dir
        t0 = time.perf_counter()
        out_model = tuned_model(cfg, wd)
        reused = not ow.redo(name) and _done(out_model[1] or out_model[0])
        if not reused:
            if ow.redo(name):
                if os.path.isdir(wd):
                    import shutil

                    shutil.rmtree(wd)
                ow.done(name)  # its checkpoints from now on are the pass's: a re-run resumes them
            anchor = f", identity anchor {cfg.anchor_weight:g}" if cfg.get("anchor_weight", 0.0) else ""
            log(f"train: {name} (loss {cfg.loss}, beta {cfg.beta:g}{anchor}, {cfg.total_steps} steps of "
                f"{cfg.batch_size}) -> {wd}")
            res = train_one(cfg, wd)
            log(f"train: {name} done: loss {res.get('loss', float('nan')):.4f}")
        else:
            log(f"train: reusing {wd}")
        times[f"train_{name}"] = time.perf_counter() - t0
        stage_done(f"train_{name}", times[f"train_{name}"], reused)
        models[name] = out_model
        raise_if_stopped(f"after train {name} finished ({wd}); run the same command again to go on")

    t0 = time.perf_counter()
    out = os.path.join(workdir, "report")
    report = evaluate(base, models, out, base_dir=str(base.model.dir), overwrite=True, log=log)
    times["evaluate"] = time.perf_counter() - t0
    times["total"] = time.perf_counter() - t_start
    result = {"html": report["html"], "report": os.path.join(out, "report", "report.json"),
              "calibrated_beta": cal, "times": {k: round(v, 1) for k, v in times.items()},
              "metrics": {m: {k: report["results"][m].get(k) for k in ("discrepancy", "recall")}
                          for m in report["models"]}}
    with open(os.path.join(workdir, "result.json"), "w") as f:
        json.dump(result, f, indent=2)
    ow.finish()
    log("")
    for line in summary_lines(report):
        log(line)
    log(f"times (s): {result['times']}")
    log(f"report: {report['html']}")
    return result


def _index(prefs_dir: str) -> dict:
    """The preference dataset's index (``fairjax.data.prefs.INDEX_FILE``)."""
    from fairjax.data.prefs import INDEX_FILE, dataset_dir

    with open(os.path.join(dataset_dir(prefs_dir), INDEX_FILE)) as f:
        return json.load(f)


def _check_prompts(prefs_dir: str, anchor_weight: float) -> None:
    """A reused preference set written before records kept their prompts cannot feed the anchor."""
    if anchor_weight and not _index(prefs_dir).get("has_prompt", False):
        raise UserError(f"{prefs_dir} was built before preference records kept the prompt each image was generated "
                        f"from, which the identity anchor (anchor_weight={anchor_weight:g}) needs: re-run with "
                        "--overwrite, or pass --config.anchor_weight=0")


def _latent_shape(prefs_dir: str):
    return tuple(_index(prefs_dir)["latent_shape"])


def main(argv=None) -> int:
    """Exit status: 0, 2 bad input, 128 + the signal's number when SIGTERM / SIGINT stopped the job."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return fs.run_entry(lambda: _main(argv))  # Interrupted: after the current stage saved; a re-run resumes it


def _main(argv: list[str]) -> int:
    from fairjax.config import split_overrides

    rest, overrides = split_overrides(argv)
    p = argparse.ArgumentParser(prog="python -m fairjax.toy.run", description=__doc__.split("\n\n")[0],
                                epilog="Override any key of configs/toy_world.py with --config.KEY=VALUE.")
    p.add_argument("--workdir", default="runs/toy", help="where every stage writes (default runs/toy)")
    p.add_argument("--preset", default=None, help="configs/toy_world.py preset (popalign, lora, quick, ...)")
    p.add_argument("--no-sft", action="store_true", help="skip the SFT baseline")
    p.add_argument("--calibrated", action="store_true", help="also train PopAlign with the calibrated beta")
    p.add_argument("--overwrite", action="store_true", help="redo every stage")
    args = p.parse_args(rest)
    from fairjax import parallel

    parallel.enable_compilation_cache()
    run(args.workdir, args.preset, sft=not args.no_sft, calibrated=args.calibrated, overwrite=args.overwrite,
        overrides=overrides)
    return 0


if __name__ == "__main__":
    from fairjax.io.preemption import PreemptionGuard

    with PreemptionGuard():  # a signal is a flag from here on, also while jax is imported; main's guard nests
        host.tune_allocator()  # glibc malloc tunables (re-executes once), synchronous CPU dispatch
        sys.exit(main())
