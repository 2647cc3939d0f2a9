"""Test session setup: 8 virtual CPU devices (for mesh tests), float32 everywhere."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

# fairjax's caches (the persistent XLA compilation cache of the entry points, converted models) go
# to a folder of this test session, never the user's ~/.cache: set before anything reads it. The process
# that made it (pytest itself; xdist's workers inherit the variable) removes it when it exits, so repeated
# runs do not pile up ~80 MB folders in the temp dir.
if "FAIRJAX_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["FAIRJAX_CACHE_DIR"] = tempfile.mkdtemp(prefix="fairjax-test-cache-")
    atexit.register(shutil.rmtree, os.environ["FAIRJAX_CACHE_DIR"], ignore_errors=True)

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def rel_err(a, b) -> float:
    """max |a - b| / max |b|: the parity measure used across the suite (b is the reference)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.fixture
def rel():
    return rel_err


@pytest.fixture
def winograd_everywhere(monkeypatch):
    """Every eligible 3x3 convolution runs as Winograd F(2x2, 3x3) whatever its size (by default the tiny
    test models' convolutions are below the size where fairjax takes it): the parity tests that take this
    fixture check that path against diffusers."""
    from fairjax.models import layers

    monkeypatch.setattr(layers, "WINOGRAD_MIN_PIXELS", 0)
    monkeypatch.setattr(layers, "WINOGRAD_MIN_CHANNELS", 0)


# session-wide tiny models of the bad-input tests (tests/test_bad_inputs_*.py), built once per run
from _bad_inputs import micro_diffusers_unet, micro_sdxl, tiny_vila_u  # noqa: E402,F401
