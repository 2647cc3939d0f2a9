"""The host process's memory allocator: keep XLA's CPU buffers resident between steps.

XLA's CPU runtime allocates a step's temporary buffer (688 MB for the 50M-parameter SDXL-shaped UNet's
train step at batch 4) with glibc's ``malloc`` and frees it when the step ends. Allocations that large are
``mmap``-ed and ``munmap``-ed on every call, so every step first-touches all its pages again: 170-220k page
faults and 0.3-1.2 s of system time per 1.4-2.0 s step on a 2-core Xeon (``BENCHMARKS.md``, issue 24).
With ``GLIBC_TUNABLES`` set to :data:`TUNABLES` glibc serves them from its heap and keeps the freed memory
for the next step (no ``mmap`` for large blocks, no trimming, at most two arenas): 0 faults per step, the
50M UNet's train step 1.3-1.4x faster, the toy PopAlign step 1.12x. The process's resident memory then
stays at its peak instead of shrinking between steps. More arenas bring the faults back (threads' own
arenas cannot hold a block that large); one arena slowed the UNet forward by about 15%.

The tunables alone are not enough. glibc serves a block larger than a thread arena's 64 MiB heap from the
main arena only when the allocating thread uses the main arena; a thread bound to a second arena falls
back to ``mmap`` whatever ``mmap_max`` says (glibc's ``sysmalloc``). With JAX's default asynchronous CPU
dispatch a PjRt worker thread runs each call and allocates its temp buffer, so whether a step faults
depended on which arena that thread had drawn: ``strace`` showed the 688 MB block ``mmap``-ed on 2 of 7
calls in one process and on none in another. :func:`tune_allocator` therefore also turns JAX's
asynchronous CPU dispatch off (``jax_cpu_enable_async_dispatch``): the calling (main) thread then runs
each computation and allocates from the main arena, every time. A 2-core CPU has no spare core for the
overlap that asynchronous dispatch buys; the toy PopAlign training ran at 4.64-4.68 steps/s synchronous
against 4.09-4.33 asynchronous. It changes nothing on GPU or TPU, whose clients it does not touch, and
an explicit ``JAX_CPU_ENABLE_ASYNC_DISPATCH`` of yours wins.

glibc reads ``GLIBC_TUNABLES`` only at process start, so :func:`tune_allocator` re-executes the process
once with it set. The training entry points (``fairjax.train``, ``fairjax.toy.run``) call it first thing;
it changes nothing when ``FAIRJAX_HOST_MALLOC=0``, when you set any glibc malloc tunable yourself (in
``GLIBC_TUNABLES`` or as ``MALLOC_*_`` variables: yours win), or off glibc/Linux.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLES = "glibc.malloc.arena_max=2:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
OFF_VARIABLE = "FAIRJAX_HOST_MALLOC"
DISPATCH_VARIABLE = "JAX_CPU_ENABLE_ASYNC_DISPATCH"


def _glibc_at_least(major: int, minor: int) -> bool:
    name, version = platform.libc_ver()
    if name != "glibc":
        return False
    try:
        return tuple(int(v) for v in version.split(".")[:2]) >= (major, minor)
    except ValueError:
        return False


def tuned_environment(environ: dict[str, str] | None = None) -> dict[str, str] | None:
    """The environment to re-execute with, or None when this process should run as it is."""
    env = dict(os.environ if environ is None else environ)
    if env.get(OFF_VARIABLE, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if sys.platform != "linux" or not _glibc_at_least(2, 26):
        return None
    tunables = env.get("GLIBC_TUNABLES", "")
    # yours win; and the re-executed process finds ours here, so it does not re-execute again
    if "glibc.malloc." in tunables or any(k.startswith("MALLOC_") for k in env):
        return None
    env["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLES}" if tunables else TUNABLES
    return env


def tune_allocator() -> None:
    """Re-execute this process (same interpreter, same command line) with :data:`TUNABLES` for ``malloc``;
    in the re-executed process, turn JAX's asynchronous CPU dispatch off (:func:`synchronous_cpu_dispatch`).

    Call it before anything else happens in a command-line entry point: the re-executed process starts
    from the beginning. Does nothing when :func:`tuned_environment` says so, when the command line
    cannot be recovered, or when the entry point's signal guard (entered before, so that jax is imported
    under it) already caught SIGTERM / SIGINT; if the exec itself fails the process goes on untuned.
    """
    if TUNABLES in os.environ.get("GLIBC_TUNABLES", ""):  # the re-executed process (or a user who set ours)
        synchronous_cpu_dispatch()
        return
    env = tuned_environment()
    argv = getattr(sys, "orig_argv", None)
    if env is None or not argv:
        return
    from fairjax.io.preemption import stop_requested

    if stop_requested():  # the entry point's guard caught SIGTERM / SIGINT: the new process would not know
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    try:
        os.execve(sys.executable, [sys.executable] + list(argv[1:]), env)
    except OSError:
        return


def synchronous_cpu_dispatch() -> bool:
    """Run XLA:CPU computations on the calling thread (``jax_cpu_enable_async_dispatch=False``), so their
    buffers come from the main thread's malloc arena (see the module docstring).

    Takes effect only before JAX creates its CPU client (the first computation or device query); does
    nothing, and returns False, when ``JAX_CPU_ENABLE_ASYNC_DISPATCH`` is set (yours wins).
    """
    if os.environ.get(DISPATCH_VARIABLE, "").strip():
        return False
    import jax

    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return True
