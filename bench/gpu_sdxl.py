#!/usr/bin/env python
"""Full-size SDXL on one accelerator: fairjax (JAX/Flax) against PyTorch, side by side, same random weights.

    OUT=/tmp/out python bench/gpu_sdxl.py                 # on a GPU machine (writes $OUT/results.json)
    python bench/gpu_sdxl.py --small --out /tmp/dry       # a CPU dry run of every stage (small UNet)
    python bench/gpu_sdxl.py --tiny --out /tmp/dry --stages fwd,step_full   # a smoke run (the test's)

One prepared device check that fits a 10-minute call. Stages run in order of value, each only when
enough of ``--budget`` seconds is left; ``$OUT/results.json`` is rewritten after every stage and the
table is printed last, so a killed run still leaves what it measured. The exit status is 1 when a
stage failed (its error is in the JSON and the log), so a dry run that breaks does not pass for one.

  env        versions, devices
  build      a diffusers UNet at the real SDXL config, every weight random, built on the device and
             converted by fairjax (in memory)
  flops      FLOPs of one UNet forward, counted by torch's FlopCounterMode on the meta device (XLA's
             cost_analysis undercounts the UNet); MFU = FLOPs / time / --peak-tflops
  torch      diffusers eager bf16 forward (SDPA), and the Diffusion-DPO train steps (full UNet and PEFT
             LoRA r32; autocast bf16, gradient checkpointing, AdamW), then the card is freed
  fwd        fairjax bf16 forward, batch 2 (one CFG pair), 1024 px (128x128 latents), attention "auto"
  step_full  the PopAlign step through fairjax.trainer.make_train_step: full UNet, fp32 masters, bf16
             compute, remat (model.remat), scan_layers when the build has it; peak memory
  step_lora  the same with LoRA r32 on the attention projections
  cache      the step compiled again in a fresh process-local cache state: cold compile vs load from
             the persistent compilation cache (fairjax.parallel.enable_compilation_cache)
  compile    torch.compile(mode="max-autotune-no-cudagraphs") of the diffusers forward, timed after warm-up
  sample     30-step Euler, CFG 5, 1024 px, VAE decode: fairjax images/s against StableDiffusionXLPipeline
             (both on random full-size SDXL components, fp16/bf16)

MFU: a forward is F FLOPs (counted); a PopAlign step on one pair is 2 images x (policy forward +
backward = 3F, reference forward = F) = 8F per pair, rematerialisation not counted.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch and JAX share the card
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

ARGS = None
T0 = time.time()
RESULTS: dict = {}
S: dict = {}  # state shared between stages


def left() -> float:
    return ARGS.budget - (time.time() - T0)


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def save():
    tmp = os.path.join(ARGS.out, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)
    os.replace(tmp, os.path.join(ARGS.out, "results.json"))


def stage(name, need_s):
    """Run the stage when ``need_s`` seconds are left (scaled down for --small); record its result or error."""
    def wrap(fn):
        def run(*a, **k):
            need = need_s / 20 if ARGS.small else need_s
            if ARGS.stages and name not in ARGS.stages and name not in ("env", "build"):  # those two always run
                return None
            if left() < need:
                RESULTS[name] = {"skipped": f"{left():.0f} s left, needs {need:.0f}"}
                log(name, "skipped")
                save()
                return None
            log(name, "start")
            t = time.time()
            try:
                r = fn(*a, **k) or {}
                r["stage_s"] = round(time.time() - t, 1)
                RESULTS[name] = r
                log(name, "done", json.dumps(r, default=str)[:500])
                return r
            except Exception as e:  # noqa: BLE001 - later stages are independent
                RESULTS[name] = {"error": f"{type(e).__name__}: {e}"[:1500], "tb": traceback.format_exc()[-3000:],
                                 "stage_s": round(time.time() - t, 1)}
                log(name, "FAILED", RESULTS[name]["error"][:600])
                return None
            finally:
                save()
        return run
    return wrap


def timeit(fn, warm=2, n=8):
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), min(ts)


def rel(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def unet_config() -> dict:
    from _torch_util import SDXL_UNET_CONFIG

    cfg = {k: v for k, v in SDXL_UNET_CONFIG.items() if not k.startswith("_")}
    if ARGS.tiny:  # SDXL's blocks at a few channels: the code paths, in seconds (tests/test_gpu_bench.py)
        cfg.update(block_out_channels=[32, 64, 64], transformer_layers_per_block=[1, 1, 2],
                   attention_head_dim=[1, 2, 2], cross_attention_dim=64, addition_time_embed_dim=8,
                   projection_class_embeddings_input_dim=64 + 6 * 8, sample_size=8)
    elif ARGS.small:  # 50M SDXL-shaped (bench/bench_unet.py's config)
        cfg.update(block_out_channels=[64, 128, 256], transformer_layers_per_block=[1, 2, 4],
                   attention_head_dim=[2, 4, 8], cross_attention_dim=256, addition_time_embed_dim=32,
                   projection_class_embeddings_input_dim=256 + 6 * 32, sample_size=32)
    return cfg


def low_dtype(lib):
    """bfloat16 (of ``torch`` or ``jax.numpy``) on an accelerator; float32 in a CPU dry run, where bf16
    is emulated and only slows the run down."""
    return lib.float32 if S.get("dev", "cpu") == "cpu" else lib.bfloat16


def latent_size() -> int:
    return 8 if ARGS.tiny else 16 if ARGS.small else 128


def mfu(flops: float | None, seconds: float) -> float | None:
    if not flops or not ARGS.peak_tflops:
        return None
    return round(100.0 * flops / seconds / (ARGS.peak_tflops * 1e12), 1)


# ----------------------------------------------------------------------------- stages

@stage("env", 0)
def env():
    import flax
    import jax
    import optax
    import torch

    import diffusers

    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        smi = str(e)
    return {"python": sys.version.split()[0], "jax": jax.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()], "nvidia_smi": smi,
            "peak_tflops": ARGS.peak_tflops, "small": ARGS.small, "tiny": ARGS.tiny}


@stage("build", 40)
def build():
    """Random diffusers UNet on the device (fast), converted by fairjax in memory."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    import diffusers
    from _torch_util import DictReader
    from fairjax.convert import unet as unet_convert
    from fairjax.convert.core import convert_checkpoint

    cfg = unet_config()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t = time.time()
    with torch.device(dev):
        tm = diffusers.UNet2DConditionModel.from_config(cfg)
        g = torch.Generator(device=dev).manual_seed(0)
        with torch.no_grad():  # every weight random (diffusers zero-inits conv_out and proj_out)
            for name, p in tm.named_parameters():
                r = torch.randn(p.shape, generator=g, device=dev)
                if "norm" in name and name.endswith("weight"):
                    p.copy_(1.0 + 0.2 * r)
                elif name.endswith("bias"):
                    p.copy_(0.2 * r)
                else:
                    p.copy_(r / np.sqrt(max(np.prod(p.shape[1:]), 1)))
    tm.eval()
    sync()
    t_torch = time.time() - t
    t = time.time()
    host = convert_checkpoint(DictReader(tm.state_dict()), unet_convert.target_shapes(cfg))
    t_conv = time.time() - t
    t = time.time()
    params = jax.tree.map(jnp.asarray, host)
    jax.block_until_ready(params)
    del host
    t_put = time.time() - t
    S.update(cfg=cfg, tm=tm, params32=params, dev=dev, n_params=sum(p.numel() for p in tm.parameters()))
    return {"n_params": S["n_params"], "torch_init_s": round(t_torch, 1), "convert_s": round(t_conv, 1),
            "device_put_s": round(t_put, 1)}


@stage("flops", 5)
def flops():
    """FLOPs of one UNet forward at batch 2, counted on the meta device (no memory, no compute)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import diffusers

    cfg, n = S["cfg"], latent_size()
    with torch.device("meta"):
        m = diffusers.UNet2DConditionModel.from_config(cfg)
        x = torch.empty(2, 4, n, n)
        ctx = torch.empty(2, 77, cfg["cross_attention_dim"])
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        added = {"text_embeds": torch.empty(2, pooled), "time_ids": torch.empty(2, 6)}
        t = torch.zeros(2)
        with FlopCounterMode(display=False) as fc:
            m(x, t, ctx, added_cond_kwargs=added)
    S["fwd_flops"] = float(fc.get_total_flops())
    return {"forward_batch2_tflop": round(S["fwd_flops"] / 1e12, 3)}


def inputs(batch, size, seed=0):
    import numpy as np

    cfg = S["cfg"]
    rng = np.random.default_rng(seed)
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    px = size * 8
    return dict(x=rng.standard_normal((batch, 4, size, size)).astype(np.float32),
                t=rng.integers(0, 1000, batch).astype(np.float32),
                ctx=rng.standard_normal((batch, 77, cfg["cross_attention_dim"])).astype(np.float32),
                text_embeds=rng.standard_normal((batch, pooled)).astype(np.float32),
                time_ids=np.tile(np.array([[px, px, 0, 0, px, px]], np.float32), (batch, 1)))


def fwd_inputs() -> dict:
    """The batch-2 forward inputs the torch, fwd and compile stages share (made by whichever runs first)."""
    if "inp" not in S:
        S["inp"] = inputs(2, latent_size(), seed=2)
    return S["inp"]


def torch_forward(tm, inp, dtype):
    import torch

    dev = S["dev"]
    with torch.no_grad():
        return tm(torch.from_numpy(inp["x"]).to(dev, dtype), torch.from_numpy(inp["t"]).to(dev),
                  torch.from_numpy(inp["ctx"]).to(dev, dtype),
                  added_cond_kwargs={"text_embeds": torch.from_numpy(inp["text_embeds"]).to(dev, dtype),
                                     "time_ids": torch.from_numpy(inp["time_ids"]).to(dev, dtype)}).sample


def torch_step(rank: int, pairs: int, size: int) -> dict:
    """The PyTorch Diffusion-DPO step (as the reference trainers run it): fp32 masters under bf16 autocast,
    gradient checkpointing, AdamW; a frozen bf16 reference copy; PEFT LoRA when ``rank``."""
    import copy

    import torch
    import torch.nn.functional as F

    from diffusers import DDPMScheduler
    from fairjax.diffusion.tiny import SDXL_SCHEDULER

    dev = S["dev"]
    tm = S["tm"].float()
    half = low_dtype(torch)
    ref = copy.deepcopy(tm).to(half).eval().requires_grad_(False)
    if rank:
        from peft import LoraConfig

        tm.requires_grad_(False)
        tm.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                  target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        params = [p for p in tm.parameters() if p.requires_grad]
    else:
        tm.requires_grad_(True)
        params = list(tm.parameters())
    tm.train()
    tm.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(params, lr=1e-4 if rank else 1e-6, weight_decay=1e-2)
    sched = DDPMScheduler.from_config(SDXL_SCHEDULER)
    inp = inputs(2 * pairs, size, seed=3)
    lat = torch.from_numpy(inp["x"]).to(dev)
    ehs = torch.from_numpy(inp["ctx"]).to(dev)
    added = {"text_embeds": torch.from_numpy(inp["text_embeds"]).to(dev),
             "time_ids": torch.from_numpy(inp["time_ids"]).to(dev)}
    gen = torch.Generator(device=dev).manual_seed(0)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def run():
        noise = torch.randn(lat[:pairs].shape, generator=gen, device=dev).repeat(2, 1, 1, 1)
        t = torch.randint(0, 1000, (pairs,), generator=gen, device=dev).repeat(2)
        noisy = sched.add_noise(lat, noise, t)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=half == torch.bfloat16):
            pred = tm(noisy, t, ehs, added_cond_kwargs=added).sample
            with torch.no_grad():
                rp = ref(noisy.to(half), t, ehs.to(half),
                         added_cond_kwargs={k: v.to(half) for k, v in added.items()}).sample
        ml = (pred.float() - noise).pow(2).mean(dim=[1, 2, 3])
        rl = (rp.float() - noise).pow(2).mean(dim=[1, 2, 3])
        mw, mlo = ml.chunk(2)
        rw, rlo = rl.chunk(2)
        loss = -F.logsigmoid(-0.5 * 5000.0 * ((mw - mlo) - (rw - rlo))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()

    med, mn = timeit(run, warm=1, n=3 if ARGS.small else 5)
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None
    if rank and hasattr(tm, "delete_adapters"):
        tm.delete_adapters("default")
    tm.requires_grad_(False)
    return {"torch_step_ms": round(med * 1e3, 1), "torch_min_ms": round(mn * 1e3, 1),
            "torch_peak_gib": None if peak is None else round(peak, 2)}


@stage("torch", 60)
def torch_side():
    """Every PyTorch number first (fp32 reference output, bf16 eager forward, both steps); then free the card."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    inp = fwd_inputs()
    S["ref32"] = torch_forward(S["tm"], inp, torch.float32).float().cpu().numpy()
    torch.backends.cuda.matmul.allow_tf32 = True
    half = low_dtype(torch)
    tm16 = S["tm"].to(half)
    out16 = torch_forward(tm16, inp, half).float().cpu().numpy()
    med, mn = timeit(lambda: (torch_forward(tm16, inp, half), sync()), warm=3, n=10)
    r = {"fwd_ms": round(med * 1e3, 2), "fwd_min_ms": round(mn * 1e3, 2), "fwd_mfu_pct": mfu(S.get("fwd_flops"), med),
         "rel_err_bf16_vs_fp32": rel(out16, S["ref32"])}
    for rank, key in ((0, "step_full"), (32, "step_lora")):
        if left() < (3 if ARGS.small else 60):
            break
        try:
            r[key] = torch_step(rank, 1, latent_size())
        except Exception as e:  # noqa: BLE001
            r[key] = {"error": f"{type(e).__name__}: {e}"[:800]}
        gc.collect()
        if S["dev"] == "cuda":
            torch.cuda.empty_cache()
    S["torch"] = r
    return r


def _model_kwargs() -> dict:
    """Options of the fairjax UNet under test: attention auto, plus scan_layers when the port has it."""
    import dataclasses

    from fairjax.models.unet import UNet2DConditionModel

    names = {f.name for f in dataclasses.fields(UNet2DConditionModel)}
    kw = {"attention_implementation": ARGS.attention}
    if "scan_layers" in names:
        kw["scan_layers"] = ARGS.scan_layers
    return kw


def _stack(params):
    """The param layout the module expects (stacked layers when scanned)."""
    kw = _model_kwargs()
    if kw.get("scan_layers"):
        from fairjax.io.tree import stack_layers

        return stack_layers(params)
    return params


@stage("fwd", 60)
def fwd():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fairjax.models.unet import UNet2DConditionModel

    half = low_dtype(jnp)
    params16 = jax.tree.map(lambda a: a.astype(half), _stack(S["params32"]))
    unet = UNet2DConditionModel.from_config(S["cfg"], dtype=half, param_dtype=half, **_model_kwargs())
    inp = fwd_inputs()
    args = (jnp.asarray(inp["x"], half), jnp.asarray(inp["t"]), jnp.asarray(inp["ctx"], half),
            {"text_embeds": jnp.asarray(inp["text_embeds"], half), "time_ids": jnp.asarray(inp["time_ids"], half)})
    t = time.time()
    compiled = jax.jit(unet.apply).lower({"params": params16}, *args).compile()
    comp = time.time() - t
    out = compiled({"params": params16}, *args)
    med, mn = timeit(lambda: jax.block_until_ready(compiled({"params": params16}, *args)), warm=3, n=10)
    r = {"latents": f"2x4x{latent_size()}x{latent_size()}", **_model_kwargs(), "fairjax_ms": round(med * 1e3, 2),
         "fairjax_min_ms": round(mn * 1e3, 2), "compile_s": round(comp, 1), "mfu_pct": mfu(S.get("fwd_flops"), med),
         "rel_err_bf16_vs_torch_fp32": rel(np.asarray(out, np.float32), S["ref32"]) if "ref32" in S else None}
    tr = S.get("torch", {})
    if "fwd_ms" in tr:
        r["diffusers_eager_ms"] = tr["fwd_ms"]
        r["ratio_fairjax_over_eager"] = round(med * 1e3 / tr["fwd_ms"], 3)
    return r


def _task(rank: int, pairs: int, size: int):
    """The SDXL preference task on the in-memory params (no model dir is read: init() is not called)."""
    import numpy as np

    from fairjax.data.pairs import ArrayPrefs
    from fairjax.diffusion.text_embeds import TextTable
    from fairjax.diffusion.tiny import SDXL_SCHEDULER
    from fairjax.io.model_dir import PARAMS_FILE, save_params, write_json
    from fairjax.tasks import diffusion_pref as dp

    md = os.path.join(ARGS.scratch, "_model_dir")
    os.makedirs(os.path.join(md, "unet"), exist_ok=True)
    os.makedirs(os.path.join(md, "scheduler"), exist_ok=True)
    write_json(os.path.join(md, "unet", "config.json"), dict(S["cfg"], _class_name="UNet2DConditionModel"))
    # The task checks that the folder is a model dir (config + params file) before it reads anything. The
    # params live in memory (S["params32"]) and init() is never called, so the file holds no tensors: writing
    # full SDXL's 10 GB would cost the device call half a minute. A read of it would fail on missing keys.
    save_params(os.path.join(md, "unet", PARAMS_FILE), {})
    write_json(os.path.join(md, "scheduler", "scheduler_config.json"), SDXL_SCHEDULER)
    c = dp.make_config("popalign", "lora" if rank else None)
    c.model.dir = md
    c.model.dtype = "float32" if S["dev"] == "cpu" else "bfloat16"
    c.model.attention = ARGS.attention
    c.model.remat = ARGS.remat
    if "scan_layers" in c.model:
        c.model.scan_layers = "true" if ARGS.scan_layers else "false"
    c.batch_size = 2 * pairs
    c.text_embeds.path = os.path.join(ARGS.scratch, "_unused.safetensors")
    px = float(size * 8)
    c.time_ids = (px, px, 0.0, 0.0, px, px)
    cfg, n = S["cfg"], 2 * pairs
    rng = np.random.default_rng(3)
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    src = ArrayPrefs(rng.standard_normal((n, 4, size, size)).astype(np.float32), ["a doctor"] * n,
                     [i < pairs for i in range(n)], [0] * n)
    table = TextTable(["", "a doctor"], rng.standard_normal((2, 77, cfg["cross_attention_dim"])).astype(np.float32),
                      rng.standard_normal((2, pooled)).astype(np.float32))
    return dp.DiffusionPrefTask(c, os.path.join(ARGS.scratch, "_task"), source=src, table=table), c


def _step_fn(rank: int, pairs: int, size: int, params=None):
    """``(step, state, frozen, batch, trainable)`` of the trainer's jitted step on one device. ``params``: the
    stacked UNet params (default the build's); abstract ones (``jax.ShapeDtypeStruct``) give an abstract state,
    for tracing without weights (bench/trace_step.py)."""
    import jax
    import jax.numpy as jnp

    from fairjax import lora, parallel, trainer

    task, c = _task(rank, pairs, size)
    mesh = parallel.make_mesh({"data": 1}, jax.devices()[:1])
    tx, schedule = trainer.make_optimizer(c.optimizer, c.total_steps)
    params = _stack(S["params32"]) if params is None else params

    def make_state(params):
        if rank:
            trainable = lora.init(params, str(c.lora.targets), rank, float(c.lora.alpha), jax.random.key(1))
        else:
            trainable = jax.tree.map(jnp.copy, params)  # the policy; the frozen reference is the original
        return {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "opt_state": tx.init(trainable),
                "rng": jax.random.key_data(jax.random.key(0))}

    abstract = isinstance(jax.tree.leaves(params)[0], jax.ShapeDtypeStruct)
    state = jax.eval_shape(make_state, params) if abstract else make_state(params)
    batch = jax.tree.map(jnp.asarray, task.batch(0, 0, 1))
    step = jax.jit(trainer.make_train_step(task, tx, schedule, 1, mesh), donate_argnums=(0,))
    return step, state, params, batch, state["trainable"]


def fairjax_step(rank: int, key: str) -> dict:
    import jax

    pairs, size = 1, latent_size()
    step, state, frozen, batch, trainable = _step_fn(rank, pairs, size)
    t = time.time()
    lowered = step.lower(state, frozen, batch)
    compiled = lowered.compile()
    comp = time.time() - t
    box = [state]

    def run():
        box[0], m = compiled(box[0], frozen, batch)
        jax.block_until_ready(m["loss"])

    med, mn = timeit(run, warm=1, n=3 if ARGS.small else 5)
    stats = jax.devices()[0].memory_stats() or {}
    n_tr = sum(x.size for x in jax.tree.leaves(trainable))
    r = {"pairs": pairs, "latents": f"4x{size}x{size}", "rank": rank, "remat": ARGS.remat,
         "fairjax_step_ms": round(med * 1e3, 1), "fairjax_min_ms": round(mn * 1e3, 1), "compile_s": round(comp, 1),
         "fairjax_peak_gib": round(stats.get("peak_bytes_in_use", 0) / 2**30, 2) if stats else None,
         "trainable_params": int(n_tr), "mfu_pct": mfu(8 * S["fwd_flops"] / 2 * pairs if "fwd_flops" in S else None,
                                                       med)}
    tr = S.get("torch", {}).get(key, {})
    r.update(tr)
    if "torch_step_ms" in tr:
        r["ratio_fairjax_over_torch"] = round(r["fairjax_step_ms"] / tr["torch_step_ms"], 3)
    if r.get("fairjax_peak_gib") and tr.get("torch_peak_gib"):
        r["peak_ratio"] = round(r["fairjax_peak_gib"] / tr["torch_peak_gib"], 3)
    gc.collect()
    return r


@stage("step_full", 150)
def step_full():
    return fairjax_step(0, "step_full")


@stage("step_lora", 90)
def step_lora():
    return fairjax_step(32, "step_lora")


@stage("cache", 120)
def cache():
    """Cold compile of the LoRA step into an empty persistent cache, then the same program from the cache."""
    import jax

    from fairjax import parallel

    folder = tempfile.mkdtemp(prefix="xla-cache-", dir=ARGS.scratch)
    parallel.enable_compilation_cache(folder)
    out = {}
    for label in ("cold", "from_cache"):
        jax.clear_caches()
        step, state, frozen, batch, _ = _step_fn(32, 1, latent_size())
        t = time.time()
        step.lower(state, frozen, batch).compile()
        out[f"{label}_compile_s"] = round(time.time() - t, 1)
        del step, state
    out["cache_files"] = len(os.listdir(folder))
    return out


@stage("compile", 150)
def torch_compile():
    """diffusers forward under torch.compile (after its own warm-up compile), bf16."""
    import torch

    half = low_dtype(torch)
    tm16 = S["tm"].to(half)
    fn = torch.compile(tm16, mode="max-autotune-no-cudagraphs", fullgraph=False)
    inp = fwd_inputs()
    t = time.time()
    torch_forward(fn, inp, half)
    sync()
    comp = time.time() - t
    med, mn = timeit(lambda: (torch_forward(fn, inp, half), sync()), warm=2, n=10)
    r = {"torch_compile_ms": round(med * 1e3, 2), "torch_compile_min_ms": round(mn * 1e3, 2),
         "torch_compile_first_call_s": round(comp, 1), "mfu_pct": mfu(S.get("fwd_flops"), med)}
    if "fwd" in RESULTS and "fairjax_ms" in RESULTS["fwd"]:
        r["ratio_fairjax_over_torch_compile"] = round(RESULTS["fwd"]["fairjax_ms"] / r["torch_compile_ms"], 3)
    return r


@stage("sample", 200)
def sample():
    """30-step Euler with CFG 5 at 1024 px, VAE decode included: fairjax against StableDiffusionXLPipeline."""
    import jax.numpy as jnp
    import torch

    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from fairjax.diffusion import pipeline as pl
    from test_pipeline import SDXL_SCHEDULER, _clip_config, write_bpe_files
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = os.path.join(ARGS.scratch, "_sdxl")
    dev, dt = S["dev"], (torch.float16 if S["dev"] == "cuda" else torch.float32)
    vocab, merges = write_bpe_files(os.path.join(folder, "_bpe"))
    tok = CLIPTokenizer(vocab, merges, model_max_length=77)
    tok_2 = CLIPTokenizer(vocab, merges, pad_token="!", model_max_length=77)
    ids = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id}
    small = ARGS.small
    with torch.device(dev):
        te = CLIPTextModel(_clip_config(len(tok), ids, 64 if small else 768, 2 if small else 12))
        te2 = CLIPTextModelWithProjection(_clip_config(len(tok), ids, 64 if small else 1280, 2 if small else 32))
        vae = AutoencoderKL(block_out_channels=(32, 64) if small else (128, 256, 512, 512), in_channels=3,
                            out_channels=3, latent_channels=4, norm_num_groups=32, scaling_factor=0.13025,
                            down_block_types=("DownEncoderBlock2D",) * (2 if small else 4),
                            up_block_types=("UpDecoderBlock2D",) * (2 if small else 4), layers_per_block=2)
    cfg = dict(S["cfg"])
    if small:  # the small UNet's conditioning widths follow the small text encoders
        cfg.update(cross_attention_dim=128, projection_class_embeddings_input_dim=64 + 6 * cfg["addition_time_embed_dim"])
        import diffusers

        with torch.device(dev):
            unet = diffusers.UNet2DConditionModel.from_config(cfg)
    else:
        unet = S["tm"]
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok_2,
                                     unet=unet, scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
                                     add_watermarker=False).to(dev, dt)
    t = time.time()
    pipe.save_pretrained(folder, safe_serialization=True)
    save_s = time.time() - t
    steps, size, n_img = (4, 128, 1) if small else (30, 1024, 1)
    prompts = ["a photo of a nurse"] * n_img

    def torch_run():
        pipe(prompts, num_inference_steps=steps, guidance_scale=5.0, height=size, width=size,
             generator=torch.Generator(dev).manual_seed(0), output_type="np")
        sync()

    torch_med, _ = timeit(torch_run, warm=1, n=2)
    pipe.to("cpu")
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_diffusers", os.path.join(ROOT, "tools", "convert_diffusers.py"))
    conv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conv)
    md = os.path.join(ARGS.scratch, "_sdxl_fairjax")
    t = time.time()
    conv.convert(folder, md, log=lambda *_: None)
    convert_s = time.time() - t
    fpipe = pl.load_pipeline(md, dtype=jnp.bfloat16 if dev == "cuda" else jnp.float32, param_dtype=jnp.bfloat16
                             if dev == "cuda" else jnp.float32, attention_implementation=ARGS.attention)
    t2i = pl.Text2Image(fpipe, pl.SampleOptions(steps=steps, guidance_scale=5.0, height=size, width=size),
                        batch_size=n_img)
    t = time.time()
    t2i(prompts, list(range(n_img)), [0] * n_img, 0)
    first = time.time() - t
    med, _ = timeit(lambda: t2i(prompts, list(range(n_img)), [0] * n_img, 0), warm=0, n=2)
    return {"steps": steps, "size": size, "images": n_img, "diffusers_images_per_s": round(n_img / torch_med, 3),
            "fairjax_images_per_s": round(n_img / med, 3), "ratio_speed": round(torch_med / med, 3),
            "fairjax_first_call_s": round(first, 1), "save_pretrained_s": round(save_s, 1),
            "convert_s": round(convert_s, 1)}


# ----------------------------------------------------------------------------- report

def table() -> str:
    rows = [("workload", "fairjax", "PyTorch", "ratio", "fairjax MFU")]
    f, tr = RESULTS.get("fwd", {}), RESULTS.get("torch", {})
    if "fairjax_ms" in f:
        rows.append(("bf16 UNet forward, batch 2", f"{f['fairjax_ms']} ms", f"{tr.get('fwd_ms', '-')} ms eager",
                     str(f.get("ratio_fairjax_over_eager", "-")), f"{f.get('mfu_pct', '-')}%"))
    c = RESULTS.get("compile", {})
    if "torch_compile_ms" in c:
        rows.append(("  vs torch.compile", f"{f.get('fairjax_ms', '-')} ms", f"{c['torch_compile_ms']} ms",
                     str(c.get("ratio_fairjax_over_torch_compile", "-")), f"torch {c.get('mfu_pct', '-')}%"))
    for key, label in (("step_full", "PopAlign step, full UNet"), ("step_lora", "PopAlign step, LoRA r32")):
        s = RESULTS.get(key, {})
        if "fairjax_step_ms" in s:
            rows.append((label, f"{s['fairjax_step_ms']} ms, {s.get('fairjax_peak_gib')} GiB",
                         f"{s.get('torch_step_ms', '-')} ms, {s.get('torch_peak_gib')} GiB",
                         str(s.get("ratio_fairjax_over_torch", "-")), f"{s.get('mfu_pct', '-')}%"))
    k = RESULTS.get("cache", {})
    if "cold_compile_s" in k:
        rows.append(("step compile: cold / from cache", f"{k['cold_compile_s']} s / {k['from_cache_compile_s']} s",
                     "", "", ""))
    sm = RESULTS.get("sample", {})
    if "fairjax_images_per_s" in sm:
        rows.append((f"{sm['steps']}-step Euler CFG {sm['size']} px + VAE", f"{sm['fairjax_images_per_s']} img/s",
                     f"{sm['diffusers_images_per_s']} img/s", str(sm["ratio_speed"]), ""))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join(" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def main(argv=None):
    global ARGS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="a 50M SDXL-shaped UNet and small inputs (CPU dry run)")
    p.add_argument("--tiny", action="store_true", help="a tiny SDXL-shaped UNet (a smoke run of the code; implies "
                                                       "--small)")
    p.add_argument("--out", default=os.environ.get("OUT") or "/tmp/gpu_sdxl", help="results folder (default $OUT)")
    p.add_argument("--budget", type=float, default=float(os.environ.get("BUDGET_S", "540")),
                   help="seconds for all stages (default 540: a 10-minute call less start-up)")
    p.add_argument("--peak-tflops", type=float, default=float(os.environ.get("PEAK_TFLOPS", "790")),
                   help="the chip's bf16 matmul rate for MFU (790 measured on an H200)")
    p.add_argument("--attention", default="auto", help="fairjax attention implementation (default auto)")
    p.add_argument("--remat", default="nothing_saveable", help="fairjax remat policy of the train steps")
    p.add_argument("--scan-layers", type=lambda s: s.lower() in ("1", "true", "yes"), default=True,
                   help="scanned transformer stacks when the port has them (default true)")
    p.add_argument("--stages", default="", help="comma-separated subset of the stages to run (env and build always run)")
    p.add_argument("--scratch", default=None,
                   help="where to make the temporary folder for the model dirs the stages write (full size: tens of "
                        "GB; removed at the end; default the system's temp dir). Only results go to --out, which "
                        "the device call copies back")
    ARGS = p.parse_args(argv)
    ARGS.stages = {s for s in ARGS.stages.split(",") if s}
    ARGS.small = ARGS.small or ARGS.tiny
    if ARGS.small:
        ARGS.peak_tflops = ARGS.peak_tflops if "PEAK_TFLOPS" in os.environ else 0.0
    os.makedirs(ARGS.out, exist_ok=True)
    ARGS.scratch = tempfile.mkdtemp(prefix="gpu_sdxl_scratch_", dir=ARGS.scratch)  # a new folder: safe to remove
    try:
        env()
        if build() is None:
            print(f"FAILED: the build stage ({RESULTS.get('build', {}).get('error', 'skipped')}); nothing else ran",
                  flush=True)
            return 1
        flops()
        torch_side()
        fwd()
        step_full()
        step_lora()
        cache()
        torch_compile()
        sample()
        save()
    finally:
        shutil.rmtree(ARGS.scratch, ignore_errors=True)
    print("\n" + table(), flush=True)
    print(f"total {time.time() - T0:.0f} s; results in {os.path.join(ARGS.out, 'results.json')}", flush=True)
    failed = [name for name, r in RESULTS.items() if isinstance(r, dict) and "error" in r]
    if failed:
        print(f"FAILED stages: {', '.join(failed)} (their errors are in results.json)", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
