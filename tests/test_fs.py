"""fairjax.io.fs and the checks under every command (issue 23): path overlap, run locks (and their races
between real processes), stale temps, atomic outputs on exceptions, disk full and SIGTERM, the one-line
text of the operating system's refusals, safetensors header validation, and config ranges."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fairjax.config import BOOL, SEED, floats, ints, one_of, validate
from fairjax.errors import CheckpointError, ConfigError, OutputError
from fairjax.io import fs
from fairjax.io.model_dir import atomic_output_dir, read_json
from fairjax.io.safetensors import SafetensorsReader, ShardedReader, write_safetensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ----------------------------------------------------------------------------- overlap


def test_relation_follows_symlinks_and_ignores_spelling(tmp_path):
    (tmp_path / "model" / "unet").mkdir(parents=True)
    os.symlink(tmp_path / "model", tmp_path / "link")
    m = str(tmp_path / "model")
    assert fs.relation(m + "/", m) == "equals"
    assert fs.relation(str(tmp_path / "model" / "." / "unet" / ".."), m) == "equals"
    assert fs.relation(str(tmp_path / "link"), m) == "equals"
    assert fs.relation(str(tmp_path / "link" / "unet" / "new"), m) == "is inside"
    assert fs.relation(str(tmp_path), m) == "contains"
    assert fs.relation(str(tmp_path / "model2"), m) is None  # a common prefix is not containment
    with pytest.raises(OutputError, match=r"--out .* contains --model .*: writing it would overwrite that input"):
        fs.check_disjoint({"--out": str(tmp_path)}, {"--model": m, "--lora": None})
    fs.check_disjoint({"--out": str(tmp_path / "out")}, {"--model": m, "--lora": ""})


def test_check_output(tmp_path):
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    assert fs.check_output(str(tmp_path / "new" / "out")) == str(tmp_path / "new" / "out")
    with pytest.raises(OutputError, match="already exists; choose another --out or pass --overwrite"):
        fs.check_output(str(tmp_path / "d"))
    fs.check_output(str(tmp_path / "d"), overwrite=True)
    fs.check_output(str(tmp_path / "d"), must_be_new=False)
    with pytest.raises(OutputError, match="is a file, not a folder"):
        fs.check_output(str(tmp_path / "f"), overwrite=True)
    with pytest.raises(OutputError, match="is a folder; pass a file path"):
        fs.check_output(str(tmp_path / "d"), kind="file", overwrite=True)
    with pytest.raises(OutputError, match="is a file, not a folder"):
        fs.check_output(str(tmp_path / "f" / "out"))  # a file on the way
    assert sorted(os.listdir(tmp_path)) == ["d", "f"]  # the write probes are gone


# ----------------------------------------------------------------------------- locks


def test_lock_is_reentrant_and_released(tmp_path):
    target = str(tmp_path / "a" / "b" / "out")
    with fs.locked(target) as lock:
        info = fs.read_lock(lock.lock_file)
        assert info["pid"] == os.getpid() and info["host"] == fs.this_host()
        with fs.locked(target):
            pass
        assert os.path.exists(lock.lock_file)
    assert not os.path.exists(tmp_path / "a")  # the folders the lock made are gone with it


def test_lock_of_a_live_process_is_refused_and_a_dead_ones_taken_over(tmp_path):
    target = str(tmp_path / "out")
    lock_file = fs.lock_file_for(target)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with open(lock_file, "w") as f:
            json.dump({"pid": sleeper.pid, "host": fs.this_host(), "start": fs.process_start(sleeper.pid),
                       "since": 0.0}, f)
        with pytest.raises(OutputError, match=rf"is in use by another run \(pid {sleeper.pid} on "):
            fs.PathLock(target).acquire()
        # the same pid, but another process's start time: the holder is gone (its pid was reused)
        with open(lock_file, "w") as f:
            json.dump({"pid": sleeper.pid, "host": fs.this_host(), "start": "1", "since": 0.0}, f)
        with fs.locked(target):
            assert fs.read_lock(lock_file)["pid"] == os.getpid()
    finally:
        sleeper.kill()
        sleeper.wait()
    with open(lock_file, "w") as f:
        json.dump({"pid": dead_pid(), "host": fs.this_host(), "since": 0.0}, f)
    with fs.locked(target):
        assert fs.read_lock(lock_file)["pid"] == os.getpid()
    assert not os.path.exists(lock_file)


def test_lock_of_another_host_is_never_broken(tmp_path):
    target = str(tmp_path / "out")
    with open(fs.lock_file_for(target), "w") as f:
        json.dump({"pid": dead_pid(), "host": "elsewhere.example", "since": time.time()}, f)
    with pytest.raises(OutputError, match="on elsewhere.example since .*delete the lock file if that run is gone"):
        fs.PathLock(target).acquire()


def test_unreadable_lock_is_taken_over_once_old(tmp_path):
    target = str(tmp_path / "out")
    lock_file = fs.lock_file_for(target)
    open(lock_file, "w").close()  # a holder that died between creating and writing it
    old = time.time() - 60
    os.utime(lock_file, (old, old))
    with fs.locked(target):
        assert fs.read_lock(lock_file)["pid"] == os.getpid()


_RACER = """
import os, sys, time
from fairjax.io import fs
from fairjax.errors import OutputError
target, go, release = sys.argv[1:4]
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.001)
try:
    with fs.locked(target):
        print("got", flush=True)
        while not os.path.exists(release):  # hold it until every racer has tried
            time.sleep(0.01)
except OutputError as e:
    print("refused", flush=True)
"""


@pytest.mark.parametrize("stale", [False, True])
def test_lock_race_between_processes(tmp_path, stale):
    """Four processes try to take one lock at the same instant (also over a stale lock of a dead process):
    exactly one gets it, and holds it until all have tried."""
    target = str(tmp_path / "work" / "out")
    os.makedirs(os.path.dirname(target))
    if stale:
        with open(fs.lock_file_for(target), "w") as f:
            json.dump({"pid": dead_pid(), "host": fs.this_host(), "since": 0.0}, f)
    go, release = str(tmp_path / "go"), str(tmp_path / "release")
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, target, go, release], env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    try:
        assert [p.stdout.readline().strip() for p in procs] == ["ready"] * 4
        open(go, "w").close()
        outcomes = sorted(p.stdout.readline().strip() for p in procs)
    finally:
        open(release, "w").close()
        results = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    assert outcomes == ["got", "refused", "refused", "refused"], results
    assert os.listdir(tmp_path / "work") == []


# ----------------------------------------------------------------------------- temps and atomic outputs


def test_stale_temps_of_dead_processes_are_removed(tmp_path):
    out = tmp_path / "out"
    dead = dead_pid()
    stale = [f".out.tmp-{dead}-{fs.this_host()}", f".out.tmp-{dead}", f".out.old-{dead}-{fs.this_host()}"]
    keep = [f".out.tmp-1-{fs.this_host()}", f".out.tmp-{dead}-elsewhere.example", f".other.tmp-{dead}"]  # pid 1 lives
    for name in stale + keep:
        (tmp_path / name).mkdir()
        (tmp_path / name / "00000_0000.png").write_bytes(b"partial")
    removed = fs.remove_stale_temps(str(out))
    assert sorted(os.path.basename(p) for p in removed) == sorted(stale)
    assert sorted(os.listdir(tmp_path)) == sorted(keep)
    for name in stale:
        (tmp_path / name).mkdir()
    with atomic_output_dir(str(out)) as tmp:  # a later run cleans up before it writes
        assert os.path.basename(tmp) == f".out.tmp-{os.getpid()}-{fs.this_host()}"
        assert not any((tmp_path / name).exists() for name in stale)
    assert sorted(os.listdir(tmp_path)) == sorted(keep + ["out"])


def test_atomic_output_dir_leaves_nothing_on_an_exception(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output_dir(str(out), overwrite=True) as tmp:
            (open(os.path.join(tmp, "x.png"), "w")).write("partial")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == ["out"] and os.listdir(out) == ["keep.txt"]
    with atomic_output_dir(str(out), overwrite=True) as tmp:
        open(os.path.join(tmp, "new.txt"), "w").write("new")
    assert os.listdir(tmp_path) == ["out"] and os.listdir(out) == ["new.txt"]


def test_atomic_output_dir_disk_full_says_how_much(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputError) as e:
        with atomic_output_dir(str(out)) as tmp:
            open(os.path.join(tmp, "a.bin"), "wb").write(b"\0" * 3000)
            err = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(tmp, "b.safetensors"))
            err.needed, err.needed_for = 5000, os.path.join(tmp, "b.safetensors")
            raise err
    text = str(e.value)
    assert text.startswith(f"disk full writing {out}: no space left on the device; it needs at least 7.8 KiB "
                           f"(2.9 KiB written before the disk filled + 4.9 KiB for {out}/b.safetensors)")
    assert "free there now (the partial output was removed)" in text
    assert os.listdir(tmp_path) == []


def test_write_safetensors_disk_full_removes_its_temp_and_knows_the_size(tmp_path, monkeypatch):
    from fairjax.io import safetensors

    real_open = open

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device", self.f.name)

    monkeypatch.setattr(safetensors, "open", lambda p, m="r": Full(real_open(p, m)) if "w" in m else real_open(p, m),
                        raising=False)
    path = str(tmp_path / "x.safetensors")
    with pytest.raises(OSError) as e:
        write_safetensors(path, {"w": np.zeros((10, 10), np.float32)})
    assert e.value.needed >= 400 and e.value.filename == path and os.listdir(tmp_path) == []
    line = fs.error_line(e.value)
    assert line.startswith(f"error: disk full writing {path}: no space left on the device; it needs at least")


_TERMINATED = """
import sys, time
from fairjax.io.model_dir import atomic_output_dir
with atomic_output_dir(sys.argv[1]) as tmp:
    open(tmp + "/00000_0000.png", "w").write("partial")
    print("writing", flush=True)
    time.sleep(60)
"""


def test_sigterm_removes_the_partial_output(tmp_path):
    """A real process stopped by SIGTERM inside atomic_output_dir: exit 143, one line, no temp folder, no lock."""
    p = subprocess.Popen([sys.executable, "-c", _TERMINATED, str(tmp_path / "out")], env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    assert any(n.startswith(".out.tmp-") for n in os.listdir(tmp_path))
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143
    assert err.strip().splitlines() == [f"error: stopped by SIGTERM before {tmp_path / 'out'} was complete; the "
                                        "partial output was removed"]
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- the OS's refusals


@pytest.mark.parametrize("code,words", [
    (errno.EACCES, "permission denied; choose a writable path path or fix its permissions"),
    (errno.EROFS, "read-only file system"),
    (errno.ENOTDIR, "a file where a folder is needed"),
    (errno.EISDIR, "a folder where a file is needed"),
    (errno.ENOSPC, "disk full writing /x/y"),
])
def test_error_line_for_os_refusals(code, words):
    line = fs.error_line(OSError(code, os.strerror(code), "/x/y"))
    assert line.startswith("error: ") and words in line and "\n" not in line


def test_error_line_is_none_for_bugs():
    assert fs.error_line(OSError(errno.EBADF, "bad fd")) is None
    assert fs.error_line(KeyError("x")) is None
    assert fs.error_line(ConfigError("a\nb")) == "error: a b"  # always one line


def _raise(e):
    def body():
        raise e
    return body


def test_run_entry_turns_how_a_command_ended_into_its_status(capsys):
    """The one runner under every entry point: a result is the status (None: 0); a stop signal, bad input, an OS
    refusal (and Ctrl-C in a tool) is one line on stderr and its code; a bug and, under the guard, a second
    Ctrl-C keep their traceback."""
    from fairjax.errors import Interrupted, UserError

    assert fs.run_entry(lambda: None) == 0 and fs.run_entry(lambda: 3, guard=False) == 3
    cases = [(_raise(Interrupted("stopped by SIGTERM at step 4; run it again", "SIGTERM")), True, 143,
              "stopped by SIGTERM at step 4; run it again"),
             (_raise(Interrupted("stopped by SIGINT", "SIGINT")), True, 130, "stopped by SIGINT"),
             (_raise(UserError("bad --x; pass a number")), True, 2, "error: bad --x; pass a number"),
             (_raise(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/x/y")), False, 2, "error: disk full writing /x/y"),
             (_raise(KeyboardInterrupt()), False, 130, "stopped by SIGINT (Ctrl-C)")]
    for body, guard, code, words in cases:
        assert fs.run_entry(body, guard=guard) == code, words
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(words), err
    for body, guard in ((_raise(KeyError("k")), False), (_raise(OSError(errno.EBADF, "bad fd")), True),
                        (_raise(KeyboardInterrupt()), True)):
        with pytest.raises((KeyError, OSError, KeyboardInterrupt)):
            fs.run_entry(body, guard=guard)
    assert capsys.readouterr().err == ""


def test_run_entry_holds_the_guard_only_while_the_body_runs():
    """guard=True: SIGTERM inside the body is a flag the body can poll (not the default kill); the previous
    handler is back afterwards. guard=False installs nothing."""
    from fairjax.io.preemption import raise_if_stopped

    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def body():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        seen.append(signal.getsignal(signal.SIGTERM))
        raise_if_stopped("between batches")

    assert fs.run_entry(body) == 143
    assert seen and seen[0] is not before and signal.getsignal(signal.SIGTERM) is before
    assert fs.run_entry(lambda: seen.append(signal.getsignal(signal.SIGTERM)), guard=False) == 0
    assert seen[-1] is before


def test_read_json_wants_an_object(tmp_path):
    for text, words in [("[1]", "expected a JSON object"), ("{x", "not valid JSON"), ("null", "found a NoneType")]:
        (tmp_path / "c.json").write_text(text)
        with pytest.raises(CheckpointError, match=words):
            read_json(str(tmp_path / "c.json"))
    with pytest.raises(CheckpointError, match="is a folder"):
        read_json(str(tmp_path))


# ----------------------------------------------------------------------------- safetensors headers


def _raw(path, header, data=b""):
    h = json.dumps(header).encode() if not isinstance(header, bytes) else header
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h + data)
    return str(path)


F = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("header,data,words", [
    ({"a": dict(F, data_offsets=[-128, 0])}, b"", "data_offsets [-128, 0] are not two non-negative integers"),
    ({"a": dict(F, data_offsets=[8, 0])}, b"\0" * 8, "hold -8 bytes"),
    ({"a": dict(F, data_offsets=[0, 4])}, b"\0" * 4, "needs 8"),
    ({"a": F, "b": dict(F, data_offsets=[4, 12])}, b"\0" * 12, "overlap"),
    ({"a": F, "b": dict(F, data_offsets=[12, 20])}, b"\0" * 20, "4 bytes before 'b' belong to no tensor"),
    ({"a": F}, b"\0" * 12, "4 bytes after the last tensor"),
    ({"a": F}, b"\0" * 4, "truncated safetensors file"),
    ({"a": dict(F, dtype="float32")}, b"\0" * 8, "unknown dtype 'float32'"),
    ({"a": dict(F, shape=[-2])}, b"\0" * 8, "not a list of non-negative integers"),
    ({"a": dict(F, shape=[2.0])}, b"\0" * 8, "not a list of non-negative integers"),
    ({"a": dict(F, data_offsets=[0, True])}, b"\0" * 8, "not two non-negative integers"),
    ({"a": {"dtype": "F32"}}, b"", "need dtype, shape and data_offsets"),
    ({"a": [1, 2]}, b"", "need dtype, shape and data_offsets"),
    ([1, 2], b"", "a JSON list, not an object"),
    ({"a": F, "__metadata__": {"k": 1}}, b"\0" * 8, "__metadata__ must map names to strings"),
    (b'{"a": ' + json.dumps(F).encode() + b', "a": ' + json.dumps(F).encode() + b"}", b"\0" * 8, "duplicate key 'a'"),
    (b"\xff\xfe", b"", "corrupt safetensors header"),
])
def test_corrupt_headers_are_one_line_errors(tmp_path, header, data, words):
    path = _raw(tmp_path / "x.safetensors", header, data)
    with pytest.raises(CheckpointError) as e:
        SafetensorsReader(path)
    assert words in str(e.value) and path in str(e.value) and "\n" not in str(e.value)


def test_valid_edge_cases_still_read(tmp_path):
    path = str(tmp_path / "x.safetensors")
    write_safetensors(path, [("s", np.float32(3.0) * np.ones((), np.float32)), ("e", np.zeros((0, 4), np.float32)),
                             ("w", np.arange(6, dtype=np.float32).reshape(2, 3))], {"k": "v"})
    with SafetensorsReader(path) as r:
        assert float(r["s"]) == 3.0 and r["e"].shape == (0, 4) and r["w"][1, 2] == 5.0 and r.metadata == {"k": "v"}


def test_shard_index_never_leaves_its_folder(tmp_path):
    outside = tmp_path / "outside.safetensors"
    write_safetensors(str(outside), {"w": np.ones(3, np.float32)})
    folder = tmp_path / "a" / "b"
    folder.mkdir(parents=True)
    for name in ["../../outside.safetensors", str(outside), "sub/x.safetensors", ".."]:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": name}}))
        with pytest.raises(CheckpointError, match="outside .*an index may only name files in its own folder"):
            ShardedReader(str(folder), "model")
    os.symlink(outside, folder / "linked.safetensors")  # a link inside the folder (the HF cache's layout) is fine
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "linked.safetensors"}}))
    with ShardedReader(str(folder), "model") as r:
        assert r["w"].tolist() == [1.0, 1.0, 1.0]


def test_integer_weights_are_not_cast(tmp_path):
    from fairjax.io.model_dir import load_params

    path = str(tmp_path / "params.safetensors")
    write_safetensors(path, {"conv/kernel": np.ones((2, 2), np.int32), "conv/bias": np.ones(2, np.float32)})
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) are not floating point .*conv/kernel \(I32\)"):
        load_params(path, {("conv", "kernel"): (2, 2), ("conv", "bias"): (2,)}, dtype=np.float32)


# ----------------------------------------------------------------------------- config ranges


def test_ranges_describe_and_check():
    import ml_collections

    assert ints(1).describe() == "an integer >= 1" and SEED.describe() == "an integer in [0, 2**32 - 1]"
    assert floats(0, lo_open=True).describe() == "a number > 0" and floats(0, 1, hi_open=True).describe() == \
        "a number in [0, 1)"
    assert ints(1, also=(-1,)).describe() == "-1 or an integer >= 1" and BOOL.describe() == "true or false"
    assert one_of("a", "b", note="why").describe() == "one of 'a', 'b' (why)"
    assert ints(1).ok(1000.0) and not ints(1).ok(1.5) and not ints(0).ok(True) and not floats().ok(math.inf)
    assert not floats(0).ok(math.nan) and not floats(0).ok("1") and BOOL.ok(False) and not BOOL.ok(0)
    cfg = ml_collections.ConfigDict({"a": 0, "b": {"c": 2.0}, "d": None})
    table = {"a": ints(1), "b.c": floats(0, 1), "d": ints(1), "missing.key": ints(1)}
    with pytest.raises(ConfigError) as e:
        validate(cfg, table)
    assert str(e.value) == ("config.a=0 is out of range: must be an integer >= 1; config.b.c=2.0 is out of range: "
                            "must be a number in [0, 1] (fix it in the config file or with --config.KEY=VALUE)")
    validate(cfg, table, {"a": ints(0), "b.c": floats(0)})  # a later table wins for its keys


def test_every_shipped_config_is_in_range():
    """Each preset of each configs/*.py passes its ranges: the tables describe what the project runs."""
    import glob

    from fairjax import evaluate, tasks, trainer
    from fairjax.config import load_config_file
    from fairjax.data import build_prefs

    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
        presets = [None]
        text = open(path).read()
        if "PRESETS" in text:
            ns: dict = {}
            exec(compile(text.split("def get_config")[0], path, "exec"), ns)
            presets += list(ns.get("PRESETS", ()))
        for preset in presets:
            cfg = load_config_file(path + (f":{preset}" if preset else ""))
            if "task" in cfg:
                trainer.validate_config(cfg, tasks.ranges(cfg))
            if "prefs" in cfg:
                validate(cfg, build_prefs.SAMPLE_RANGES, build_prefs.RANGES, evaluate.RANGES)
    validate(evaluate.default_config(), build_prefs.SAMPLE_RANGES, evaluate.RANGES)
