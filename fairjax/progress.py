"""Time-left estimates for long jobs: a rate over work done, and a multi-stage plan.

:class:`Rate` turns "n of N done after t seconds" into a time left (the generation loops of
``evaluate`` / ``build_prefs`` print it with their progress lines; the trainer uses its own
steps/s). :class:`StagePlan` holds a job's stages with their work in a shared unit (for the toy
main job: UNet forward passes of one image, see :mod:`fairjax.toy.run`), keeps one measured rate
per kind of work (sampling, training), and after each stage says how long every stage still to
run should take on this machine.
"""

from __future__ import annotations

import time


def format_seconds(s: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    s = max(float(s), 0.0)
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


class Rate:
    """Items per second since construction (a first call's compile counts as work: early estimates run long)."""

    def __init__(self, total: int):
        self.total = int(total)
        self.t0 = time.perf_counter()

    def left(self, done: int) -> float | None:
        """Seconds left at the average rate so far; None before anything is done."""
        if done <= 0:
            return None
        return (time.perf_counter() - self.t0) / done * (self.total - done)

    def line(self, done: int, what: str = "") -> str:
        """``1000/3648 images (~25 s left)``."""
        left = self.left(done)
        tail = f" (~{format_seconds(left)} left)" if left is not None and done < self.total else ""
        return f"{done}/{self.total}{(' ' + what) if what else ''}{tail}"


class StagePlan:
    """Stages ``[(name, kind, units)]`` run in order; ``done(name, seconds)`` after each one.

    The time left for a stage is its units divided by the measured rate (units per second) of its
    kind, or, when no stage of that kind has run yet, by the rate of all stages so far. Before any
    stage has finished there is no estimate (the first stage measures this machine).
    """

    def __init__(self, stages: list[tuple[str, str, float]]):
        self.stages = [(str(n), str(k), float(u)) for n, k, u in stages]
        self.finished: dict[str, float] = {}  # name -> seconds

    def _rate(self, kind: str) -> float | None:
        def rate(rows):
            units = sum(u for _, _, u in rows)
            secs = sum(self.finished[n] for n, _, _ in rows)
            return units / secs if secs > 0 and units > 0 else None

        done = [s for s in self.stages if s[0] in self.finished]
        return rate([s for s in done if s[1] == kind]) or rate(done)

    def done(self, name: str, seconds: float) -> None:
        self.finished[name] = float(seconds)

    def skip(self, name: str) -> None:
        """A stage whose output already existed: neither work left nor a measurement of the rate."""
        self.stages = [s for s in self.stages if s[0] != name]

    def estimates(self) -> dict[str, float]:
        """``{stage: seconds}`` for the stages not yet finished (empty before the first finishes)."""
        out = {}
        for n, k, u in self.stages:
            if n not in self.finished:
                r = self._rate(k)
                if r is None:
                    return {}
                out[n] = u / r
        return out

    def line(self) -> str:
        """``time left (estimated): train_popalign ~1 min 40 s, evaluate ~45 s; total ~2 min 25 s``."""
        est = self.estimates()
        if not est:
            return ""
        parts = ", ".join(f"{n} ~{format_seconds(s)}" for n, s in est.items())
        return f"time left (estimated from this machine's rate so far): {parts}; total ~{format_seconds(sum(est.values()))}"
