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


def _probe(env_extra, *args, script=PROBE):
    """The one "PID ..." line ``script`` printed in a fresh process, without any malloc/dispatch settings of
    this environment, plus ``env_extra``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", host.OFF_VARIABLE, host.DISPATCH_VARIABLE) and not k.startswith("MALLOC_")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, check=True)
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


# A jitted program whose temp buffer (a @ b: 6144 x 6144 float32, 144 MiB) is far above glibc's 32 MiB
# largest dynamic mmap threshold, so untuned glibc mmaps it (and first-touches its 36,864 pages) on
# every call. The median of the minor page faults of calls 3-7, and the dispatch mode JAX ran with.
FAULT_PROBE = r"""
import resource
from fairjax.io import host
host.tune_allocator()
import jax, jax.numpy as jnp
f = jax.jit(lambda a, b, c: (a @ b) @ c)
a, b, c = jnp.ones((6144, 4)), jnp.ones((4, 6144)), jnp.ones((6144, 4))
for _ in range(2):
    f(a, b, c).block_until_ready()
faults = []
for _ in range(5):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(a, b, c).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print("PID ASYNC", jax.config.read("jax_cpu_enable_async_dispatch"), "FAULTS", sorted(faults)[2])
"""


def _fault_probe(env_extra):
    _, _, is_async, _, faults = _probe(env_extra, script=FAULT_PROBE).split()
    return is_async, int(faults)


@pytest.mark.skipif(not GLIBC or sys.version_info < (3, 10), reason="glibc tunables; sys.orig_argv")
def test_tuned_process_runs_xla_cpu_on_its_main_thread_and_keeps_the_temp_buffer():
    # Untuned, every call mmaps the 144 MiB temp buffer anew. Tuned, the main thread allocates it from
    # glibc's main arena and keeps it (no faults). With asynchronous dispatch a worker thread bound to a
    # second arena would mmap it whatever mmap_max says (glibc's sysmalloc fallback), in some processes.
    # A fresh 144 MiB buffer costs 36,864 faults. The median call is checked: CI once saw one call in three
    # grow the heap by a buffer (36,864 faults in all) and, another time, 8 faults per call from elsewhere.
    is_async, faults = _fault_probe({})
    assert is_async == "False" and faults < 1_000
    is_async, faults = _fault_probe({host.OFF_VARIABLE: "0"})
    assert is_async == "True" and faults >= 30_000
    # your JAX_CPU_ENABLE_ASYNC_DISPATCH wins over ours
    assert _fault_probe({host.DISPATCH_VARIABLE: "true"})[0] == "True"
