"""One model argument for every command: a fairjax model dir, a diffusers / transformers / vila-u folder,
or a Hugging Face repo id, resolved to a fairjax model dir.

    resolve_model("runs/popalign/model")                        -> itself (already fairjax)
    resolve_model("/data/stable-diffusion-xl-base-1.0")         -> $FAIRJAX_CACHE_DIR/models/<key> (converted once)
    resolve_model("stabilityai/stable-diffusion-xl-base-1.0")   -> downloaded, converted once, cached
    resolve_model("ORG/NAME@v1.0", variant="fp16")              -> a branch, tag or commit; the .fp16 weights

Used by ``fairjax.train`` (``model.dir``), ``fairjax.generate --model``, ``fairjax.evaluate
--model/--base``, ``fairjax.data.build_prefs`` (``model.dir``), ``fairjax.analysis.reward_probe
--base/--tuned`` and ``tools/export_{diffusers,vila_u}.py``.

What a spec is, in order: an existing folder (a fairjax model dir, :func:`is_fairjax_dir`, is returned as is;
a diffusers pipeline folder with ``model_index.json``, a single component folder such as ``unet/`` or a
transformers CLIP text encoder, or a vila-u checkpoint folder with ``llm/ vision_tower/ mm_projector/`` is
converted; any other folder is returned as is, for the command to say what it lacks); else ``ORG/NAME[@REVISION]``, a Hugging Face repo id, fetched with
``huggingface_hub.snapshot_download`` into the Hugging Face cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``;
``HF_HUB_OFFLINE`` and ``HF_TOKEN`` are read when the call is made). Only the files a conversion reads are
fetched: first the small ones (``*.json``, ``*.txt``, ``*.model``), then, from what those name, each
converted component's weights (``.safetensors``; plain, else the ``fp16`` / ``bf16`` variant, or the
``variant`` asked for) and the copied folders (tokenizers, scheduler).

Conversion goes into the model cache (:mod:`fairjax.convert.cache`), once per source content: a second
call, or a second process while the first converts, gets the same folder without converting again.
``cache=False`` (the commands' ``--no-cache``) converts into a temporary folder removed at exit.

Every failure is one :class:`~fairjax.errors.CheckpointError` line: a repo that is not in the Hugging Face
cache while ``HF_HUB_OFFLINE`` is set, a revision that does not exist, a gated or private repo without a
token that may read it, a repo without the files a conversion needs (named), an unwritable cache.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable

from fairjax.convert import cache as cache_lib
from fairjax.errors import CheckpointError

#: ``ORG/NAME`` or ``ORG/NAME@REVISION`` (exactly one slash: anything else is a path)
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(?P<rev>[^@\s]+))?")
#: fetched first from a repo: configs, indexes, tokenizer and scheduler files (all small)
SMALL_FILES = ("*.json", "*.txt", "*.model")
FAIRJAX, DIFFUSERS, VILA_U = "fairjax", "diffusers", "vila_u"
VARIANTS = ("fp16", "bf16")
_TRUE = {"1", "on", "yes", "true"}


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


# ----------------------------------------------------------------------------- what a folder holds


def is_fairjax_dir(path: str) -> bool:
    """A fairjax model dir (``fairjax.json``), a bare component folder or a folder of components
    (``[*/]params.safetensors`` or ``params.link.json``)."""
    from fairjax.io.model_dir import INDEX_FILE, has_params

    if os.path.isfile(os.path.join(path, INDEX_FILE)) or has_params(path):
        return True
    return any(has_params(os.path.join(path, d)) for d in _listdir(path))


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def folder_kind(path: str) -> str | None:
    """:data:`FAIRJAX`, :data:`VILA_U`, :data:`DIFFUSERS`, or None for a folder that is none of them."""
    from fairjax.convert import pipeline
    from fairjax.convert import vila_u as vila_u_convert

    if is_fairjax_dir(path):
        return FAIRJAX
    if all(os.path.isdir(os.path.join(path, n)) for n in vila_u_convert.SOURCE_PARTS):
        return VILA_U
    if os.path.isfile(os.path.join(path, pipeline.MODEL_INDEX)) or os.path.isfile(os.path.join(path, "config.json")):
        return DIFFUSERS
    return None


# ----------------------------------------------------------------------------- which files a conversion reads


def _read_json(root: str, rel: str) -> dict:
    from fairjax.io.model_dir import read_json

    return read_json(os.path.join(root, rel))


def weight_files(root: str, files: set[str], folder: str, prefix: str, variant: str | None, where: str,
                 required: bool = True, variants: tuple[str, ...] = VARIANTS) -> list[str]:
    """The weight files of one component folder (paths relative to ``root``, a shard index + its shards or one
    file): the ``variant`` asked for, or without one plain, else ``fp16``, else ``bf16`` (the converters' order,
    :func:`fairjax.convert.pipeline.open_weights`). A folder with none is a one-line error naming what it needed
    and what it holds (``required=False``: an empty list; ``variants=()``: plain weights only)."""
    head = f"{folder}/" if folder else ""
    for v in [variant] if variant else [None, *variants]:
        stem = f"{prefix}.{v}" if v else prefix
        indexes = [f"{head}{stem}.safetensors.index.json"] + ([f"{head}{prefix}.safetensors.index.{v}.json"] if v else [])
        for index in indexes:
            if index in files:
                weight_map = _read_json(root, index).get("weight_map") or {}
                return [index] + sorted({head + s for s in weight_map.values()})
        if f"{head}{stem}.safetensors" in files:
            return [f"{head}{stem}.safetensors"]
    if not required:
        return []
    held = sorted(f[len(head):] for f in files if f.startswith(head) and "/" not in f[len(head):])
    hint = (" (only PyTorch .bin weights there: fairjax reads .safetensors; pick a revision that has them)"
            if any(f.endswith(".bin") for f in held) else "")
    want = f"{head}{prefix}{'.' + variant if variant else ''}.safetensors"
    other = "sharded" if variant else "sharded, fp16 or bf16"
    raise CheckpointError(f"{where} lacks the weights of {folder or 'its model'}: no {want} (nor a {other} "
                          f"version); {folder or 'it'} holds: {', '.join(held[:10]) or 'nothing'}{hint}")


def needed_files(root: str, files: Iterable[str], variant: str | None = None, *, where: str | None = None
                 ) -> tuple[str, list[str]]:
    """``(kind, [relative paths])``: every file of ``root`` (listing ``files``) that converting it reads. The
    ``*.json`` files must be readable under ``root``; missing configs or weights are one-line errors naming them."""
    from fairjax.convert import pipeline
    from fairjax.convert import vila_u as vila_u_convert

    files = set(files)
    where = where or root
    need: list[str] = []

    def require(rel: str) -> None:
        if rel not in files:
            raise CheckpointError(f"{where} lacks {rel}, which converting it needs")
        need.append(rel)

    if all(f"{n}/config.json" in files for n in vila_u_convert.SOURCE_PARTS):
        for n in vila_u_convert.SOURCE_PARTS:  # vila-u ships plain weights only, and its converter reads those
            require(f"{n}/config.json")
            need.extend(weight_files(root, files, n, vila_u_convert.WEIGHTS_PREFIX, None, where,
                                     required=n != "mm_projector", variants=()))
        need.extend(f"llm/{f}" for f in vila_u_convert.TOKENIZER_FILES if f"llm/{f}" in files)
        return VILA_U, sorted(set(need))
    if pipeline.MODEL_INDEX in files:
        require(pipeline.MODEL_INDEX)
        for name, (_, cls) in pipeline.index_entries(root).items():
            if name in pipeline.CONVERTERS:
                require(f"{name}/config.json")
                need.extend(weight_files(root, files, name, pipeline.WEIGHTS_PREFIX[name], variant, where))
            elif pipeline.is_copied_class(cls):
                part = sorted(f for f in files if f.startswith(name + "/"))
                if not part:
                    raise CheckpointError(f"{where}: model_index.json names {name} ({cls}) but the repo has no "
                                          f"{name}/ files")
                need.extend(part)
        return DIFFUSERS, sorted(set(need))
    if "config.json" in files:
        cls = pipeline.component_class(_read_json(root, "config.json"))
        name = pipeline.CLASS_TO_COMPONENT.get(cls)
        if name is None:
            raise CheckpointError(f"{where}: config.json is for {cls or 'an unnamed class'}, which has no converter "
                                  f"(supported: {', '.join(pipeline.CLASS_TO_COMPONENT)}, a diffusers pipeline with "
                                  f"model_index.json, or a vila-u checkpoint)")
        return DIFFUSERS, ["config.json"] + weight_files(root, files, "", pipeline.WEIGHTS_PREFIX[name], variant,
                                                         where)
    raise CheckpointError(f"{where} has neither model_index.json, config.json nor llm/ + vision_tower/ + "
                          f"mm_projector/ configs; it is not a diffusers, transformers or vila-u model")


def local_files(root: str) -> list[str]:
    """Every file under ``root``, as ``/``-joined paths relative to it (links followed)."""
    out = []
    for dirpath, _, names in os.walk(root, followlinks=True):
        rel = os.path.relpath(dirpath, root)
        out += [n if rel == "." else f"{rel.replace(os.sep, '/')}/{n}" for n in names]
    return sorted(out)


# ----------------------------------------------------------------------------- the Hugging Face Hub


def hub_cache_dir() -> str:
    """``HF_HUB_CACHE``, else ``HF_HOME/hub``, else huggingface_hub's default (read now, not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def hub_offline() -> bool:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE or bool(constants.HF_HUB_OFFLINE)


def _cached_revisions(repo: str) -> list[str]:
    folder = os.path.join(hub_cache_dir(), "models--" + repo.replace("/", "--"))
    refs = [os.path.relpath(os.path.join(d, n), os.path.join(folder, "refs"))
            for d, _, ns in os.walk(os.path.join(folder, "refs")) for n in ns]
    return sorted(refs) + [s[:12] for s in _listdir(os.path.join(folder, "snapshots"))]


def _hub_error(e: Exception, repo: str, revision: str | None, spec: str) -> CheckpointError:
    """One line for whatever ``snapshot_download`` / ``list_repo_files`` raised."""
    from huggingface_hub import errors as hf

    rev = f" revision {revision!r} of" if revision else ""
    local = f"{spec}: no such local folder, and " if "/" in spec else ""
    cache = hub_cache_dir()
    token = "HF_TOKEN is set but its account has no access" if os.environ.get("HF_TOKEN") else "HF_TOKEN is not set"
    if isinstance(e, hf.GatedRepoError):
        return CheckpointError(f"{repo} is a gated repo ({token}): accept its conditions on "
                               f"https://huggingface.co/{repo} and set HF_TOKEN to a token of that account")
    if isinstance(e, hf.RevisionNotFoundError):
        return CheckpointError(f"{repo} has no revision {revision!r}: pass a branch, tag or commit hash that exists "
                               f"(ORG/NAME@REVISION)")
    if isinstance(e, hf.RepositoryNotFoundError):
        return CheckpointError(f"{local}there is no Hugging Face repo {repo!r} that this account can read "
                               f"({token}; a private repo needs a token)")
    if isinstance(e, hf.IncompleteSnapshotError):
        return CheckpointError(f"the Hugging Face cache ({cache}) holds only part of{rev} {repo} and HF_HUB_OFFLINE "
                               f"is set (or the Hub cannot be reached); unset HF_HUB_OFFLINE to finish the download")
    if isinstance(e, hf.LocalEntryNotFoundError):
        cached = _cached_revisions(repo)
        if hub_offline():
            if cached:
                return CheckpointError(f"{revision or 'main'!r} of {repo} is not in the Hugging Face cache ({cache}) "
                                       f"and HF_HUB_OFFLINE is set (cached: {', '.join(cached)}); pass one of those as "
                                       f"{repo}@REVISION, or unset HF_HUB_OFFLINE to download it")
            return CheckpointError(f"{local}{repo}{' @' + revision if revision else ''} is not in the Hugging Face "
                                   f"cache ({cache}) and HF_HUB_OFFLINE is set; unset HF_HUB_OFFLINE to download it, "
                                   f"or set HF_HOME / HF_HUB_CACHE to the cache that holds it")
        return CheckpointError(f"{local}{repo} could not be fetched (the Hugging Face Hub cannot be reached) and is "
                               f"not in the Hugging Face cache ({cache}); check the connection or set HF_HUB_OFFLINE=1 "
                               f"with a cache that holds it")
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return CheckpointError(f"fetching{rev} {repo} from the Hugging Face Hub failed: {first}")


def _download(repo: str, revision: str | None, patterns: list[str], spec: str) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo, revision=revision, allow_patterns=patterns, cache_dir=hub_cache_dir(),
                                 local_files_only=hub_offline(), token=os.environ.get("HF_TOKEN") or None)
    except CheckpointError:
        raise
    except (OSError, ValueError) as e:  # huggingface_hub's errors are OSError / ValueError subclasses
        raise _hub_error(e, repo, revision, spec) from None


def _repo_files(repo: str, commit: str, snapshot: str, spec: str) -> list[str]:
    """Every file of the repo at ``commit`` (offline: those in the cached snapshot)."""
    if hub_offline():
        return local_files(snapshot)
    from huggingface_hub import HfApi

    try:
        return sorted(HfApi(token=os.environ.get("HF_TOKEN") or None).list_repo_files(repo, revision=commit))
    except (OSError, ValueError) as e:
        raise _hub_error(e, repo, commit, spec) from None


def fetch_snapshot(repo: str, revision: str | None, variant: str | None, *, spec: str, log=_stderr
                   ) -> tuple[str, str, str, list[str]]:
    """Fetch what converting ``repo`` needs: ``(snapshot folder, commit hash, kind, [needed files])``."""
    snapshot = _download(repo, revision, list(SMALL_FILES), spec)
    commit = os.path.basename(os.path.normpath(snapshot))
    where = f"{repo}@{revision or 'main'} ({commit[:12]})"
    kind, need = needed_files(snapshot, _repo_files(repo, commit, snapshot, spec), variant, where=where)
    missing = [f for f in need if not os.path.isfile(os.path.join(snapshot, f))]
    if missing:
        log(f"fetching {len(missing)} file(s) of {where} into the Hugging Face cache ({hub_cache_dir()})")
        snapshot = _download(repo, commit, need, spec)
        missing = [f for f in need if not os.path.isfile(os.path.join(snapshot, f))]
        if missing:
            raise CheckpointError(f"{where}: the Hugging Face cache lacks {', '.join(missing[:6])}"
                                  f"{' ...' if len(missing) > 6 else ''} and HF_HUB_OFFLINE is set; unset it to "
                                  f"download them")
    return snapshot, commit, kind, need


# ----------------------------------------------------------------------------- resolving


def _convert(kind: str, src: str, out: str, *, dtype: str | None, variant: str | None, log, **meta) -> None:
    if kind == VILA_U:
        from fairjax.convert import vila_u as vila_u_convert

        vila_u_convert.convert_vila_u(src, out, dtype=dtype, log=log, **meta)
    else:
        from fairjax.convert import pipeline

        pipeline.convert_folder(src, out, dtype=dtype, variant=variant, log=log, link=True, **meta)


def _convert_once(kind: str, src: str, key: str, *, cache: bool, dtype, variant, log, what: str, **meta) -> str:
    if not cache:
        tmp = tempfile.mkdtemp(prefix="fairjax-model-")
        atexit.register(shutil.rmtree, tmp, True)
        out = os.path.join(tmp, "model")
        log(f"converting {what} into {out} (--no-cache: removed at exit)")
        _convert(kind, src, out, dtype=dtype, variant=variant, log=log, **meta)
        return out

    def build(entry: str) -> None:
        log(f"converting {what} into the model cache: {entry} (once; later runs load it)")
        _convert(kind, src, entry, dtype=dtype, variant=variant, log=log, **meta)

    entry, _ = cache_lib.ensure_entry(key, build, log=log, what=what)
    return entry


def resolve_folder(path: str, *, variant: str | None = None, dtype: str | None = None, cache: bool = True,
                   log=_stderr) -> str:
    """A local folder -> a fairjax model dir: itself, or its conversion (cached by path and file fingerprints).
    A folder of no known kind is returned as is: the command's loader then says what it lacks."""
    kind = folder_kind(path)
    if kind in (FAIRJAX, None):
        return path
    real = os.path.realpath(path)
    _, need = needed_files(real, local_files(real), variant, where=path)
    payload = {"source": real, "kind": kind, "dtype": dtype, "variant": variant,
               "files": {f: cache_lib.file_fingerprint(os.path.join(real, f)) for f in need}}
    key = cache_lib.entry_key(os.path.basename(real), payload)
    return _convert_once(kind, real, key, cache=cache, dtype=dtype, variant=variant, log=log, what=path)


def resolve_hub(repo: str, revision: str | None = None, *, variant: str | None = None, dtype: str | None = None,
                cache: bool = True, spec: str | None = None, log=_stderr) -> str:
    """A Hugging Face repo id -> a fairjax model dir (fetched and converted once; see the module docstring)."""
    spec = spec or repo + (f"@{revision}" if revision else "")
    snapshot, commit, kind, need = fetch_snapshot(repo, revision, variant, spec=spec, log=log)
    payload = {"repo": repo, "commit": commit, "kind": kind, "dtype": dtype, "variant": variant,
               "files": {f: cache_lib.file_fingerprint(os.path.join(snapshot, f)) for f in need}}
    key = cache_lib.entry_key(f"{repo.replace('/', '--')}--{commit[:12]}", payload)
    return _convert_once(kind, snapshot, key, cache=cache, dtype=dtype, variant=variant, log=log, what=spec,
                         hub={"repo": repo, "revision": revision or "main", "commit": commit})


def resolve_model(spec: str, *, variant: str | None = None, dtype: str | None = None, cache: bool = True,
                  log=_stderr) -> str:
    """``spec`` (a folder or ``ORG/NAME[@REVISION]``) -> the path of a fairjax model dir (module docstring).

    ``variant``: the weight files to use (``fp16``, ``bf16``; default plain, else fp16, else bf16);
    ``dtype``: the stored param dtype of a conversion (``float32``, ``bfloat16``, ``float16``; default as in the
    source); ``cache=False``: convert into a temporary folder removed at exit.
    """
    spec = os.fspath(spec)
    if not spec:
        raise CheckpointError("no model given: pass a fairjax model dir, a diffusers folder or a Hugging Face repo id")
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        return resolve_folder(path, variant=variant, dtype=dtype, cache=cache, log=log)
    if os.path.exists(path):
        raise CheckpointError(f"{spec}: a file, not a model folder; pass a fairjax model dir, a diffusers folder or a "
                              f"Hugging Face repo id (ORG/NAME[@REVISION])")
    m = HUB_ID.fullmatch(spec)
    if m is None:
        raise CheckpointError(f"{spec}: model directory not found, and not a Hugging Face repo id (ORG/NAME[@REVISION])")
    return resolve_hub(m["repo"], m["rev"], variant=variant, dtype=dtype, cache=cache, spec=spec, log=log)


def add_model_args(parser) -> None:
    """``--variant`` and ``--no-cache``, the options every command with a model argument takes."""
    parser.add_argument("--variant", default=None, choices=VARIANTS,
                        help="weight files to read from a diffusers folder or hub repo (default: plain, else fp16)")
    parser.add_argument("--no-cache", action="store_true",
                        help="convert a model that is not in fairjax format into a temporary folder instead of the "
                             f"model cache (${cache_lib.CACHE_ENV}, default ~/.cache/fairjax)")


def resolve_args(spec: str | None, args) -> str | None:
    """:func:`resolve_model` with a command's ``--variant`` / ``--no-cache`` (None stays None)."""
    if spec is None:
        return None
    return resolve_model(spec, variant=getattr(args, "variant", None), cache=not getattr(args, "no_cache", False))


def main(argv: list[str] | None = None) -> int:
    """``python -m fairjax.convert.resolve SPEC [--variant fp16] [--no-cache]``: print the model dir's path."""
    import argparse

    from fairjax.errors import UserError

    p = argparse.ArgumentParser(prog="python -m fairjax.convert.resolve", description=main.__doc__)
    p.add_argument("spec", help="fairjax model dir, diffusers / vila-u folder, or ORG/NAME[@REVISION]")
    add_model_args(p)
    args = p.parse_args(argv)
    try:
        print(resolve_args(args.spec, args))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
