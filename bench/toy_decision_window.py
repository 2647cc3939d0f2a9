"""Where, along the sampler's steps, the toy model decides each attribute (README, toy world).

    python bench/toy_decision_window.py [--data runs/toy/prefs] [--images 256] [--repeats 2]

Takes the losing (neutral-prompt) images of a toy preference set, noises each to the timestep of
DDIM step ``k`` of the toy sampler (``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``), runs the
remaining steps with the shipped base model and the image's own caption, and reads the attributes
back with the exact decoder. The fraction that keep the original label is the chance level (the
class frequencies) when ``t`` is pure noise and 1 once the attribute is fixed; the range of ``t``
where it climbs is where the attribute is decided. Prints one row per step.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None) -> int:
    import jax
    import jax.numpy as jnp

    from fairjax.data.build_prefs import make_classifier
    from fairjax.diffusion import samplers
    from fairjax.diffusion.pipeline import to_uint8
    from fairjax.tasks.diffusion_pref import DiffusionPrefTask
    from fairjax.toy.config import make_config
    from fairjax.toy.model import SCHEDULER_CONFIG, default_model_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.path.join("runs", "toy", "prefs"))
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2, help="noise draws per image and step")
    args = p.parse_args(argv)
    cfg = make_config("full")
    cfg.model.dir = default_model_dir()
    cfg.data.path = os.path.abspath(args.data)
    with tempfile.TemporaryDirectory() as wd:
        task = DiffusionPrefTask(cfg, wd)
    _, params = task.init(jax.random.key(0))
    losers = np.flatnonzero(~np.asarray(task.source.is_winner))
    idx = losers[np.linspace(0, len(losers) - 1, min(args.images, len(losers))).astype(np.int64)]
    rec = task.source.read(idx)
    x0 = jnp.asarray(rec["latents"], jnp.float32)
    cond = task.table.gather(task.table.ids(rec["caption"]))
    n = x0.shape[0]
    added = {"text_embeds": cond["text_embeds"], "time_ids": jnp.broadcast_to(jnp.asarray(task.time_ids), (n, 6))}
    steps = int(cfg.sample.steps)
    sch = samplers.ddim_schedule(SCHEDULER_CONFIG, steps)
    clf, _ = make_classifier("toy", cfg.model.dir)

    def labels(x):
        return [clf.classify([im]).labels[0] for im in np.asarray(to_uint8(x))]

    @jax.jit
    def from_step(eps, k):
        x = jnp.sqrt(sch.alphas_cumprod_t[k]) * x0 + jnp.sqrt(1 - sch.alphas_cumprod_t[k]) * eps

        def body(i, x):
            out = task.unet.apply({"params": params}, x, jnp.full((n,), sch.timesteps[i]),
                                  cond["encoder_hidden_states"], added)
            return samplers.ddim_step(out, x, sch.alphas_cumprod_t[i], sch.alphas_cumprod_prev[i], "epsilon",
                                      sch.clip_sample_range)

        return jax.lax.fori_loop(k, steps, body, x)  # steps k .. end (a traced k: one compiled loop)

    original = labels(x0)
    print("step  t    kept gender  kept race")
    for k in range(steps):
        kept = {"gender": 0, "race": 0}
        m = 0
        for r in range(args.repeats):
            eps = jax.random.normal(jax.random.key(100 + r), x0.shape)
            for a, b in zip(original, labels(from_step(eps, k))):
                if a is None or b is None:
                    continue
                m += 1
                kept["gender"] += a["gender"] == b["gender"]
                kept["race"] += a["race"] == b["race"]
        print(f"{k:4d}  {int(sch.timesteps[k]):3d}  {kept['gender'] / m:11.3f}  {kept['race'] / m:9.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
