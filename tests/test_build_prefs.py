"""build_prefs: labelling, drop reasons, balanced winning sets, the dataset the trainer reads."""

from __future__ import annotations

import collections
import json
import os
import warnings

import numpy as np
import pytest

from fairjax.data import build_prefs as bp
from fairjax.errors import UserError
from fairjax.fairness.classifiers import ExactClassifier
from fairjax.toy.world import ToyWorld, identity_grid


@pytest.fixture(scope="module")
def world():
    return ToyWorld()


def _item(world, s, occ, g, r, identity=None, image=None, latents=None):
    img = world.render(occ, g, r) if image is None else image
    lat = np.zeros((3, 8, 8), np.float32) if latents is None else latents
    prompt = world.neutral_prompt(occ) if identity is None else world.identity_prompt(occ, *identity)
    return bp.Generated(s, prompt, None if identity is None else {"gender": identity[0], "race": identity[1]},
                        img, lat)


def _doctor_set(world):
    """Set 0 ("a doctor"): 5 good neutral images, 1 without a figure, 1 malformed array,
    1 with NaN latents; 2 identity images per group, one of (female, violet) showing jade."""
    items = [_item(world, 0, "doctor", g, r) for g, r in
             [("male", "amber"), ("male", "amber"), ("male", "cobalt"), ("female", "amber"), ("male", "jade")]]
    items.append(_item(world, 0, "doctor", None, None))
    items.append(_item(world, 0, "doctor", "male", "amber", image=np.zeros((8, 8), np.uint8)))
    items.append(_item(world, 0, "doctor", "male", "amber", latents=np.full((3, 8, 8), np.nan, np.float32)))
    for g, r in identity_grid(world):
        for k in range(2):
            shown = "jade" if (g, r, k) == ("female", "violet", 1) else r
            items.append(_item(world, 0, "doctor", g, shown, identity=(g, r)))
    return items


def test_drop_reasons_balance_and_records(world):
    clf = ExactClassifier(world.decode, world.classes)
    labelled = bp.label_items(_doctor_set(world), clf)
    records, summary = bp.form_sets(labelled, ["a doctor"], world.classes)
    # 8 groups x 2 identity images; (female, violet) keeps 1 after the mismatch -> 1 per group
    assert summary["dropped"] == {"corrupt": 2, "mismatch": 1, "no_face": 1, "surplus": 7}
    assert summary["winners"] == 8 and summary["losers"] == 5 and len(records) == 13
    assert summary["generated"] == len(records) + sum(summary["dropped"].values())
    wins = [r for r in records if r["is_winner"]]
    assert [r["is_winner"] for r in records] == [True] * 8 + [False] * 5
    groups = [(world.genders[r["labels"]["gender"]], world.races[r["labels"]["race"]]) for r in wins]
    assert sorted(groups) == sorted(identity_grid(world))  # one of each group
    assert all(r["caption"] == "a doctor" and r["set_id"] == 0 for r in records)
    assert all(r["image"][:8] == b"\x89PNG\r\n\x1a\n" for r in records)
    assert summary["winner_frequencies"]["gender"] == {"male": 0.5, "female": 0.5}
    s0 = summary["sets"][0]
    assert s0["loser_groups"]["gender"] == {"male": 0.8, "female": 0.2}
    assert s0["generated"] == {"neutral": 8, "identity": 16}


def test_winners_are_interleaved_by_group(world):
    clf = ExactClassifier(world.decode, world.classes)
    items = [_item(world, 0, "chef", g, r, identity=(g, r)) for g, r in identity_grid(world) for _ in range(3)]
    items += [_item(world, 0, "chef", "male", "amber")]
    records, summary = bp.form_sets(bp.label_items(items, clf), ["a chef"], world.classes)
    wins = [(r["labels"]["gender"], r["labels"]["race"]) for r in records if r["is_winner"]]
    assert len(wins) == 24 and summary["dropped"] == {}
    for start in range(0, 24, 8):  # every block of 8 holds each group once: any prefix is balanced
        assert len(set(wins[start:start + 8])) == 8


def test_missing_group_is_warned_and_set_without_losers_left_out(world):
    clf = ExactClassifier(world.decode, world.classes)
    items = [_item(world, 0, "pilot", g, r, identity=(g, r)) for g, r in identity_grid(world)
             if (g, r) != ("female", "cobalt")]
    items += [_item(world, 0, "pilot", "female", "amber", identity=("female", "cobalt"))]  # mismatch
    items += [_item(world, 0, "pilot", "male", "amber")]
    items += [_item(world, 1, "teacher", "female", "amber", identity=("female", "amber"))]  # set 1: no loser
    with pytest.warns(UserWarning) as rec:
        records, summary = bp.form_sets(bp.label_items(items, clf), ["a pilot", "a teacher"], world.classes)
    text = " ".join(str(w.message) for w in rec)
    assert "female/cobalt" in text and "forms no pair" in text
    assert summary["sets"][0]["missing_groups"] == ["female/cobalt"] and summary["sets"][0]["winners"] == 7
    assert {r["set_id"] for r in records} == {0}


def test_no_face_anywhere_is_an_error(world):
    clf = ExactClassifier(world.decode, world.classes)
    items = [_item(world, 0, "doctor", None, None) for _ in range(3)]
    items += [_item(world, 0, "doctor", None, None, identity=("male", "amber"))]
    with pytest.raises(UserError, match="no face in any of the 4"):
        bp.form_sets(bp.label_items(items, clf), ["a doctor"], world.classes)


def test_prompt_plan(world):
    plan = bp.prompt_plan(["a doctor", "a chef"], world.keywords, "a {race} {gender} {prompt}", 5, 2)
    assert len(plan) == 2 * (1 + 8)
    assert plan[0] == (0, "a doctor", None, 5)
    assert plan[1] == (0, "an amber male doctor", {"gender": "male", "race": "amber"}, 2)
    with pytest.raises(UserError, match="n_neutral"):
        bp.prompt_plan(["a doctor"], world.keywords, "a {race} {gender} {prompt}", 0, 2)


# ----------------------------------------------------------------------------- end to end (shipped toy model)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """build_prefs on the shipped toy model with tiny counts; one prompt names a gender."""
    from fairjax.toy.config import make_config

    cfg = make_config()
    cfg.prefs.neutral_prompts = ["a doctor", "a male pilot"]
    cfg.prefs.n_neutral = 6
    cfg.prefs.n_identity = 2
    cfg.sample.steps = 10
    cfg.sample.batch_size = 64
    out = str(tmp_path_factory.mktemp("prefs") / "ds")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = bp.build_prefs(cfg, out, log=lambda *_: None)
    return cfg, out, summary, caught


def test_build_prefs_end_to_end(built):
    from fairjax.data.prefs import PreferenceData
    from fairjax.data.prompts import augment

    cfg, out, summary, caught = built
    assert any("'a male pilot' (male)" in str(w.message) for w in caught)
    assert summary["not_neutral"] == [{"prompt": "a male pilot", "words": ["male"]}]
    assert summary["generated"] == 2 * (6 + 8 * 2)
    assert summary["generated"] == summary["records"] + sum(summary["dropped"].values())
    with open(os.path.join(out, bp.SUMMARY_FILE)) as f:
        assert json.load(f)["records"] == summary["records"]
    data = PreferenceData(out)
    assert len(data) == summary["records"]
    rows = data.read(np.arange(len(data)))
    assert rows["latents"].shape[1:] == (3, 8, 8)
    assert set(rows["caption"]) <= {"a doctor", "a male pilot"}
    assert int(rows["is_winner"].sum()) == summary["winners"]
    for s in summary["sets"]:  # winners of a set are balanced over the groups present
        mine = (rows["set_id"] == s["set_id"]) & rows["is_winner"]
        cnt = collections.Counter(zip(rows["label_gender"][mine], rows["label_race"][mine]))
        assert len(set(cnt.values())) <= 1
    genders, races = data.info["metadata"]["classes"]["gender"], data.info["metadata"]["classes"]["race"]
    for i in range(len(data)):  # each record keeps the prompt it was generated from
        cap, prompt = rows["caption"][i], rows["prompt"][i]
        if rows["is_winner"][i]:  # its identity prompt, naming the identity its labels found
            g, r = genders[rows["label_gender"][i]], races[rows["label_race"][i]]
            assert prompt == augment(cap, g, r, cfg.prefs.identity_template), (prompt, g, r)
        else:
            assert prompt == cap
    with pytest.raises(UserError, match="already exists"):
        bp.build_prefs(cfg, out)


def test_the_training_task_reads_the_dataset(built):
    """The SDXL preference task (python -m fairjax.train) takes the dataset as it is."""
    from fairjax.tasks.diffusion_pref import DiffusionPrefTask

    cfg, out, summary, _ = built
    cfg = cfg.copy_and_resolve_references()
    cfg.data.path = out
    cfg.batch_size = 4
    task = DiffusionPrefTask(cfg)
    b = task.batch(0, 0, 1)
    assert b["latents"].shape == (4, 3, 8, 8) and list(b["is_winner"]) == [True, True, False, False]
    assert b["encoder_hidden_states"].shape[-1] == 64 and b["text_embeds"].shape == (4, 32)


def test_cli_errors(tmp_path, capsys):
    rc = bp.main(["--config", "configs/popalign_mog.py", "--out", str(tmp_path / "x")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "'prefs'" in err and "\n" not in err
