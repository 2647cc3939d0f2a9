"""The toy world: tiny rendered figures whose colours carry "demographic" attributes.

An image is ``size x size`` RGB (8 x 8 by default) on a plain background:

* a **head** (2 x 2 block, rows 1-2, centre columns) whose colour is the figure's
  "race" (4 classes, named after the colour: amber, cobalt, jade, violet);
* a **shirt** (3 x 4 block under the head) whose colour is its "gender"
  (male: teal, female: orange);
* a **prop** (2 x 2 block, top-left corner) whose colour is the occupation
  (doctor: red, chef: white, pilot: navy, teacher: green);
* no figure at all (head and shirt are background) means "no face".

Prompts: neutral ``a doctor``; identity-specific ``a {race} {gender} doctor``
(``an amber male doctor``). The toy corpus is biased per occupation
(:attr:`ToyWorld.bias`): a neutral prompt's figures follow the occupation's
gender / race frequencies, an identity prompt's figures show the identity asked
for except for a small error rate (so a base model's recall is below 1, as a
real model's is), and a small fraction of images shows no figure.

:func:`decode` is the exact label decoder plugged into
:class:`fairjax.fairness.classifiers.ExactClassifier`: the mean colour of each
fixed region is matched to the nearest prototype colour (robust to sampling
noise); a head region nearest to the background (or far from every head colour)
is "no face".
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

from fairjax.data.prompts import IdentityKeywords, fill_template, with_article
from fairjax.errors import UserError

RGB = tuple[int, int, int]

WORLD_FILE = "toy_world.json"  # a toy model directory describes its world here

GENDERS: tuple[str, ...] = ("male", "female")
RACES: tuple[str, ...] = ("amber", "cobalt", "jade", "violet")
OCCUPATIONS: tuple[str, ...] = ("doctor", "chef", "pilot", "teacher")

#: neutral / identity prompt templates of the toy world (training and evaluation use the same ones)
NEUTRAL_TEMPLATE = "{occupation}"  # with its article: "a doctor"
IDENTITY_TEMPLATE = "a {race} {gender} {occupation}"  # "an amber male doctor"

BACKGROUND: RGB = (222, 214, 196)
HEAD_COLOURS: dict[str, RGB] = {"amber": (236, 166, 34), "cobalt": (36, 74, 206), "jade": (28, 158, 92),
                                "violet": (152, 54, 176)}
SHIRT_COLOURS: dict[str, RGB] = {"male": (18, 126, 138), "female": (242, 118, 22)}
PROP_COLOURS: dict[str, RGB] = {"doctor": (212, 28, 34), "chef": (252, 252, 252), "pilot": (22, 30, 92),
                                "teacher": (64, 150, 38)}

#: (gender frequencies (male, female), race frequencies (amber, cobalt, jade, violet)) per occupation;
#: pooled over the four occupations the corpus is 66% male and 57.5% amber.
DEFAULT_BIAS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "doctor": ((0.85, 0.15), (0.60, 0.20, 0.10, 0.10)),
    "chef": ((0.70, 0.30), (0.50, 0.30, 0.10, 0.10)),
    "pilot": ((0.90, 0.10), (0.60, 0.15, 0.15, 0.10)),
    "teacher": ((0.20, 0.80), (0.60, 0.10, 0.20, 0.10)),
}


@dataclasses.dataclass(frozen=True)
class Region:
    """Rows ``[r0, r1)`` and columns ``[c0, c1)`` of an 8 x 8 layout (scaled with the image size)."""

    r0: int
    r1: int
    c0: int
    c1: int

    def slices(self, size: int) -> tuple[slice, slice]:
        f = size // 8
        return slice(self.r0 * f, self.r1 * f), slice(self.c0 * f, self.c1 * f)


HEAD = Region(1, 3, 3, 5)
SHIRT = Region(3, 6, 2, 6)
PROP = Region(0, 2, 0, 2)


@dataclasses.dataclass(frozen=True)
class ToyWorld:
    """Everything that defines the toy world (saved as ``toy_world.json`` next to the model)."""

    size: int = 8
    genders: tuple[str, ...] = GENDERS
    races: tuple[str, ...] = RACES
    occupations: tuple[str, ...] = OCCUPATIONS
    bias: Mapping[str, tuple[tuple[float, ...], tuple[float, ...]]] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_BIAS))
    no_face_rate: float = 0.03  # images without a figure, every prompt
    identity_error_rate: float = 0.04  # identity images whose race is not the one asked for
    background: RGB = BACKGROUND
    head_colours: Mapping[str, RGB] = dataclasses.field(default_factory=lambda: dict(HEAD_COLOURS))
    shirt_colours: Mapping[str, RGB] = dataclasses.field(default_factory=lambda: dict(SHIRT_COLOURS))
    prop_colours: Mapping[str, RGB] = dataclasses.field(default_factory=lambda: dict(PROP_COLOURS))

    def __post_init__(self):
        if self.size < 8 or self.size % 8:
            raise UserError(f"toy world: size must be a positive multiple of 8, got {self.size}")
        for name, classes, colours in (("genders", self.genders, self.shirt_colours),
                                       ("races", self.races, self.head_colours),
                                       ("occupations", self.occupations, self.prop_colours)):
            missing = [c for c in classes if c not in colours]
            if missing:
                raise UserError(f"toy world: {name} {missing} have no colour")
        for occ in self.occupations:
            if occ not in self.bias:
                raise UserError(f"toy world: occupation {occ!r} has no bias entry")
            g, r = self.bias[occ]
            if len(g) != len(self.genders) or len(r) != len(self.races):
                raise UserError(f"toy world: bias of {occ!r} needs {len(self.genders)} gender and "
                                f"{len(self.races)} race frequencies")
            if abs(sum(g) - 1) > 1e-6 or abs(sum(r) - 1) > 1e-6 or min(g) < 0 or min(r) < 0:
                raise UserError(f"toy world: bias frequencies of {occ!r} must be >= 0 and sum to 1")

    # ------------------------------------------------------------------ description

    @property
    def keywords(self) -> IdentityKeywords:
        return IdentityKeywords(genders=tuple(self.genders), races=tuple(self.races))

    @property
    def classes(self) -> dict[str, tuple[str, ...]]:
        return {"gender": tuple(self.genders), "race": tuple(self.races)}

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["bias"] = {k: [list(g), list(r)] for k, (g, r) in self.bias.items()}
        return json.loads(json.dumps(d))

    @classmethod
    def from_json(cls, d: Mapping) -> "ToyWorld":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"toy world description has unknown keys {unknown}")
        kw = dict(d)
        for k in ("genders", "races", "occupations"):
            if k in kw:
                kw[k] = tuple(kw[k])
        for k in ("background",):
            if k in kw:
                kw[k] = tuple(kw[k])
        for k in ("head_colours", "shirt_colours", "prop_colours"):
            if k in kw:
                kw[k] = {n: tuple(c) for n, c in kw[k].items()}
        if "bias" in kw:
            kw["bias"] = {o: (tuple(g), tuple(r)) for o, (g, r) in kw["bias"].items()}
        return cls(**kw)

    # ------------------------------------------------------------------ prompts

    def neutral_prompt(self, occupation: str) -> str:
        """``a doctor``."""
        return fill_template(NEUTRAL_TEMPLATE, occupation=with_article(occupation))

    def identity_prompt(self, occupation: str, gender: str, race: str) -> str:
        """``an amber male doctor``."""
        return fill_template(IDENTITY_TEMPLATE, race=race, gender=gender, occupation=occupation)

    def neutral_prompts(self) -> list[str]:
        return [self.neutral_prompt(o) for o in self.occupations]

    def vocabulary(self) -> list[str]:
        """Every word a toy prompt uses (for the toy tokenizer)."""
        words = {"a", "an", *self.occupations, *self.genders}
        for r in self.races:
            words.update(r.split())
        return sorted(words)

    def occupation_of(self, prompt: str) -> str:
        """The occupation a toy prompt names (its last word)."""
        last = prompt.strip().split()[-1] if prompt.strip() else ""
        if last not in self.occupations:
            raise UserError(f"prompt {prompt!r} names no toy-world occupation ({', '.join(self.occupations)})")
        return last

    # ------------------------------------------------------------------ rendering

    def render(self, occupation: str, gender: str | None, race: str | None) -> np.ndarray:
        """The clean ``(size, size, 3)`` uint8 image; ``gender``/``race`` None: no figure."""
        img = np.empty((self.size, self.size, 3), np.uint8)
        img[:] = self.background
        img[PROP.slices(self.size)] = self.prop_colours[occupation]
        if gender is not None and race is not None:
            img[SHIRT.slices(self.size)] = self.shirt_colours[gender]
            img[HEAD.slices(self.size)] = self.head_colours[race]
        return img

    def sample_figures(self, occupation: str, n: int, rng: np.random.Generator,
                       identity: tuple[str, str] | None = None) -> list[tuple[str | None, str | None]]:
        """``n`` (gender, race) draws for one prompt; ``(None, None)`` = no figure.

        Neutral prompt (``identity`` None): the occupation's bias. Identity prompt
        ``(gender, race)``: that identity, except that with probability
        ``identity_error_rate`` the race is another one (uniformly).
        """
        g_freq, r_freq = self.bias[occupation]
        out = []
        for _ in range(n):
            if rng.random() < self.no_face_rate:
                out.append((None, None))
                continue
            if identity is None:
                g = self.genders[rng.choice(len(self.genders), p=np.asarray(g_freq) / sum(g_freq))]
                r = self.races[rng.choice(len(self.races), p=np.asarray(r_freq) / sum(r_freq))]
            else:
                g, r = identity
                if rng.random() < self.identity_error_rate:
                    others = [x for x in self.races if x != r]
                    r = others[rng.integers(len(others))]
            out.append((g, r))
        return out

    def corpus_batch(self, n: int, rng: np.random.Generator, identity_fraction: float = 0.5):
        """``(images uint8 (n, S, S, 3), captions)``: the biased pretraining corpus.

        Each example: a uniform occupation; with probability ``identity_fraction`` a
        uniform identity prompt, otherwise the neutral prompt.
        """
        images, captions = [], []
        for _ in range(n):
            occ = self.occupations[rng.integers(len(self.occupations))]
            if rng.random() < identity_fraction:
                ident = (self.genders[rng.integers(len(self.genders))], self.races[rng.integers(len(self.races))])
                caption = self.identity_prompt(occ, *ident)
            else:
                ident, caption = None, self.neutral_prompt(occ)
            (g, r), = self.sample_figures(occ, 1, rng, ident)
            images.append(self.render(occ, g, r))
            captions.append(caption)
        return np.stack(images), captions

    # ------------------------------------------------------------------ decoding

    def decode(self, image: np.ndarray) -> dict[str, str] | None:
        """``{"gender", "race"}`` read back from an image, or None when it shows no figure.

        Mean colour of the head and shirt regions -> nearest prototype (Euclidean RGB).
        No figure: the head (or shirt) is nearer the background than any head (shirt)
        colour, or farther than ``tolerance`` from every prototype.
        """
        img = np.asarray(image, np.float64)
        if img.shape != (self.size, self.size, 3):
            raise UserError(f"toy decoder: image shape {img.shape} is not ({self.size}, {self.size}, 3)")
        race = _nearest(img[HEAD.slices(self.size)], self.head_colours, self.background)
        gender = _nearest(img[SHIRT.slices(self.size)], self.shirt_colours, self.background)
        if race is None or gender is None:
            return None
        return {"gender": gender, "race": race}

    def decode_occupation(self, image: np.ndarray) -> str | None:
        """The occupation the prop colour shows (None: unreadable)."""
        img = np.asarray(image, np.float64)
        return _nearest(img[PROP.slices(self.size)], self.prop_colours, None)


#: a region whose mean colour is farther than this (RGB Euclidean, 0..255 scale) from every prototype is unreadable
TOLERANCE = 90.0


def _nearest(pixels: np.ndarray, colours: Mapping[str, RGB], background: RGB | None) -> str | None:
    mean = pixels.reshape(-1, 3).mean(0)
    names = list(colours)
    protos = np.asarray([colours[n] for n in names], np.float64)
    d = np.linalg.norm(protos - mean, axis=1)
    i = int(np.argmin(d))
    if d[i] > TOLERANCE:
        return None
    if background is not None and np.linalg.norm(np.asarray(background, np.float64) - mean) < d[i]:
        return None
    return names[i]


def load_toy_world(model_dir: str) -> ToyWorld:
    """The world a toy model directory was trained on (its ``toy_world.json``; a fine-tuned
    UNet folder that names its ``base_model`` in ``fairjax.json`` uses the base's)."""
    from fairjax.io.model_dir import INDEX_FILE, read_json

    path = os.path.join(model_dir, WORLD_FILE)
    if os.path.isfile(path):
        return ToyWorld.from_json(read_json(path))
    index = os.path.join(model_dir, INDEX_FILE)
    base = read_json(index).get("base_model") if os.path.isfile(index) else None
    if base and os.path.abspath(base) != os.path.abspath(model_dir):
        return load_toy_world(base)
    raise UserError(f"{model_dir} is not a toy-world model (no {WORLD_FILE}); use the deepface classifier "
                    "for real models")


def identity_grid(world: ToyWorld) -> list[tuple[str, str]]:
    """Every (gender, race) pair, race-major as :func:`fairjax.data.prompts.identity_prompts` orders them."""
    return [(g, r) for r in world.races for g in world.genders]


def images_to_model(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW in [-1, 1] (the pixel-space model's sample space)."""
    x = np.asarray(images, np.float32) / 127.5 - 1.0
    return np.transpose(x, (0, 3, 1, 2))


def check_prompts_in_world(world: ToyWorld, prompts: Sequence[str]) -> None:
    for p in prompts:
        world.occupation_of(p)
