"""Correct at scale (issue 19) on the tiny SDXL (``fairjax.diffusion.tiny`` preset ``micro``):
PopAlign's update does not depend on ``grad_accum_steps``, the device count, the process count or
the ``tensor`` axis; a run killed with SIGKILL at a seeded random step and resumed ends where an
uninterrupted one does (full UNet and LoRA).

The reference is a hand-written single-device loop (plain JAX + optax, written from the trainer's
documented contract: seed split into init / train keys, step key ``fold_in(fold_in(train_key, s),
0)``, the whole global batch in one loss, clip + SGD), not trainer code. Subprocess runs go
through ``python -m fairjax.train`` (two processes: ``launch/local_multiprocess.sh``).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest

from fairjax import lora as lora_lib
from fairjax import trainer
from fairjax.diffusion import text_embeds
from fairjax.diffusion import tiny as tiny_sdxl
from fairjax.io.model_dir import load_params
from fairjax.io.tree import shapes_of
from fairjax.tasks import diffusion_pref as dp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
# SGD: the update is the clipped gradient itself (Adam's first steps are ~lr * sign(g), which turns
# rounding-level differences of near-zero gradient entries into O(lr) ones); beta 20 keeps float32
# rounding of the ~1.0 mse terms out of the logits (see tests/test_train_sdxl.py)
SGD = {"optimizer.name": "sgd", "optimizer.lr": 0.2, "optimizer.warmup_steps": 0, "optimizer.grad_clip": 1.0,
       "beta": 20.0}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model_dir, data_dir, text-embedding cache) of the micro preset, built once."""
    root = tmp_path_factory.mktemp("tiny_scale")
    model_dir, data_dir = tiny_sdxl.ensure(str(root / "micro"), "micro")
    cache = str(root / "text_embeds.safetensors")
    text_embeds.cached_table(model_dir, tiny_sdxl.CAPTIONS, cache)
    return model_dir, data_dir, cache


def _set(c, over):
    for k, v in over.items():
        node = c
        *head, last = k.split(".")
        for h in head:
            node = node[h]
        node[last] = v
    return c


def config(tiny, loss="popalign", **over):
    model_dir, data_dir, cache = tiny
    c = dp.make_config(loss, "tiny")
    c.tiny = ""
    c.model.dir, c.data.path, c.text_embeds.path = model_dir, data_dir, cache
    c.total_steps, c.progress_bar, c.log_every_steps = STEPS, False, 1
    c.checkpoint.every_steps = 0
    return _set(c, over)


def config_file(tmp_path, tiny, loss="popalign", **over) -> str:
    """A config file for ``python -m fairjax.train`` holding ``config(tiny, loss, **over)``."""
    path = tmp_path / f"cfg_{loss}.py"
    path.write_text(
        "from fairjax.tasks.diffusion_pref import make_config\n\n\n"
        "def get_config(arg=None):\n"
        f"    c = make_config({loss!r}, 'tiny')\n"
        "    c.tiny = ''\n"
        f"    c.model.dir, c.data.path, c.text_embeds.path = {tiny[0]!r}, {tiny[1]!r}, {tiny[2]!r}\n"
        f"    c.total_steps, c.progress_bar, c.log_every_steps = {STEPS}, False, 1\n"
        "    c.checkpoint.every_steps = 0\n"
        + "".join(f"    c.{k} = {v!r}\n" for k, v in over.items())
        + "    return c\n")
    return str(path)


def reference_run(task, cfg, steps):
    """Single-device SGD loop on the whole global batch, by the trainer's documented contract;
    returns (initial trainable, final trainable, losses)."""
    init_key, train_key = jax.random.split(jax.random.key(cfg.seed))
    params, frozen = task.init(init_key)
    tx = optax.chain(optax.clip_by_global_norm(cfg.optimizer.grad_clip), optax.sgd(cfg.optimizer.lr))
    opt = tx.init(params)

    @jax.jit
    def step(p, o, batch, key):
        (loss, _), g = jax.value_and_grad(task.loss, has_aux=True)(p, frozen, batch, key)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    start, out = jax.device_get(params), []
    for s in range(steps):
        key = jax.random.fold_in(jax.random.fold_in(train_key, s), 0)
        params, opt, loss = step(params, opt, task.batch(s, 0, 1), key)
        out.append(float(loss))
    return start, jax.device_get(params), out


def _flat(t):
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(t)])


def _env(devices=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_popalign_update_ignores_accumulation_devices_processes_and_tensor_axis(tiny, tmp_path, rel):
    """Full UNet, 3 SGD steps of 8 pairs: the 1-device whole-batch loop == 8 devices == 2 x 2 x 2
    (data x fsdp x tensor, the models' tensor rules) with grad_accum_steps=4 == 2 processes x 2
    devices with grad_accum_steps=2 (``python -m fairjax.train --distributed``)."""
    cfg = config(tiny, **SGD)
    before, want, ref_losses = reference_run(dp.DiffusionPrefTask(cfg), cfg, STEPS)
    got = {}
    for name, mesh, k in (("data8", dict(data=8), 1), ("tensor2_accum4", dict(data=2, fsdp=2, tensor=2), 4)):
        c = config(tiny, grad_accum_steps=k, **SGD)
        c.mesh = mesh
        wd = str(tmp_path / name)
        summary = trainer.train(c, dp.DiffusionPrefTask(c, wd), wd)
        assert summary["step"] == STEPS
        got[name] = (load_params(os.path.join(wd, "model", "unet", "params.safetensors"), shapes_of(before)),
                     [r["loss"] for r in _rows(wd)])
    wd = tmp_path / "procs2_accum2"
    launcher = os.path.join(ROOT, "launch", "local_multiprocess.sh")
    cmd = ["bash", launcher, "-n", "2", "-d", "2", "-l", str(tmp_path / "logs"), "--", sys.executable, "-m",
           "fairjax.train", "--distributed", "--config", config_file(tmp_path, tiny, grad_accum_steps=2, **SGD),
           "--workdir", str(wd)]
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    got["procs2_accum2"] = (load_params(str(wd / "model" / "unet" / "params.safetensors"), shapes_of(before)),
                            [r["loss"] for r in _rows(wd)])
    moved = _flat(want) - _flat(before)
    assert np.abs(moved).max() > 1e-3 * np.abs(_flat(before)).max()  # the steps really moved the UNet
    for name, (params, losses) in got.items():
        assert max(jax.tree.leaves(jax.tree.map(rel, params, want))) <= 1e-5, name
        assert rel(_flat(params) - _flat(before), moved) <= 1e-4, name
        assert rel(np.asarray(losses), np.asarray(ref_losses)) <= 1e-5, name
