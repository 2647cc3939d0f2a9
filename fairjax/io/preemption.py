"""Preemption: SIGTERM / SIGINT as a flag that long loops poll at safe points.

:class:`PreemptionGuard` installs a SIGTERM (and SIGINT) handler that only sets a flag; the training
loop calls :meth:`PreemptionGuard.should_stop` at each step boundary (with several processes the flag is
OR-ed across processes so all of them stop at the same step), saves a checkpoint and returns
``preempted``; the entry points hold a guard for the whole job, stop it there with one line and exit
128 + the signal number (:class:`fairjax.errors.Interrupted`); other long loops (image generation) poll
:func:`raise_if_stopped` between batches.

This module imports neither jax nor numpy, so an entry point enters its guard before it imports them:
while jax is imported, Python's default SIGINT handler would raise KeyboardInterrupt inside jax's garbage
collection callback, where Python only prints it ("Exception ignored in ...") and the job runs on.
:mod:`fairjax.checkpoint` re-exports these names.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

_ACTIVE: list["PreemptionGuard"] = []  # the guards entered in this process, outermost first


class PreemptionGuard:
    """Turn SIGTERM / SIGINT into a flag that long loops poll at safe points (step or batch boundaries).

    Use as a context manager; the previous handlers are restored on exit.  Guards nest: an entry
    point holds one for the whole job and the trainer enters its own inside it; the inner one
    installs nothing and shares the outer one's flag, so a signal received anywhere in the job
    (set-up, compilation, another stage) is seen by the next poll.  A second SIGINT while the
    flag is already set falls through to the previous handler (Ctrl-C twice still kills).  Only
    the main thread can install handlers; elsewhere the guard is inert.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self._flag = threading.Event()
        self._previous: dict[int, Any] = {}
        self._outer: PreemptionGuard | None = None
        self._signal_name: str | None = None

    def _handler(self, signum, frame):
        if self._flag.is_set() and signum == signal.SIGINT:
            prev = self._previous.get(signum)
            if callable(prev):
                prev(signum, frame)
            raise KeyboardInterrupt
        self._signal_name = signal.Signals(signum).name
        self._flag.set()

    def __enter__(self):
        if _ACTIVE:
            self._outer = _ACTIVE[0]
        elif threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handler)
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        return False

    @property
    def signal_name(self) -> str | None:
        """``'SIGTERM'`` / ``'SIGINT'`` once a stop signal arrived, else None."""
        return self._outer.signal_name if self._outer is not None else self._signal_name

    @property
    def requested(self) -> bool:
        """This process received a stop signal."""
        return self._outer.requested if self._outer is not None else self._flag.is_set()

    def should_stop(self) -> bool:
        """True on every process once any process received a stop signal (collective when multi-process)."""
        import jax
        import numpy as np

        local = self.requested
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray([int(local)], np.int32))
        return bool(np.asarray(flags).any())


def stop_requested() -> str | None:
    """The stop signal's name if the job's guard (an entry point's :class:`PreemptionGuard`) caught one."""
    return _ACTIVE[0].signal_name if _ACTIVE else None


def raise_if_stopped(what: str) -> None:
    """Raise :class:`fairjax.errors.Interrupted` (``"stopped by SIGTERM <what>"``) once a stop signal
    arrived; a no-op without a guard (library use: the signals keep their default behaviour).
    ``what`` says where the job stopped and what it kept, e.g. ``"while generating: nothing written"``."""
    name = stop_requested()
    if name:
        from fairjax.errors import Interrupted

        raise Interrupted(f"stopped by {name} {what}", name)
