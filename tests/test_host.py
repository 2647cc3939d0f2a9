"""fairjax.io.host: the training entry points re-execute once with glibc malloc tunables that keep XLA's
large CPU buffers resident, and leave a user's own malloc settings alone."""

import os
import platform
import subprocess
import sys

import pytest

from fairjax.io import host

GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"

# After the entry-point call: the environment glibc saw, and whether a 64 MiB block came from mmap
# (glibc's own count of mmap-ed blocks, mallinfo2().hblks).
PROBE = r"""
import ctypes, os, sys
from fairjax.io import host
host.tune_allocator()
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
block = libc.malloc(64 << 20)
print("PID", os.getpid(), "TUNABLES", os.environ.get("GLIBC_TUNABLES", ""), "HBLKS", libc.mallinfo2().hblks,
      "ARGV", sys.argv[1:])
libc.free(ctypes.c_void_p(block))
"""


def _probe(env_extra, *args):
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")}
    env.pop(host.OFF_VARIABLE, None)
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", PROBE, *args], env=env, capture_output=True, text=True, check=True)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("PID")]
    assert len(line) == 1, out.stdout + out.stderr  # one process printed: the re-exec replaced the first
    return line[0]


@pytest.mark.skipif(not GLIBC or sys.version_info < (3, 10), reason="glibc tunables; sys.orig_argv")
def test_reexec_sets_the_tunables_and_glibc_serves_large_blocks_from_its_heap():
    tuned = _probe({}, "--flag", "a b")
    assert f"TUNABLES {host.TUNABLES} " in tuned
    assert "HBLKS 0 " in tuned  # mmap_max=0: no block came from mmap
    assert "ARGV ['--flag', 'a b']" in tuned  # same command line after the re-exec
    untuned = _probe({host.OFF_VARIABLE: "0"})
    assert "TUNABLES  " in untuned
    assert int(untuned.split("HBLKS ")[1].split()[0]) >= 1  # glibc's default: the 64 MiB block is mmap-ed


@pytest.mark.skipif(not GLIBC, reason="glibc tunables")
def test_a_users_own_malloc_settings_win():
    mine = "glibc.malloc.arena_max=4"
    assert f"TUNABLES {mine} " in _probe({"GLIBC_TUNABLES": mine})
    assert host.tuned_environment({"MALLOC_ARENA_MAX": "4"}) is None
    assert host.tuned_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}) is None
    assert host.tuned_environment({host.OFF_VARIABLE: "off"}) is None
    # other tunables are kept and ours appended; with ours set there is no second re-exec
    env = host.tuned_environment({"GLIBC_TUNABLES": "glibc.cpu.x86_rep_movsb_threshold=4096"})
    assert env["GLIBC_TUNABLES"] == "glibc.cpu.x86_rep_movsb_threshold=4096:" + host.TUNABLES
    assert host.tuned_environment(env) is None
