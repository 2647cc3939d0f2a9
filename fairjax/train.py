"""``python -m fairjax.train --config FILE[:preset] --workdir DIR [--config.key=value ...]``

Thin by design: config -> task (model adapter + data + loss) -> the generic
sharded loop in :mod:`fairjax.trainer`. The resolved config is saved as
``DIR/config.json``; re-running in the same ``DIR`` resumes from its last
checkpoint and must resolve to the same config (``--allow-config-change``
resumes anyway and records the new one beside it).

Multi-host: run the same command on every host; ``--distributed`` (or the
launch scripts in ``launch/``) calls ``jax.distributed.initialize()`` first.
"""

from __future__ import annotations

import argparse
import json
import sys

from fairjax.errors import UserError


def parse_args(argv):
    from fairjax.config import split_overrides

    rest, overrides = split_overrides(argv)
    p = argparse.ArgumentParser(
        prog="python -m fairjax.train",
        description="Fine-tune with PopAlign / Diffusion-DPO / SFT / BPO / DPO / mDPO from an ml_collections config.",
        epilog="Override any config key with --config.KEY=VALUE (e.g. --config.beta=2.0).",
    )
    p.add_argument("--config", required=True, help="config file, optionally with a preset: configs/popalign_mog.py:sft")
    p.add_argument("--workdir", required=True, help="where checkpoints, metrics and outputs go; re-use it to resume")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume a workdir whose saved config differs from this one")
    p.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() first (multi-host; see launch/)")
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
    task = tasks.build(cfg, workdir=args.workdir)
    if jax.process_index() == 0:
        changed = config_lib.check_or_save(cfg, args.workdir, args.allow_config_change)
        if changed:
            print(f"note: resuming {args.workdir} with a changed config: {', '.join(changed)}", file=sys.stderr)
    return trainer.train(cfg, task, args.workdir)


def main(argv=None) -> int:
    try:
        summary = run(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
