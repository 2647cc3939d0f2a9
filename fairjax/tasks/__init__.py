"""Training tasks: a model adapter + data + loss, looked up by ``config.task``.

Each task implements the contract documented in :mod:`fairjax.trainer`
(``init``, ``batch``, ``loss``, ``finish``). Modules are imported lazily so a
task's heavy dependencies load only when it is used.
"""

from __future__ import annotations

import importlib

from fairjax.errors import UserError

TASKS = {
    "mog": "fairjax.tasks.mog:MogTask",
    "vila_u_pref": "fairjax.tasks.vila_u_pref:VilaUPrefTask",
    "diffusion_pref": "fairjax.tasks.diffusion_pref:DiffusionPrefTask",
}


def ranges(config) -> dict:
    """The ``RANGES`` table of the task ``config.task`` names (its valid config values; {} if it has none)."""
    name = config.get("task")
    if name not in TASKS:
        raise UserError(f"unknown task {name!r} in config.task; known tasks: {', '.join(sorted(TASKS))}")
    return dict(getattr(importlib.import_module(TASKS[name].partition(":")[0]), "RANGES", {}))


def build(config, workdir=None):
    """The task ``config.task`` names; ``workdir`` goes to tasks whose constructor takes one
    (e.g. to build or cache files there before training)."""
    import inspect

    name = config.get("task")
    if name not in TASKS:
        raise UserError(f"unknown task {name!r} in config.task; known tasks: {', '.join(sorted(TASKS))}")
    module, _, cls = TASKS[name].partition(":")
    task_cls = getattr(importlib.import_module(module), cls)
    if workdir is not None and "workdir" in inspect.signature(task_cls).parameters:
        return task_cls(config, workdir=workdir)
    return task_cls(config)
