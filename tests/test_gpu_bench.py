"""bench/gpu_sdxl.py, the device check a session runs on a lent GPU, run here on CPU at a tiny size.

The device minutes are few and a run is prepared in advance, so a stage that breaks must be caught here,
not on the device: the fairjax forward is checked against diffusers' (same random weights), the train steps
and the compilation-cache stage must run through fairjax.trainer, and a failed stage must turn the exit
status to 1.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench", "gpu_sdxl.py")


def _run(out, *args):
    env = dict(os.environ, BUDGET_S="900")
    p = subprocess.run([sys.executable, BENCH, "--tiny", "--out", str(out), *args], capture_output=True, text=True,
                       env=env, timeout=900)
    with open(os.path.join(out, "results.json")) as f:
        return p, json.load(f)


def test_dry_run_of_the_device_check(tmp_path):
    p, res = _run(tmp_path, "--stages", "flops,torch,fwd,step_full,cache,sample")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for name in ("env", "build", "flops", "torch", "fwd", "step_full", "cache", "sample"):
        assert "error" not in res[name], (name, res[name])
    assert "compile" not in res and "step_lora" not in res  # --stages honoured (torch.compile takes minutes on CPU)
    fwd = res["fwd"]
    assert fwd["scan_layers"] is True
    # float32 on CPU: fairjax's forward against diffusers' on the same weights (computed by the torch stage)
    assert fwd["rel_err_bf16_vs_torch_fp32"] < 1e-4
    assert fwd["diffusers_eager_ms"] > 0 and fwd["ratio_fairjax_over_eager"] > 0
    step = res["step_full"]
    assert step["rank"] == 0 and step["remat"] == "nothing_saveable" and step["fairjax_step_ms"] > 0
    assert step["trainable_params"] == res["build"]["n_params"]  # the whole UNet trains
    assert step["torch_step_ms"] > 0 and step["ratio_fairjax_over_torch"] > 0  # the PyTorch anchor ran beside it
    assert res["torch"]["step_lora"]["torch_step_ms"] > 0  # the PEFT LoRA step of the torch side
    assert res["cache"]["cache_files"] >= 1  # the LoRA step's program was written to the persistent cache
    # the sampler: a converted pipeline against StableDiffusionXLPipeline
    assert res["sample"]["fairjax_images_per_s"] > 0 and res["sample"]["diffusers_images_per_s"] > 0
    # only the results come back from a device call: the model dirs the stages wrote were in a scratch folder
    assert sorted(os.listdir(tmp_path)) == ["results.json"]
    assert "PopAlign step, full UNet" in p.stdout and "step compile: cold / from cache" in p.stdout  # the table


def test_a_failed_stage_fails_the_run(tmp_path):
    """Through bench/gpu_sdxl.sh, the one-call wrapper used on the device: the status and the log survive it."""
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, BUDGET_S="900")
    p = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_sdxl.sh"), "run", "--tiny", "--stages", "fwd",
                        "--attention", "no_such_attention"], capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    with open(tmp_path / "results.json") as f:
        res = json.load(f)
    assert "no_such_attention" in res["fwd"]["error"]  # fwd runs alone (no torch stage before it)
    assert "FAILED stages: fwd" in (tmp_path / "log.txt").read_text()
    assert sorted(os.listdir(tmp_path)) == ["gpu.txt", "log.txt", "results.json"]


def test_trace_step_traces_without_weights():
    """bench/trace_step.py: the device check's train step traced and lowered on abstract params."""
    for extra in ([], ["--lora"]):
        p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "trace_step.py"), "--tiny", "--repeat", "1",
                            *extra], capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        assert ("LoRA r32" if extra else "full") + " PopAlign step" in p.stdout and " lower " in p.stdout
