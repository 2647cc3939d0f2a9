"""Checkpoints: sharded save/restore, keep-K, corrupt and partial step directories,
preemption signals, and SIGKILL-then-resume of a real training run (subprocess)."""

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from fairjax import parallel
from fairjax.errors import CheckpointError
from fairjax.checkpoint import Checkpointer, PreemptionGuard, abstract_like
from fairjax.errors import UserError

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _tree():
    return {"w": np.arange(64, dtype=np.float32).reshape(8, 8), "b": np.linspace(0, 1, 6).astype(np.float32),
            "step": np.int32(7)}


def _saved(tmp_path, steps=(1, 2, 3), keep=5):
    mesh = parallel.make_mesh({"data": 8})
    tree = _tree()
    x = parallel.put_global(tree, parallel.param_shardings(tree, mesh, [(".*", ())]))
    c = Checkpointer(str(tmp_path), keep=keep)
    for s in steps:
        c.save(s, jax.tree.map(lambda a: a + s if a.dtype != np.int32 else a, x))
    c.wait()
    return c, tree


def _target(tree, spec_mesh=None):
    mesh = spec_mesh or parallel.make_mesh({"data": 2, "fsdp": 4})
    sh = parallel.param_shardings(tree, mesh)
    return abstract_like(tree, sh)


def test_restore_reshards_onto_a_new_mesh(tmp_path):
    c, tree = _saved(tmp_path)
    step, got = c.restore(_target(tree))
    assert step == 3
    np.testing.assert_array_equal(np.asarray(got["w"]), tree["w"] + 3)
    np.testing.assert_array_equal(np.asarray(got["b"]), tree["b"] + 3)
    assert int(got["step"]) == 7
    assert got["w"].sharding.spec == P(None, "fsdp")  # the target's sharding, not the saved one
    step, got = c.restore(_target(tree), step=1)
    np.testing.assert_array_equal(np.asarray(got["w"]), tree["w"] + 1)
    c.close()


def test_keeps_last_k(tmp_path):
    c, _ = _saved(tmp_path, steps=(1, 2, 3, 4, 5), keep=2)
    assert c.all_steps() == [4, 5]
    assert sorted(os.listdir(tmp_path)) == ["4", "5"]
    c.close()


def test_empty_directory_restores_nothing(tmp_path):
    c = Checkpointer(str(tmp_path / "none"))
    assert c.restore(_target(_tree())) is None and c.latest_step() is None
    c.close()


def _corrupt(step_dir):
    """Truncate every data file of a step to a few bytes (a disk that filled up, a bad copy)."""
    n = 0
    for root, _, files in os.walk(step_dir):
        for f in files:
            if "commit_success" in f:
                continue
            path = os.path.join(root, f)
            with open(path, "r+b") as fh:
                fh.truncate(3)
            n += 1
    assert n


def test_corrupt_latest_falls_back_to_previous(tmp_path, caplog):
    c, tree = _saved(tmp_path)
    c.close()
    _corrupt(tmp_path / "3")
    c = Checkpointer(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="fairjax.checkpoint"):
        step, got = c.restore(_target(tree))
    assert step == 2
    np.testing.assert_array_equal(np.asarray(got["w"]), tree["w"] + 2)
    assert any("3 unreadable" in r.getMessage() for r in caplog.records)
    c.close()


def test_a_step_saved_again_replaces_the_unreadable_one_it_fell_back_from(tmp_path):
    """Restored from step 2 past an unreadable step 3, a run that reaches step 3 again saves it (before, the
    broken copy stayed, and the next resume fell back past it again)."""
    c, tree = _saved(tmp_path)
    c.close()
    _corrupt(tmp_path / "3")
    c = Checkpointer(str(tmp_path))
    step, got = c.restore(_target(tree))
    assert step == 2
    assert c.save(3, jax.tree.map(lambda a: a + 30 if a.dtype != np.int32 else a, got))
    assert not c.save(2, got)  # a readable step is never written over
    c.wait()
    c.close()
    c = Checkpointer(str(tmp_path))
    step, got = c.restore(_target(tree))
    assert step == 3 and c.all_steps() == [1, 2, 3]
    np.testing.assert_array_equal(np.asarray(got["w"]), tree["w"] + 32)
    c.close()


def test_all_corrupt_is_one_line_error(tmp_path):
    c, tree = _saved(tmp_path, steps=(1, 2))
    c.close()
    _corrupt(tmp_path / "1")
    _corrupt(tmp_path / "2")
    c = Checkpointer(str(tmp_path))
    with pytest.raises(CheckpointError) as e:
        c.restore(_target(tree))
    msg = str(e.value)
    assert isinstance(e.value, UserError) and "\n" not in msg
    assert f"no readable checkpoint in {tmp_path}" in msg and "tried steps 2" in msg and "1 (" in msg


def test_partial_save_is_ignored_and_cleaned(tmp_path):
    c, tree = _saved(tmp_path, steps=(1,))
    c.close()
    partial = tmp_path / "2.orbax-checkpoint-tmp-1234567"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "junk").write_bytes(b"\0" * 10)
    c = Checkpointer(str(tmp_path))
    assert c.all_steps() == [1]
    assert not partial.exists()
    step, _ = c.restore(_target(tree))
    assert step == 1
    c.close()


def test_preemption_guard_turns_sigterm_into_a_flag():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as g:
        assert not g.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert g.requested and g.should_stop() and g.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


# ----------------------------------------------------------------------------- SIGKILL + resume


def _worker(workdir, out, *extra, devices=8):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    cmd = [sys.executable, os.path.join(HERE, "_multihost_worker.py"), "--workdir", str(workdir), "--out", str(out),
           "--mesh", "2,4,1", "--batch", "16", *extra]
    return cmd, env


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_exact(tmp_path):
    steps = 10
    # uninterrupted reference
    cmd, env = _worker(tmp_path / "ref", tmp_path / "ref", "--steps", str(steps), "--every", "0")
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
    ref = dict(np.load(tmp_path / "ref" / "final_params.npz"))

    # killed at a random step (after checkpoint `kill_after` appeared, mid-way through the next steps)
    kill_after = random.Random().randint(2, 6)
    work = tmp_path / "run"
    cmd, env = _worker(work, work, "--steps", str(steps), "--every", "1", "--sleep", "0.25", "--async-ckpt")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    ckdir = work / "checkpoints"
    while time.time() < deadline and proc.poll() is None:
        if ckdir.is_dir() and str(kill_after) in os.listdir(ckdir):
            time.sleep(random.Random().uniform(0.0, 0.3))
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"worker ended before step {kill_after}: {proc.stdout.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (work / "final_params.npz").exists()

    cmd, env = _worker(work, work, "--steps", str(steps), "--every", "1")
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=300)
    resumed_from = [line for line in out.stdout.splitlines() if line.startswith("resumed from")]
    assert resumed_from and int(resumed_from[0].rsplit("/", 1)[1]) >= kill_after, out.stdout[-2000:]
    summary = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("SUMMARY"))[8:])
    assert summary["step"] == steps
    got = dict(np.load(work / "final_params.npz"))
    assert got.keys() == ref.keys()
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{k} (killed after checkpoint {kill_after})")


# ----------------------------------------------------------------------------- two processes


def _kill_rng():
    """``(seed, random.Random(seed))`` for a random kill point: FAIRJAX_KILL_SEED replays a failure's seed
    (every assertion message names it)."""
    seed = int(os.environ.get("FAIRJAX_KILL_SEED") or random.randrange(2**31))
    return seed, random.Random(seed)


def _launch(tmp_path, name, *extra, devices=1, mesh="1,2,1"):
    """``launch/local_multiprocess.sh -n 2`` running the toy worker (FSDP over the two processes by
    default, so each process owns its own shards on disk)."""
    launcher = os.path.join(ROOT, "launch", "local_multiprocess.sh")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    cmd = ["bash", launcher, "-n", "2", "-d", str(devices), "-l", str(tmp_path / f"logs_{name}"), "--",
           sys.executable, os.path.join(HERE, "_multihost_worker.py"), "--mesh", mesh, "--batch", "16", *extra]
    return cmd, env


def _our_frames(log):
    """Traceback frame lines in ``log`` that pass through fairjax's code or the test worker."""
    return [line for line in log.splitlines()
            if line.lstrip().startswith("File ") and ("/fairjax/" in line or "_multihost_worker.py" in line)]


def _summary(stdout):
    return json.loads(next(line for line in stdout.splitlines() if line.startswith("SUMMARY"))[8:])


def _single_process_reference(tmp_path, steps, *extra):
    cmd, env = _worker(tmp_path / "ref", tmp_path / "ref", "--steps", str(steps), "--every", "0", *extra, devices=2)
    cmd[cmd.index("--mesh") + 1] = "1,2,1"
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
    return dict(np.load(tmp_path / "ref" / "final_params.npz"))


@pytest.mark.slow
def test_two_processes_restore_the_same_step_when_one_cannot_read_the_newest(tmp_path, rel):
    """Checkpoints 1 and 2 of a 2-process run (params FSDP-split over the processes); the shards
    process 1 wrote for step 2 are truncated, so only process 1 fails to read step 2. The re-run
    warns once, both processes restore step 1 (not each its own newest), and training ends where a
    1-process run ends. Reaching step 2 again, both processes replace the unreadable step 2 with a good one:
    a third run that finds only steps 1 and 2 resumes from 2 without a warning."""
    work, wide = tmp_path / "run", ("--hidden", "4096")  # shards of 32 KiB: on disk in each process's own files
    cmd, env = _launch(tmp_path, "a", "--workdir", str(work), "--steps", "2", "--every", "1", *wide)
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300, cwd=ROOT)
    shards = work / "checkpoints" / "2" / "state" / "ocdbt.process_1"
    assert shards.is_dir(), sorted(os.listdir(work / "checkpoints" / "2" / "state"))
    _corrupt(shards)
    cmd, env = _launch(tmp_path, "b", "--workdir", str(work), "--steps", "4", "--every", "1", *wide)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    p1 = (tmp_path / "logs_b" / "proc_1.log").read_text()
    warned = [line for line in (out.stdout + out.stderr).splitlines() if "checkpoints/2 unreadable" in line]
    assert len(warned) == 1 and "process 1:" in warned[0] and "restoring" in warned[0] and \
        warned[0].rstrip().endswith("checkpoints/1 instead"), out.stdout[-3000:] + out.stderr[-3000:]
    assert "resumed from" in out.stdout and out.stdout.count("checkpoints/1\n") >= 1
    # orbax's reader can leave tensorstore callbacks in flight when one read fails; they may print
    # "RuntimeError: Event loop is closed" tracebacks from its own threads after the failed restore
    # returned (seen in CI, timing-dependent). Not a crash: no traceback may pass through our code.
    assert not _our_frames(p1), p1[-3000:]
    assert _summary(out.stdout)["step"] == 4
    got, ref = dict(np.load(work / "final_params.npz")), _single_process_reference(tmp_path, 4, *wide)
    for k in ref:
        assert rel(got[k], ref[k]) <= 1e-5, k
    for s in ("3", "4"):
        shutil.rmtree(work / "checkpoints" / s)
    cmd, env = _launch(tmp_path, "c", "--workdir", str(work), "--steps", "4", "--every", "0", *wide)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "unreadable" not in out.stdout + out.stderr and "checkpoints/2\n" in out.stdout, out.stdout[-3000:]
    got = dict(np.load(work / "final_params.npz"))
    for k in ref:
        assert rel(got[k], ref[k]) <= 1e-5, k


@pytest.mark.slow
def test_two_processes_stop_together_on_a_signal_to_one_of_them(tmp_path, rel):
    """SIGTERM to process 1 only, at a seeded random point after checkpoint 2: the flag is OR-ed
    across processes, so both stop after the same step, save it, say so and exit 143; the re-run
    resumes there and ends where an uninterrupted 1-process run ends, with one metrics row per step."""
    steps, (seed, r) = 8, _kill_rng()
    work = tmp_path / "run"
    cmd, env = _launch(tmp_path, "a", "--workdir", str(work), "--steps", str(steps), "--every", "2", "--sleep", "0.3")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    ckdir, deadline = work / "checkpoints", time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (ckdir / "2").is_dir():
        time.sleep(0.05)
    assert proc.poll() is None, f"seed {seed}: the run ended before checkpoint 2"
    time.sleep(r.uniform(0.0, 0.6))
    os.kill(int((work / "pid_1").read_text()), signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 143, f"seed {seed}: {stdout[-2000:]}{stderr[-2000:]}"
    stopped = _summary(stdout)
    assert stopped["preempted"] and stopped["signal"] == "SIGTERM", stopped
    at = stopped["step"]
    assert 2 <= at < steps and str(at) in os.listdir(ckdir), (seed, at)
    p1 = (tmp_path / "logs_a" / "proc_1.log").read_text()
    assert f"stopped by SIGTERM at step {at}: checkpoint saved" in p1  # the process that got the signal
    assert f"stopped by SIGTERM at step {at}" in stdout  # process 0 (its stderr goes through the launcher's tee)
    assert not (work / "final_params.npz").exists()
    cmd, env = _launch(tmp_path, "b", "--workdir", str(work), "--steps", str(steps), "--every", "2")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"resumed from {ckdir}/{at}" in out.stdout
    rows = [json.loads(line)["step"] for line in open(work / "metrics.jsonl")]
    assert rows == list(range(1, steps + 1)), (seed, rows)
    got, ref = dict(np.load(work / "final_params.npz")), _single_process_reference(tmp_path, steps)
    for k in ref:
        assert rel(got[k], ref[k]) <= 1e-5, (seed, k)
