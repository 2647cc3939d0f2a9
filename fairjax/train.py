"""``python -m fairjax.train --config FILE[:preset] --workdir DIR [--config.key=value ...]``

Thin by design: config -> task (model adapter + data + loss) -> the generic
sharded loop in :mod:`fairjax.trainer`. The resolved config is saved as
``DIR/config.json``; re-running in the same ``DIR`` resumes from its last
checkpoint and must resolve to the same config (``--allow-config-change``
resumes anyway and records the new one beside it; a ``DIR`` with no checkpoint
yet takes the new config). The dataset's files are fingerprinted at the start
(``DIR/data_fingerprint.json``): a resume on a dataset rebuilt in place since is refused
(``--allow-config-change`` goes on with it). Checkpoints another model saved (other keys or shapes) are refused in
one line naming the first differing keys, and the config files in ``DIR`` are left as they were.

Before anything is built or compiled: every config value is checked against its
range (:data:`fairjax.trainer.TRAIN_RANGES` and the task's ``RANGES``; one line
naming each bad key, its value and its range, and no ``config.json`` written), the
mesh must fit the devices and the batch divide over it (:func:`fairjax.trainer.check_mesh`),
``DIR`` must be a writable folder that neither equals, contains nor sits inside
``model.dir``, ``data.path``, ``lora.init`` or the config file, and ``DIR/.lock``
(pid and host of the run holding it) refuses a second run on the same ``DIR``.

``model.dir`` may be a fairjax model dir, a diffusers / vila-u folder or a Hugging Face repo id
(``ORG/NAME[@REVISION]``, ``--variant fp16``), converted once into the model cache
(:mod:`fairjax.convert.resolve`; ``--no-cache``: into a temporary folder).

SIGTERM / SIGINT stop the run at the next step boundary after a checkpoint is saved: one line says
where, the exit status is 128 + the signal number (143 / 130), and re-running resumes.

Multi-host: run the same command on every host; ``--distributed`` (or the
launch scripts in ``launch/``) calls ``jax.distributed.initialize()`` first.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from fairjax.errors import NonFiniteLossError, UserError
from fairjax.io import fs, host


def parse_args(argv):
    from fairjax.config import split_overrides
    from fairjax.convert.resolve import add_model_args

    rest, overrides = split_overrides(argv)
    p = argparse.ArgumentParser(
        prog="python -m fairjax.train",
        description="Fine-tune with PopAlign / Diffusion-DPO / SFT / BPO / DPO / mDPO from an ml_collections config.",
        epilog="Override any config key with --config.KEY=VALUE (e.g. --config.beta=2.0).",
    )
    p.add_argument("--config", required=True, help="config file, optionally with a preset: configs/popalign_mog.py:sft")
    p.add_argument("--workdir", required=True, help="where checkpoints, metrics and outputs go; re-use it to resume")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume a workdir whose saved config (or dataset) differs from this one")
    p.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() first (multi-host; see launch/)")
    add_model_args(p)
    return p.parse_args(rest), overrides


def run(argv=None) -> dict:
    """Parse ``argv``, train, and return the task's summary (raises UserError on bad input)."""
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if args.distributed:
        from fairjax import parallel

        parallel.initialize_distributed()
    import jax

    from fairjax import parallel

    parallel.enable_compilation_cache()

    from fairjax import config as config_lib
    from fairjax import tasks, trainer

    cfg = config_lib.load_config_file(args.config)
    config_lib.apply_overrides(cfg, overrides)
    trainer.validate_config(cfg, tasks.ranges(cfg))
    trainer.check_mesh(cfg)
    check_workdir(args.workdir, cfg, args.config)
    main_process = jax.process_index() == 0
    with fs.locked(args.workdir, inside=True, what="--workdir") if main_process else contextlib.nullcontext():
        spec = str(cfg.model.get("dir", "")) if "model" in cfg else ""
        if spec:  # a diffusers folder or repo id is converted once; the saved config keeps what was given
            from fairjax.convert.resolve import resolve_args

            cfg.model.dir = resolve_args(spec, args)
        task = tasks.build(cfg, workdir=args.workdir)
        before = _config_files(args.workdir) if main_process else None
        if main_process:
            saved = cfg
            if spec and cfg.model.dir != spec:
                saved = cfg.copy_and_resolve_references()
                saved.model.dir = spec
            resumable = has_checkpoint(args.workdir)
            fingerprint = task.data_fingerprint() if hasattr(task, "data_fingerprint") else None
            data_changed = check_data(args.workdir, fingerprint, resumable, args.allow_config_change)
            changed = config_lib.check_or_save(saved, args.workdir, args.allow_config_change, resumable=resumable)
            if changed:
                print(f"note: resuming {args.workdir} with a changed config: {', '.join(changed)}", file=sys.stderr)
            if data_changed:
                print(f"note: resuming {args.workdir} on a dataset that changed since the run started", file=sys.stderr)
            if fingerprint:
                _write_fingerprint(args.workdir, fingerprint, str(cfg.data.path))
        try:
            return trainer.train(cfg, task, args.workdir)
        except UserError as e:  # refused in the set-up (the checkpoints do not fit): the config files as they were
            if before is not None and not isinstance(e, NonFiniteLossError) and _steps(args.workdir) == before[0]:
                _put_back(args.workdir, before[1])
            raise


#: the dataset's fingerprint at the run's start (:func:`check_data`)
DATA_FILE = "data_fingerprint.json"

#: the files :func:`fairjax.config.check_or_save` and :func:`check_data` write into the workdir
CONFIG_FILES = ("config.json", "config.resumed.json", DATA_FILE)


def check_data(workdir: str, fingerprint: str | None, resumable: bool, allow_change: bool) -> bool:
    """Refuse to resume a run whose dataset files changed since it started (a preference set rebuilt in
    place): the saved fingerprint (``DIR/data_fingerprint.json``) against ``fingerprint``. Returns whether
    it changed (only with ``allow_change``); writes nothing."""
    path = os.path.join(workdir, DATA_FILE)
    if not (fingerprint and resumable and os.path.exists(path)):
        return False
    try:
        with open(path) as f:
            saved = json.load(f)
        old = saved["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{path} is unreadable; remove it to resume without the dataset check, or use a new "
                        "--workdir") from None
    if old == fingerprint:
        return False
    if not allow_change:
        raise UserError(f"the dataset of the run in {workdir} changed since it started ({saved.get('data_path')} "
                        f"holds other files than its fingerprint in {DATA_FILE}); resume with the data it started "
                        "with, use a new --workdir, or pass --allow-config-change to go on with the new data")
    return True


def _write_fingerprint(workdir: str, fingerprint: str, data_path: str) -> None:
    path = os.path.join(workdir, DATA_FILE)
    tmp = fs.temp_path(path)
    with open(tmp, "w") as f:
        json.dump({"fingerprint": fingerprint, "data_path": data_path}, f, indent=1)
    os.replace(tmp, path)


def _steps(workdir: str) -> list[str]:
    try:
        return sorted(name for name in os.listdir(os.path.join(workdir, "checkpoints")) if name.isdigit())
    except OSError:
        return []


def _config_files(workdir: str) -> tuple[list[str], dict]:
    """The workdir's checkpoint steps and config files (bytes, or None where absent) before this run."""
    saved = {}
    for name in CONFIG_FILES:
        try:
            with open(os.path.join(workdir, name), "rb") as f:
                saved[name] = f.read()
        except FileNotFoundError:
            saved[name] = None
    return _steps(workdir), saved


def _put_back(workdir: str, saved: dict) -> None:
    """Leave the config files as they were before a run that was refused before it saved a step (the
    workdir's checkpoints are another model's): a later run is judged against the old ones."""
    for name, data in saved.items():
        path = os.path.join(workdir, name)
        if data is None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            continue
        tmp = fs.temp_path(path)
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)


#: config keys that name what a run reads (the workdir may not overlap them)
INPUT_KEYS = ("model.dir", "data.path", "lora.init")


def check_workdir(workdir: str, cfg, config_spec: str) -> None:
    """``workdir`` is (or can become) a writable folder disjoint from every input the config names."""
    inputs = {"--config": config_spec.partition(":")[0]}
    for key in INPUT_KEYS:
        node = cfg
        for part in key.split("."):
            node = node.get(part) if hasattr(node, "get") else None
        if isinstance(node, str) and node:
            inputs[f"config.{key}"] = node
    fs.check_output(workdir, what="--workdir", must_be_new=False, inputs=inputs)


def has_checkpoint(workdir: str) -> bool:
    """Whether ``workdir/checkpoints`` holds a finished step (something to resume)."""
    try:
        return any(name.isdigit() for name in os.listdir(os.path.join(workdir, "checkpoints")))
    except OSError:
        return False


def main(argv=None) -> int:
    """Exit status: 0 trained, 2 bad input, 128 + the signal's number when SIGTERM / SIGINT stopped the
    run (after a checkpoint; a re-run resumes there)."""
    from fairjax.errors import Interrupted

    def body():
        summary = run(argv)
        print(json.dumps(summary, indent=2, default=str))
        if summary.get("preempted"):
            print(summary["message"], file=sys.stderr)
            return Interrupted("", summary["signal"]).exit_code
        return 0

    return fs.run_entry(body)


if __name__ == "__main__":
    from fairjax.io.preemption import PreemptionGuard

    with PreemptionGuard():  # a signal is a flag from here on, also while jax is imported; main's guard nests
        host.tune_allocator()  # glibc malloc tunables (re-executes once), synchronous CPU dispatch
        sys.exit(main())
