"""The memory benchmarks run, at their smallest settings (the GPU check and the trace bench have their own test).

A benchmark that reaches into the trainer breaks when the trainer changes, and nothing else would notice:
``bench/memory_vila_u.py`` stopped at ``trainer._state_shardings`` (a new ``min_size`` argument) until a
smoke run found it. These run each one's real code path on small configs; the numbers they print are
BENCHMARKS.md's business, not asserted here.
"""

import importlib.util
import math
import os
import subprocess
import sys

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "bench", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tiny_vila_u(mv, scan_layers):
    from fairjax.models import vila_u

    llm = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5)
    vt = {"rqtransformer": {"block_size": [4, 4, 4], "input_embed_dim_1": 32, "input_embed_dim_2": 64,
                            "embed_dim": 32, "vocab_size": 64, "head": {"block": {"n_head": 2}, "n_layer": 2}},
          "rqvaesiglip": {"n_embed": 64, "latent_shape": [4, 4, 32], "code_shape": [4, 4, 4],
                          "shared_codebook": True}}
    return vila_u.build(llm, vt, {"mm_projector_type": "mlp2x_gelu"}, dtype=mv._bf16(), param_dtype=mv._bf16(),
                        remat=True, scan_layers=scan_layers)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_memory_vila_u_compiles_the_trainers_step(scan_layers):
    """The compiled BPO LoRA step on a data x fsdp mesh of 8 devices, unrolled and scanned; the scanned
    model has the same parameters and LoRA as the unrolled one, only stacked."""
    assert len(jax.devices()) == 8  # tests/conftest.py
    mv = _bench("memory_vila_u")
    vu = _tiny_vila_u(mv, scan_layers)
    ref = _tiny_vila_u(mv, False)
    assert mv.param_counts(vu) == mv.param_counts(ref)
    assert mv.lora_count(vu) == mv.lora_count(ref)
    # LoRA r32 on q/k/v/o (64 -> 64) and gate/up (64 -> 128), down (128 -> 64), two layers: (in + out) * 32
    assert mv.lora_count(ref) == 2 * 32 * (4 * (64 + 64) + 2 * (64 + 128) + (128 + 64))
    m = mv.compile_step(vu, fsdp=4, pairs=1, prompt_len=8, chunk=8)
    assert m.argument_size_in_bytes > 0 and m.temp_size_in_bytes > 0
    shape = mv.Shapes.of(vu, 1, 8)
    assert shape.seq == 8 + vu.image_tokens - 1 and shape.rows == 2
    assert math.isfinite(mv.activation_bytes(shape, 8))


@pytest.mark.parametrize("cmd", [
    ["memory_sdxl.py"],
    ["bench_memory.py", "--devices", "8", "--width", "64", "--layers", "2", "--batch", "16"],
])
def test_memory_benches_run(cmd):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", cmd[0]), *cmd[1:]], capture_output=True,
                       text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert p.stdout.strip()


def test_bench_conv_runs_and_every_form_matches_torch():
    # the first two shapes: one below Winograd's size (8x8: XLA's convolution) and one above it (32x32)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_conv.py"), "--calls", "1", "--rounds", "1",
                        "--shapes", "2"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    rows = [line for line in p.stdout.splitlines() if line.count("|") == 3 and line.split("|")[0].strip()[:1].isdigit()]
    diffs = [float(d) for line in rows for d in line.rsplit("|", 1)[1].split(",")]
    assert len(rows) == 2 and len(diffs) == 4 and max(diffs) < 1e-5, p.stdout


def test_bench_dense_runs_and_both_backwards_agree():
    """bench/bench_dense.py, all three parts: the flattened Dense gradient and the batched products agree."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_dense.py"), "--calls", "1", "--rounds", "1"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    diffs = [float(line.rsplit(" ", 1)[1]) for line in p.stdout.splitlines() if "gradient difference" in line]
    assert len(diffs) == 3 and max(diffs) < 1e-5, p.stdout
    # the batched products (both JAX forms) against torch's bmm on the same inputs
    bmm = [float(line.split("  (")[0].rsplit(" ", 1)[1]) for line in p.stdout.splitlines()
           if line.endswith(")") and ("attention" in line or "Winograd" in line)]
    assert len(bmm) == 7 and max(bmm) < 1e-5, p.stdout
