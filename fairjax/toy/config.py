"""The toy world's experiment config (``configs/toy_world.py`` is a thin wrapper around :func:`make_config`).

One ``ml_collections`` config serves every stage:

* the trainer and the SDXL preference task (:mod:`fairjax.tasks.diffusion_pref`) read the
  usual keys (``loss``, ``beta``, ``model.dir``, ``data.path``, ``optimizer``, ...);
* :mod:`fairjax.data.build_prefs` reads ``sample`` and ``prefs``;
* :mod:`fairjax.evaluate` reads ``sample`` and ``eval``;
* :mod:`fairjax.toy.run` (the main job) runs all of them.

Presets: ``popalign`` (default: PopAlign with a rank-8 LoRA), ``full`` (PopAlign on the full
UNet), ``sft``, ``dpo`` (Diffusion-DPO, full UNet), ``quick`` / ``quick_sft`` (PopAlign / SFT with
fewer images and steps: the sizes the slow test uses), ``smoke`` / ``smoke_sft`` (the smallest sizes
that still form preference pairs: the job's plumbing, resume and signal tests, not its results).
"""

from __future__ import annotations

import ml_collections

from fairjax.toy import world as world_lib

PRESETS = ("popalign", "full", "sft", "dpo", "quick", "quick_sft", "smoke", "smoke_sft")


def make_config(arg: str | None = None) -> ml_collections.ConfigDict:
    from fairjax.tasks.diffusion_pref import make_config as diffusion_config
    from fairjax.toy.model import ASSET_DIR

    if arg not in (None,) + PRESETS:
        raise ValueError(f"unknown preset {arg!r}; choose one of {PRESETS}")
    w = world_lib.ToyWorld()
    loss = {"sft": "sft", "quick_sft": "sft", "smoke_sft": "sft", "dpo": "diffusion_dpo"}.get(arg or "", "popalign")
    c = diffusion_config(loss)
    c.model.dir = ASSET_DIR
    c.time_ids = (float(w.size), float(w.size), 0.0, 0.0, float(w.size), float(w.size))
    c.model.dtype = "float32"
    c.model.remat = "none"
    c.data.caption_dropout = 0.0  # the toy samples without guidance: a dropped caption only dilutes the signal
    # beta 250, about an eighth of the calibrated 1893: the per-sample loss sees each image's reward
    # through a one- or two-draw estimate of its ELBO difference, and -logsigmoid's curvature turns
    # that estimator's variance into a penalty on moving at all (about beta^2 var(g) / 8; the
    # training loss sits above log 2). Without the anchor below, beta 2000 -> 1000 -> 500 took race
    # discrepancy 0.191 -> 0.157 -> 0.127 and recall 98% -> 95% -> 92% of the base's; with it the
    # recall stays within about 1% of the base's down to beta 150 (docs/toy_world.md). 200 with the
    # short cosine schedule below: at 250 it left the per-prompt gender bias at 0.53-0.54x the base's in
    # training seeds 1 and 2 (misses), at 150 seed 2's race at 0.50x; 200 met the target in seeds 0-2
    c.beta = 200.0
    # the identity anchor (fairjax.tasks.diffusion_pref): w * |eps_policy - eps_ref|^2 on each winner
    # under the identity prompt it was generated from. Without it PopAlign's shift is shared by the
    # identity prompts ("an amber female doctor" follows "a doctor") and halving race cost 5% of
    # the recall; with w = 100 the recall stays within about 1% of the base's. ~1.35x a step's work
    c.anchor_weight = 100.0
    # PopAlign's normaliser weight (the paper's alpha, 0.5 in the reference recipe). 0.9 puts the
    # centring term near the winners' mean, so the losers' side saturates first and the gradient
    # keeps a net "lower the error on every image" part: at 0.5 the toy model's error rises on
    # winners and losers alike (README, toy world) and the samples degrade.
    c.alpha = 0.9
    c.calibrate_beta = False  # True: beta from fairjax.losses.calibrate_beta on the dataset's group frequencies
    c.batch_size = 64  # 32 winner/loser pairs per step (SFT: 64 winners)
    # each image's reward averaged over 2 (eps, t) draws (1 draw missed the target in three seeds);
    # 300 steps with a cosine decay from lr 1e-2 do what 1100 constant-rate steps at 3e-3 did
    # (docs/toy_world.md, "The 300-step schedule"; 400 steps from 8e-3 before it)
    c.noise_draws = 2
    c.total_steps = 300
    # PopAlign trains a rank-8 LoRA on the cross-attention keys and values only: what the prompt's
    # tokens contribute, so its change is a function of the prompt's tokens.
    # With the pooled-text embedding added, the main job at this beta let chefs overshoot to 44%
    # "male" while teachers stayed at 28% (pooled gender cut 38%; without it 71%); the attention,
    # projection and added-embedding kernels together met the target in two of five runs at beta
    # 200-300 (README, toy world).
    c.lora.rank = 8
    c.lora.alpha = 8.0
    c.lora.targets = r"attn2/to_(k|v)/kernel$"
    c.optimizer.lr = 1e-2
    c.optimizer.warmup_steps = 20
    c.optimizer.schedule = "cosine"
    c.checkpoint.every_steps = 1000
    c.log_every_steps = 100
    c.progress_bar = False

    # sampling shared by build_prefs and evaluate (no guidance: the model's own population). 10 DDIM
    # steps: the base's discrepancies and recall match 20 steps' within their sampling error, at half the time.
    # 512 images per call: 287 images/s against 230 at 128 on 2 cores (BENCHMARKS.md); the default's
    # image counts (4096 and 3072) are multiples of it, so no call runs padding rows
    c.sample = ml_collections.ConfigDict(dict(sampler="ddim", steps=10, guidance_scale=1.0, batch_size=512))
    kw = dict(genders=list(w.genders), races=list(w.races))
    c.prefs = ml_collections.ConfigDict(dict(
        neutral_prompts=list(w.neutral_prompts()),
        identity_template=world_lib.IDENTITY_TEMPLATE.replace("{occupation}", "{prompt}"),
        keywords=kw,
        n_neutral=512,  # losing set: the neutral prompt's own generations
        n_identity=64,  # per identity prompt (8 identities -> up to 512 winners per neutral prompt, balanced)
        seed=1,
        classifier="toy",  # toy | deepface
        lora="",
    ))
    c.eval = ml_collections.ConfigDict(dict(
        occupations=list(w.occupations),
        neutral_template=world_lib.NEUTRAL_TEMPLATE,  # "a doctor": the same prompts as the preference sets
        identity_template=world_lib.IDENTITY_TEMPLATE,
        keywords=kw,
        n_neutral=512,  # 2048 neutral images: the pooled gender discrepancy's sampling error is about 0.015
        n_identity=32,  # 1024 identity images: recall's sampling error about 0.009 (the target's margin is ~0.04)
        seed=1000,  # other seeds than build_prefs: fresh images
        classifier="toy",
        n_resamples=1000,
        grid_images=16,
    ))
    if arg in ("full", "dpo", "sft", "quick_sft", "smoke_sft"):  # the whole UNet, one draw per image
        # beta / anchor as before the anchor existed: these presets were not re-tuned with it
        c.beta = 1000.0
        c.anchor_weight = 0.0  # (SFT has no reference to anchor to)
        c.lora.rank = 0
        c.optimizer.lr = 2e-5  # small steps, many of them: a step's damage grows as lr^2, its signal as lr
        c.optimizer.schedule = "constant"
        c.noise_draws = 1
        c.total_steps = 3000
    if arg in ("sft", "quick_sft", "smoke_sft"):  # SFT has no degradation to avoid: the usual rate, fewer steps
        c.total_steps = 150
        c.optimizer.lr = 1e-4
        c.checkpoint.every_steps = 100
        c.log_every_steps = 25
    if arg in ("quick", "quick_sft", "smoke", "smoke_sft"):  # a few hundred images: smaller calls waste fewer rows
        c.sample.batch_size = 128
    if arg in ("quick", "quick_sft"):
        # 20 DDIM steps: at these few images the end-to-end test's SFT check (both discrepancies cut) was set
        # with 20; with 10, quick SFT overshot gender (0.106 -> 0.262) in the one run tried
        c.sample.steps = 20
        c.prefs.n_neutral = 32
        c.prefs.n_identity = 4
        c.eval.n_neutral = 50
        c.eval.n_identity = 4
        c.eval.n_resamples = 200
        c.total_steps = 150
        c.batch_size = 32
    if arg in ("smoke", "smoke_sft"):
        c.prefs.n_neutral = 8
        c.prefs.n_identity = 2
        c.eval.n_neutral = 4
        c.eval.n_identity = 1
        c.eval.n_resamples = 20
        c.eval.grid_images = 4
        c.sample.steps = 4
        c.total_steps = 24
        c.batch_size = 16
        c.checkpoint.every_steps = 8
        c.log_every_steps = 1
    return c
