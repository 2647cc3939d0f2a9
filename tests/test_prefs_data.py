"""Preference datasets: TFDS array_record written and read without TensorFlow; deterministic,
epoch-aware, per-host, resumable batches; one-line errors for bad input."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fairjax.data.prefs import NAME, VERSION, PreferenceBatches, PreferenceData, dataset_dir, write_preference_dataset
from fairjax.errors import DataError
from fairjax.errors import UserError


def _png(v, mode="RGB"):
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 6, 3), v, np.uint8)).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def make_records(n_sets=3, per_side=4, image=True, labels=True):
    """Set s: `per_side` winners then `per_side` losers; record value = its global position."""
    recs = []
    for s in range(n_sets):
        for j in range(2 * per_side):
            i = len(recs)
            r = {"latents": np.full((2, 3, 3), i, np.float32) + np.arange(3, dtype=np.float32),
                 "caption": f"a photo of a doctor #{s} ✓", "is_winner": j < per_side, "set_id": s}
            if image:
                r["image"] = _png(i)
            if labels:
                r["labels"] = {"gender": i % 2, "race": i % 6}
            recs.append(r)
    return recs


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("prefs") / "ds"
    recs = make_records()
    counts = write_preference_dataset(out, iter(recs), metadata={"model": "tiny"})
    assert counts == {"train": 24}
    return str(out), recs


def test_roundtrip_records_in_order(dataset):
    out, recs = dataset
    data = PreferenceData(out)
    assert len(data) == len(recs) and data.info["metadata"] == {"model": "tiny"}
    for i in (0, 5, 23):
        r = data[i]
        np.testing.assert_array_equal(r["latents"], recs[i]["latents"])
        assert r["caption"] == recs[i]["caption"] and r["is_winner"] == recs[i]["is_winner"]
        assert r["set_id"] == recs[i]["set_id"] and r["labels"] == recs[i]["labels"]
        assert r["image"] == recs[i]["image"]  # PNG bytes, not decoded
    b = data.read([3, 1])
    assert b["latents"].shape == (2, 2, 3, 3) and b["latents"].dtype == np.float32
    assert list(b["label_race"]) == [3, 1] and list(b["caption"]) == [recs[3]["caption"], recs[1]["caption"]]
    dec = PreferenceData(out, decode_images=True).read([7])
    np.testing.assert_array_equal(dec["image"], np.full((1, 4, 6, 3), 7, np.uint8))


def test_readable_by_plain_tfds_without_tensorflow(dataset):
    """A fresh interpreter reads it through plain tfds.data_source, and TensorFlow is never imported."""
    out, recs = dataset
    code = (
        "import sys, importlib.util\n"
        "import tensorflow_datasets as tfds\n"
        f"ds = tfds.data_source('{NAME}:{VERSION}', split='train', data_dir={out!r}, download=False)\n"
        "r = ds[9]; print(len(ds), r['set_id'], r['caption'].decode(), r['image'].shape)\n"
        "assert 'tensorflow' not in sys.modules\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["24", "1", *recs[9]["caption"].split(), "(4,", "6,", "3)"]


def test_pairs_match_kth_winner_with_kth_loser(dataset):
    data = PreferenceData(dataset[0])
    p = data.pairs()
    assert p.shape == (12, 2)
    assert p[:4].tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert (data.set_id[p[:, 0]] == data.set_id[p[:, 1]]).all()
    assert data.is_winner[p[:, 0]].all() and not data.is_winner[p[:, 1]].any()


def test_batches_cover_each_epoch_once_and_reshuffle(dataset):
    data = PreferenceData(dataset[0])
    b = PreferenceBatches(data, batch_size=8, seed=3)
    assert b.steps_per_epoch == 3
    e0 = np.concatenate([b.global_indices(s) for s in range(3)])
    e1 = np.concatenate([b.global_indices(s) for s in range(3, 6)])
    assert sorted(e0) == list(range(24)) and sorted(e1) == list(range(24))
    assert not np.array_equal(e0, e1)  # a new permutation per epoch
    np.testing.assert_array_equal(e0, np.random.default_rng([3, 0]).permutation(24))
    # a different seed, a different order; the same seed, the same order (pure function of step)
    assert not np.array_equal(PreferenceBatches(data, 8, seed=4).global_indices(0), b.global_indices(0))
    np.testing.assert_array_equal(PreferenceBatches(data, 8, seed=3).global_indices(4), b.global_indices(4))
    assert PreferenceBatches(data, 8, shuffle=False).global_indices(1).tolist() == list(range(8, 16))


def test_hosts_take_contiguous_slices_of_the_global_batch(dataset):
    data = PreferenceData(dataset[0])
    b = PreferenceBatches(data, batch_size=8, seed=1)
    whole = b.batch(5)
    parts = [b.batch(5, i, 4) for i in range(4)]
    for k in whole:
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])
    np.testing.assert_array_equal(whole["set_id"], data.set_id[b.global_indices(5)])


def test_pair_batches(dataset):
    data = PreferenceData(dataset[0])
    b = PreferenceBatches(data, batch_size=4, seed=0, unit="pair")
    assert b.steps_per_epoch == 3
    x = b.batch(1, 1, 2)
    assert x["w_latents"].shape == (2, 2, 3, 3) and x["w_is_winner"].all() and not x["l_is_winner"].any()
    np.testing.assert_array_equal(x["w_set_id"], x["l_set_id"])
    np.testing.assert_array_equal(x["w_latents"][:, 0, 0, 0] + 4, x["l_latents"][:, 0, 0, 0])  # loser = winner + 4


def test_no_images_no_labels_and_float16(tmp_path):
    recs = make_records(n_sets=1, per_side=2, image=False, labels=False)
    write_preference_dataset(tmp_path / "d", recs, latent_dtype=np.float16, split="val")
    data = PreferenceData(tmp_path / "d", split="val")
    x = data.read([0, 1, 2])
    assert set(x) == {"latents", "caption", "is_winner", "set_id"} and x["latents"].dtype == np.float16
    with pytest.raises(DataError, match="has no split 'train'; it has \\['val'\\]"):
        PreferenceData(tmp_path / "d")


def test_prompt_field_round_trips_and_old_datasets_have_none(tmp_path, dataset):
    """``prompt`` (the prompt a sample was generated from) is optional, all records or none."""
    recs = make_records(n_sets=2, per_side=2)
    for r in recs:
        r["prompt"] = f"an amber female doctor #{r['latents'][0, 0, 0]:.0f} ✓" if r["is_winner"] else r["caption"]
    write_preference_dataset(tmp_path / "d", recs)
    data = PreferenceData(tmp_path / "d")
    assert data.has_prompt and data[0]["prompt"] == "an amber female doctor #0 ✓"
    assert list(data.read([5, 2, 1])["prompt"]) == [recs[5]["prompt"], recs[2]["caption"], recs[1]["prompt"]]
    old = PreferenceData(dataset[0])  # written without prompts
    assert not old.has_prompt and "prompt" not in old.read([0]) and "prompt" not in old[0]


def test_non_rgb_png_is_stored_as_rgb(tmp_path):
    recs = make_records(n_sets=1, per_side=1, labels=False)
    recs[0]["image"] = _png(9, mode="L")
    write_preference_dataset(tmp_path / "d", recs)
    img = PreferenceData(tmp_path / "d", decode_images=True).read([0])["image"]
    np.testing.assert_array_equal(img, np.full((1, 4, 6, 3), 9, np.uint8))


def _one_line(e):
    msg = str(e.value)
    assert isinstance(e.value, UserError) and "\n" not in msg
    return msg


@pytest.mark.parametrize("mutate, words", [
    (lambda r: r[2].pop("caption"), "record 2 lacks ['caption']"),
    (lambda r: r[3].update(latents=np.zeros((2, 3))), "record 3: latents shape (2, 3) differs"),
    (lambda r: r[1].update(labels={"gender": 1}), "record 1: labels ['gender'] differ"),
    (lambda r: r[1].update(image=b"GIF89a"), "record 1: image must be PNG bytes"),
    (lambda r: r[4].pop("image"), "record 4: no image, unlike record 0"),
    (lambda r: r[0].update(is_winner=1), "record 0: is_winner must be a bool"),
    (lambda r: r[5].update(extra=1), "record 5 has unknown fields ['extra']"),
    (lambda r: r[5]["latents"].__setitem__((0, 0, 0), np.nan), "record 5: latents hold NaN/inf"),
    (lambda r: r[0].update(prompt="a female doctor"), "record 1: no prompt, unlike record 0"),
    (lambda r: r[3].update(prompt="a female doctor"), "record 3: a prompt, unlike record 0"),
    (lambda r: [x.update(prompt="p") for x in r] and r[2].update(prompt=7), "record 2: prompt must be a str"),
])
def test_bad_records_are_one_line_errors_and_leave_nothing(tmp_path, mutate, words):
    recs = make_records(n_sets=1, per_side=3)
    mutate(recs)
    with pytest.raises(DataError) as e:
        write_preference_dataset(tmp_path / "d", recs)
    assert words in _one_line(e)
    assert os.listdir(tmp_path) == []  # nothing half-written


def test_empty_dataset_and_existing_dir(tmp_path):
    with pytest.raises(DataError) as e:
        write_preference_dataset(tmp_path / "d", [])
    assert "split 'train' has no records" in _one_line(e)
    write_preference_dataset(tmp_path / "d", make_records(n_sets=1, per_side=1, image=False))
    with pytest.raises(DataError) as e:
        write_preference_dataset(tmp_path / "d", make_records(n_sets=1, per_side=1, image=False))
    assert "already exists" in _one_line(e)
    counts = write_preference_dataset(tmp_path / "d", make_records(n_sets=2, per_side=1, image=False), overwrite=True)
    assert counts == {"train": 4} and len(PreferenceData(tmp_path / "d")) == 4


def test_reader_errors(tmp_path):
    with pytest.raises(DataError) as e:
        PreferenceData(tmp_path / "nothing")
    assert "no preference dataset at" in _one_line(e) and "dataset_info.json" in str(e.value)
    recs = make_records(n_sets=1, per_side=2, image=False)
    write_preference_dataset(tmp_path / "d", recs)
    data = PreferenceData(tmp_path / "d")
    with pytest.raises(DataError) as e:
        PreferenceBatches(data, batch_size=8)
    assert "has 4 records, fewer than the global batch 8" in _one_line(e)
    only_w = [dict(r, is_winner=True) for r in recs]
    write_preference_dataset(tmp_path / "w", only_w)
    with pytest.raises(DataError) as e:
        PreferenceBatches(PreferenceData(tmp_path / "w"), batch_size=1, unit="pair")
    assert "no winner/loser pairs" in _one_line(e)


def test_truncated_array_record_is_one_line_error(tmp_path):
    write_preference_dataset(tmp_path / "d", make_records(n_sets=2, per_side=3))
    shard = [f for f in os.listdir(dataset_dir(tmp_path / "d")) if ".array_record-" in f]
    assert len(shard) == 1
    path = os.path.join(dataset_dir(tmp_path / "d"), shard[0])
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(DataError) as e:
        PreferenceData(tmp_path / "d")
    assert "rewrite the dataset" in _one_line(e)
