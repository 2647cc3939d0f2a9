"""Hub-native models (fairjax.convert.resolve): a tiny SDXL pipeline built with diffusers, placed in a Hugging
Face cache layout under a temporary HF_HOME (``hub/models--ORG--NAME/snapshots/<commit>/`` linking ``blobs/``,
``refs/main``), used offline (HF_HUB_OFFLINE=1) by its repo id: the same images as the explicitly converted
dir, converted once and then read from the model cache, trainable by ``model.dir=ORG/NAME``, two processes at
once, VILA-U repos, and one-line errors for every way a repo id can fail."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import torch  # noqa: F401
import diffusers  # noqa: F401

from fairjax.convert import cache as cache_lib  # noqa: E402
from fairjax.convert import resolve  # noqa: E402
from fairjax.errors import CheckpointError  # noqa: E402
from fairjax.io.linked import LINK_FILE  # noqa: E402
from fairjax.io.model_dir import open_params  # noqa: E402
from fairjax.io.safetensors import SafetensorsReader  # noqa: E402
from test_convert_vila_u import src as vila_u_src  # noqa: E402,F401  (fixture: a tiny vila-u checkpoint folder)
from test_pipeline import build_tiny_sdxl, convert_tiny_sdxl  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = "fairjax-test/tiny-sdxl"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
#: the UNet of fairjax.diffusion.tiny's "micro" preset (so the preset's dataset trains it), text encoders 8 wide
MICRO_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(1, 2), use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=4,
    transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=32, cross_attention_dim=16,
    norm_num_groups=4,
)  # projection_class_embeddings_input_dim = 6 * 4 + 8; cross_attention_dim = 8 + 8
MICRO_VAE = dict(
    block_out_channels=(8, 8), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
    scaling_factor=0.13025,
)


def put_in_hf_cache(src: str, hf_home: str, repo: str, commit: str = COMMIT, ref: str | None = "main") -> str:
    """Copy ``src`` into ``hf_home/hub`` the way huggingface_hub stores a download: file bodies in
    ``blobs/<sha256>``, ``snapshots/<commit>/<path>`` relative links to them, ``refs/<ref>`` = commit."""
    root = os.path.join(hf_home, "hub", "models--" + repo.replace("/", "--"))
    snap = os.path.join(root, "snapshots", commit)
    for dirpath, _, names in os.walk(src):
        for n in names:
            path = os.path.join(dirpath, n)
            digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
            blob = os.path.join(root, "blobs", digest)
            os.makedirs(os.path.dirname(blob), exist_ok=True)
            if not os.path.exists(blob):
                shutil.copyfile(path, blob)
            link = os.path.join(snap, os.path.relpath(path, src))
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    if ref:
        os.makedirs(os.path.join(root, "refs"), exist_ok=True)
        with open(os.path.join(root, "refs", ref), "w") as f:
            f.write(commit)
    return snap


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """``{hf_home, src, converted}``: the tiny pipeline as diffusers saved it, in the cache as REPO, and
    converted explicitly with tools/convert_diffusers.py."""
    root = tmp_path_factory.mktemp("hub")
    src = str(root / "src")
    build_tiny_sdxl(src, unet=MICRO_UNET, vae=MICRO_VAE, text_hidden=8, text_layers=2)
    hf_home = str(root / "hf")
    put_in_hf_cache(src, hf_home, REPO)
    converted = convert_tiny_sdxl(src, str(root / "converted"))
    return {"hf_home": hf_home, "src": src, "converted": converted, "root": root}


@pytest.fixture
def offline(hub, tmp_path, monkeypatch):
    """HF_HOME = the fixture's cache, HF_HUB_OFFLINE=1, a fresh model cache; returns that model cache."""
    monkeypatch.setenv("HF_HOME", hub["hf_home"])
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    cache = str(tmp_path / "fjcache")
    monkeypatch.setenv(cache_lib.CACHE_ENV, cache)
    return cache


def _files(folder):
    """``{relative path: (inode, mtime_ns, size)}`` of every file under ``folder``."""
    out = {}
    for dirpath, _, names in os.walk(folder):
        for n in names:
            st = os.stat(os.path.join(dirpath, n))
            out[os.path.relpath(os.path.join(dirpath, n), folder)] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


def _same_params(a: str, b: str):
    """The params at ``a`` (a file, or the link beside it) equal those of the file ``b``, as views and as reads."""
    with open_params(a) as ra, SafetensorsReader(b) as rb:
        assert sorted(ra.keys()) == sorted(rb.keys())
        for k in ra.keys():
            assert ra.dtype(k) == rb.dtype(k) and ra.shape(k) == rb.shape(k), k
            assert np.array_equal(ra[k], rb[k]) and np.array_equal(ra.read(k), rb[k]), k
            assert ra.read(k).flags.c_contiguous, k


# ----------------------------------------------------------------------------- SDXL by repo id


def test_generate_by_repo_id_matches_the_converted_dir_and_converts_once(hub, offline, tmp_path, capsys):
    from PIL import Image

    from fairjax import generate

    def read_png(path):
        return np.asarray(Image.open(path))

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n")
    common = ["--prompts", str(prompts), "--num-per-prompt", "2", "--steps", "2", "--batch-size", "2"]
    assert generate.main(["--model", REPO, "--out", str(tmp_path / "hub_out"), *common]) == 0
    assert generate.main(["--model", hub["converted"], "--out", str(tmp_path / "dir_out"), *common]) == 0
    for name in ("00000_0000.png", "00000_0001.png"):
        assert np.array_equal(read_png(str(tmp_path / "hub_out" / name)), read_png(str(tmp_path / "dir_out" / name)))
    err = capsys.readouterr().err
    assert err.count("converting") == 1 and "into the model cache" in err

    (entry,) = [os.path.join(offline, "models", n) for n in os.listdir(os.path.join(offline, "models"))
                if not n.startswith(".")]
    index = json.load(open(os.path.join(entry, "fairjax.json")))
    assert index["hub"] == {"repo": REPO, "revision": "main", "commit": COMMIT}
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        # no dtype change: the entry links to the snapshot's files instead of holding a copy of the weights
        assert not os.path.exists(os.path.join(entry, comp, "params.safetensors"))
        link = json.load(open(os.path.join(entry, comp, LINK_FILE)))
        assert all(s["path"].startswith(os.path.join(hub["hf_home"], "hub")) for s in link["sources"])
        _same_params(os.path.join(entry, comp, "params.safetensors"),
                     os.path.join(hub["converted"], comp, "params.safetensors"))

    before = _files(entry)
    assert resolve.resolve_model(REPO) == entry  # the second call reads the cache: nothing converted or written
    assert resolve.resolve_model(f"{REPO}@main") == entry and resolve.resolve_model(f"{REPO}@{COMMIT}") == entry
    assert _files(entry) == before
    assert "converting" not in capsys.readouterr().err


def test_train_with_model_dir_repo_id(hub, offline, tmp_path, capsys):
    """``model.dir=ORG/NAME``: the task reads the converted repo (text encoders, scheduler, UNet), the run saves
    the config as given and writes its UNet. One step at learning rate 1e-30 (a run needs at least one step and a
    positive rate): the UNet written is the repo's to float32 rounding of weights that move by ~1e-30."""
    from fairjax import train

    argv = ["--config", os.path.join(ROOT, "configs", "popalign_sdxl.py:tiny"), "--workdir", str(tmp_path / "run"),
            "--config.tiny=micro", f"--config.model.dir={REPO}", "--config.total_steps=1", "--config.optimizer.lr=1e-30",
            "--config.progress_bar=false", "--config.time_ids=(16.0, 16.0, 0.0, 0.0, 16.0, 16.0)"]
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{"):])["step"] == 1
    saved = json.load(open(tmp_path / "run" / "config.json"))
    assert saved["model"]["dir"] == REPO  # a resume compares the config as given, not the cache path
    trained = json.load(open(tmp_path / "run" / "model" / "fairjax.json"))
    assert trained["base_model"].startswith(os.path.join(offline, "models"))
    with SafetensorsReader(str(tmp_path / "run" / "model" / "unet" / "params.safetensors")) as ra, \
            SafetensorsReader(os.path.join(hub["converted"], "unet", "params.safetensors")) as rb:
        assert sorted(ra.keys()) == sorted(rb.keys())
        for k in ra.keys():
            np.testing.assert_allclose(ra[k], rb[k], rtol=1e-6, atol=1e-20, err_msg=k)


def test_two_processes_resolving_the_same_id_at_once(hub, offline, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "fairjax.convert.resolve", REPO]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in "ab"]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    paths = {o.strip().splitlines()[-1] for o, _ in outs}
    assert len(paths) == 1
    (entry,) = paths
    assert sum(e.count("into the model cache") for _, e in outs) == 1  # one converted, the other waited for it
    assert sorted(n for n in os.listdir(os.path.join(offline, "models")) if not n.endswith(".lock")) == \
        [os.path.basename(entry)]  # no temporary folder left
    _same_params(os.path.join(entry, "unet", "params.safetensors"),
                 os.path.join(hub["converted"], "unet", "params.safetensors"))


def test_a_lone_conversion_never_waits_on_a_lock(hub, offline, monkeypatch):
    """The cache's cross-process flock and the entry's own write lock (fs.PathLock) are different files: with
    one file, the write lock found the flock's empty file, took it for a stale lock, waited 5 s on every cold
    conversion and then broke it (letting a third process in to clear the temp folder of the one converting)."""
    import types

    from fairjax.io import fs

    def no_wait(seconds):
        raise AssertionError(f"a lone conversion waited {seconds} s on a lock")

    clock = types.ModuleType("time")  # fs's clock, with a sleep that fails the test
    clock.__dict__.update({k: getattr(fs.time, k) for k in dir(fs.time) if not k.startswith("__")}, sleep=no_wait)
    monkeypatch.setattr(fs, "time", clock)
    monkeypatch.setattr(fs.PathLock, "_break", lambda self, holder: pytest.fail(f"broke {self.lock_file}"))
    entry = resolve.resolve_model(hub["src"])
    assert cache_lib.is_complete(entry)
    assert not os.path.exists(fs.lock_file_for(entry))  # the write lock is released ...
    assert os.path.exists(os.path.join(os.path.dirname(entry), f".{os.path.basename(entry)}.convert.lock"))


def test_local_folders_and_no_cache(hub, offline, capsys):
    assert resolve.resolve_model(hub["converted"]) == hub["converted"]  # fairjax already: as is
    entry = resolve.resolve_model(hub["src"])  # a diffusers folder: converted into the cache, keyed by content
    assert entry.startswith(os.path.join(offline, "models", "src-"))
    _same_params(os.path.join(entry, "unet", "params.safetensors"),
                 os.path.join(hub["converted"], "unet", "params.safetensors"))
    assert resolve.resolve_model(hub["src"]) == entry

    import jax

    from fairjax.io.model_dir import load_params
    from fairjax.models import unet

    _, lazy = unet.load(entry)  # no cast: read-only views of the file's memory map
    _, cast = unet.load(entry, param_dtype=np.float16)
    eager = load_params(os.path.join(entry, "unet", "params.safetensors"))
    for a, c, e in zip(jax.tree.leaves(lazy), jax.tree.leaves(cast), jax.tree.leaves(eager)):
        assert not a.flags.writeable and e.flags.writeable and c.dtype == np.float16
        assert np.array_equal(a, e) and np.array_equal(c, e.astype(np.float16))
    unet = resolve.resolve_model(os.path.join(hub["src"], "unet"))  # one component folder
    assert json.load(open(os.path.join(unet, "fairjax.json")))["components"] == ["unet"]
    capsys.readouterr()

    shutil.rmtree(os.path.join(offline, "models"))
    tmp = resolve.resolve_model(REPO, cache=False)
    assert not tmp.startswith(offline) and not os.path.exists(os.path.join(offline, "models"))
    assert "--no-cache" in capsys.readouterr().err
    _same_params(os.path.join(tmp, "vae", "params.safetensors"), os.path.join(hub["converted"], "vae", "params.safetensors"))


def test_linked_entries_follow_their_sources(hub, offline, tmp_path, capsys):
    """A cache entry links to its source's files: a source rewritten since is a one-line error when the entry is
    opened directly, and asking for the model again converts it again (a new key for a changed local folder; the
    same key, rebuilt, for a Hugging Face blob rewritten in place). A dtype change copies instead of linking,
    and a linked entry exports to diffusers exactly as the explicitly converted dir does."""
    from test_convert_unet import export_tool as export_diffusers

    from fairjax.io.linked import LinkedReader

    src = str(tmp_path / "src")
    shutil.copytree(hub["src"], src)
    entry = resolve.resolve_model(src)
    unet_file = os.path.join(src, "unet", "diffusion_pytorch_model.safetensors")
    assert os.path.getsize(os.path.join(entry, "unet", LINK_FILE)) < 64 << 10

    out_entry, out_dir = str(tmp_path / "exp_entry"), str(tmp_path / "exp_dir")
    assert export_diffusers.main([entry, out_entry]) == 0 and export_diffusers.main([hub["converted"], out_dir]) == 0
    for comp in ("unet", "vae"):
        (f,) = [n for n in os.listdir(os.path.join(out_dir, comp)) if n.endswith(".safetensors")]
        with SafetensorsReader(os.path.join(out_entry, comp, f)) as a, \
                SafetensorsReader(os.path.join(out_dir, comp, f)) as b:
            assert sorted(a.keys()) == sorted(b.keys()) and all(np.array_equal(a[k], b[k]) for k in a.keys())

    st = os.stat(unet_file)
    os.utime(unet_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the same bytes, rewritten a second later
    with pytest.raises(CheckpointError, match="changed since it was converted") as e:
        LinkedReader(os.path.join(entry, "unet", LINK_FILE))
    assert "\n" not in str(e.value)
    assert not cache_lib.is_complete(entry)
    again = resolve.resolve_model(src)
    assert again != entry and cache_lib.is_complete(again)
    _same_params(os.path.join(again, "unet", "params.safetensors"),
                 os.path.join(hub["converted"], "unet", "params.safetensors"))
    os.remove(unet_file)
    with pytest.raises(CheckpointError, match="which is gone"):
        LinkedReader(os.path.join(again, "unet", LINK_FILE))

    copied = resolve.resolve_model(hub["src"], dtype="float16")  # a cast: the entry holds the converted copy
    assert os.path.isfile(os.path.join(copied, "unet", "params.safetensors"))
    assert not os.path.exists(os.path.join(copied, "unet", LINK_FILE))

    hub_home = str(tmp_path / "hf")
    shutil.copytree(hub["hf_home"], hub_home, symlinks=True)
    os.environ["HF_HOME"] = hub_home  # restored by the offline fixture's monkeypatch
    entry = resolve.resolve_model(REPO)
    link = json.load(open(os.path.join(entry, "unet", LINK_FILE)))
    (blob,) = [s["path"] for s in link["sources"]]
    st = os.stat(blob)
    os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    capsys.readouterr()
    assert resolve.resolve_model(REPO) == entry  # same snapshot, same key: converted again in place
    assert "into the model cache" in capsys.readouterr().err
    _same_params(os.path.join(entry, "unet", "params.safetensors"),
                 os.path.join(hub["converted"], "unet", "params.safetensors"))


def test_vila_u_repo_id_converts_with_its_converter(offline, tmp_path, request, monkeypatch):
    from test_convert_vila_u import SIGLIP

    from fairjax.convert import vila_u as vila_u_convert

    src = request.getfixturevalue("vila_u_src")
    # the made-up SigLIP the tiny folder names (real vila-u names google/siglip-large-patch16-256, built in)
    monkeypatch.setitem(vila_u_convert.SIGLIP_VISION_CONFIGS, "siglip-tiny-test", dict(SIGLIP))
    put_in_hf_cache(src["root"], os.environ["HF_HOME"], "fairjax-test/tiny-vila-u")
    entry = resolve.resolve_model("fairjax-test/tiny-vila-u")
    ref = str(tmp_path / "ref")
    vila_u_convert.convert_vila_u(src["root"], ref, log=lambda *_: None)
    index = json.load(open(os.path.join(entry, "fairjax.json")))
    assert index["model_type"] == "vila_u" and index["hub"]["repo"] == "fairjax-test/tiny-vila-u"
    for comp in vila_u_convert.COMPONENTS:
        _same_params(os.path.join(entry, comp, "params.safetensors"), os.path.join(ref, comp, "params.safetensors"))


# ----------------------------------------------------------------------------- which files


def _fake(folder, files: dict):
    for rel, body in files.items():
        path = os.path.join(folder, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(json.dumps(body) if isinstance(body, dict) else body)
    return folder


def test_needed_files_pick_the_variant_shards_and_copied_folders(tmp_path):
    index = {"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "EulerDiscreteScheduler"],
             "safety_checker": [None, None], "feature_extractor": ["transformers", "CLIPImageProcessor"]}
    shards = {"weight_map": {"a": "diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
                             "b": "diffusion_pytorch_model.fp16-00002-of-00002.safetensors"}}
    files = {"model_index.json": index, "unet/config.json": {}, "unet/diffusion_pytorch_model.safetensors": "",
             "unet/diffusion_pytorch_model.safetensors.index.fp16.json": shards,
             "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors": "",
             "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors": "",
             "unet/diffusion_pytorch_model.bin": "", "tokenizer/vocab.json": {}, "tokenizer/merges.txt": "",
             "scheduler/scheduler_config.json": {}, "feature_extractor/preprocessor_config.json": {},
             "vae_onnx/model.onnx": ""}
    root = _fake(str(tmp_path / "p"), files)
    listing = resolve.local_files(root)
    kind, plain = resolve.needed_files(root, listing)
    assert kind == resolve.DIFFUSERS
    assert plain == ["feature_extractor/preprocessor_config.json", "model_index.json", "scheduler/scheduler_config.json",
                     "tokenizer/merges.txt", "tokenizer/vocab.json", "unet/config.json",
                     "unet/diffusion_pytorch_model.safetensors"]
    _, fp16 = resolve.needed_files(root, listing, "fp16")
    assert [f for f in fp16 if f.startswith("unet/d")] == [
        "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.fp16.json"]
    os.remove(os.path.join(root, "unet", "diffusion_pytorch_model.safetensors"))
    _, only_fp16 = resolve.needed_files(root, resolve.local_files(root))  # no plain weights: the fp16 ones
    assert only_fp16 == fp16
    for f in os.listdir(os.path.join(root, "unet")):
        if "fp16" in f:
            os.remove(os.path.join(root, "unet", f))
    _fake(root, {"unet/diffusion_pytorch_model.safetensors": ""})
    with pytest.raises(CheckpointError, match=r"no unet/diffusion_pytorch_model.fp16.safetensors \(nor a sharded"):
        resolve.needed_files(root, resolve.local_files(root), "fp16")  # a variant asked for must be there
    os.remove(os.path.join(root, "unet", "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"lacks the weights of unet: no unet/diffusion_pytorch_model.safetensors"
                                              r".*only PyTorch \.bin"):
        resolve.needed_files(root, resolve.local_files(root))


# ----------------------------------------------------------------------------- one-line errors


def _resolve_error(capsys, *argv) -> str:
    assert resolve.main(list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_offline_errors_are_one_line(hub, offline, tmp_path, capsys):
    from fairjax import generate

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    assert generate.main(["--model", "nobody/nothing", "--prompts", str(prompts), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not in the Hugging Face cache" in err[0] and "HF_HUB_OFFLINE is set" in err[0]
    assert not (tmp_path / "o").exists()

    msg = _resolve_error(capsys, f"{REPO}@v9")
    assert "'v9'" in msg and "HF_HUB_OFFLINE is set" in msg and "cached: main" in msg

    broken = str(tmp_path / "broken")
    shutil.copytree(hub["src"], broken)
    os.remove(os.path.join(broken, "unet", "diffusion_pytorch_model.safetensors"))
    put_in_hf_cache(broken, os.environ["HF_HOME"], "fairjax-test/no-unet-weights")
    msg = _resolve_error(capsys, "fairjax-test/no-unet-weights")
    assert "unet/diffusion_pytorch_model.safetensors" in msg and "config.json" in msg

    assert "not a Hugging Face repo id" in _resolve_error(capsys, "no/such/folder")
    not_dir = tmp_path / "file"
    not_dir.write_text("")
    os.environ[cache_lib.CACHE_ENV] = str(not_dir / "cache")
    assert "is not writable" in _resolve_error(capsys, REPO)
    assert not os.path.exists(offline)


def _http_error(cls, status):
    import httpx2  # huggingface_hub's HTTP client

    response = httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/x"))
    return cls("the Hub said no", response=response)


@pytest.mark.parametrize("kind, words", [
    ("gated", ["gated repo", "HF_TOKEN is not set", "accept its conditions"]),
    ("revision", ["has no revision 'v9'"]),
    ("missing", ["there is no Hugging Face repo", "a private repo needs a token"]),
])
def test_online_errors_are_one_line(kind, words, offline, monkeypatch, capsys):
    """What snapshot_download raises online (no network here: it is replaced by one that raises)."""
    import huggingface_hub
    from huggingface_hub import errors as hf

    err = {"gated": (hf.GatedRepoError, 403), "revision": (hf.RevisionNotFoundError, 404),
           "missing": (hf.RepositoryNotFoundError, 401)}[kind]

    def raise_(*a, **k):
        raise _http_error(*err)

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", raise_)
    msg = _resolve_error(capsys, "someone/gated-model@v9")
    assert all(w in msg for w in words), msg
