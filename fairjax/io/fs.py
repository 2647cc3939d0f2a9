"""Outputs that lose nothing: overlap guards, run locks, the operating system's refusals as one line,
temp names that a later run can clean up.

Every command calls these before it reads anything heavy (paths in, a one-line
:class:`~fairjax.errors.OutputError` out):

* :func:`check_disjoint` -- an output that equals, contains or is inside an input is refused. Paths are
  compared after ``realpath`` (a symlink into a model dir counts as the model dir), so
  ``--out M --overwrite`` can never delete the model ``M`` it reads.
* :func:`check_output` -- the output checks of a command in one call: disjoint from the inputs, absent
  unless ``overwrite``, not a file where a folder goes (or the reverse), and on a file system that
  accepts a write (a probe folder made and removed in the nearest existing parent).
* :class:`PathLock` / :func:`locked` -- a lock file ``{"pid", "host", "start", "since", "argv"}`` held
  while a run writes a workdir (``<workdir>/.lock``) or an output (``<parent>/.<name>.lock``). It is
  created atomically (written beside, then hard-linked into place), removed on release, and a second
  run gets a one-line refusal naming the holder. A lock whose pid is dead on this host (or reused
  by another process: ``start`` is the process start time from ``/proc``) is stale and taken over;
  a lock from another host is never broken here (the message says to remove it by hand).
* :func:`error_line` -- ``error: <message>`` for a :class:`UserError` or an operating-system refusal
  (permission, read-only file system, disk full, a folder where a file goes, ...); None for anything
  else, which is a bug and keeps its traceback.
* :func:`run_entry` -- an entry point's body run to its exit status: :func:`exit_status` for a stop signal,
  bad input or Ctrl-C; a bug keeps its traceback.
* :func:`temp_path` / :func:`remove_stale_temps` -- temp names ``.<name>.tmp-<pid>-<host>`` (and
  ``.old-``); a later run removes those whose process is dead on this host.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import sys
import time

from fairjax.errors import Interrupted, OutputError, UserError

LOCK_NAME = ".lock"  # inside a workdir

# ----------------------------------------------------------------------------- paths


def resolve(path: str | os.PathLike) -> str:
    """Absolute path with ``~`` expanded and every symlink followed (also for a path not there yet)."""
    return os.path.realpath(os.path.abspath(os.path.expanduser(os.fspath(path))))


def relation(a: str | os.PathLike, b: str | os.PathLike) -> str | None:
    """``'equals'``, ``'is inside'``, ``'contains'`` or None: where resolved path ``a`` sits relative to ``b``."""
    a, b = resolve(a), resolve(b)
    if a == b:
        return "equals"
    if os.path.commonpath([a, b]) == b:
        return "is inside"
    if os.path.commonpath([a, b]) == a:
        return "contains"
    return None


def check_disjoint(outputs: dict[str, str | None], inputs: dict[str, str | None]) -> None:
    """Refuse an output that equals, contains or is inside an input (``{flag: path}``; None / "" skipped).

    Writing into an input, or replacing a folder that holds one (``--overwrite``), would destroy it.
    """
    for oname, out in outputs.items():
        if not out:
            continue
        for iname, inp in inputs.items():
            if not inp:
                continue
            rel = relation(out, inp)
            if rel is not None:
                raise OutputError(f"{oname} {out} {rel} {iname} {inp}: writing it would overwrite that input; "
                                  f"choose an output outside every input")


def nearest_existing(path: str) -> str:
    """``path`` or its nearest ancestor that exists."""
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def probe_writable(path: str, what: str = "output", inside: bool = False) -> None:
    """Raise a one-line :class:`OutputError` unless a folder can be created beside ``path`` (``inside``: in
    it, for a workdir that exists), or in the nearest existing ancestor; the probe is removed at once."""
    base = nearest_existing(os.path.abspath(path) if inside else os.path.dirname(os.path.abspath(path)) or ".")
    if not os.path.isdir(base):
        raise OutputError(f"cannot write {what} {path}: {base} is a file, not a folder")
    probe = os.path.join(base, f".fairjax-probe-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.mkdir(probe)
    except OSError as e:
        raise OutputError(f"cannot write {what} {path}: {_reason(e)} ({base}); {_advice(e, what)}") from None
    os.rmdir(probe)


def check_output(path: str, *, what: str = "--out", kind: str = "dir", overwrite: bool = False,
                 inputs: dict[str, str | None] | None = None, must_be_new: bool = True) -> str:
    """The output checks of a command, before anything heavy is read; returns the absolute path.

    ``kind``: ``'dir'`` (a folder is written) or ``'file'``; ``must_be_new``: an existing path is refused
    unless ``overwrite`` (False for a workdir, which a re-run resumes).
    """
    if not path:
        raise OutputError(f"{what} is empty; pass a path")
    check_disjoint({what: path}, inputs or {})
    if os.path.lexists(path):
        if kind == "dir" and not os.path.isdir(path):
            raise OutputError(f"{what} {path} is a file, not a folder; pass a folder path")
        if kind == "file" and os.path.isdir(path):
            raise OutputError(f"{what} {path} is a folder; pass a file path")
        if must_be_new and not overwrite:
            raise OutputError(f"{path} already exists; choose another {what} or pass --overwrite")
    probe_writable(path, what, inside=not must_be_new)
    return os.path.abspath(path)


# ----------------------------------------------------------------------------- processes


def this_host() -> str:
    return socket.gethostname()


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one of another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def process_start(pid: int) -> str | None:
    """The start time of ``pid`` (clock ticks since boot, field 22 of ``/proc/<pid>/stat``), None off Linux:
    tells a live process from a later one that got the same pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


def owner_gone(pid: int, host: str | None, start: str | None = None) -> bool:
    """A temp or lock of process ``pid`` on ``host`` (None: this host) whose process is gone. Another
    host's are never judged gone: its processes cannot be seen from here."""
    if host not in (None, this_host()):
        return False
    if pid == os.getpid():
        return False
    if not pid_alive(pid):
        return True
    return start is not None and process_start(pid) not in (None, start)


# ----------------------------------------------------------------------------- temp names


_TEMP = re.compile(r"^\.?(?P<base>.+)\.(?P<tag>tmp|old)-(?P<pid>\d+)(?:-(?P<host>[A-Za-z0-9._-]+))?$")


def temp_path(path: str, tag: str = "tmp") -> str:
    """``<dir>/.<name>.<tag>-<pid>-<host>``: a hidden sibling of ``path`` that names its writer."""
    path = os.path.abspath(path)
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{tag}-{os.getpid()}-{this_host()}")


def remove_stale_temps(path: str) -> list[str]:
    """Remove the temp files / folders of ``path`` (``.<name>.tmp-<pid>[-<host>]``, ``.old-``, and the
    older ``<name>.tmp-<pid>``) whose process is dead on this host; returns what was removed."""
    path = os.path.abspath(path)
    folder, name = os.path.dirname(path), os.path.basename(path)
    try:
        entries = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for entry in entries:
        m = _TEMP.match(entry)
        if not m or m["base"] != name:
            continue
        if not owner_gone(int(m["pid"]), m["host"]):
            continue
        full = os.path.join(folder, entry)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(full)
        removed.append(full)
    return removed


# ----------------------------------------------------------------------------- locks


_HELD: dict[str, int] = {}  # lock file -> depth: re-entrant within one process


def lock_file_for(target: str, inside: bool = False) -> str:
    """``<target>/.lock`` (``inside``: a workdir) or ``<parent>/.<name>.lock`` (an output written by rename)."""
    target = os.path.abspath(target)
    if inside:
        return os.path.join(target, LOCK_NAME)
    return os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.lock")


def read_lock(lock_file: str) -> dict | None:
    """The holder a lock file names, None when there is none (or it cannot be parsed)."""
    try:
        with open(lock_file) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("pid"), int) else None


def _holder_text(info: dict | None) -> str:
    if info is None:
        return "an unreadable lock"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info.get("since", 0))))
    return f"pid {info['pid']} on {info.get('host', '?')} since {since}"


class PathLock:
    """A lock file held while this process writes ``target`` (see the module docstring).

    ``acquire`` raises a one-line :class:`OutputError` when a live run holds it; ``release`` removes the
    file (only if it is still this process's) and any parent folder the lock had to create, if empty.
    """

    def __init__(self, target: str, *, inside: bool = False, what: str = "output"):
        self.target = os.path.abspath(target)
        self.lock_file = lock_file_for(self.target, inside)
        self.what = what
        self.info: dict | None = None
        self._made: list[str] = []

    def acquire(self) -> PathLock:
        if self.lock_file in _HELD:
            _HELD[self.lock_file] += 1
            return self
        self._make_parents()
        self.info = {"pid": os.getpid(), "host": this_host(), "start": process_start(os.getpid()),
                     "since": time.time(), "argv": [os.path.basename(sys.argv[0])] + sys.argv[1:8]}
        deadline = time.monotonic() + 10.0
        while True:
            if self._create():
                _HELD[self.lock_file] = 1
                return self
            holder = read_lock(self.lock_file)
            if holder is not None and owner_gone(holder["pid"], holder.get("host"), holder.get("start")):
                self._break(holder)
                continue
            if holder is None and self._unreadable_for(5.0):
                self._break(None)
                continue
            if holder is None and time.monotonic() < deadline:  # being written or just removed: look again
                time.sleep(0.05)
                continue
            self._undo_parents()
            raise OutputError(
                f"{self.what} {self.target} is in use by another run ({_holder_text(holder)}; lock "
                f"{self.lock_file}); wait for it to finish, or delete the lock file if that run is gone")

    def release(self) -> None:
        depth = _HELD.get(self.lock_file, 0)
        if depth > 1:
            _HELD[self.lock_file] = depth - 1
            return
        _HELD.pop(self.lock_file, None)
        held = read_lock(self.lock_file)
        if held is not None and self.info is not None and (held["pid"], held.get("since")) == (
                self.info["pid"], self.info["since"]):
            with contextlib.suppress(OSError):
                os.remove(self.lock_file)
        self._undo_parents()

    def __enter__(self) -> PathLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # -- internals

    def _make_parents(self) -> None:
        folder = os.path.dirname(self.lock_file)
        missing = []
        while not os.path.lexists(folder):
            missing.append(folder)
            folder = os.path.dirname(folder)
        try:
            for d in reversed(missing):
                os.mkdir(d)
                self._made.append(d)
        except OSError as e:
            self._undo_parents()
            raise OutputError(f"cannot write {self.what} {self.target}: {_reason(e)} ({e.filename}); "
                              f"{_advice(e, self.what)}") from None

    def _undo_parents(self) -> None:
        while self._made:
            d = self._made.pop()
            try:
                os.rmdir(d)
            except OSError:
                self._made.clear()

    def _create(self) -> bool:
        """Write the holder beside the lock, hard-link it into place: atomic, never half-written."""
        tmp = f"{self.lock_file}.{os.getpid()}-{time.monotonic_ns()}"
        try:
            with open(tmp, "w") as f:
                json.dump(self.info, f)
            try:
                os.link(tmp, self.lock_file)
                return True
            except FileExistsError:
                return False
            except OSError as e:  # no hard links here: exclusive create (a reader may see it empty briefly)
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                    raise
                try:
                    fd = os.open(self.lock_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "w") as f:
                    json.dump(self.info, f)
                return True
        except OSError as e:
            self._undo_parents()
            raise OutputError(f"cannot write {self.what} {self.target}: {_reason(e)} ({e.filename}); "
                              f"{_advice(e, self.what)}") from None
        finally:
            with contextlib.suppress(OSError):
                os.remove(tmp)

    def _unreadable_for(self, seconds: float) -> bool:
        try:
            return time.time() - os.stat(self.lock_file).st_mtime > seconds
        except OSError:
            return False

    def _break(self, holder: dict | None) -> None:
        """Remove a stale lock under a short-lived guard, if it still names the same dead holder."""
        guard = self.lock_file + ".break"
        try:
            fd = os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            with contextlib.suppress(OSError):
                if time.time() - os.stat(guard).st_mtime > 30:  # a breaker that died in between
                    os.remove(guard)
            time.sleep(0.02)
            return
        os.close(fd)
        try:
            now = read_lock(self.lock_file)
            same = (now is None and holder is None) or (
                now is not None and holder is not None and (now["pid"], now.get("since")) == (holder["pid"],
                                                                                              holder.get("since")))
            if same:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.lock_file)
        finally:
            os.remove(guard)


@contextlib.contextmanager
def locked(target: str, *, inside: bool = False, what: str = "output"):
    """Hold :class:`PathLock` on ``target`` for the block."""
    lock = PathLock(target, inside=inside, what=what).acquire()
    try:
        yield lock
    finally:
        lock.release()


# ----------------------------------------------------------------------------- the OS's refusals


_REFUSALS = {
    errno.EACCES: "permission denied", errno.EPERM: "operation not permitted", errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
    errno.ENOENT: "no such file or folder", errno.ENOTDIR: "a file where a folder is needed",
    errno.EISDIR: "a folder where a file is needed", errno.ENAMETOOLONG: "file name too long",
    errno.ELOOP: "too many levels of symbolic links", errno.EIO: "input/output error",
    errno.EFBIG: "file too large for the file system", errno.EMFILE: "too many open files",
    errno.ENFILE: "too many open files in the system", errno.ENOTEMPTY: "folder not empty",
    errno.EEXIST: "already exists", errno.EBUSY: "device or resource busy",
}
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def folder_fingerprint(path: str, whole_below: int = 4 << 20, edge: int = 1 << 20) -> str:
    """A sha256 over ``path``'s files: every relative name and size, the whole content of files smaller
    than ``whole_below`` bytes (a dataset's info and index files) and the first and last ``edge`` bytes of
    larger ones (its records). It changes when a dataset is rewritten with other content, at the cost
    of reading a few MiB per file, not the whole dataset."""
    import hashlib

    h = hashlib.sha256()
    root = os.path.abspath(path)
    for dirpath, dirnames, files in os.walk(root):
        dirnames.sort()
        for name in sorted(files):
            full = os.path.join(dirpath, name)
            size = os.path.getsize(full)
            h.update(f"{os.path.relpath(full, root)}\0{size}\0".encode())
            with open(full, "rb") as f:
                if size < whole_below:
                    h.update(f.read())
                else:
                    h.update(f.read(edge))
                    f.seek(size - edge)
                    h.update(f.read(edge))
    return h.hexdigest()


def human_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``."""
    n = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def free_bytes(path: str) -> int | None:
    try:
        return shutil.disk_usage(nearest_existing(path)).free
    except OSError:
        return None


def _reason(e: OSError) -> str:
    return _REFUSALS.get(e.errno, e.strerror or type(e).__name__)


def _advice(e: OSError, what: str = "output") -> str:
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"choose a writable {what} path or fix its permissions"
    if e.errno in DISK_FULL:
        return "free some space or write elsewhere"
    if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR):
        return "check the path"
    return "check the path and the file system"


def disk_full_message(e: OSError, target: str, written: int = 0) -> str:
    """The one line for a disk that filled up while ``target`` was written: how much was needed
    (what had been written, plus the size of the file that did not fit when the writer knows it:
    ``e.needed``) and how much is free."""
    needed = int(getattr(e, "needed", 0) or 0)
    total = written + needed
    parts = []
    if written:
        parts.append(f"{human_bytes(written)} written before the disk filled")
    if needed:
        parts.append(f"{human_bytes(needed)} for {getattr(e, 'needed_for', None) or e.filename or 'the next file'}")
    free = free_bytes(target)
    free_text = f"{human_bytes(free)} free" if free is not None else "free space unknown"
    need_text = f"needs at least {human_bytes(total)} ({' + '.join(parts)})" if total else "needs more space"
    return (f"disk full writing {target}: {_reason(e)}; it {need_text}, {free_text} there now (the partial output "
            f"was removed); free some space or write elsewhere")


def os_error_message(e: OSError) -> str | None:
    """One line for an operating-system refusal (see ``_REFUSALS``), None for anything else."""
    if not isinstance(e, OSError) or e.errno not in _REFUSALS:
        return None
    where = e.filename if e.filename is not None else "a file"
    if e.errno in DISK_FULL:
        return disk_full_message(e, os.fspath(where))
    extra = f" -> {e.filename2}" if getattr(e, "filename2", None) else ""
    return f"{where}{extra}: {_reason(e)}; {_advice(e, 'path')}"


def error_line(e: BaseException) -> str | None:
    """``error: <message>`` for a :class:`UserError` or an OS refusal; None (a bug: re-raise it) otherwise."""
    if isinstance(e, UserError):
        text = str(e)
    elif isinstance(e, OSError):
        text = os_error_message(e)
        if text is None:
            return None
    else:
        return None
    return "error: " + " ".join(text.split())  # one line, whatever the message held


def exit_status(e: BaseException) -> int | None:
    """What an entry point does with the failure that ends it: a stop signal (:class:`~fairjax.errors.Interrupted`)
    prints its one line and gives 128 + the signal's number; a :class:`UserError` or an OS refusal prints
    :func:`error_line` and gives 2; anything else is a bug: None, re-raise it.

    A ``KeyboardInterrupt`` is Ctrl-C in a tool without a :class:`~fairjax.io.preemption.PreemptionGuard`
    (the conversion and export tools, which write through :func:`fairjax.io.model_dir.atomic_output_dir`
    and so keep nothing partial): one line and 130."""
    if isinstance(e, Interrupted):
        line, code = str(e), e.exit_code
    elif isinstance(e, KeyboardInterrupt):
        line, code = "stopped by SIGINT (Ctrl-C) before the output was complete; nothing partial was kept", 130
    else:
        line, code = error_line(e), 2
        if line is None:
            return None
    print(line, file=sys.stderr)
    return code


def run_entry(body, *, guard: bool = True) -> int:
    """An entry point's body run to its exit status, with the failure handling of every command in one place.

    ``body()`` does the work and returns its exit status (None: 0). How it ends is :func:`exit_status`'s: a
    :class:`~fairjax.errors.Interrupted`, a :class:`UserError`, an operating-system refusal or (``guard=False``)
    a ``KeyboardInterrupt`` is one line and its code; anything else is a bug and keeps its traceback.

    ``guard=True`` (the jobs: train, generate, evaluate, build_prefs, the analyses) runs ``body`` inside a
    :class:`~fairjax.io.preemption.PreemptionGuard`: SIGTERM / SIGINT become a flag that the job's loops poll,
    and it stops at the next safe point (128 + the signal's number). ``guard=False`` is for the conversion and
    export tools, which have no such points and write through a temp folder that a rename publishes: the
    default signal handling stops them where they are, with nothing partial kept (Ctrl-C: 130)."""
    from fairjax.io.preemption import PreemptionGuard

    stops = (Interrupted, UserError, OSError) + (() if guard else (KeyboardInterrupt,))
    try:
        with PreemptionGuard() if guard else contextlib.nullcontext():
            code = body()
    except stops as e:  # under the guard a KeyboardInterrupt is Ctrl-C pressed twice: a hard stop, traceback kept
        code = exit_status(e)
        if code is None:
            raise
    return 0 if code is None else code


#: the environment variable that moves fairjax's cache (models, traced shapes)
CACHE_ENV = "FAIRJAX_CACHE_DIR"


def cache_root() -> str:
    """``$FAIRJAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/fairjax``, else ``~/.cache/fairjax`` (not created)."""
    root = os.environ.get(CACHE_ENV)
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                            "fairjax")
    return os.path.abspath(os.path.expanduser(root))
