"""Every optional integration the extras in pyproject.toml promise imports in this environment.

CI runs the suite in a fresh virtual environment without system site-packages (``.ci/run``), so a
module that a package imports without declaring it (deepface -> werkzeug) fails here, with the
missing module's name, instead of being supplied by the machine image. The integrations themselves
run in their own tests: DeepFace on synthetic ONNX models (``test_classifiers.py``), TFDS reading an
array_record dataset without TensorFlow (``test_prefs_data.py``), PEFT adapters
(``test_convert_pipeline.py``, ``test_export_vila_u.py``) and sentencepiece tokenizers
(``test_convert_vila_u.py``).
"""

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

# distribution name -> the import paths fairjax (or the test suite) uses; every distribution named
# in an extra must appear here, so a new dependency cannot be added without its import check.
IMPORTS = {
    "torch": ["torch"],
    "diffusers": ["diffusers", "diffusers.models.unets.unet_2d_condition"],
    "transformers": ["transformers", "transformers.models.llama.modeling_llama"],
    "peft": ["peft", "peft.tuners.lora"],
    "accelerate": ["accelerate"],
    "sentencepiece": ["sentencepiece"],
    "protobuf": ["google.protobuf"],
    "tensorflow-datasets": ["tensorflow_datasets"],
    "importlib_resources": ["importlib_resources"],
    "array-record": ["array_record.python.array_record_module"],
    "deepface": ["deepface", "deepface.DeepFace", "deepface.modules.modeling"],
    "onnxruntime": ["onnxruntime"],
    "werkzeug": ["werkzeug.datastructures"],
    "onnx": ["onnx", "onnx.helper"],
    "pytest": ["pytest"],
    "pytest-xdist": ["xdist", "xdist.plugin"],
    "mpmath": ["mpmath"],
}


def _extras() -> dict[str, list[str]]:
    with open(PYPROJECT, "rb") as f:
        return tomllib.load(f)["project"]["optional-dependencies"]


def _dist(req: str) -> str | None:
    name = re.match(r"\s*([A-Za-z0-9_.\-]+)", req).group(1)
    return None if name == "fairjax" else name


def _cases():
    for extra, reqs in _extras().items():
        for req in reqs:
            dist = _dist(req)
            if dist is not None:
                yield pytest.param(extra, dist, id=f"{extra}-{dist}")


_PROBE = r"""
import importlib, json, os, sys
os.environ.setdefault("DEEPFACE_BACKEND_ENGINE", "onnx")  # as DeepFaceClassifier sets it
out = {}
for mod in json.loads(sys.argv[1]):
    try:
        importlib.import_module(mod)
        out[mod] = None
    except ImportError as e:
        out[mod] = [e.name, str(e)]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def import_results():
    """Every import path of IMPORTS, tried in one fresh interpreter (deepface fixes its backend engine
    at import, so importing it here would decide it for the other tests of this process)."""
    mods = sorted({m for ms in IMPORTS.values() for m in ms} | {"deepface.commons.image_utils"})
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(mods)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("extra,dist", list(_cases()))
def test_extra_dependency_imports(extra, dist, import_results):
    assert dist in IMPORTS, f"pyproject extra [{extra}] names {dist!r}: add its import paths to IMPORTS here"
    for mod in IMPORTS[dist]:
        failed = import_results[mod]
        if failed is not None:
            pytest.fail(f"extra [{extra}] promises {dist}, but `import {mod}` fails: module {failed[0]!r} is missing "
                        f"({failed[1]}); declare it in pyproject.toml's [{extra}] extra", pytrace=False)


def test_deepface_entry_point_imports(import_results):
    """The exact import DeepFaceClassifier makes (it reaches werkzeug through deepface.commons.image_utils)."""
    for mod in ("deepface.DeepFace", "deepface.commons.image_utils"):
        assert import_results[mod] is None, f"`import {mod}` fails: module {import_results[mod][0]!r} is missing"


def test_missing_module_error_names_the_module(monkeypatch):
    """DeepFaceClassifier's import failure names the module that is missing, not the packages around it."""
    from fairjax.errors import UserError
    from fairjax.fairness import classifiers as C

    clf = C.DeepFaceClassifier.__new__(C.DeepFaceClassifier)
    clf.home, clf.backend = "/nonexistent", "onnx"
    real_import = __import__

    def fake_import(name, *args, **kwargs):
        if name == "deepface.commons" or name.startswith("deepface"):
            raise ModuleNotFoundError("No module named 'werkzeug'", name="werkzeug")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr("builtins.__import__", fake_import)
    with pytest.raises(UserError, match="'werkzeug'") as info:
        clf._load()
    assert "\n" not in str(info.value)
