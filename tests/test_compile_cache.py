"""The persistent compilation cache: a second process loads the train step instead of compiling it.

Asserted on the cache folder's contents (JAX writes one ``<name>-<hash>-cache`` file per compiled
program and nothing on a hit), never on a time.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _train(workdir, cache_dir, extra_env=None):
    env = dict(os.environ, FAIRJAX_CACHE_DIR=str(cache_dir), JAX_PLATFORMS="cpu",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONPATH=str(ROOT))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env.update(extra_env or {})
    cmd = [sys.executable, "-m", "fairjax.train", "--config", str(ROOT / "configs" / "popalign_mog.py"),
           "--workdir", str(workdir), "--config.total_steps=3", "--config.log_every_steps=1",
           "--config.progress_bar=false", "--config.checkpoint.every_steps=0"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _programs(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.name.endswith("-cache"))


def test_second_run_loads_the_train_step_from_the_cache(tmp_path):
    cache = tmp_path / "cache"
    first = _train(tmp_path / "run1", cache)
    programs = _programs(cache / "xla")
    assert any(name.startswith("jit_step_fn-") for name in programs), programs
    assert "train step ready in" in first.stdout + first.stderr
    rows = [json.loads(line) for line in (tmp_path / "run1" / "metrics.jsonl").read_text().splitlines()]
    assert "compile_s" in rows[0] and rows[0]["compile_s"] > 0
    assert all("compile_s" not in r for r in rows[1:])

    _train(tmp_path / "run2", cache)  # a fresh workdir: the same programs, all from the cache
    assert _programs(cache / "xla") == programs


def test_jax_own_variable_wins_and_the_cache_can_be_turned_off(tmp_path):
    theirs = tmp_path / "theirs"
    _train(tmp_path / "run1", tmp_path / "cache", {"JAX_COMPILATION_CACHE_DIR": str(theirs)})
    assert _programs(theirs) and not (tmp_path / "cache" / "xla").exists()
    _train(tmp_path / "run2", tmp_path / "cache2", {"FAIRJAX_COMPILATION_CACHE": "0"})
    assert not (tmp_path / "cache2" / "xla").exists()
