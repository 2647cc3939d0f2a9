"""The evaluation report folder: files written, HTML links resolve, two-model deltas, atomic writes."""

import csv
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from fairjax.errors import UserError
from fairjax.fairness import metrics as M
from fairjax.fairness import report as R
from fairjax.fairness.metrics import Record

NEUTRAL = ["best quality, a realistic photo of a doctor", "best quality, a realistic photo of a nurse"]
IDENT = "best quality, a realistic photo of an asian female doctor"


def _records(folder, name, genders, races):
    """Neutral records for two prompts (one image unreadable, one faceless) plus identity records."""
    os.makedirs(folder, exist_ok=True)
    recs = []
    for i, (g, r) in enumerate(zip(genders, races)):
        path = os.path.join(folder, f"{name}_{i}.png")
        Image.fromarray(np.full((24, 32, 3), 40 * i % 255, np.uint8)).save(path)
        prompt = NEUTRAL[i % 2]
        recs.append(Record(prompt, None if g is None else {"gender": g, "race": r}, path,
                           reason=None if g is not None else "no_face"))
    recs.append(Record(NEUTRAL[0], None, os.path.join(folder, "gone.png"), reason="missing"))
    recs.append(Record(IDENT, {"gender": "female", "race": "asian"}, recs[0].image,
                       identity={"gender": "female", "race": "asian"}))
    recs.append(Record(IDENT, {"gender": "male", "race": "asian"}, recs[1].image,
                       identity={"gender": "female", "race": "asian"}))
    return recs


@pytest.fixture
def runs(tmp_path):
    base = _records(str(tmp_path / "img"), "base", ["male", "male", "male", None, "male", "female"],
                    ["white", "white", "asian", None, "white", "white"])
    tuned = _records(str(tmp_path / "img"), "tuned", ["male", "female", "female", "male", "male", "female"],
                     ["white", "black", "asian", "indian", "white", "latino hispanic"])
    return {"base": base, "tuned": tuned}


def _links(html_text):
    return re.findall(r"(?:src|href)='([^']+)'", html_text)


def test_single_model_report(tmp_path, runs):
    out = tmp_path / "report"
    rep = R.write_report(str(out), runs["base"], n_resamples=100)
    data = json.loads((out / "report.json").read_text())
    expected = M.evaluate(runs["base"], n_resamples=100)
    assert data["models"] == ["model"]
    assert data["discrepancy"] == pytest.approx(expected["discrepancy"])
    assert data["bias"] == pytest.approx(expected["bias"])
    assert data["recall"] == pytest.approx({"gender": 0.5, "race": 1.0, "both": 0.5})
    assert set(data["intervals"]) == {"discrepancy", "bias", "recall"}
    assert data["results"]["model"]["skipped"] == {"no_face": 1, "missing": 1}
    for f in rep["files"]:
        assert (out / f).is_file(), f
    assert {"report.json", "index.html", "per_prompt_model.csv", "recall_model.csv", "frequencies_gender.png",
            "frequencies_race.png"} <= set(rep["files"])
    html_text = (out / "index.html").read_text()
    links = _links(html_text)
    assert links and all((out / link).is_file() for link in links)
    assert any(link.startswith("grids/") for link in links)
    with open(out / "per_prompt_model.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["prompt"] for r in rows] == NEUTRAL
    assert int(rows[0]["n_images"]) == 4 and int(rows[0]["n_faces"]) == 3  # the missing file counts as an image
    assert Image.open(out / "frequencies_race.png").size[0] > 100


def test_two_models_side_by_side(tmp_path, runs):
    out = tmp_path / "cmp"
    rep = R.write_report(str(out), runs, n_resamples=100)
    base, tuned = (M.evaluate(runs[m], n_resamples=100) for m in ("base", "tuned"))
    assert rep["models"] == ["base", "tuned"]
    assert rep["discrepancy"] == pytest.approx(tuned["discrepancy"])  # top level: the last model
    for key in ("discrepancy", "bias", "recall"):
        for sub, v in tuned[key].items():
            assert rep["delta"]["tuned"][key][sub] == pytest.approx(v - base[key][sub])
    assert rep["delta"]["tuned"]["discrepancy"]["gender"] < 0  # tuned is more balanced here
    with open(out / "per_prompt_delta.csv") as f:
        rows = list(csv.DictReader(f))
    col = "delta tuned-base:discrepancy:gender"
    for r in rows:
        assert float(r[col]) == pytest.approx(float(r["tuned:discrepancy:gender"]) - float(r["base:discrepancy:gender"]))
    html_text = (out / "index.html").read_text()
    assert all((out / link).is_file() for link in _links(html_text))
    assert "grids/base/" in html_text and "grids/tuned/" in html_text
    assert "&Delta; tuned" in html_text
    assert {"per_prompt_base.csv", "per_prompt_tuned.csv", "recall_base.csv", "recall_tuned.csv"} <= set(os.listdir(out))


def test_atomic_and_errors(tmp_path, runs, monkeypatch):
    out = tmp_path / "rep"
    R.write_report(str(out), runs["base"], n_resamples=20)
    with pytest.raises(UserError, match="already exists"):
        R.write_report(str(out), runs["base"], n_resamples=20)
    R.write_report(str(out), runs, n_resamples=20, overwrite=True)
    assert json.loads((out / "report.json").read_text())["models"] == ["base", "tuned"]

    faceless = [Record(NEUTRAL[0], None), Record(NEUTRAL[1], None)]
    with pytest.raises(UserError, match="no face detected"):
        R.write_report(str(tmp_path / "none"), faceless)
    assert not (tmp_path / "none").exists()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(R, "frequency_chart", boom)
    with pytest.raises(RuntimeError):
        R.write_report(str(tmp_path / "half"), runs, n_resamples=20)
    assert sorted(os.listdir(tmp_path)) == ["img", "rep"]  # nothing half-written, no temp folder
    with pytest.raises(UserError, match="collide"):
        R.write_report(str(tmp_path / "x"), {"a b": runs["base"], "a_b": runs["tuned"]})


def test_records_jsonl_roundtrip(tmp_path, runs):
    path = str(tmp_path / "records.jsonl")
    R.write_records(path, runs["tuned"])
    assert R.read_records(path) == runs["tuned"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x", "labels": null}\n{"labels": 3}\n')
    with pytest.raises(UserError, match="line 2"):
        R.read_records(str(tmp_path / "bad.jsonl"))
    with pytest.raises(UserError, match="not found"):
        R.read_records(str(tmp_path / "nope.jsonl"))
