"""Per-device training-state memory of fairjax.trainer under data / FSDP meshes vs a PyTorch AdamW reference.

  python bench/bench_memory.py [--devices 8] [--width 1024] [--layers 8] [--batch 64]

Model: an MLP of ``layers`` Dense(width) layers (GELU), the same in Flax and torch.
PyTorch reference (one process, CPU): params + grads + AdamW ``exp_avg``/``exp_avg_sq``
after one ``optimizer.step()``, summed from the tensors' storage.
fairjax: the bytes of the train state (params + AdamW mu/nu + step/rng) held by device 0
after one trainer step, and the compiled step's per-device argument + temp sizes
(``compiled.memory_analysis()``), for each mesh.  Expect ~1/fsdp of the torch state for
FSDP meshes and ~(params + 2 moments) / (params + grads + 2 moments) = 0.75 for pure data
parallelism (gradients are transient temporaries inside the jitted step).
Timings are not reported: 8 virtual CPU devices on a few cores say nothing about speed.
"""

import argparse
import os
import sys


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=64)
    a = p.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={a.devices}"

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np
    import torch

    from fairjax import parallel, trainer

    W, L, B = a.width, a.layers, a.batch

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i in range(L):
                x = nn.gelu(nn.Dense(W, dtype=jnp.float32, param_dtype=jnp.float32, name=f"layers_{i}")(x))
            return x

    class Task:
        config = ml_collections.ConfigDict()

        def init(self, rng):
            return MLP().init(rng, jnp.zeros((1, W)))["params"], {}

        def batch(self, step, pi, pc):
            x = np.random.default_rng([0, step]).normal(size=(B, W)).astype(np.float32)
            per = B // pc
            return {"x": x[pi * per:(pi + 1) * per]}

        def loss(self, params, frozen, batch, rng):
            return jnp.mean(MLP().apply({"params": params}, batch["x"]) ** 2), {}

        def finish(self, *a):
            return {}

    # --- torch reference
    tm = torch.nn.Sequential(*[m for _ in range(L) for m in (torch.nn.Linear(W, W), torch.nn.GELU())])
    opt = torch.optim.AdamW(tm.parameters(), lr=1e-3)
    tm(torch.randn(B, W)).pow(2).mean().backward()
    opt.step()
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    t_params = sum(nbytes(q) for q in tm.parameters())
    t_grads = sum(nbytes(q.grad) for q in tm.parameters())
    t_opt = sum(nbytes(v) for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0)
    torch_total = t_params + t_grads + t_opt
    mib = lambda b: b / 2**20  # noqa: E731
    print(f"model: {L} x Dense({W}) MLP, {t_params // 4:,} params; batch {B}; {a.devices} devices")
    print(f"torch AdamW state (params + grads + 2 moments): {mib(torch_total):9.2f} MiB")
    print(f"{'mesh':<24}{'state on dev0 MiB':>18}{'ratio':>8}{'step args MiB':>15}{'step temp MiB':>15}{'(args+temp)/torch':>19}")

    dev0 = jax.devices()[0]
    meshes = [dict(data=-1), dict(fsdp=-1), dict(data=2, fsdp=-1)]
    for mesh in meshes:
        cfg = trainer.default_train_config()
        cfg.mesh = mesh
        cfg.batch_size = B
        cfg.total_steps = 1
        s = trainer._Setup(cfg, Task(), "/tmp")
        state, frozen = s.initial(fresh=True)
        step = trainer.make_train_step(Task(), s.tx, s.schedule, 1, s.mesh)
        jitted = jax.jit(step, in_shardings=(s.state_sh, s.frozen_sh, parallel.batch_sharding(s.mesh)),
                         out_shardings=(s.state_sh, parallel.replicated(s.mesh)), donate_argnums=(0,))
        batch = parallel.global_batch(Task().batch(0, 0, 1), s.mesh)
        compiled = jitted.lower(state, frozen, batch).compile()
        state, _ = compiled(state, frozen, batch)
        on0 = sum(sh.data.nbytes for x in jax.tree.leaves(state) for sh in x.addressable_shards if sh.device == dev0)
        ma = compiled.memory_analysis()
        args = getattr(ma, "argument_size_in_bytes", float("nan"))
        temp = getattr(ma, "temp_size_in_bytes", float("nan"))
        name = "x".join(f"{k}={v}" for k, v in s.mesh.shape.items())
        print(f"{name:<24}{mib(on0):18.2f}{on0 / torch_total:8.3f}{mib(args):15.2f}{mib(temp):15.2f}"
              f"{(args + temp) / torch_total:19.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
