"""The 1-D population experiment (PopAlign sec. 5) trained through the real entry point.

Expected values come from the fixed-point analysis in docs/reference.md, written
out here from the dataset's own group frequencies:
``p1/p3 = (ref1/ref3) * exp((log(w1/l1) - log(w3/l3)) / beta)``.
"""

import json
import os

import numpy as np
import pytest

from fairjax import train
from fairjax.tasks import mog

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = os.path.join(REPO, "configs", "popalign_mog.py")
REF_W = np.exp([1.0, 0.0, -1.0]) / np.exp([1.0, 0.0, -1.0]).sum()


def _run(tmp_path, name, *extra):
    wd = str(tmp_path / name)
    summary = train.run(["--config", CFG if not extra or not extra[0].startswith(":") else CFG + extra[0],
                         "--workdir", wd, *[e for e in extra if not e.startswith(":")]])
    return summary, wd


def _dataset_freqs():
    import ml_collections

    from fairjax.config import load_config_file

    c = load_config_file(CFG)
    data = mog.make_dataset(ml_collections.ConfigDict(c.mog))
    comp, win = data["component"], data["is_winner"]
    w = np.array([np.mean(comp[win] == 0), np.mean(comp[win] == 2)])
    l = np.array([np.mean(comp[~win] == 0), np.mean(comp[~win] == 2)])
    assert not np.any(comp == 1), "no preference sample comes from the middle component"
    return w, l


def _predicted_ratio(beta):
    w, l = _dataset_freqs()
    return (REF_W[0] / REF_W[2]) * np.exp((np.log(w[0] / l[0]) - np.log(w[1] / l[1])) / beta)


@pytest.mark.parametrize("beta", [1.0, 2.0])
def test_popalign_reaches_fixed_point(tmp_path, beta):
    summary, wd = _run(tmp_path, f"b{beta}", f"--config.beta={beta}")
    wts = np.array(summary["trained"]["weights"])
    ratio = wts[0] / wts[2]
    pred = _predicted_ratio(beta)
    assert abs(ratio / pred - 1) < 0.25, (ratio, pred)
    saved = json.load(open(os.path.join(wd, "mixture.json")))
    assert np.allclose(saved["trained"]["weights"], wts)
    assert os.path.getsize(os.path.join(wd, "density.png")) > 1000


def test_popalign_small_beta_overshoots(tmp_path):
    summary, _ = _run(tmp_path, "b05", "--config.beta=0.5")
    wts = np.array(summary["trained"]["weights"])
    assert _predicted_ratio(0.5) < 0.5
    assert wts[0] / wts[2] < 0.5  # past balance: the rare outer component now dominates


def test_sft_collapses_middle(tmp_path):
    summary, _ = _run(tmp_path, "sft", ":sft")
    assert summary["loss"] == "sft"
    assert summary["trained"]["weights"][1] < 0.05


def test_calibrated_beta_lands_near_balance(tmp_path):
    summary, _ = _run(tmp_path, "cal", ":calibrated")
    w, l = _dataset_freqs()
    # two groups: balance needs log(ref1/ref3) + (log(w1/l1) - log(w3/l3)) / beta = 0
    beta_star = -(np.log(w[0] / l[0]) - np.log(w[1] / l[1])) / np.log(REF_W[0] / REF_W[2])
    assert summary["beta"] == pytest.approx(beta_star, rel=1e-6)
    wts = np.array(summary["trained"]["weights"])
    assert abs(wts[0] / wts[2] - 1) < 0.10


def test_cli_bad_config_key(tmp_path, capsys):
    rc = train.main(["--config", CFG, "--workdir", str(tmp_path / "x"), "--config.betaa=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "unknown config key 'betaa'" in err[0]
    assert not os.path.exists(tmp_path / "x" / "config.json")


def test_cli_refuses_other_runs_workdir(tmp_path, capsys):
    wd = str(tmp_path / "w")
    assert train.main(["--config", CFG, "--workdir", wd, "--config.total_steps=5"]) == 0
    before = open(os.path.join(wd, "config.json")).read()
    capsys.readouterr()
    rc = train.main(["--config", CFG + ":sft", "--workdir", wd, "--config.total_steps=5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "different config" in err[0] and "loss" in err[0]
    assert open(os.path.join(wd, "config.json")).read() == before


def test_calibrate_beta_two_and_three_groups():
    from fairjax.errors import UserError
    from fairjax.losses import calibrate_beta

    # two groups: closed form beta = -(d1 - d2) / (log r1 - log r2)
    ref, w, l = [0.8, 0.2], [0.5, 0.5], [0.9, 0.1]
    d = np.log(np.array(w) / np.array(l))
    assert calibrate_beta(ref, w, l) == pytest.approx(-(d[0] - d[1]) / np.log(0.8 / 0.2), rel=1e-12)
    # three groups: least squares of log r_j + u d_j = c, solved here with numpy lstsq
    ref, w, l = np.array([0.6, 0.3, 0.1]), np.array([0.3, 0.35, 0.35]), np.array([0.7, 0.2, 0.1])
    d = np.log(w / l)
    (u, c), *_ = np.linalg.lstsq(np.stack([d, -np.ones(3)], 1), -np.log(ref), rcond=None)
    assert calibrate_beta(ref, w, l) == pytest.approx(1 / u, rel=1e-9)
    with pytest.raises(UserError, match="zero winner frequency"):
        calibrate_beta([0.5, 0.5], [1.0, 0.0], [0.5, 0.5])
    with pytest.raises(UserError, match="no population signal"):
        calibrate_beta([0.7, 0.3], [0.4, 0.6], [0.4, 0.6])
    with pytest.raises(UserError, match="no positive beta"):
        calibrate_beta([0.7, 0.3], [0.9, 0.1], [0.5, 0.5])
