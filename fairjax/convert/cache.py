"""The model cache: where converted models live, how an entry is keyed, and the lock that lets two
processes ask for the same model at once.

    $FAIRJAX_CACHE_DIR/models/<key>/       a fairjax model dir (default root: $XDG_CACHE_HOME/fairjax,
                                          else ~/.cache/fairjax)

``<key>`` is ``<slug>-<hash>``: the slug names the source for a human (``ORG--NAME--<commit>`` for a
Hugging Face snapshot, the folder name for a local one), the hash (16 hex digits of a SHA-256) covers
everything the conversion reads and how: the snapshot's revision, a fingerprint of every file used
(:func:`file_fingerprint`), the dtype, the variant and :data:`CONVERTER_VERSION`. An entry is complete
once its folder exists: converters write into a temporary folder beside it and rename it into place
(:func:`fairjax.io.model_dir.atomic_output_dir`). :func:`ensure_entry` builds an entry under an
exclusive lock on ``models/.<key>.lock`` (:func:`exclusive_lock`), so a second process asking for the
same key waits for the first and then loads what it wrote; a later call finds the folder and reads it
without taking the lock or writing anything.

An entry converted without a dtype change holds no copy of the weights: each component has a
``params.link.json`` naming the source files (their size and mtime) and the tensors it reads from them,
transposed when used (:mod:`fairjax.io.linked`). Converting a 5 GB SDXL UNet then writes a few hundred KB,
and loading it maps the source as diffusers does. An entry whose linked sources are gone or changed is not
complete (:func:`is_complete`): asking for the model converts it again.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping

from fairjax.errors import CheckpointError

from fairjax.io.fs import CACHE_ENV, cache_root  # noqa: F401  (re-exported: the cache's root and its variable)

MODELS = "models"
#: bumped whenever a converter writes something different for the same source: old entries are not reused
CONVERTER_VERSION = 1


def models_root() -> str:
    """``cache_root()/models``, created; a folder that cannot be created or written is a one-line error."""
    root = os.path.join(cache_root(), MODELS)
    try:
        os.makedirs(root, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as e:
        raise CheckpointError(f"the model cache {root} is not writable ({e.strerror or e}); set {CACHE_ENV} to a "
                              f"writable folder, or pass --no-cache to convert into a temporary folder") from None
    return root


def file_fingerprint(path: str) -> str:
    """What identifies a file's content cheaply: the blob name of a Hugging Face cache snapshot file (a link to
    ``blobs/<sha256 or git sha1>``), else ``<size>:<mtime_ns>``."""
    if os.path.islink(path):
        target = os.readlink(path)
        if os.path.basename(os.path.dirname(target)) == "blobs":
            return os.path.basename(target)
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}"


def entry_key(slug: str, payload: Mapping) -> str:
    """``<slug>-<first 16 hex digits of sha256(payload as sorted JSON + CONVERTER_VERSION)>``."""
    blob = json.dumps({"converter": CONVERTER_VERSION, **payload}, sort_keys=True, default=str).encode()
    safe = "".join(c if c.isalnum() or c in "-_.@" else "-" for c in slug).strip(".-") or "model"
    return f"{safe[:80]}-{hashlib.sha256(blob).hexdigest()[:16]}"


@contextlib.contextmanager
def exclusive_lock(path: str, *, log=print, what: str = "") -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created) for the block; if another process holds it, say so
    once and wait. Released when the block ends or the process dies."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process that is converting {what or path} ...")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def is_complete(entry: str) -> bool:
    """The entry was written to the end, and every source file its linked components read is still as it was
    (a Hugging Face cache cleaned since, say: the entry is then converted again; :mod:`fairjax.io.linked`)."""
    from fairjax.io.linked import LINK_FILE, sources_intact
    from fairjax.io.model_dir import INDEX_FILE

    if not os.path.isfile(os.path.join(entry, INDEX_FILE)):
        return False
    links = glob.glob(os.path.join(glob.escape(entry), "*", LINK_FILE))
    return all(sources_intact(p) for p in links)


def ensure_entry(key: str, build: Callable[[str], object], *, log=print, what: str = "") -> tuple[str, bool]:
    """``(models_root()/key, built)``: the entry as it is when complete (``built`` False), else built now by
    ``build(entry)`` (which must write ``entry`` atomically) under :func:`exclusive_lock`. Temporary folders
    that a killed conversion of the same key left behind are removed first."""
    root = os.path.join(cache_root(), MODELS)
    entry = os.path.join(root, key)
    if is_complete(entry):
        return entry, False
    root = models_root()
    # its own file: ``.<key>.lock`` is the lock file the atomic write of the entry takes (fs.PathLock, which
    # would see this flock's empty file as a stale lock, wait 5 s and break it, letting a third process in)
    with exclusive_lock(os.path.join(root, f".{key}.convert.lock"), log=log, what=what or key):
        if is_complete(entry):  # another process finished it while this one waited
            return entry, False
        for stale in glob.glob(os.path.join(root, f".{key}.tmp-*")) + glob.glob(os.path.join(root, f".{key}.old-*")):
            shutil.rmtree(stale, ignore_errors=True)
        if os.path.isdir(entry):  # an incomplete folder (not written by fairjax's atomic rename): replace it
            shutil.rmtree(entry)
        build(entry)
    return entry, True
