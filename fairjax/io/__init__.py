"""File formats below every model: safetensors, fairjax model directories, param-tree paths, images;
the host process's malloc settings (:mod:`fairjax.io.host`) and its stop-signal guard
(:mod:`fairjax.io.preemption`, which imports neither jax nor numpy).

The lowest layer of fairjax after :mod:`fairjax.errors`: nothing here imports a model, a
converter or a task.
"""
