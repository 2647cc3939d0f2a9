"""Checkpoints (orbax) and preemption.

Layout: ``<workdir>/checkpoints/<step>/state/...`` written by an orbax
``CheckpointManager`` with ``StandardSave`` of the (sharded) train state: every
process writes the shards it owns, the step directory appears only once complete
(orbax writes to a temporary directory and renames it), the last ``keep`` steps are
kept.  Restoring uses ``StandardRestore`` of an abstract state (shapes, dtypes and
``NamedSharding`` s), so arrays come back sharded exactly as the trainer wants them,
on any mesh.

A step directory that exists but cannot be read (truncated file, deleted shard) is
skipped with a warning and the next older one is tried; if none can be read the error
says which directories were tried.  Temporary directories of an interrupted save are
ignored (and removed on start-up).

Preemption: :class:`PreemptionGuard` installs a SIGTERM (and SIGINT) handler that only
sets a flag; the training loop calls :meth:`PreemptionGuard.should_stop` at each step
boundary (with several processes the flag is OR-ed across processes so all of them stop
at the same step), saves a checkpoint and exits cleanly.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
from typing import Any

import jax
import numpy as np

from fairjax.errors import CheckpointError

log = logging.getLogger(__name__)


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


class Checkpointer:
    """Periodic sharded checkpoints of a train-state pytree.

    ``every_steps``: save when ``step % every_steps == 0`` (0 = only final / preemption saves).
    ``keep``: number of most recent checkpoints kept (``None``/0 = all).
    ``async_save``: write in a background thread while training continues
    (:meth:`wait` blocks until the last save is on disk).
    """

    def __init__(self, directory: str, every_steps: int = 0, keep: int | None = 3, async_save: bool = False):
        ocp = _ocp()
        self.directory = os.path.abspath(directory)
        self.every_steps = int(every_steps or 0)
        self._remove_partial()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=int(keep) if keep else None,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=bool(async_save),
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    # -- queries
    def all_steps(self) -> list[int]:
        return sorted(int(s) for s in self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def due(self, step: int) -> bool:
        return self.every_steps > 0 and step % self.every_steps == 0

    # -- save / restore
    def save(self, step: int, state: Any, force: bool = True) -> bool:
        """Save ``state`` as checkpoint ``step`` (all processes must call this together)."""
        ocp = _ocp()
        if step in self.all_steps():
            return False
        return bool(self.manager.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=force))

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any] | None:
        """Restore the newest readable checkpoint (or ``step``) into ``abstract_state``'s structure/shardings.

        Returns ``(step, state)``, or ``None`` when the directory holds no checkpoint.
        Unreadable checkpoints are skipped (warning); if every one fails -> CheckpointError.
        """
        ocp = _ocp()
        steps = self.all_steps() if step is None else [int(step)]
        if not steps:
            return None
        failures = []
        for s in reversed(steps):
            try:
                restored = self.manager.restore(
                    s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
                )
                return s, restored["state"]
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: try the previous one
                msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                log.warning("checkpoint %s/%d unreadable (%s: %s); trying an older one", self.directory, s, type(e).__name__, msg)
                failures.append(f"{s} ({type(e).__name__}: {msg})")
        raise CheckpointError(
            f"no readable checkpoint in {self.directory} (tried steps {', '.join(failures)}); "
            "delete the broken step directories or start from a new --workdir"
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def _remove_partial(self) -> None:
        """Remove temporary directories of saves that were killed midway (process 0 only)."""
        if jax.process_index() != 0 or not os.path.isdir(self.directory):
            return
        import shutil

        for name in os.listdir(self.directory):
            if re.search(r"orbax-checkpoint-tmp", name):
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)


def abstract_like(tree: Any, shardings: Any) -> Any:
    """``ShapeDtypeStruct`` tree (with shardings) describing ``tree`` for StandardRestore."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


class PreemptionGuard:
    """Turn SIGTERM / SIGINT into a flag the training loop polls at step boundaries.

    Use as a context manager; the previous handlers are restored on exit.  A second
    SIGINT while the flag is already set falls through to the previous handler
    (Ctrl-C twice still kills).  Only the main thread can install handlers; elsewhere
    the guard is inert.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self._flag = threading.Event()
        self._previous: dict[int, Any] = {}
        self.signal_name: str | None = None

    def _handler(self, signum, frame):
        if self._flag.is_set() and signum == signal.SIGINT:
            prev = self._previous.get(signum)
            if callable(prev):
                prev(signum, frame)
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        self._flag.set()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
        return False

    @property
    def requested(self) -> bool:
        """This process received a stop signal."""
        return self._flag.is_set()

    def should_stop(self) -> bool:
        """True on every process once any process received a stop signal (collective when multi-process)."""
        local = self._flag.is_set()
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray([int(local)], np.int32))
        return bool(np.asarray(flags).any())
