"""Shared pieces of the bad-input test files (``tests/test_bad_inputs_<command>.py``, issue 23).

Every case runs the command's ``main(argv)`` in-process and asserts what a user sees: exit status 2,
exactly one line on stderr starting with ``error: `` that names the problem (besides a tqdm progress
bar, whose updates are ``\r``-separated), no traceback (``main`` returned instead of raising), and
every input and output tree byte-for-byte as before (hashed before and after, so a case that writes,
deletes or leaves a temp file or a lock behind fails).

Fixtures (session-scoped, built once, no torch, nothing compiled):

* ``micro_sdxl``: ``fairjax.diffusion.tiny``'s ``micro`` model dir plus a micro VAE (a complete SDXL
  model dir), its preference dataset, a LoRA that fits its UNet and one that does not;
  ``micro_diffusers_unet``: its UNet exported to a diffusers ``unet/`` folder (numpy only).
* ``tiny_vila_u``: ``fairjax.vila_u.tiny``'s model dir and datasets, a LoRA over its LLM, one of the
  wrong shapes, and a vila-u source folder with the real configs and an exported LLM (no vision
  weights: enough for every case that fails before the vision tower is read).

Real operating-system refusals: :func:`readonly_dir` mounts a read-only tmpfs (root) or drops the
write bits (not root); :func:`small_fs` mounts a tiny tmpfs. Both skip only when mounting is not
permitted here.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tool(name: str):
    """A ``tools/<name>.py`` script as a module."""
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------- trees and assertions


def tree_digest(*roots) -> dict:
    """``{path: what}`` for every path under each root (the root included): ``('file', sha256, mode)``,
    ``('dir', mode)``, ``('link', target)`` or ``'absent'``."""
    out = {}

    def one(p):
        if os.path.islink(p):
            return ("link", os.readlink(p))
        if os.path.isdir(p):
            return ("dir", os.stat(p).st_mode)
        if os.path.isfile(p):
            with open(p, "rb") as f:
                return ("file", hashlib.sha256(f.read()).hexdigest(), os.stat(p).st_mode)
        return "absent"

    for root in roots:
        root = os.fspath(root)
        out[root] = one(root)
        if os.path.isdir(root) and not os.path.islink(root):
            for dirpath, dirnames, filenames in os.walk(root):
                for name in sorted(dirnames + filenames):
                    p = os.path.join(dirpath, name)
                    out[p] = one(p)
    return out


def refused(main, argv, capsys, needles, roots, code: int = 2) -> str:
    """Run ``main(argv)``; assert exit ``code``, one ``error:`` line holding every needle, no traceback,
    and ``roots`` unchanged. Returns the line."""
    capsys.readouterr()
    before = tree_digest(*roots)
    rc = main([os.fspath(a) for a in argv])  # a raise here is the traceback a user would have seen
    out, err = capsys.readouterr()
    lines = [ln for ln in err.split("\n") if ln.strip() and "\r" not in ln]  # "\r": a tqdm progress bar
    assert rc == code, f"exit {rc}, stderr: {err}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"not one error line: {err!r}"
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    assert tree_digest(*roots) == before, "an input or output changed"
    return lines[0]


# ----------------------------------------------------------------------------- OS refusals


@contextlib.contextmanager
def readonly_dir(path):
    """``path`` (created) as a folder nobody can write into: a read-only tmpfs mount as root, the write
    bits dropped otherwise (they stop a non-root user). Skips when neither is possible."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    if os.geteuid() == 0:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", path], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a read-only tmpfs here: {r.stderr.decode().strip()}")
        try:
            yield path
        finally:
            subprocess.run(["umount", path], check=True)
    else:
        os.chmod(path, 0o555)
        try:
            yield path
        finally:
            os.chmod(path, 0o755)


@contextlib.contextmanager
def small_fs(path, size: str = "64k"):
    """A tmpfs of ``size`` mounted at ``path``; skips where mounting is not permitted (CI not root)."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], capture_output=True)
    except FileNotFoundError:
        pytest.skip("no mount command here")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", path], check=True)


def os_error(code: int, path: str = "") -> OSError:
    return OSError(code, os.strerror(code), path)


def inject_mkdir_error(monkeypatch, under: str, code: int = errno.EROFS) -> None:
    """``os.mkdir`` of any path under ``under`` fails with ``code`` (what a read-only mount does)."""
    real = os.mkdir
    under = os.path.abspath(under)

    def mkdir(p, *a, **k):
        if os.path.abspath(p).startswith(under + os.sep):
            raise os_error(code, p)
        return real(p, *a, **k)

    monkeypatch.setattr(os, "mkdir", mkdir)


@contextlib.contextmanager
def held_by_other_process(target: str, inside: bool = False):
    """A live process (``sleep``) named as the holder of ``target``'s lock file, as another run leaves it."""
    from fairjax.io import fs

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    lock = fs.lock_file_for(target, inside)
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    with open(lock, "w") as f:
        json.dump({"pid": proc.pid, "host": fs.this_host(), "start": fs.process_start(proc.pid), "since": 0.0}, f)
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()
        os.remove(lock)


# ----------------------------------------------------------------------------- bad files


def write_raw_safetensors(path: str, header, data: bytes = b"") -> None:
    """A safetensors file with exactly this header (any JSON value) and data bytes."""
    h = json.dumps(header).encode() if not isinstance(header, bytes) else header
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h + data)


def replace_file(path: str, text: str) -> None:
    """Replace ``path`` (maybe a symlink into a shared fixture) by a file holding ``text``."""
    if os.path.lexists(path):
        os.remove(path)
    with open(path, "w") as f:
        f.write(text)


def linked_copy(src: str, dst: str, real: tuple = ()) -> str:
    """``dst`` mirroring ``src`` with symlinks, except the relative paths in ``real`` (and the folders on
    the way to them), which are copied so that a case can damage them."""
    os.makedirs(dst)
    for name in sorted(os.listdir(src)):
        s, d = os.path.join(src, name), os.path.join(dst, name)
        inner = tuple(r.split("/", 1)[1] for r in real if r.startswith(name + "/"))
        if name in real:
            (shutil.copytree if os.path.isdir(s) else shutil.copy)(s, d)
        elif inner and os.path.isdir(s):
            linked_copy(s, d, inner)
        else:
            os.symlink(s, d)
    return dst


# ----------------------------------------------------------------------------- fixtures


MICRO_VAE = dict(_class_name="AutoencoderKL", block_out_channels=[8, 8], in_channels=3, out_channels=3,
                 latent_channels=4, norm_num_groups=4, layers_per_block=1, down_block_types=["DownEncoderBlock2D"] * 2,
                 up_block_types=["UpDecoderBlock2D"] * 2, sample_size=16, scaling_factor=0.13025)


def _lora_files(root: str, params: dict, targets: str, rank: int = 2):
    """``(fits, wrong shapes)``: two fairjax LoRA files over ``params``'s kernels matching ``targets``
    (random numpy values: nothing compiled)."""
    from fairjax import lora as lora_lib
    from fairjax.io.tree import flatten, path_str

    shapes = {path_str(p): np.shape(v) for p, v in flatten(params).items()}
    rng = np.random.default_rng(0)
    good = {k: {"a": rng.standard_normal((int(np.prod(shapes[k][:-1])), rank)).astype(np.float32),
                "b": rng.standard_normal((rank, shapes[k][-1])).astype(np.float32)}
            for k in lora_lib.match_kernels(params, targets)}
    bad = {k: {"a": np.zeros((e["a"].shape[0] + 1, rank), np.float32), "b": e["b"]} for k, e in good.items()}
    paths = os.path.join(root, "lora.safetensors"), os.path.join(root, "lora_wrong_shapes.safetensors")
    for path, entries in zip(paths, (good, bad)):
        lora_lib.save(path, entries, alpha=float(rank), targets=targets)
    return paths


@pytest.fixture(scope="session")
def micro_sdxl(tmp_path_factory) -> dict:
    from fairjax.diffusion import tiny
    from fairjax.io.model_dir import load_params, save_component
    from fairjax.io.tree import unflatten
    from fairjax.models import vae

    import jax

    root = str(tmp_path_factory.mktemp("micro_sdxl"))
    model, data = tiny.ensure(os.path.join(root, "micro"), "micro", seed=0)
    m = vae.from_config(MICRO_VAE)
    shapes = unflatten({k: jax.ShapeDtypeStruct(v, np.float32) for k, v in vae.param_shapes(m).items()})
    save_component(os.path.join(model, "vae"), MICRO_VAE, tiny.random_params(shapes, np.random.default_rng(3)))
    unet = load_params(os.path.join(model, "unet", "params.safetensors"))
    lora, lora_bad = _lora_files(root, unet, r"attn2/to_(k|v)/kernel$")
    prompts = os.path.join(root, "prompts.txt")
    with open(prompts, "w") as f:
        f.write("a photo of a doctor\na photo of a nurse\n")
    return {"root": root, "model": model, "data": data, "lora": lora, "lora_bad": lora_bad, "prompts": prompts}


@pytest.fixture(scope="session")
def micro_diffusers_unet(micro_sdxl) -> str:
    """The micro UNet exported to a diffusers ``unet/`` folder (config.json +
    diffusion_pytorch_model.safetensors), under ``micro_sdxl['root']``."""
    from fairjax.convert import unet as unet_convert

    out = os.path.join(micro_sdxl["root"], "diffusers", "unet")
    unet_convert.export_component(os.path.join(micro_sdxl["model"], "unet"), out)
    return out


@pytest.fixture(scope="session")
def tiny_vila_u(tmp_path_factory) -> dict:
    from fairjax.convert import vila_u as convert_vila_u
    from fairjax.convert.llama import export_hf_llama
    from fairjax.io.model_dir import load_params, read_json
    from fairjax.vila_u.tiny import TINY, ensure_tiny

    root = str(tmp_path_factory.mktemp("tiny_vila_u"))
    dirs = ensure_tiny(os.path.join(root, "tiny"), 0)
    llm_dir = os.path.join(dirs["model"], "llm")
    params = load_params(os.path.join(llm_dir, "params.safetensors"))
    lora, lora_bad = _lora_files(root, params, r"layers_\d+/self_attn/(q|v)_proj/kernel$")
    src = os.path.join(root, "vila-u-src")
    export_hf_llama(params, read_json(os.path.join(llm_dir, "config.json")), os.path.join(src, "llm"))
    vt = read_json(os.path.join(dirs["model"], "vision_tower", "config.json"))
    vt.pop(convert_vila_u.SIGLIP_KEY, None)
    for part, cfg in (("vision_tower", vt), ("mm_projector", TINY["mm_projector"])):
        os.makedirs(os.path.join(src, part))
        with open(os.path.join(src, part, "config.json"), "w") as f:
            json.dump(cfg, f)
    siglip = os.path.join(root, "siglip_config.json")
    with open(siglip, "w") as f:
        json.dump(TINY["siglip"], f)
    return {"root": root, **dirs, "lora": lora, "lora_bad": lora_bad, "src": src, "siglip": siglip}
