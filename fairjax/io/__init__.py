"""File formats below every model: safetensors, fairjax model directories, param-tree paths, images.

The lowest layer of fairjax after :mod:`fairjax.errors`: nothing here imports a model, a
converter or a task.
"""
