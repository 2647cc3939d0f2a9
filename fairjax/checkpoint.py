"""Checkpoints (orbax) and preemption.

Layout: ``<workdir>/checkpoints/<step>/state/...`` written by an orbax
``CheckpointManager`` with ``StandardSave`` of the (sharded) train state: every
process writes the shards it owns, the step directory appears only once complete
(orbax writes to a temporary directory and renames it), the last ``keep`` steps are
kept.  Restoring uses ``StandardRestore`` of an abstract state (shapes, dtypes and
``NamedSharding`` s), so arrays come back sharded exactly as the trainer wants them,
on any mesh.

A step directory that exists but cannot be read (truncated file, deleted shard) is
skipped with a one-line warning and the next older one is tried; with several processes they
agree on the step first (process 0's list of steps, broadcast; a step counts as readable only
if every process read its shards of it), so all of them restore the same step.  If none can be
read the one-line error says which steps were tried and why.  A step whose metadata reads but
whose keys or shapes are not the state's (another run's model in the workdir) is no broken step:
the one-line error names the first differing keys and their shapes, and no older step is tried.
Temporary directories of an interrupted save are ignored (and removed on start-up).

Preemption: :class:`PreemptionGuard` installs a SIGTERM (and SIGINT) handler that only
sets a flag; the training loop calls :meth:`PreemptionGuard.should_stop` at each step
boundary (with several processes the flag is OR-ed across processes so all of them stop
at the same step), saves a checkpoint and returns ``preempted``; the entry points hold a
guard for the whole job, stop it there with one line and exit 128 + the signal number
(:class:`fairjax.errors.Interrupted`); other long loops (image generation) poll
:func:`raise_if_stopped` between batches. They live in :mod:`fairjax.io.preemption` (no jax import, so an
entry point enters its guard before jax is imported) and are re-exported here.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import jax
import numpy as np

from fairjax.errors import CheckpointError
from fairjax.io.preemption import (  # noqa: F401
    _ACTIVE,
    PreemptionGuard,
    raise_if_stopped,
    stop_requested,
)

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
        self._unreadable: set[int] = set()  # steps restore() fell back from: save() replaces them

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
        """Save ``state`` as checkpoint ``step`` (all processes must call this together). A step that
        :meth:`restore` found unreadable is replaced; any other existing step is kept and nothing is saved."""
        ocp = _ocp()
        if step in self.all_steps():
            if step not in self._unreadable:
                return False
            # the broken copy this run fell back from (every process agreed it was unreadable); the run has
            # redone its steps, so the new state takes its place instead of leaving it to be tried on resume
            self.manager.delete(int(step))
            log.warning("checkpoint %s/%d was unreadable; replaced by this run's step %d", self.directory, step, step)
        self._unreadable.discard(int(step))
        return bool(self.manager.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=force))

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any] | None:
        """Restore the newest checkpoint every process can read (or ``step``) into ``abstract_state``'s
        structure/shardings.

        Returns ``(step, state)``, or ``None`` when the directory holds no checkpoint.  All
        processes restore the same step: the candidate steps are process 0's list (broadcast),
        each process reads its own shards of a candidate without any collective, and the
        processes then agree (one all-gather of a success flag and of each failure's first
        line).  A step that fails on any process is skipped with one warning line naming the
        processes and their reasons, and the next older one is tried on every process; if none
        is readable everywhere: one-line :class:`CheckpointError`.
        """
        steps = _agree_on_steps(self.all_steps() if step is None else [int(step)])
        if not steps:
            return None
        failures = []
        for s in reversed(steps):
            local = self._misfit(s, abstract_state)
            misfit = [m for m in _gather_reasons(local) if m]  # (every process raises, or none does)
            if misfit:  # another run's model: its older steps do not fit either, and none of them is broken
                raise CheckpointError(local or misfit[0])
            restored, reason = self._read(s, abstract_state)
            reasons = _gather_reasons(reason)
            bad = {i: r for i, r in enumerate(reasons) if r}
            if not bad:
                return s, restored
            where = "; ".join(f"process {i}: {r}" for i, r in bad.items()) if len(reasons) > 1 else bad[0]
            failures.append(f"{s} ({where})")
            self._unreadable.add(int(s))
            older = [t for t in steps if t < s]
            then = f"restoring {self.directory}/{older[-1]} instead" if older else "no older checkpoint"
            log.warning("checkpoint %s/%d unreadable (%s); %s", self.directory, s, where, then)
        raise CheckpointError(
            f"no readable checkpoint in {self.directory} (every process must read it; tried steps {', '.join(failures)}); "
            "delete the broken step directories or start from a new --workdir"
        )

    def _read(self, step: int, abstract_state: Any) -> tuple[Any, str]:
        """``(state, "")`` or ``(None, why)``: this process's shards of checkpoint ``step`` read with the
        orbax handler alone (no barrier: a process that fails cannot leave the others waiting)."""
        ocp = _ocp()
        from etils import epath

        path = epath.Path(self.directory) / str(step) / "state"
        try:
            state = ocp.StandardCheckpointHandler().restore(path, args=ocp.args.StandardRestore(abstract_state))
            jax.block_until_ready(state)
            return state, ""
        except Exception as e:  # noqa: BLE001 - only what unreadable files raise; anything else propagates
            if not _unreadable(e):
                raise
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            return None, f"{type(e).__name__}: {first}" if first else type(e).__name__

    def _misfit(self, step: int, abstract_state: Any) -> str:
        """Why checkpoint ``step`` cannot hold ``abstract_state`` although its metadata reads (another run's
        model: other keys or shapes, naming the first few), or "" (it fits, or its metadata is unreadable
        too: then it is a broken step)."""
        ocp = _ocp()
        from etils import epath

        try:
            meta = ocp.StandardCheckpointHandler().metadata(epath.Path(self.directory) / str(step) / "state")
            stored = ocp.tree.to_flat_dict(getattr(meta, "tree", meta), sep=".")
            wanted = ocp.tree.to_flat_dict(abstract_state, sep=".")
            stored = {k: tuple(v.shape) for k, v in stored.items()}
            wanted = {k: tuple(v.shape) for k, v in wanted.items()}
        except Exception:  # noqa: BLE001 - unreadable metadata: the caller's "unreadable" path says why
            return ""

        def order(keys):  # the model's own keys first: the optimizer state's follow from them
            return sorted(keys, key=lambda k: (not k.startswith("trainable."), k))

        diffs = [f"{k} has shape {stored[k]} there but {wanted[k]} in this config"
                 for k in order(set(stored) & set(wanted)) if stored[k] != wanted[k]]
        diffs += [f"it has no {k}" for k in order(set(wanted) - set(stored))]
        diffs += [f"it holds {k}, which this config does not have" for k in order(set(stored) - set(wanted))]
        if not diffs:
            return ""
        more = f" (and {len(diffs) - 3} more differences)" if len(diffs) > 3 else ""
        return (f"checkpoint {self.directory}/{step} was saved by a run of another model: {'; '.join(diffs[:3])}"
                f"{more}; resume it with the config it was saved with, or start from a new --workdir")

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


def _unreadable(e: BaseException) -> bool:
    """Whether ``e`` (or an exception it was raised from) is what a missing, truncated or corrupt file
    raises: ``OSError``, ``ValueError`` (tensorstore's read errors, JSON decoding) or ``KeyError``
    (orbax wraps tensorstore's errors in a bare ``Exception`` raised from them)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, (OSError, ValueError, KeyError)):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _agree_on_steps(steps: list[int]) -> list[int]:
    """Process 0's list of steps, on every process (a process may list the directory a moment later)."""
    if jax.process_count() == 1:
        return steps
    from jax.experimental import multihost_utils

    padded = np.full((_MAX_STEPS,), -1, np.int64)
    padded[: min(len(steps), _MAX_STEPS)] = steps[-_MAX_STEPS:]
    got = np.asarray(multihost_utils.broadcast_one_to_all(padded))
    return [int(x) for x in got if x >= 0]


def _gather_reasons(reason: str) -> list[str]:
    """Every process's failure reason for one restore attempt ("" = read fine), in process order."""
    if jax.process_count() == 1:
        return [reason]
    from jax.experimental import multihost_utils

    buf = np.zeros((_REASON_BYTES,), np.uint8)
    raw = reason.encode("utf-8", "replace")[:_REASON_BYTES]
    buf[: len(raw)] = np.frombuffer(raw, np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(buf)).reshape(jax.process_count(), _REASON_BYTES)
    return [bytes(r).rstrip(b"\0").decode("utf-8", "replace") for r in rows]


_MAX_STEPS = 1024
_REASON_BYTES = 256


def abstract_like(tree: Any, shardings: Any) -> Any:
    """``ShapeDtypeStruct`` tree (with shardings) describing ``tree`` for StandardRestore."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)
