"""Attribute classifiers: the real deepface code on tiny ONNX models made here, and the exact classifier.

The DeepFace test builds ONNX graphs with deepface's input/output contract and
puts them where deepface looks for its weights (a temp ``$DEEPFACE_HOME``):

- ``gender_model_weights.onnx``: (n, 224, 224, 3) BGR in [0, 1] -> softmax over
  deepface's [Woman, Man]; Woman iff the mean blue exceeds the mean red.
- ``race_model_single_batch.onnx``: -> softmax over deepface's [asian, indian,
  black, white, middle eastern, latino hispanic]; nearest of the colour
  centroids red, green, blue, white, black, yellow (RGB) to the mean colour.
- ``centerface.onnx`` (a face detector deepface runs through OpenCV's dnn): one
  32x32 face in the centre of a 64x64 image iff the mean red is above ~35%.

So the test knows each image's expected labels from its colour, and a wrong
channel order, label mapping or class order in the wrapper changes them.
"""

import os

import numpy as np
import pytest

from fairjax.errors import UserError
from fairjax.fairness import classifiers as C


def _attr_model(path, weight, bias):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k = weight.shape[1]
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[1, 2], keepdims=0),
             helper.make_node("MatMul", ["m", "W"], ["z"]),
             helper.make_node("Add", ["z", "b"], ["zb"]),
             helper.make_node("Softmax", ["zb"], ["y"], axis=-1)]
    graph = helper.make_graph(
        nodes, "attr", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 224, 224, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", k])],
        [numpy_helper.from_array(weight.astype(np.float32), "W"), numpy_helper.from_array(bias.astype(np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def _centerface_model(path, size=64):
    """CenterFace's outputs '537' heatmap, '538' log-scale, '539' offset, '540' landmarks at stride 4."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    h = size // 4
    red = np.zeros((1, 3, 1, 1), np.float32)
    red[0, 0] = 1 / 255                               # blob is RGB 0..255 (deepface passes swapRB=True)
    mask = np.zeros((1, 1, h, h), np.float32)
    mask[0, 0, h // 2, h // 2] = 1                    # heatmap: mean red, at the centre cell only
    zeros2 = np.zeros((1, 2, h, h), np.float32)
    scale = np.full((1, 2, h, h), np.log(size / 2 / 4), np.float32)  # box side exp(s) * 4 = size / 2
    zeros10 = np.zeros((1, 10, h, h), np.float32)
    marks = np.zeros((1, 10, h, h), np.float32)       # (y, x) per landmark, relative to the box; eyes level
    for j, (x, y) in enumerate([(0.3, 0.4), (0.7, 0.4), (0.5, 0.6), (0.35, 0.8), (0.65, 0.8)]):
        marks[0, 2 * j], marks[0, 2 * j + 1] = y, x
    nodes = [helper.make_node("Conv", ["input.1", "red"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["gap"]),
             helper.make_node("Mul", ["gap", "mask"], ["537"]),
             helper.make_node("Mul", ["gap", "zeros2"], ["g2"]),
             helper.make_node("Add", ["g2", "scale"], ["538"]),
             helper.make_node("Mul", ["gap", "zeros2"], ["539"]),
             helper.make_node("Mul", ["gap", "zeros10"], ["g10"]),
             helper.make_node("Add", ["g10", "marks"], ["540"])]
    inits = [numpy_helper.from_array(a, n) for a, n in
             [(red, "red"), (mask, "mask"), (zeros2, "zeros2"), (scale, "scale"), (zeros10, "zeros10"), (marks, "marks")]]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, c, h, h])
            for n, c in [("537", 1), ("538", 2), ("539", 2), ("540", 10)]]
    graph = helper.make_graph(nodes, "centerface", [helper.make_tensor_value_info(
        "input.1", TensorProto.FLOAT, [1, 3, size, size])], outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


# race centroids in RGB, in deepface's race order
_RACE_CENTROIDS_RGB = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1], [0, 0, 0], [1, 1, 0]], float)


@pytest.fixture(scope="module")
def deepface_home(tmp_path_factory):
    import deepface  # noqa: F401
    import onnxruntime  # noqa: F401
    return write_home(str(tmp_path_factory.mktemp("deepface_home")))


def write_home(home: str) -> str:
    """The tiny ONNX models in ``home/.deepface/weights`` (deepface's layout); returns ``home``."""
    weights = os.path.join(home, ".deepface", "weights")
    os.makedirs(weights)
    # the graphs see BGR: rows of W are (B, G, R)
    gender_w = np.array([[10.0, -10.0], [0.0, 0.0], [-10.0, 10.0]])     # [Woman, Man]: Woman iff B > R
    _attr_model(os.path.join(weights, "gender_model_weights.onnx"), gender_w, np.zeros(2))
    cent = _RACE_CENTROIDS_RGB[:, ::-1]                                   # -> BGR
    # -||x - c||^2 up to a constant = 2 x.c - ||c||^2 (scaled by 10 for confident softmax)
    _attr_model(os.path.join(weights, "race_model_single_batch.onnx"), 20 * cent.T, -10 * (cent ** 2).sum(1))
    _centerface_model(os.path.join(weights, "centerface.onnx"))
    return home


# (RGB colour, expected labels with the 'skip' detector)
CASES = [
    ((240, 20, 10), {"gender": "male", "race": "asian"}),
    ((20, 30, 230), {"gender": "female", "race": "black"}),
    ((200, 210, 40), {"gender": "male", "race": "latino hispanic"}),
    ((230, 240, 250), {"gender": "female", "race": "white"}),
    ((20, 10, 40), {"gender": "female", "race": "middle eastern"}),
    ((10, 220, 30), {"gender": "female", "race": "indian"}),
]


def _image(rgb, size=64):
    return np.full((size, size, 3), rgb, np.uint8)


def test_deepface_skip_detector_labels_by_colour(deepface_home):
    clf = C.DeepFaceClassifier(detector_backend="skip", home=deepface_home)
    assert clf.classes["gender"] == ("male", "female") and len(clf.classes["race"]) == 6
    bad = [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 3), np.float32), "not an image"]
    out = clf.classify([_image(c) for c, _ in CASES] + bad)
    assert list(out) == [lab for _, lab in CASES] + [None] * 3
    assert out.counts() == {"corrupt": 3}
    assert out.n_labelled == len(CASES)


def test_deepface_detector_no_face_is_none(deepface_home):
    clf = C.DeepFaceClassifier(detector_backend="centerface", home=deepface_home, enforce_detection=True, align=False)
    out = clf.classify([_image(c) for c, _ in CASES])
    # a face (red > ~35%) only in the red, yellow and white images
    expected = [lab if c[0] > 90 else None for c, lab in CASES]
    assert sum(e is not None for e in expected) == 3
    assert list(out) == expected
    assert out.counts() == {"no_face": 3}


def test_deepface_files(deepface_home, tmp_path):
    from PIL import Image

    good = tmp_path / "a.png"
    Image.fromarray(_image(CASES[1][0])).save(good)
    broken = tmp_path / "b.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    clf = C.DeepFaceClassifier(detector_backend="skip", home=deepface_home)
    out = clf.classify_files([str(good), str(broken), str(tmp_path / "missing.png")])
    assert list(out) == [CASES[1][1], None, None]
    assert out.reasons == (None, "undecodable", "missing")
    assert out.counts() == {"undecodable": 1, "missing": 1}


def test_deepface_missing_weights_named_before_any_download(tmp_path, monkeypatch):
    (tmp_path / ".deepface" / "weights").mkdir(parents=True)
    (tmp_path / ".deepface" / "weights" / "gender_model_weights.onnx").write_bytes(b"x")
    monkeypatch.setenv("DEEPFACE_HOME", str(tmp_path))
    with pytest.raises(UserError) as e:
        C.DeepFaceClassifier(detector_backend="yunet")
    msg = str(e.value)
    assert "race_model_single_batch.onnx" in msg and "face_detection_yunet_2023mar.onnx" in msg
    assert "gender_model_weights.onnx" not in msg
    assert os.path.join(str(tmp_path), ".deepface", "weights") in msg
    assert "\n" not in msg
    with pytest.raises(UserError, match="unknown deepface detector_backend"):
        C.DeepFaceClassifier(detector_backend="nope", home=str(tmp_path))
    with pytest.raises(UserError, match="backend"):
        C.DeepFaceClassifier(detector_backend="skip", home=str(tmp_path), backend="jax")


def test_deepface_label_mapping():
    assert C.DeepFaceClassifier.map_labels("Woman", "latino hispanic") == {"gender": "female", "race": "latino hispanic"}
    assert C.DeepFaceClassifier.map_labels("Man", "middle eastern") == {"gender": "male", "race": "middle eastern"}
    with pytest.raises(UserError, match="unexpected deepface labels"):
        C.DeepFaceClassifier.map_labels("female", "white")


def test_exact_classifier_decoder_and_table():
    # toy-world style: labels painted into the top-left pixel, no face when it is black
    genders, races = C.DEFAULT_CLASSES["gender"], C.DEFAULT_CLASSES["race"]

    def decode(img):
        g, r, face = img[0, 0]
        return {"gender": genders[g], "race": races[r]} if face else None

    imgs = [np.array([[[1, 4, 1]]], np.uint8), np.array([[[0, 0, 0]]], np.uint8), np.zeros((2, 2), np.uint8)]
    out = C.ExactClassifier(decode).classify(imgs)
    assert list(out) == [{"gender": "female", "race": "indian"}, None, None]
    assert out.counts() == {"no_face": 1, "corrupt": 1}

    a, b = _image((1, 2, 3), 4), _image((3, 2, 1), 4)
    table = {C.image_digest(a): {"gender": "male", "race": "asian"}, C.image_digest(b): None}
    clf = C.ExactClassifier(C.table_decoder(table))
    assert list(clf.classify([a, b])) == [{"gender": "male", "race": "asian"}, None]
    with pytest.raises(UserError, match="no ground-truth labels"):
        clf.classify([_image((9, 9, 9), 4)])
    with pytest.raises(UserError, match="not one of"):
        C.ExactClassifier(lambda img: {"gender": "Man", "race": "white"}).classify([a])
    with pytest.raises(UserError, match="lack attribute 'race'"):
        C.ExactClassifier(lambda img: {"gender": "male"}).classify([a])
