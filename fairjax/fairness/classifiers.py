"""Attribute classifiers: images in, ``{"gender": ..., "race": ...}`` (or None: no face) out.

One interface, :class:`AttributeClassifier`:

- ``classify(images)`` takes HxWx3 uint8 RGB arrays and returns a
  :class:`Labeling`: a sequence with one entry per image (a label dict, or
  None when the image has no usable face) plus the reason for every None,
  counted by :meth:`Labeling.counts` ('no_face', 'corrupt', 'undecodable',
  'missing').
- ``classify_files(paths)`` decodes image files with PIL first.
- ``classes`` lists the classes of each attribute (gender: male, female;
  race: white, asian, black, latino hispanic, indian, middle eastern).

Two implementations:

- :class:`DeepFaceClassifier` wraps ``DeepFace.analyze(img, actions=['gender',
  'race'], detector_backend=..., enforce_detection=...)`` (deepface 0.0.103 on
  onnxruntime: no TensorFlow, no torch). Weights are read from
  ``$DEEPFACE_HOME/.deepface/weights/``; a missing weight file is an error
  naming the files and the folder before deepface could try to download one.
- :class:`ExactClassifier` is the toy world's exact labeller: it calls a
  function ``image -> labels | None`` (e.g. one decoding the labels the toy
  generator painted into the image, or :func:`table_decoder` for ground truth
  keyed by image content).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import hashlib
import os
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from fairjax.errors import UserError
from fairjax.fairness.metrics import DEFAULT_CLASSES

Labels = dict[str, str]

NO_FACE = "no_face"
CORRUPT = "corrupt"
UNDECODABLE = "undecodable"
MISSING = "missing"


@dataclasses.dataclass(frozen=True)
class Labeling(Sequence):
    """Labels per image (None: unusable) and, for each None, why."""

    labels: tuple[Labels | None, ...]
    reasons: tuple[str | None, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.labels[i]

    def __iter__(self) -> Iterator[Labels | None]:
        return iter(self.labels)

    def counts(self) -> dict[str, int]:
        """``{reason: number of images}`` for the images without labels."""
        out: dict[str, int] = {}
        for r in self.reasons:
            if r is not None:
                out[r] = out.get(r, 0) + 1
        return out

    @property
    def n_labelled(self) -> int:
        return sum(lab is not None for lab in self.labels)


def image_problem(img) -> str | None:
    """Why ``img`` is not an HxWx3 uint8 image (None when it is fine)."""
    if not isinstance(img, np.ndarray):
        return f"not a numpy array ({type(img).__name__})"
    if img.ndim != 3 or img.shape[-1] != 3:
        return f"shape {img.shape} is not (H, W, 3)"
    if img.dtype != np.uint8:
        return f"dtype {img.dtype} is not uint8"
    if img.shape[0] == 0 or img.shape[1] == 0:
        return f"empty image {img.shape}"
    return None


def load_image(path: str) -> tuple[np.ndarray | None, str | None]:
    """``(HxWx3 uint8 RGB array, None)``, or ``(None, reason)`` for a missing/undecodable file."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        return None, MISSING
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8), None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None, UNDECODABLE


class AttributeClassifier(abc.ABC):
    """Labels images with one class per attribute, or None when there is no face."""

    classes: Mapping[str, tuple[str, ...]] = DEFAULT_CLASSES

    @abc.abstractmethod
    def label_image(self, image: np.ndarray) -> Labels | None:
        """Labels of one valid HxWx3 uint8 RGB image, or None when it shows no face."""

    def classify(self, images: Iterable[np.ndarray]) -> Labeling:
        """Labels for each image; malformed arrays are skipped as 'corrupt', faceless ones as 'no_face'."""
        labels, reasons = [], []
        for img in images:
            lab, why = self._one(img)
            labels.append(lab)
            reasons.append(why)
        return Labeling(tuple(labels), tuple(reasons))

    def classify_files(self, paths: Iterable[str]) -> Labeling:
        """Like :meth:`classify` for image files; unreadable files count as 'missing'/'undecodable'."""
        labels, reasons = [], []
        for p in paths:
            img, why = load_image(os.fspath(p))
            if img is not None:
                lab, why = self._one(img)
            else:
                lab = None
            labels.append(lab)
            reasons.append(why)
        return Labeling(tuple(labels), tuple(reasons))

    def _one(self, img) -> tuple[Labels | None, str | None]:
        if image_problem(img) is not None:
            return None, CORRUPT
        lab = self.label_image(img)
        if lab is None:
            return None, NO_FACE
        return self.check_labels(lab), None

    def check_labels(self, labels: Mapping[str, str]) -> Labels:
        """The labels restricted to :attr:`classes`; a missing attribute or unknown class is an error."""
        out = {}
        for attr, cls in self.classes.items():
            if attr not in labels:
                raise UserError(f"{type(self).__name__}: labels {dict(labels)} lack attribute '{attr}'")
            if labels[attr] not in cls:
                raise UserError(f"{type(self).__name__}: {attr} label {labels[attr]!r} is not one of {list(cls)}")
            out[attr] = labels[attr]
        return out


# ---------------------------------------------------------------- exact (toy world)

class ExactClassifier(AttributeClassifier):
    """Exact labels from a function ``image -> {"gender": ..., "race": ...} | None``.

    The toy world plugs in the function that reads its ground truth back from an
    image; :func:`table_decoder` turns a ``{image_digest: labels}`` table into one.
    """

    def __init__(self, decode: Callable[[np.ndarray], Mapping[str, str] | None],
                 classes: Mapping[str, Sequence[str]] = DEFAULT_CLASSES):
        if not callable(decode):
            raise UserError(f"ExactClassifier needs a function image -> labels, got {type(decode).__name__}")
        self.decode = decode
        self.classes = {k: tuple(v) for k, v in classes.items()}

    def label_image(self, image: np.ndarray) -> Labels | None:
        lab = self.decode(image)
        return None if lab is None else dict(lab)


def image_digest(image: np.ndarray) -> str:
    """Content key of an image: sha1 over its shape, dtype and bytes."""
    a = np.ascontiguousarray(image)
    h = hashlib.sha1(f"{a.shape}{a.dtype}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def table_decoder(table: Mapping[str, Mapping[str, str] | None]) -> Callable[[np.ndarray], Mapping[str, str] | None]:
    """Decoder for ground-truth labels keyed by :func:`image_digest` (None entries: no face)."""
    table = dict(table)

    def decode(image: np.ndarray):
        key = image_digest(image)
        if key not in table:
            raise UserError(f"image {key[:12]} (shape {image.shape}) has no ground-truth labels in the table")
        return table[key]

    return decode


# ---------------------------------------------------------------- DeepFace

DEEPFACE_GENDERS = {"Man": "male", "Woman": "female"}
DEEPFACE_RACES = {"white": "white", "asian": "asian", "black": "black", "latino hispanic": "latino hispanic",
                  "indian": "indian", "middle eastern": "middle eastern"}

# attribute model files per deepface backend engine (deepface 0.0.103)
ATTRIBUTE_WEIGHTS = {
    "onnx": ("gender_model_weights.onnx", "race_model_single_batch.onnx"),
    "pytorch": ("gender_model_weights.pth", "race_model_single_batch.pth"),
    "tensorflow": ("gender_model_weights.h5", "race_model_single_batch.h5"),
}
_BUILTIN_DETECTORS = ("skip", "mtcnn", "fastmtcnn", "mediapipe")  # weights ship with their packages
_DETECTOR_WEIGHTS = {
    "opencv": ("haarcascade_frontalface_default.xml", "haarcascade_eye.xml"),
    "yunet": ("face_detection_yunet_2023mar.onnx",),
    "centerface": ("centerface.onnx",),
    "ssd": ("deploy.prototxt", "res10_300x300_ssd_iter_140000.caffemodel"),
    "dlib": ("shape_predictor_5_face_landmarks.dat",),
}
_RETINAFACE_WEIGHTS = {"onnx": "retinaface.onnx", "pytorch": "retinaface.pth", "tensorflow": "retinaface.h5"}


def detector_weights(detector_backend: str, backend: str) -> tuple[str, ...]:
    """File names a deepface face detector reads from the weights folder (yolo: ``<name>-face.pt``)."""
    if detector_backend in _BUILTIN_DETECTORS:
        return ()
    if detector_backend in _DETECTOR_WEIGHTS:
        return _DETECTOR_WEIGHTS[detector_backend]
    if detector_backend == "retinaface":
        return (_RETINAFACE_WEIGHTS[backend],)
    if detector_backend.startswith("yolov"):
        return (f"{detector_backend}-face.pt",)
    known = sorted([*_BUILTIN_DETECTORS, *_DETECTOR_WEIGHTS, "retinaface", "yolov8n", "yolov11n"])
    raise UserError(f"unknown deepface detector_backend {detector_backend!r}; use one of {known} (or another yolov*)")


def deepface_home(home: str | None = None) -> str:
    """The folder deepface keeps ``.deepface/weights`` in: ``home``, else ``$DEEPFACE_HOME``, else ``~``."""
    return os.path.abspath(home or os.environ.get("DEEPFACE_HOME") or os.path.expanduser("~"))


def missing_weights(home: str, detector_backend: str, backend: str) -> tuple[str, list[str]]:
    """``(weights folder, [missing file names])`` for the attribute models and the detector."""
    folder = os.path.join(home, ".deepface", "weights")
    need = list(ATTRIBUTE_WEIGHTS[backend]) + list(detector_weights(detector_backend, backend))
    missing = [f for f in need if not os.path.isfile(os.path.join(folder, f))]
    if detector_backend == "opencv":  # deepface uses cv2's own copy when the wheel ships one
        import cv2

        cv2_data = os.path.join(os.path.dirname(cv2.__file__), "data")
        missing = [f for f in missing if not os.path.isfile(os.path.join(cv2_data, f))]
    return folder, missing


@contextlib.contextmanager
def _environ(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class DeepFaceClassifier(AttributeClassifier):
    """Gender and race from DeepFace (PopAlign's evaluation classifier).

    Args:
      detector_backend: deepface face detector ('yunet' as in the PopAlign
        evaluation, 'retinaface', 'opencv', 'skip' = the whole image is the face, ...).
      enforce_detection: True: an image where the detector finds no face is
        'no_face' (None). False: deepface then analyses the whole image.
      home: folder holding ``.deepface/weights`` (default ``$DEEPFACE_HOME`` or ``~``).
      backend: deepface engine; default ``$DEEPFACE_BACKEND_ENGINE`` or 'onnx'
        (onnxruntime: ``gender_model_weights.onnx``, ``race_model_single_batch.onnx``).
      align: deepface face alignment.

    When several faces are found, the largest one (region area) is labelled.
    deepface caches built models per process: the first ``home`` used wins.
    """

    classes = DEFAULT_CLASSES

    def __init__(self, detector_backend: str = "yunet", enforce_detection: bool = True, home: str | None = None,
                 backend: str | None = None, align: bool = True):
        self.detector_backend = detector_backend
        self.enforce_detection = bool(enforce_detection)
        self.align = bool(align)
        self.home = deepface_home(home)
        self.backend = (backend or os.environ.get("DEEPFACE_BACKEND_ENGINE") or "onnx").strip().lower()
        if self.backend not in ATTRIBUTE_WEIGHTS:
            raise UserError(f"deepface backend {self.backend!r} is not one of {sorted(ATTRIBUTE_WEIGHTS)}")
        folder, missing = missing_weights(self.home, detector_backend, self.backend)
        if missing:
            raise UserError(f"deepface weights missing: {', '.join(missing)} not in {folder}; copy them there "
                            "(fairjax never downloads; set DEEPFACE_HOME to the folder holding .deepface/weights)")
        self._analyze = self._load()

    def _env(self):
        return _environ(DEEPFACE_HOME=self.home, DEEPFACE_BACKEND_ENGINE=self.backend)

    def _load(self):
        try:
            with self._env():
                from deepface.commons import backend_utils

                try:
                    engine = backend_utils.get_backend_engine()
                except ValueError as e:  # the engine's package is not installed
                    raise UserError(f"deepface cannot run on {self.backend}: {e}") from None
                if engine != self.backend:
                    raise UserError(f"deepface already runs on {engine} in this process, not {self.backend}; "
                                    f"set DEEPFACE_BACKEND_ENGINE={self.backend} before anything imports deepface")
                from deepface import DeepFace
                from deepface.modules import modeling

                for name in ("Gender", "Race"):  # build now: a bad weight file fails here, not mid-run
                    modeling.build_model(task="facial_attribute", model_name=name)
        except ImportError as e:
            missing = getattr(e, "name", None) or str(e)
            raise UserError(f"DeepFaceClassifier cannot import {missing!r} ({e}); pip install 'fairjax[eval]' "
                            "installs deepface, onnxruntime and what deepface imports without declaring") from None
        return DeepFace.analyze

    def label_image(self, image: np.ndarray) -> Labels | None:
        from deepface.modules.exceptions import FaceNotDetected, ImgNotFound

        bgr = np.ascontiguousarray(image[:, :, ::-1])  # deepface reads numpy images as BGR (OpenCV order)
        try:
            with self._env():
                faces = self._analyze(bgr, actions=["gender", "race"], detector_backend=self.detector_backend,
                                      enforce_detection=self.enforce_detection, align=self.align, silent=True)
        except (FaceNotDetected, ImgNotFound):
            return None
        if not faces:
            return None
        face = max(faces, key=lambda f: f["region"]["w"] * f["region"]["h"])  # first of the largest
        return self.map_labels(face["dominant_gender"], face["dominant_race"])

    @staticmethod
    def map_labels(gender: str, race: str) -> Labels:
        """deepface's 'Man'/'Woman' and race names -> fairjax classes."""
        if gender not in DEEPFACE_GENDERS or race not in DEEPFACE_RACES:
            raise UserError(f"unexpected deepface labels gender={gender!r} race={race!r}; "
                            f"expected {list(DEEPFACE_GENDERS)} and {list(DEEPFACE_RACES)}")
        return {"gender": DEEPFACE_GENDERS[gender], "race": DEEPFACE_RACES[race]}
