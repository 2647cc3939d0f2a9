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
}


def build(config):
    name = config.get("task")
    if name not in TASKS:
        raise UserError(f"unknown task {name!r} in config.task; known tasks: {', '.join(sorted(TASKS))}")
    module, _, cls = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), cls)(config)
