"""Subprocess entry for the trainer tests: train the toy MLP task once.

  python tests/_multihost_worker.py --workdir W [--steps 3] [--batch 16] [--mesh 2,2,1]
      [--every 1] [--sleep 0] [--devices 4] [--out DIR] [--hidden 16]

Run alone (one process) or under ``launch/local_multiprocess.sh`` (which sets
FAIRJAX_COORDINATOR / FAIRJAX_NUM_PROCESSES / FAIRJAX_PROCESS_ID and XLA_FLAGS).
Process 0 writes ``final_params.npz`` to ``--out`` (default: the workdir) and prints
the summary as a JSON line starting with ``SUMMARY``.  Every process writes its pid to
``<workdir>/pid_<process index>`` (so a test can signal one of them); a run stopped by a
signal exits with 128 + its number, as ``python -m fairjax.train`` does.
"""

import argparse
import json
import os
import sys


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", default=None)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--mesh", default="-1,1,1")
    p.add_argument("--every", type=int, default=0)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--devices", type=int, default=None)
    p.add_argument("--async-ckpt", action="store_true")
    p.add_argument("--hidden", type=int, default=16, help="MLP width (large: shards too big to be inlined on disk)")
    a = p.parse_args()
    if a.devices and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={a.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

    from fairjax import parallel

    parallel.initialize_distributed(required=False)
    import jax

    from _toy_task import ToyTask, toy_config

    d, f, t = (int(x) for x in a.mesh.split(","))
    cfg = toy_config(total_steps=a.steps, batch_size=a.batch)
    cfg.mesh = dict(data=d, fsdp=f, tensor=t)
    cfg.checkpoint.every_steps = a.every
    cfg.checkpoint["async"] = a.async_ckpt
    from fairjax import trainer

    from fairjax.checkpoint import PreemptionGuard
    from fairjax.errors import Interrupted

    os.makedirs(a.workdir, exist_ok=True)
    with open(os.path.join(a.workdir, f"pid_{jax.process_index()}"), "w") as f:
        f.write(str(os.getpid()))
    task = ToyTask(cfg, hidden=a.hidden, sleep=a.sleep, out_dir=a.out)
    with PreemptionGuard():
        summary = trainer.train(cfg, task, a.workdir)
    if jax.process_index() == 0:
        print("SUMMARY " + json.dumps(summary, default=str), flush=True)
    if summary["preempted"]:
        print(summary["message"], file=sys.stderr, flush=True)
        sys.exit(Interrupted("", summary["signal"]).exit_code)


if __name__ == "__main__":
    main()
