"""File formats below every model: safetensors, fairjax model directories, param-tree paths, images;
and the host process's malloc settings (:mod:`fairjax.io.host`).

The lowest layer of fairjax after :mod:`fairjax.errors`: nothing here imports a model, a
converter or a task.
"""
