"""The toy world: renderer + exact decoder, tokenizer, shipped model, and the end-to-end PopAlign run."""

from __future__ import annotations

import itertools
import json
import os
import shutil

import numpy as np
import pytest

from fairjax.errors import UserError
from fairjax.fairness.classifiers import ExactClassifier
from fairjax.toy import world as W


@pytest.fixture(scope="module")
def world():
    return W.ToyWorld()


def _all_figures(world):
    return list(itertools.product(world.occupations, world.genders, world.races))


# ----------------------------------------------------------------------------- renderer / decoder


def test_clean_renders_decode_exactly(world):
    for occ, g, r in _all_figures(world):
        img = world.render(occ, g, r)
        assert img.shape == (8, 8, 3) and img.dtype == np.uint8
        assert world.decode(img) == {"gender": g, "race": r}
        assert world.decode_occupation(img) == occ
    for occ in world.occupations:  # no figure: no face
        assert world.decode(world.render(occ, None, None)) is None


def test_decoder_is_robust_to_sampling_noise(world):
    """Gaussian pixel noise (sd 25 of 255) and a global colour cast of +-20 leave every label intact."""
    rng = np.random.default_rng(0)
    figures = _all_figures(world)
    wrong = 0
    for k in range(20):
        for occ, g, r in figures:
            img = world.render(occ, g, r).astype(np.float64)
            img += rng.normal(0, 25, img.shape) + rng.uniform(-20, 20, (1, 1, 3))
            noisy = np.clip(np.round(img), 0, 255).astype(np.uint8)
            wrong += world.decode(noisy) != {"gender": g, "race": r}
    assert wrong == 0
    blank = np.clip(world.render("chef", None, None) + rng.normal(0, 25, (8, 8, 3)), 0, 255).astype(np.uint8)
    assert world.decode(blank) is None


def test_decoder_rejects_garbage_and_wrong_shapes(world):
    grey = np.full((8, 8, 3), 128, np.uint8)  # far from every head colour: unreadable, no face
    assert world.decode(grey) is None
    with pytest.raises(UserError, match="shape"):
        world.decode(np.zeros((16, 16, 3), np.uint8))


def test_exact_classifier_with_toy_decoder(world):
    clf = ExactClassifier(world.decode, world.classes)
    imgs = [world.render("pilot", "female", "jade"), world.render("pilot", None, None), np.zeros((8, 8), np.uint8)]
    lab = clf.classify(imgs)
    assert lab.labels[0] == {"gender": "female", "race": "jade"}
    assert lab.labels[1] is None and lab.labels[2] is None
    assert lab.counts() == {"no_face": 1, "corrupt": 1}


def test_corpus_follows_the_configured_bias(world):
    """Neutral captions: group frequencies of the occupation's bias (binomial 4-sigma bounds);
    identity captions: the identity asked for, up to the configured error rate."""
    rng = np.random.default_rng(1)
    n = 3000
    figs = world.sample_figures("doctor", n, rng)
    faces = [f for f in figs if f[0] is not None]
    g_freq, r_freq = world.bias["doctor"]
    p_male = np.mean([g == "male" for g, _ in faces])
    assert abs(p_male - g_freq[0]) < 4 * np.sqrt(g_freq[0] * (1 - g_freq[0]) / len(faces))
    p_amber = np.mean([r == "amber" for _, r in faces])
    assert abs(p_amber - r_freq[0]) < 4 * np.sqrt(r_freq[0] * (1 - r_freq[0]) / len(faces))
    no_face = 1 - len(faces) / n
    assert abs(no_face - world.no_face_rate) < 4 * np.sqrt(world.no_face_rate / n)
    ident = world.sample_figures("chef", n, rng, identity=("female", "violet"))
    ok = np.mean([f == ("female", "violet") for f in ident if f[0] is not None])
    expect = 1 - world.identity_error_rate
    assert abs(ok - expect) < 4 * np.sqrt(expect * (1 - expect) / n)
    imgs, caps = world.corpus_batch(64, rng)
    assert imgs.shape == (64, 8, 8, 3) and len(caps) == 64
    assert {world.occupation_of(c) for c in caps} <= set(world.occupations)


def test_prompts_and_world_json(world):
    assert world.neutral_prompt("doctor") == "a doctor"
    assert world.identity_prompt("doctor", "male", "amber") == "an amber male doctor"
    from fairjax.data.prompts import augment, check_neutral, parse_identity

    # the toy's identity prompts are the PopAlign augmentation of its neutral prompts with its template
    tmpl = W.IDENTITY_TEMPLATE.replace("{occupation}", "{prompt}")
    assert augment("a chef", "female", "jade", tmpl) == world.identity_prompt("chef", "female", "jade")
    assert parse_identity("a violet female pilot", world.keywords) == {"gender": "female", "race": "violet"}
    assert check_neutral(world.neutral_prompts(), world.keywords) == []
    again = W.ToyWorld.from_json(json.loads(json.dumps(world.to_json())))
    assert again == world
    with pytest.raises(UserError, match="bias"):
        W.ToyWorld(bias={"doctor": ((1.0, 0.0), (1.0, 0, 0, 0))})


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_encodes_each_toy_word_as_one_token(tmp_path, world):
    from fairjax.models.tokenizer import CLIPTokenizer
    from fairjax.toy.model import MAX_LENGTH, write_tokenizer

    write_tokenizer(str(tmp_path), world.vocabulary())
    tok = CLIPTokenizer.from_folder(str(tmp_path))
    for word in world.vocabulary():
        ids = tok([word])[0]
        assert tok.backend.id_to_token(int(ids[1])) == word + "</w>"
        assert ids[2] == tok.eos_token_id
    longest = max((world.identity_prompt(o, g, r) for o, g, r in _all_figures(world)), key=len)
    ids = tok([longest])[0]
    assert ids.shape == (MAX_LENGTH,) and ids[0] == tok.bos_token_id
    assert list(ids).index(tok.eos_token_id) == 1 + len(longest.split())  # nothing truncated
    # the same files through transformers' CLIPTokenizer (the reference) give the same ids
    import transformers
    ref = transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    want = ref([longest], padding="max_length", max_length=MAX_LENGTH, truncation=True)["input_ids"][0]
    assert list(ids) == list(want)


# ----------------------------------------------------------------------------- the shipped model


def test_shipped_model_matches_its_manifest():
    from fairjax.toy.model import ASSET_DIR, check, unet_config

    man = check(ASSET_DIR)
    assert man["unet_config"] == unet_config(8, man["unet_config"]["block_out_channels"])
    total = sum(os.path.getsize(os.path.join(ASSET_DIR, f)) for f in man["files"])
    assert total < 10 * 2**20


def test_manifest_check_detects_a_changed_file(tmp_path):
    from fairjax.toy.model import ASSET_DIR, check

    copy = tmp_path / "toy"
    shutil.copytree(ASSET_DIR, copy)
    check(str(copy))
    with open(copy / "unet" / "params.safetensors", "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(UserError, match="changed.*unet/params.safetensors"):
        check(str(copy))
