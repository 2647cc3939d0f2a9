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


# ----------------------------------------------------------------------------- SIGKILL and resume


def _kill_rng():
    """``(seed, random.Random(seed))`` for a random kill point: FAIRJAX_KILL_SEED replays a failure's seed
    (every assertion message names it)."""
    seed = int(os.environ.get("FAIRJAX_KILL_SEED") or random.randrange(2**31))
    return seed, random.Random(seed)


def _cached_env(tmp_path, devices=2):
    """Subprocess env with a persistent compilation cache shared by the runs of one test (the killed,
    the resumed and the uninterrupted run compile the same programs)."""
    env = _env(devices)
    env.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def _tensors(path):
    from safetensors.numpy import load_file

    return load_file(path)


def kill_and_resume(cmd, workdir, output, env, steps, every):
    """Run ``cmd`` (a ``python -m fairjax.train`` command line) uninterrupted in ``workdir/ref``, then in
    ``workdir/run``: SIGKILL it once a seeded random number of steps are logged (after at least one
    checkpoint), run it again (it resumes), and compare: the final params (``output``, a safetensors
    file under the workdir) bit for bit and every metrics row but the timing."""
    seed, r = _kill_rng()
    ref, run = os.path.join(workdir, "ref"), os.path.join(workdir, "run")
    done = subprocess.run(cmd + ["--workdir", ref], env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    kill_after = r.randint(every + 1, steps - every)
    proc = subprocess.Popen(cmd + ["--workdir", run], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            cwd=ROOT)
    metrics, deadline = os.path.join(run, "metrics.jsonl"), time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if os.path.isfile(metrics) and len(open(metrics).read().splitlines()) >= kill_after:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"seed {seed}: ended before step {kill_after}: {proc.stderr.read()[-2000:]}"
    time.sleep(r.uniform(0.0, 0.05))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not os.path.exists(os.path.join(run, output)), f"seed {seed}"
    again = subprocess.run(cmd + ["--workdir", run], env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert again.returncode == 0, f"seed {seed}: {again.stdout[-3000:]}{again.stderr[-3000:]}"
    resumed = [line for line in again.stdout.splitlines() if line.startswith("resumed from")]
    assert resumed and every <= int(resumed[0].rsplit("/", 1)[1]) <= kill_after + every, (seed, resumed)
    want, got = _tensors(os.path.join(ref, output)), _tensors(os.path.join(run, output))
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=f"{k} (seed {seed}, killed after step {kill_after})")
    timing = ("steps_per_sec", "compile_s")  # wall-clock readings differ between runs
    rows = {w: [{k: v for k, v in row.items() if k not in timing} for row in _rows(w)] for w in (ref, run)}
    assert [row["step"] for row in rows[run]] == list(range(1, steps + 1)), f"seed {seed}"
    assert rows[run] == rows[ref], f"seed {seed}"
    return seed


@pytest.mark.slow
@pytest.mark.parametrize("lora", [0, 4], ids=["full", "lora"])
def test_sdxl_sigkill_then_resume_equals_uninterrupted(tiny, tmp_path, lora):
    """PopAlign on the tiny SDXL, full UNet and rank-4 LoRA, AdamW with warm-up, 10 steps, a checkpoint
    every 2: killed with SIGKILL at a seeded random step and resumed == uninterrupted, bit for bit."""
    steps, every = 10, 2
    over = {"total_steps": steps, "checkpoint.every_steps": every, "mesh": dict(data=2)}
    if lora:
        over.update({"lora.rank": lora, "lora.alpha": float(lora), "optimizer.lr": 1e-3})
    cmd = [sys.executable, "-m", "fairjax.train", "--config", config_file(tmp_path, tiny, **over)]
    output = "unet_lora.safetensors" if lora else os.path.join("model", "unet", "params.safetensors")
    kill_and_resume(cmd, str(tmp_path), output, _cached_env(tmp_path), steps, every)


@pytest.mark.slow
def test_vila_u_bpo_lora_sigkill_then_resume_equals_uninterrupted(tmp_path):
    """``configs/bpo_vila_u.py:tiny`` (BPO on explicit pairs, LoRA with dropout 0.1, cosine schedule):
    killed with SIGKILL at a seeded random step and resumed == uninterrupted, bit for bit."""
    steps, every = 10, 2
    cmd = [sys.executable, "-m", "fairjax.train", "--config", "configs/bpo_vila_u.py:tiny",
           f"--config.tiny_root={tmp_path / 'tiny'}", f"--config.total_steps={steps}",
           f"--config.checkpoint.every_steps={every}", "--config.log_every_steps=1", "--config.progress_bar=False",
           "--config.mesh.data=2"]
    kill_and_resume(cmd, str(tmp_path), "lora.safetensors", _cached_env(tmp_path), steps, every)
