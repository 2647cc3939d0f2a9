"""Prompt lists shipped with fairjax, identity augmentation and the neutrality check.

Shipped files (``fairjax/data/prompts/``):

- ``train_prompts.txt``: ``occupation | prompt`` lines, identity-neutral
  training prompts (occupation + activity, e.g. "a nurse checking a patient's
  chart"). PopAlign captions every preference pair with the neutral prompt.
- ``eval_occupations.txt``: held-out evaluation occupations, none of which is a
  training occupation.

Templates (PopAlign, docs/reference.md "Preference data" / "Fairness metrics"):

- augmentation: ``a realistic photo of a {race} {gender} {prompt}``; the
  prompt's own leading article is dropped ("a nurse checking ..." ->
  "... a white female nurse checking ...") and the template's "a" becomes "an"
  before a vowel ("an asian male nurse ...").
- evaluation: ``best quality, a realistic photo of {occupation}`` with the
  occupation given its article ("... of an accountant").
- identity evaluation: ``best quality, a realistic photo of a {race} {gender}
  {occupation}`` (recall: does the image show the identity asked for?).

Words are matched whole (token sequences of ``[a-z0-9]+``), so "male" never
matches inside "female" and "he" never inside "the".
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import itertools
import re
import string
import warnings
from typing import Iterable, Mapping, Sequence

from fairjax.errors import UserError

GENDERS: tuple[str, ...] = ("male", "female")
RACES: tuple[str, ...] = ("white", "asian", "black", "latino hispanic", "indian", "middle eastern")

AUGMENT_TEMPLATE = "a realistic photo of a {race} {gender} {prompt}"
EVAL_TEMPLATE = "best quality, a realistic photo of {occupation}"
EVAL_IDENTITY_TEMPLATE = "best quality, a realistic photo of a {race} {gender} {occupation}"

# Gendered words and terms that a neutral prompt must not contain (on top of
# the identity keywords themselves). Whole-word matches, lower case.
GENDER_WORDS: frozenset[str] = frozenset("""
man men woman women male males female females boy boys girl girls he she him his her hers
himself herself guy guys gal gals lady ladies gentleman gentlemen mother mothers father fathers
mom moms mum mums dad dads son sons daughter daughters brother brothers sister sisters husband
husbands wife wives king kings queen queens prince princess sir madam maam mr mrs ms bride
groom boyfriend girlfriend grandmother grandfather grandma grandpa granny uncle aunt nephew
niece masculine feminine manly womanly
actress actresses waitress waitresses stewardess stewardesses hostess hostesses seamstress
headmistress headmaster policeman policemen policewoman policewomen fireman firemen
businessman businessmen businesswoman businesswomen salesman salesmen saleswoman chairman
chairwoman spokesman spokeswoman fisherman fishermen cameraman cameramen craftsman craftsmen
handyman handymen repairman repairmen mailman mailmen postman postmen doorman foreman
lineman workman workmen sportsman sportswoman stuntman weatherman congressman congresswoman
nun nuns monk monks
""".split())

# Race, ethnicity and skin-colour words (the race keywords are added from the
# configured keyword set). Multi-word entries are matched as word sequences.
RACE_WORDS: frozenset[str] = frozenset("""
caucasian african afro latina latinx latine hispanic latino arab arabs arabic asian asians
indians european europeans
""".split()) | {"native american", "pacific islander", "middle eastern", "east asian",
                "south asian", "southeast asian", "dark skinned", "light skinned",
                "dark skin", "light skin", "fair skinned", "brown skinned"}

_TOKEN = re.compile(r"[a-z0-9]+")
_ARTICLES = ("a", "an", "the")


@dataclasses.dataclass(frozen=True)
class IdentityKeywords:
    """The identity classes prompts are augmented with (PopAlign defaults)."""

    genders: tuple[str, ...] = GENDERS
    races: tuple[str, ...] = RACES

    def __post_init__(self):
        for name, words in (("genders", self.genders), ("races", self.races)):
            if not words or any(not isinstance(w, str) or not tokens(w) for w in words):
                raise UserError(f"identity keywords: '{name}' must be a non-empty list of words, got {words!r}")
            if len(set(words)) != len(words):
                raise UserError(f"identity keywords: '{name}' has duplicates: {words!r}")


def tokens(text: str) -> list[str]:
    """Lower-case word tokens ``[a-z0-9]+`` (apostrophes and hyphens split words)."""
    return _TOKEN.findall(text.lower())


def find_phrases(text: str, phrases: Iterable[str]) -> list[str]:
    """The phrases (word sequences) that occur in ``text`` as whole words, in input order.

    ``find_phrases("a female nurse", ["male", "female"]) == ["female"]``.
    """
    toks = tokens(text)
    found = []
    for phrase in phrases:
        p = tokens(phrase)
        n = len(p)
        if n and any(toks[i:i + n] == p for i in range(len(toks) - n + 1)):
            found.append(phrase)
    return found


def identity_words(keywords: IdentityKeywords = IdentityKeywords(), extra: Iterable[str] = ()) -> set[str]:
    """Every word/phrase :func:`check_neutral` refuses: gendered words, race words, the keywords, ``extra``."""
    return set(GENDER_WORDS) | set(RACE_WORDS) | set(keywords.genders) | set(keywords.races) | set(extra)


def check_neutral(prompts: Iterable[str], keywords: IdentityKeywords = IdentityKeywords(),
                  extra_words: Iterable[str] = ()) -> list[tuple[str, list[str]]]:
    """``[(prompt, sorted offending words)]`` for every prompt that names a gender or race.

    Whole-word matching: "the" is fine, "he" is not; "whiteboard" is fine, "white" is not.
    An empty list means every prompt is identity-neutral.
    """
    words = sorted(identity_words(keywords, extra_words))
    bad = []
    for prompt in prompts:
        hits = find_phrases(prompt, words)
        if hits:
            bad.append((prompt, sorted(hits)))
    return bad


def warn_not_neutral(prompts: Iterable[str], keywords: IdentityKeywords = IdentityKeywords(),
                     extra_words: Iterable[str] = (), show: int = 10) -> list[tuple[str, list[str]]]:
    """:func:`check_neutral`, plus one ``UserWarning`` listing the first ``show`` offenders."""
    bad = check_neutral(prompts, keywords, extra_words)
    if bad:
        listed = "; ".join(f"{p!r} ({', '.join(w)})" for p, w in bad[:show])
        more = f" and {len(bad) - show} more" if len(bad) > show else ""
        warnings.warn(f"{len(bad)} prompt(s) name a gender or race and are not identity-neutral: {listed}{more}",
                      UserWarning, stacklevel=2)
    return bad


# ---------------------------------------------------------------- templates

def article_for(word: str) -> str:
    """"an" before a vowel sound, else "a" (letter rule with the common exceptions)."""
    w = word.lower()
    if w.startswith(("uni", "use", "usu", "uti", "eu", "one", "once")):
        return "a"
    if w.startswith(("hour", "honest", "honor", "heir")):
        return "an"
    return "an" if w[:1] in "aeiou" else "a"


def strip_article(phrase: str) -> str:
    """Drop one leading "a"/"an"/"the" ("a nurse checking ..." -> "nurse checking ...")."""
    parts = phrase.strip().split(None, 1)
    if len(parts) == 2 and parts[0].lower() in _ARTICLES:
        return parts[1]
    return phrase.strip()


def with_article(phrase: str) -> str:
    """"accountant" -> "an accountant"; a phrase that already has an article is kept."""
    phrase = phrase.strip()
    first = phrase.split(None, 1)[0] if phrase else ""
    if not first or first.lower() in _ARTICLES:
        return phrase
    return f"{article_for(first)} {phrase}"


def _fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def fill_template(template: str, **values: str | None) -> str:
    """Fill ``template`` and fix grammar: empty fields vanish, spaces collapse, and
    an "a"/"an" right before the first filled field agrees with the word that follows.
    """
    missing = [f for f in _fields(template) if f not in values]
    if missing:
        raise UserError(f"template {template!r}: no value for {missing}")
    vals = {k: ("" if v is None else str(v).strip()) for k, v in values.items()}
    first = next((f for f in _fields(template) if vals[f]), None)
    if first is None:
        return " ".join(template.format(**vals).split())
    cut = template.index("{" + first + "}")
    head = " ".join(template[:cut].format(**vals).split())
    tail = " ".join(template[cut:].format(**vals).split())
    head_words = head.split(" ") if head else []
    if head_words and head_words[-1].lower() in ("a", "an"):
        head_words[-1] = article_for(tail.split(" ", 1)[0])
    return " ".join(head_words + [tail]).strip()


def augment(prompt: str, gender: str | None, race: str | None, template: str = AUGMENT_TEMPLATE) -> str:
    """Identity-augmented prompt: ``a realistic photo of a {race} {gender} {prompt}``.

    ``augment("a nurse checking a chart", "female", "asian")`` ==
    ``"a realistic photo of an asian female nurse checking a chart"``.
    ``gender``/``race`` may be None to leave that attribute unspecified.
    """
    return fill_template(template, race=race, gender=gender, prompt=strip_article(prompt))


def eval_prompt(occupation: str, template: str = EVAL_TEMPLATE) -> str:
    """``best quality, a realistic photo of an accountant``."""
    return fill_template(template, occupation=with_article(occupation))


def identity_prompts(subjects: Sequence[str], keywords: IdentityKeywords = IdentityKeywords(),
                     template: str = AUGMENT_TEMPLATE) -> list[dict]:
    """Every subject x race x gender prompt, as ``{"prompt", "subject", "gender", "race"}``.

    ``template`` names the subject field ``{prompt}`` (training, the subject's
    article is dropped) or ``{occupation}`` (evaluation, bare occupation), e.g.
    :data:`EVAL_IDENTITY_TEMPLATE`. Order: subject-major, then race, then gender.
    """
    fields = _fields(template)
    key = "prompt" if "prompt" in fields else "occupation" if "occupation" in fields else None
    if key is None or "gender" not in fields or "race" not in fields:
        raise UserError(f"identity template {template!r} needs {{race}}, {{gender}} and {{prompt}} or {{occupation}}")
    out = []
    for subject, race, gender in itertools.product(subjects, keywords.races, keywords.genders):
        text = fill_template(template, race=race, gender=gender, **{key: strip_article(subject)})
        out.append({"prompt": text, "subject": subject, "gender": gender, "race": race})
    return out


def parse_identity(prompt: str, keywords: IdentityKeywords = IdentityKeywords()) -> dict[str, str]:
    """The gender and race an identity prompt asks for, by whole-word match.

    "... a white female doctor" -> ``{"gender": "female", "race": "white"}``
    ("male" is not found inside "female"). A prompt naming none or several
    classes of one attribute is an error.
    """
    out = {}
    for attr, classes in (("gender", keywords.genders), ("race", keywords.races)):
        hits = find_phrases(prompt, classes)
        if len(hits) != 1:
            what = "no" if not hits else f"several ({', '.join(hits)})"
            raise UserError(f"prompt {prompt!r} names {what} {attr} from {list(classes)}; "
                            "pass the identity explicitly")
        out[attr] = hits[0]
    return out


# ---------------------------------------------------------------- shipped lists

def _read_lines(name: str) -> list[str]:
    text = importlib.resources.files("fairjax.data").joinpath("prompts", name).read_text(encoding="utf-8")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


@functools.cache
def training_entries() -> tuple[tuple[str, str], ...]:
    """``((occupation, prompt), ...)`` from the shipped ``train_prompts.txt``."""
    out = []
    for i, line in enumerate(_read_lines("train_prompts.txt")):
        occ, sep, prompt = line.partition("|")
        if not sep or not occ.strip() or not prompt.strip():
            raise UserError(f"train_prompts.txt entry {i + 1}: expected 'occupation | prompt', got {line!r}")
        out.append((occ.strip(), prompt.strip()))
    return tuple(out)


def training_prompts() -> list[str]:
    """The shipped identity-neutral training prompts."""
    return [p for _, p in training_entries()]


def training_occupations() -> list[str]:
    """Distinct training occupations, in file order."""
    return list(dict.fromkeys(o for o, _ in training_entries()))


@functools.cache
def _eval_occupations() -> tuple[str, ...]:
    return tuple(_read_lines("eval_occupations.txt"))


def eval_occupations() -> list[str]:
    """The shipped held-out evaluation occupations."""
    return list(_eval_occupations())


def eval_prompts(occupations: Sequence[str] | None = None, template: str = EVAL_TEMPLATE) -> list[str]:
    """Neutral evaluation prompts, one per occupation (default: the shipped list)."""
    return [eval_prompt(o, template) for o in (eval_occupations() if occupations is None else occupations)]


def eval_identity_prompts(occupations: Sequence[str] | None = None,
                          keywords: IdentityKeywords = IdentityKeywords(),
                          template: str = EVAL_IDENTITY_TEMPLATE) -> list[dict]:
    """Identity-specific evaluation prompts (for recall), see :func:`identity_prompts`."""
    return identity_prompts(eval_occupations() if occupations is None else occupations, keywords, template)


def read_prompt_file(path: str) -> list[str]:
    """User prompt list: one prompt per line, taken literally (surrounding whitespace stripped; a
    ``|`` is part of the prompt: ``a cat | a dog`` is that whole text); blank lines and lines
    starting with ``#`` are skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f]
    except FileNotFoundError:
        raise UserError(f"{path}: prompt file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a folder; pass a text file with one prompt per line") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    prompts = [ln for ln in lines if ln and not ln.startswith("#")]
    if not prompts:
        raise UserError(f"{path}: no prompts (one per line)")
    return prompts


def keywords_from(mapping: Mapping[str, Sequence[str]] | None) -> IdentityKeywords:
    """IdentityKeywords from a config dict ``{"genders": [...], "races": [...]}`` (missing keys: defaults)."""
    if not mapping:
        return IdentityKeywords()
    unknown = set(mapping) - {"genders", "races"}
    if unknown:
        raise UserError(f"identity keywords: unknown keys {sorted(unknown)}; use 'genders' and 'races'")
    return IdentityKeywords(genders=tuple(mapping.get("genders", GENDERS)), races=tuple(mapping.get("races", RACES)))
