"""Shipped prompt lists, identity augmentation and the neutral-prompt checker."""

import pytest

from fairjax.data import prompts as P
from fairjax.errors import UserError


def test_checker_flags_identity_words_whole_words_only():
    bad = P.check_neutral([
        "a nurse checking a patient's chart",         # neutral
        "a nurse checking her patient's chart",       # her
        "a businessman reading the news",             # gendered compound
        "a doctor in a white coat",                   # race keyword
        "a Middle-Eastern chef cooking",              # two-word keyword, hyphen, capitals
        "the theme of the show",                      # 'he' inside 'the'/'theme': fine
        "a teacher writing on a whiteboard",          # 'white' inside 'whiteboard': fine
        "a female pilot",                             # female
        "a guy fixing a car",
    ])
    assert bad == [
        ("a nurse checking her patient's chart", ["her"]),
        ("a businessman reading the news", ["businessman"]),
        ("a doctor in a white coat", ["white"]),
        ("a Middle-Eastern chef cooking", ["middle eastern"]),
        ("a female pilot", ["female"]),
        ("a guy fixing a car", ["guy"]),
    ]


def test_checker_uses_configured_keywords_and_extra_words():
    kw = P.IdentityKeywords(genders=("nonbinary", "female"), races=("martian",))
    assert P.check_neutral(["a martian astronaut", "a nonbinary pilot"], kw) == [
        ("a martian astronaut", ["martian"]), ("a nonbinary pilot", ["nonbinary"])]
    assert P.check_neutral(["a pilot in uniform"], extra_words=["uniform"]) == [("a pilot in uniform", ["uniform"])]
    with pytest.raises(UserError, match="races"):
        P.IdentityKeywords(races=())


def test_shipped_lists_counts_neutral_and_disjoint():
    train, occs, evals = P.training_prompts(), P.training_occupations(), P.eval_occupations()
    assert len(train) >= 300 and len(set(train)) == len(train)
    assert len(evals) == 100 and len(set(evals)) == 100
    assert P.check_neutral(train) == []
    assert P.check_neutral(evals) == []
    assert not set(occs) & set(evals)
    # no evaluation occupation is mentioned in a training prompt, nor contains a training occupation
    for occ in evals:
        assert not [p for p in train if P.find_phrases(p, [occ])], occ
        assert not P.find_phrases(occ, occs), occ
    # every training prompt names its own occupation
    for occ, prompt in P.training_entries():
        assert P.find_phrases(prompt, [occ]), (occ, prompt)


def test_augment_articles():
    assert P.augment("a nurse checking a patient's chart", "female", "white") == \
        "a realistic photo of a white female nurse checking a patient's chart"
    assert P.augment("a nurse checking a chart", "male", "asian") == \
        "a realistic photo of an asian male nurse checking a chart"
    assert P.augment("an actuary at work", "female", "indian") == "a realistic photo of an indian female actuary at work"
    assert P.augment("The chef tasting soup", "male", "latino hispanic") == \
        "a realistic photo of a latino hispanic male chef tasting soup"
    assert P.augment("chefs tasting soup", "female", "middle eastern") == \
        "a realistic photo of a middle eastern female chefs tasting soup"
    assert P.augment("a nurse", None, "asian") == "a realistic photo of an asian nurse"
    assert P.augment("a nurse", "male", None) == "a realistic photo of a male nurse"
    assert P.augment("an editor", None, None) == "a realistic photo of an editor"


def test_eval_and_identity_prompts():
    assert P.eval_prompt("accountant") == "best quality, a realistic photo of an accountant"
    assert P.eval_prompt("bus driver") == "best quality, a realistic photo of a bus driver"
    assert P.eval_prompts()[0] == "best quality, a realistic photo of an accountant"
    ids = P.eval_identity_prompts(["doctor", "engineer"])
    assert len(ids) == 2 * 6 * 2
    assert ids[0] == {"prompt": "best quality, a realistic photo of a white male doctor",
                      "subject": "doctor", "gender": "male", "race": "white"}
    assert ids[3]["prompt"] == "best quality, a realistic photo of an asian female doctor"
    assert ids[12]["prompt"] == "best quality, a realistic photo of a white male engineer"
    kw = P.IdentityKeywords(genders=("female",), races=("black",))
    train = P.identity_prompts(["a nurse checking a chart"], kw)
    assert train == [{"prompt": "a realistic photo of a black female nurse checking a chart",
                      "subject": "a nurse checking a chart", "gender": "female", "race": "black"}]
    with pytest.raises(UserError, match="needs"):
        P.identity_prompts(["x"], template="a photo of {prompt}")


def test_parse_identity_whole_words():
    assert P.parse_identity("best quality, a realistic photo of a white female doctor") == \
        {"gender": "female", "race": "white"}
    assert P.parse_identity("a realistic photo of a middle eastern male pilot") == \
        {"gender": "male", "race": "middle eastern"}
    with pytest.raises(UserError, match="no gender"):
        P.parse_identity("a photo of an asian pilot")
    with pytest.raises(UserError, match="several"):
        P.parse_identity("a male and a female asian pilot")


def test_prompt_file_and_keywords_config(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# comment\n\na chef cooking\n  a cat | a dog  \n")
    assert P.read_prompt_file(str(f)) == ["a chef cooking", "a cat | a dog"]  # each line literally (issue 23)
    with pytest.raises(UserError, match="is a folder"):
        P.read_prompt_file(str(tmp_path))
    with pytest.raises(UserError, match="not found"):
        P.read_prompt_file(str(tmp_path / "nope.txt"))
    (tmp_path / "e.txt").write_text("# only a comment\n")
    with pytest.raises(UserError, match="no prompts"):
        P.read_prompt_file(str(tmp_path / "e.txt"))
    assert P.keywords_from({"races": ["asian", "black"]}) == P.IdentityKeywords(races=("asian", "black"))
    with pytest.raises(UserError, match="unknown keys"):
        P.keywords_from({"ages": ["old"]})


def test_warn_not_neutral_lists_offenders():
    with pytest.warns(UserWarning, match=r"2 prompt\(s\).*'a boy reading' \(boy\); 'his desk' \(his\)"):
        bad = P.warn_not_neutral(["a chef", "a boy reading", "his desk"])
    assert [p for p, _ in bad] == ["a boy reading", "his desk"]
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert P.warn_not_neutral(P.training_prompts()[:20]) == []
