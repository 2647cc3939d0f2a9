"""Fairness metrics against hand-computed values, bootstrap coverage, recall matching."""

import math

import numpy as np
import pytest

from fairjax.errors import UserError
from fairjax.fairness import metrics as M
from fairjax.fairness.metrics import Record


def rec(prompt, gender=None, race=None, identity=None):
    labels = None if gender is None else {"gender": gender, "race": race}
    return Record(prompt, labels, identity=identity)


def test_discrepancy_keeps_classes_never_predicted():
    # 3 male, 1 female: p = (3/4, 1/4); ||p - 1/2|| = sqrt(2 * (1/4)^2)
    assert M.discrepancy_of(["male", "male", "female", "male"], ["male", "female"]) == pytest.approx(math.sqrt(2) / 4)
    # race: 2 white, 1 asian, 1 black, none of the other three (6 classes, uniform 1/6):
    # (1/2-1/6)^2 + 2 (1/4-1/6)^2 + 3 (1/6)^2 = 1/9 + 1/72 + 1/12 = 15/72
    races = ["white", "asian", "black", "latino hispanic", "indian", "middle eastern"]
    got = M.discrepancy_of(["white", "white", "asian", "black"], races)
    assert got == pytest.approx(math.sqrt(15 / 72))
    # the reference code's bug (absent classes dropped, 3 classes): sqrt(1/36 + 2/144) = 0.204 -- not what we report
    assert abs(got - math.sqrt(1 / 36 + 2 / 144)) > 0.2
    # all one class of two: sqrt(2)/2; balanced: 0
    assert M.discrepancy_of(["female"] * 5, ["male", "female"]) == pytest.approx(math.sqrt(0.5))
    assert M.discrepancy_of(["male", "female"], ["male", "female"]) == pytest.approx(0.0)
    with pytest.raises(UserError, match="not one of"):
        M.discrepancy_of(["Man"], ["male", "female"])


def test_pairwise_bias_k2_k4_k8():
    assert M.pairwise_bias([0.75, 0.25]) == pytest.approx(0.5)
    # |.5-.25| + |.5-.25| + |.5-0| + 0 + .25 + .25 = 1.5 over 6 pairs
    assert M.pairwise_bias([0.5, 0.25, 0.25, 0.0]) == pytest.approx(0.25)
    # one of 8 classes takes everything: 7 pairs differ by 1, of 28
    assert M.pairwise_bias(np.eye(8)[3]) == pytest.approx(0.25)
    assert M.pairwise_bias(np.full(8, 1 / 8)) == pytest.approx(0.0)
    # batched along leading axes
    np.testing.assert_allclose(M.pairwise_bias([[1.0, 0.0], [0.5, 0.5]]), [1.0, 0.0])


def test_neutral_summary_hand_computed():
    recs = [
        rec("p1", "male", "white"), rec("p1", "female", "asian"), rec("p1"),             # p1: 1 no-face image
        rec("p2", "male", "black"), rec("p2", "male", "middle eastern"),
        rec("p3"),                                                                         # p3: no face at all
    ]
    out = M.evaluate(recs, n_resamples=50)
    # pooled gender: 3 male 1 female
    assert out["discrepancy"]["gender"] == pytest.approx(math.sqrt(2) / 4)
    # pooled race: white, asian, black, middle eastern once each, latino & indian never:
    # 4 (1/4-1/6)^2 + 2 (1/6)^2 = 4/144 + 2/36 = 12/144
    assert out["discrepancy"]["race"] == pytest.approx(math.sqrt(12 / 144))
    # bias K=2 per prompt: p1 (1/2,1/2) -> 0, p2 (1,0) -> 1; p3 has no face and is left out
    assert out["bias"]["gender"] == pytest.approx(0.5)
    # race4 (wmelh, asian, black, indian): p1 (1/2,1/2,0,0) -> (0+1/2+1/2+1/2+1/2+0)/6 = 1/3;
    # p2 (1/2,0,1/2,0) -> 1/3
    assert out["bias"]["race4"] == pytest.approx(1 / 3)
    # gender x race4 (8 classes): p1 two classes at 1/2: pairs between them 0, with the other 6: 2*6*(1/2) = 6 -> 6/28
    # p2 (male|wmelh 1/2, male|black 1/2): same 6/28
    assert out["bias"]["gender_race4"] == pytest.approx(6 / 28)
    assert out["bias_k"] == {"gender": 2, "race4": 4, "gender_race4": 8}
    assert out["skipped"] == {"no_face": 2}
    assert out["frequencies"]["race"]["indian"] == 0.0
    rows = {r["prompt"]: r for r in out["tables"]["per_prompt"]}
    assert rows["p3"]["n_faces"] == 0 and rows["p3"]["bias:gender"] is None
    assert rows["p2"]["gender:male"] == 2 and rows["p2"]["discrepancy:gender"] == pytest.approx(math.sqrt(0.5))
    for key in ("gender", "race"):
        lo, hi = out["intervals"]["discrepancy"][key]
        assert lo <= out["discrepancy"][key] + 1e-12 and hi >= lo


def test_no_face_anywhere_is_a_user_error():
    with pytest.raises(UserError, match="no face detected in any of the 3"):
        M.evaluate([rec("p1"), rec("p1"), rec("p2")])
    with pytest.raises(UserError, match="no face detected"):
        M.evaluate([rec("a realistic photo of a white male pilot", identity={"gender": "male", "race": "white"})])
    with pytest.raises(UserError, match="no records"):
        M.evaluate([])


def test_recall_matches_whole_words():
    fw = "best quality, a realistic photo of a white female doctor"
    mb = "best quality, a realistic photo of a black male doctor"
    recs = [
        # asked female/white: a 'male' label must not count ('male' is inside 'female')
        rec(fw, "male", "white", identity=None), rec(fw, "female", "white"), rec(fw, "female", "asian"), rec(fw),
        rec(mb, "male", "black"), rec(mb, "female", "black"),
    ]
    # identity taken from the prompt by whole words
    recs = [Record(r.prompt, r.labels, identity=M.identity_of(r)) for r in recs]
    assert recs[0].identity == {"gender": "female", "race": "white"}
    assert recs[4].identity == {"gender": "male", "race": "black"}
    out = M.evaluate(recs, n_resamples=50)
    # 5 faces: gender right 3 (female, female, male), race right 4, both right 2
    assert out["recall"] == pytest.approx({"gender": 3 / 5, "race": 4 / 5, "both": 2 / 5})
    assert out["discrepancy"] is None and out["recall_counts"]["n_faces"] == 5
    table = {r["prompt"]: r for r in out["tables"]["recall"]}
    assert table[fw]["recall:gender"] == pytest.approx(2 / 3)
    assert table[fw]["asked:gender"] == "female"
    assert M.labels_match("female", "female") and not M.labels_match("male", "female")
    assert M.labels_match("Latino_Hispanic", "latino hispanic")


def test_explicit_identity_wins_and_is_checked():
    r = Record("a photo of a pilot", {"gender": "male", "race": "white"}, identity={"gender": "male", "race": "white"})
    assert M.evaluate([r], n_resamples=10)["recall"]["both"] == 1.0
    bad = Record("a photo of a pilot", None, identity={"gender": "man", "race": "white"})
    with pytest.raises(UserError, match="not one of"):
        M.identity_of(bad)


def test_bootstrap_is_seeded_and_percentile():
    x = np.arange(10.0)[:, None]
    stat = lambda a: a.mean(axis=(-2, -1))  # noqa: E731
    a = M.bootstrap_interval(x, stat, n_resamples=200, seed=3)
    assert a == M.bootstrap_interval(x, stat, n_resamples=200, seed=3)
    assert a != M.bootstrap_interval(x, stat, n_resamples=200, seed=4)
    # the bootstrap distribution of the mean of 0..9 is centred at 4.5 with sd ~ 2.87/sqrt(10)
    assert 2.0 < a[0] < 4.5 < a[1] < 7.0
    with pytest.raises(UserError):
        M.bootstrap_interval(x, stat, n_resamples=0)


def _simulate(rng, p_mean, n_prompts, n_images, concentration):
    """Per-prompt class counts: each prompt draws its own frequencies around p_mean (Dirichlet)."""
    p = rng.dirichlet(concentration * np.asarray(p_mean), size=n_prompts)
    return np.stack([rng.multinomial(n_images, q) for q in p])


@pytest.mark.parametrize("p_mean", [(0.7, 0.3), (0.45, 0.25, 0.12, 0.08, 0.06, 0.04)])
def test_bootstrap_interval_covers_true_discrepancy(p_mean):
    """Datasets drawn from a known population: the 95% interval covers the population's
    discrepancy in about 95% of them. Prompts differ (Dirichlet, concentration 10), so
    resampling images instead of prompts would cover only ~75-80% here and fail."""
    rng = np.random.default_rng(0)
    truth = float(M.discrepancy(np.asarray(p_mean)))
    n_sets, hits = 300, 0
    for s in range(n_sets):
        counts = _simulate(rng, p_mean, n_prompts=30, n_images=20, concentration=10.0)
        lo, hi = M.bootstrap_interval(counts, M.pooled_discrepancy, n_resamples=400, seed=s)
        hits += lo <= truth <= hi
    assert 0.88 <= hits / n_sets <= 0.99


def test_bootstrap_interval_covers_true_recall():
    rng = np.random.default_rng(1)
    truth, n_sets, hits = 0.8, 300, 0
    for s in range(n_sets):
        rates = rng.beta(truth * 20, (1 - truth) * 20, size=25)
        faces = rng.integers(5, 15, size=25)
        hf = np.stack([rng.binomial(faces, rates), faces], -1)
        lo, hi = M.bootstrap_interval(hf, M.pooled_rate, n_resamples=400, seed=s)
        hits += lo <= truth <= hi
    assert 0.88 <= hits / n_sets <= 0.99


def test_custom_race_classes_bias_views():
    classes = {"gender": ("male", "female"), "race": ("a", "b", "c")}
    views = M.bias_views(classes)
    assert [(v.name, len(v.classes)) for v in views] == [("gender", 2), ("race", 3), ("gender_race", 6)]
    recs = [Record("p", {"gender": "male", "race": "a"}), Record("p", {"gender": "female", "race": "a"})]
    out = M.evaluate(recs, classes=classes, n_resamples=10)
    # race (1, 0, 0): |1-0|*2 + 0 over 3 pairs
    assert out["bias"]["race"] == pytest.approx(2 / 3)
