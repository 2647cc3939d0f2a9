"""fairjax.analysis.reward_probe: per-group, per-timestep reward of a tuned model against its base.

The checks use algebra that holds whatever the UNet predicts: a tuned UNet equal to the base has
reward exactly 0; tuned UNets whose output bias is shifted by +d and -d (on every channel) have,
with the same (eps, t) draws, ``g(+d) + g(-d) = -2 d^2`` for every record, so for every group and
timestep bucket — which fails if the two models do not see the same noise and timesteps.
"""

import json
import os

import numpy as np
import pytest

import tensorflow_datasets  # noqa: F401

from fairjax.analysis import reward_probe  # noqa: E402
from fairjax.io.model_dir import save_component, write_index  # noqa: E402
from fairjax.data.prefs import write_preference_dataset  # noqa: E402
from fairjax.models import unet  # noqa: E402
from fairjax.toy.model import ASSET_DIR  # noqa: E402
from fairjax.toy.world import ToyWorld, images_to_model  # noqa: E402

D = 0.05


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    w = ToyWorld()
    recs = []
    for i, (g, r) in enumerate([(g, r) for g in w.genders for r in w.races] * 2):
        occ = ("doctor", "chef")[i // 8]  # two prompts' sets of 8 records
        recs.append({"latents": images_to_model(w.render(occ, g, r)[None])[0], "caption": f"a {occ}",
                     "is_winner": i % 2 == 0, "set_id": i // 8,
                     "labels": {"gender": w.genders.index(g), "race": w.races.index(r)}})
    write_preference_dataset(root / "prefs", recs,
                             metadata={"classes": {"gender": list(w.genders), "race": list(w.races)}})
    cfg = json.load(open(os.path.join(ASSET_DIR, "unet", "config.json")))
    _, params = unet.load(ASSET_DIR)
    dirs = {}
    for name, shift in (("same", 0.0), ("plus", D), ("minus", -D)):
        p = {k: dict(v) for k, v in params.items()}
        p["conv_out"] = {"kernel": np.asarray(params["conv_out"]["kernel"]),
                         "bias": np.asarray(params["conv_out"]["bias"]) + shift}
        d = root / name
        save_component(str(d / "unet"), cfg, p)
        write_index(str(d), ["unet"], base_model=ASSET_DIR)
        dirs[name] = str(d)
    return str(root / "prefs"), dirs, len(recs)


def test_same_model_has_zero_reward(setup):
    data, dirs, n = setup
    res = reward_probe.probe(data, ASSET_DIR, dirs["same"], draws=1, buckets=3, batch_size=5)
    assert res["records"] == n and res["bucket_edges"] == [0, 333, 667, 1000]
    assert res["common"]["mean"] == [0.0, 0.0, 0.0]
    assert {c: s["n"] for c, s in res["sides"].items()} == {"winner": 8, "loser": 8}
    assert set(res["attributes"]) == {"gender", "race"}
    assert {c: s["n"] for c, s in res["attributes"]["race"].items()} == {"amber": 4, "cobalt": 4, "jade": 4,
                                                                         "violet": 4}
    assert {p: v["n"] for p, v in res["prompts"].items()} == {"a chef": 8, "a doctor": 8}
    for v in res["prompts"].values():
        assert {c: s["n"] for c, s in v["attributes"]["gender"].items()} == {"male": 4, "female": 4}
        assert all(s["mean"] == [0.0, 0.0, 0.0] for s in v["attributes"]["race"].values())


def test_shifted_output_bias_gives_minus_two_d_squared(setup):
    data, dirs, _ = setup
    kw = dict(draws=2, buckets=4, batch_size=7, seed=3)
    plus = reward_probe.probe(data, ASSET_DIR, dirs["plus"], **kw)
    minus = reward_probe.probe(data, ASSET_DIR, dirs["minus"], **kw)
    def rows(res):
        out = [res["common"], res["sides"]["winner"], res["sides"]["loser"]]
        out += [s for a in ("gender", "race") for s in res["attributes"][a].values()]
        return out + [s for p in ("a chef", "a doctor") for a in ("gender", "race")
                      for s in res["prompts"][p]["attributes"][a].values()]

    assert len(rows(plus)) == 3 + 6 + 2 * 6
    for sp, sm in zip(rows(plus), rows(minus), strict=True):
        np.testing.assert_allclose(np.add(sp["mean"], sm["mean"]), -2 * D * D, rtol=2e-4)
        assert all(m < 0 for m in np.add(sp["mean"], sm["mean"]))
    # a shifted bias costs the most where the UNet is otherwise most accurate: not a constant
    assert np.ptp(plus["common"]["mean"]) > 0


def test_cli_stops_on_sigterm_with_one_line_and_writes_nothing(setup, tmp_path, capsys):
    """SIGTERM (the job's guard caught it): the probe stops before its next batch, prints one line, returns
    143 and leaves neither OUT, its temp folder nor its lock (it had no guard: a traceback, or a kill)."""
    import signal

    from fairjax.checkpoint import PreemptionGuard

    data, dirs, _ = setup
    with PreemptionGuard():
        os.kill(os.getpid(), signal.SIGTERM)
        assert reward_probe.main(["--data", data, "--tuned", dirs["plus"], "--out", str(tmp_path / "probe"),
                                  "--draws", "1", "--buckets", "2"]) == 143
    err = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("fairjax: attention auto")]
    assert err == ["stopped by SIGTERM while probing (bucket 1 of 2, draw 1 of 1): nothing written; run the same "
                   "command again to start over"], err
    assert os.listdir(tmp_path) == []


def test_cli_writes_json_csv_and_plots(setup, tmp_path, capsys):
    data, dirs, _ = setup
    out = tmp_path / "probe"
    assert reward_probe.main(["--data", data, "--tuned", dirs["plus"], "--out", str(out), "--draws", "1",
                              "--buckets", "2"]) == 0  # base from the tuned dir's fairjax.json
    assert sorted(os.listdir(out)) == ["probe.csv", "probe.json", "reward_gender.png", "reward_race.png"]
    lines = open(out / "probe.csv").read().splitlines()
    # header + buckets x (all, 2 sides, 2 genders, 4 races, and the 2 + 4 classes of each of 2 prompts)
    assert len(lines) == 1 + 2 * (1 + 2 + 2 + 4 + 2 * 6)
    printed = capsys.readouterr().out
    assert "race:violet" in printed and "a chef (8 records)" not in printed  # per-prompt rows: --by-prompt
    assert reward_probe.main(["--data", data, "--tuned", dirs["plus"], "--out", str(out), "--draws", "1",
                              "--buckets", "2", "--by-prompt", "--overwrite"]) == 0
    assert "a chef (8 records)" in capsys.readouterr().out
    # an existing output, both or neither of --tuned/--lora, bad buckets: one line, nothing written
    assert reward_probe.main(["--data", data, "--tuned", dirs["plus"], "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    bad = tmp_path / "bad"
    assert reward_probe.main(["--data", data, "--base", ASSET_DIR, "--out", str(bad)]) == 2
    assert "exactly one of --tuned" in capsys.readouterr().err
    assert reward_probe.main(["--data", data, "--tuned", dirs["plus"], "--out", str(bad), "--buckets", "0"]) == 2
    assert "--buckets 0" in capsys.readouterr().err
    assert reward_probe.main(["--data", str(tmp_path / "none"), "--tuned", dirs["plus"], "--out", str(bad)]) == 2
    assert "no preference dataset" in capsys.readouterr().err
    assert not bad.exists()
