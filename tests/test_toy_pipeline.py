"""The toy world's main job end to end (``python -m fairjax.toy.run``).

``test_main_job_halves_gender_and_race_discrepancy_and_keeps_recall`` runs it as README does (default
sizes, 4 to 12 minutes on 2 cores): build_prefs -> PopAlign and SFT through the trainer -> evaluate,
with every model's headline numbers recomputed here from the PNGs the evaluation wrote (decoded with
the toy world's exact decoder, pooled counts, L2 to uniform in numpy), and asserts the issue's target:
the pooled gender and race discrepancies of the biased base at least halved, at least 95% of the
base's identity-specific recall kept, the SFT baseline cutting both beside it (README, "What the main
job shows"). The SIGTERM test runs the ``smoke`` sizes: stopped, resumed, then run again with every
stage reused.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from fairjax.toy import world as W


def _pooled_discrepancy(labels, classes):
    counts = np.array([sum(lab == c for lab in labels) for c in classes], np.float64)
    p = counts / counts.sum()
    return float(np.sqrt(((p - 1.0 / len(classes)) ** 2).sum()))


def _recompute(records_file, world):
    """(discrepancy {attr}, recall {attr, both}, gender bias) from the PNGs of one model's evaluation;
    gender bias is Shen et al.'s pairwise bias for 2 classes, |f_male - f_female| per neutral
    prompt, averaged over the prompts."""
    neutral = {a: [] for a in ("gender", "race")}
    per_prompt = {}  # neutral prompt -> [first gender class count, faces]
    hit = {"gender": 0, "race": 0, "both": 0}
    faces = 0
    with open(records_file) as f:
        rows = [json.loads(line) for line in f]
    assert rows
    for r in rows:
        lab = world.decode(np.asarray(Image.open(r["image"]).convert("RGB")))
        assert lab == r["labels"]  # the stored labels are the decoder's on the written PNG
        if lab is None:
            continue
        if r["identity"] is None:
            for a in neutral:
                neutral[a].append(lab[a])
            c = per_prompt.setdefault(r["prompt"], [0, 0])
            c[0] += lab["gender"] == world.genders[0]
            c[1] += 1
        else:
            faces += 1
            ok = {a: lab[a] == r["identity"][a] for a in ("gender", "race")}
            hit["gender"] += ok["gender"]
            hit["race"] += ok["race"]
            hit["both"] += ok["gender"] and ok["race"]
    disc = {"gender": _pooled_discrepancy(neutral["gender"], world.genders),
            "race": _pooled_discrepancy(neutral["race"], world.races)}
    assert len(per_prompt) == len(world.occupations)  # every neutral prompt has faces
    bias = float(np.mean([abs(2 * m / n - 1) for m, n in per_prompt.values()]))
    return disc, {k: v / faces for k, v in hit.items()}, bias


@pytest.mark.slow
def test_main_job_halves_gender_and_race_discrepancy_and_keeps_recall(tmp_path, capsys):
    """The main job as README runs it (default preset, default sizes, about 4 minutes): PopAlign
    (LoRA on the cross-attention keys and values, identity anchor, 300 cosine-decayed steps) cuts the
    pooled gender and race discrepancies and its per-prompt gender bias at least in half, and keeps at
    least 95% of the base's recall on identity prompts (both attributes right); the SFT baseline is in
    the same report. All are recomputed from the evaluation's PNGs with the toy world's exact decoder.

    Training seeds 0, 1 and 2 met this target in the sweep behind the default (docs/toy_world.md,
    "The 300-step schedule"); the per-prompt gender bias is the closest to the line (0.22-0.40 of the
    base's). This is the default seed's result, guarded, not a bound on every seed."""
    from fairjax.toy import run

    world = W.ToyWorld()
    res = run.run(str(tmp_path / "toy"), sft=True)
    report = json.loads(open(res["report"]).read())
    assert report["models"] == ["base", "popalign", "sft"]
    out_dir = os.path.dirname(os.path.dirname(res["report"]))
    got = {name: _recompute(os.path.join(out_dir, f"records_{name}.jsonl"), world) for name in report["models"]}
    (base_disc, base_recall, _), (pop_disc, pop_recall, _) = got["base"], got["popalign"]
    for name, (disc, recall, _) in got.items():  # the reported numbers are the PNGs' numbers
        for attr in ("gender", "race"):
            assert abs(res["metrics"][name]["discrepancy"][attr] - disc[attr]) < 1e-9, (name, attr)
        for attr in ("gender", "race", "both"):
            assert abs(res["metrics"][name]["recall"][attr] - recall[attr]) < 1e-9, (name, attr)
    assert os.path.isfile(res["html"])
    bias = {name: b for name, (_, _, b) in got.items()}
    assert abs(bias["popalign"] - report["results"]["popalign"]["bias"]["gender"]) < 1e-9
    summary = {name: (d, r["both"], b) for name, (d, r, b) in got.items()}
    print(f"toy target: {summary}")
    assert base_disc["gender"] > 0.1 and base_disc["race"] > 0.2 and bias["base"] > 0.4, summary  # biased base
    assert pop_disc["gender"] <= 0.5 * base_disc["gender"], summary
    assert pop_disc["race"] <= 0.5 * base_disc["race"], summary
    assert bias["popalign"] <= 0.5 * bias["base"], summary
    assert pop_recall["both"] >= 0.95 * base_recall["both"], summary
    for attr in ("gender", "race"):  # the SFT baseline on the balanced winners cuts both too
        assert got["sft"][0][attr] < 0.75 * base_disc[attr], summary
    printed = capsys.readouterr().out
    assert "discrepancy (gender): base" in printed and "sft" in printed and res["html"] in printed


def test_reused_preference_set_without_prompts_is_a_one_line_error(tmp_path, capsys):
    """A workdir whose preference set predates the ``prompt`` field cannot feed the identity
    anchor: the main job says so (and how to go on) before training anything."""
    from fairjax.data.prefs import write_preference_dataset
    from fairjax.toy import run

    recs = [{"latents": np.zeros((3, 8, 8), np.float32), "caption": "a doctor", "is_winner": w, "set_id": 0}
            for w in (True, False)]
    write_preference_dataset(tmp_path / "toy" / "prefs", recs)
    assert run.main(["--workdir", str(tmp_path / "toy"), "--preset", "quick"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "anchor_weight=100" in err and "--overwrite" in err, err
    assert sorted(os.listdir(tmp_path / "toy")) == ["prefs"]  # nothing trained or written


@pytest.mark.slow
def test_sigterm_stops_the_whole_job_and_a_rerun_resumes_the_stage(tmp_path):
    """``timeout`` / a scheduler sends SIGTERM while PopAlign trains (``--preset smoke``; the kill point, a
    logged training step, is drawn from a seeded RNG): the job saves that stage's checkpoint, says so in
    one line and exits 143 -- it does not go on to SFT or the evaluation, and PopAlign's output is not
    written. The same command again resumes PopAlign from that checkpoint and finishes the job."""
    import random
    import signal
    import subprocess
    import sys
    import time

    seed = int(os.environ.get("FAIRJAX_KILL_SEED") or random.randrange(2**31))
    kill_after = random.Random(seed).randint(2, 12)  # logged training steps before the signal (of 24)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    wd = tmp_path / "toy"
    cmd = [sys.executable, "-m", "fairjax.toy.run", "--workdir", str(wd), "--preset", "smoke"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env.pop("XLA_FLAGS", None)  # the re-run reuses the first run's compiled programs
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=root)
    metrics, deadline = wd / "popalign" / "metrics.jsonl", time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= kill_after:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"seed {seed}: the job ended before step {kill_after}: {proc.communicate()}"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, f"seed {seed}: {out[-2000:]}{err[-2000:]}"
    said = [line for line in err.splitlines() if "stopped by SIGTERM" in line]
    assert len(said) == 1 and "checkpoint saved in" in said[0] and "run the same command again" in said[0], err
    step = int(said[0].split(" at step ")[1].split(":")[0])
    assert kill_after <= step < 24 and (wd / "popalign" / "checkpoints" / str(step)).is_dir(), (seed, said)
    assert not (wd / "popalign" / "unet_lora.safetensors").exists()  # not taken as done
    assert not (wd / "sft").exists() and not (wd / "report").exists() and "train: sft" not in out

    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=900)
    assert again.returncode == 0, f"seed {seed}: {again.stdout[-3000:]}{again.stderr[-3000:]}"
    assert "build_prefs: reusing" in again.stdout and f"resumed from {wd}/popalign/checkpoints/{step}" in again.stdout
    rows = [json.loads(line)["step"] for line in open(metrics)]
    assert rows == list(range(1, 25)), (seed, rows)
    assert (wd / "popalign" / "unet_lora.safetensors").is_file() and (wd / "sft" / "model").is_dir()
    result = json.loads((wd / "result.json").read_text())
    assert result["metrics"].keys() == {"base", "popalign", "sft"}

    third = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=900)  # all done:
    assert third.returncode == 0, third.stderr[-3000:]  # every stage is reused, the evaluation is the same
    assert "build_prefs: reusing" in third.stdout and third.stdout.count("train: reusing") == 2, third.stdout
    assert json.loads((wd / "result.json").read_text())["metrics"] == result["metrics"]
