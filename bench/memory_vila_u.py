"""Per-device memory of BPO LoRA training of VILA-U 7B (vila-u-7b-256) under FSDP, on paper and compiled.

  python bench/memory_vila_u.py                  # analytic 7B table + compiled smaller config
  python bench/memory_vila_u.py --compile-7b     # also compile (not run) the 7B step at fsdp 8
  python bench/memory_vila_u.py --compile-7b --scan-layers   # the same with scanned layers
  python bench/memory_vila_u.py --compile-7b --layers 4 --peak --skip-small   # 7B width, 4 LLaMA layers,
                                                 # and what is live at XLA's peak (from its buffer dump)

1. Sizes from ``jax.eval_shape`` of the full-size modules (no weights), side by side with the
   PyTorch reference built on the ``meta`` device: transformers ``LlamaForCausalLM`` + PEFT
   ``LoraConfig(r=32, alpha=32, target q/k/v/o/gate/up/down)`` (ratio of parameter counts).
2. Analytic per-device bytes for ``fsdp`` = 1 / 4 / 8, with the depth head on all image
   positions at once and ``--head-chunk`` positions at a time (``model.head_chunk``) (mesh data x fsdp = 8 devices; the base is
   sharded over fsdp, the batch over all devices): bf16 frozen base, float32 LoRA + gradient +
   AdamW moments, and activations of 8 pairs (16 sequences of prompt + 255 image positions) per
   device with every LLaMA layer and depth-transformer block rematerialised (see
   :func:`activation_bytes` for the terms). The vision tower is not needed (codes are in the data).
3. ``jit(train_step).lower(...).compile().memory_analysis()`` of the real fairjax step
   (:func:`fairjax.trainer.make_train_step` on :class:`fairjax.tasks.vila_u_pref.VilaUPrefTask`'s
   BPO loss) for a smaller VILA-U (and with ``--compile-7b`` the 7B) on 8 virtual CPU devices,
   compile only, nothing allocated; printed next to the analytic model of the same config.
   XLA:CPU's buffer assignment is not XLA:GPU's (other fusions, no cuDNN attention), so the
   compiled numbers check the analytic model's order of magnitude, not a GPU's exact peak.
   ``--dropout 0`` compiles without the LoRA dropout (its masks are a fused hash, see
   :func:`fairjax.lora.hash_keep_mask`; ``jax.random.bernoulli`` masks cost
   0.7 GB at 4 layers and 2.1 GB at 8 layers of the smaller config on XLA:CPU).
4. Which GPU memory sizes fit the 7B run (analytic total <= 90% of the card).

Measured (2-core CPU box, see BENCHMARKS.md for the numbers): unrolled, the 7B step at fsdp 8 compiles
to ~8x the analytic bytes on XLA:CPU. ``--peak`` (XLA's live-range dump) shows why: the peak is in
the depth head's backward, where XLA:CPU's scheduler has already run the rematerialised forward of
most LLaMA layers (it depends only on the saved layer inputs) and holds all of it; XLA:CPU computes
the bf16 matmuls in float32, so those intermediates and a float32 copy of every frozen weight shard
are stored too. Remat itself works (without it the step needs ~4.6x more per layer). With
``--scan-layers`` (what ``model.scan_layers="auto"`` picks on accelerators) the loop recomputes one
layer at a time: the same step compiles to ~2x the analytic bytes, most of the rest being the float32
copies. Measure on a GPU before trusting the fit table.
"""

import argparse
import dataclasses
import os
import sys
import time

GIB = 2**30


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--pairs-per-device", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--compile-7b", action="store_true")
    p.add_argument("--head-chunk", type=int, default=64)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--layers", type=int, default=32, help="LLaMA layers of the compiled 7B-width step")
    p.add_argument("--peak", action="store_true", help="print what is live at the compiled 7B step's peak")
    p.add_argument("--skip-small", action="store_true", help="skip the smaller config's compiles")
    p.add_argument("--scan-layers", action="store_true",
                   help="compile with the LLaMA layers and depth-transformer blocks scanned (model.scan_layers)")
    a = p.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
    dump = None
    if a.peak:
        import tempfile

        dump = tempfile.mkdtemp(prefix="memory_vila_u_")
        os.environ["XLA_FLAGS"] += f" --xla_dump_to={dump} --xla_dump_hlo_as_text --xla_dump_hlo_module_re=step"
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

    full = vila_u_7b()
    sizes = param_counts(full)
    print("VILA-U 7B (vila-u-7b-256 shapes), parameters from jax.eval_shape:")
    for k, v in sizes.items():
        print(f"  {k:<14}{v:>16,}")
    lora_n = lora_count(full)
    print(f"  {'LoRA r32':<14}{lora_n:>16,}  (q/k/v/o/gate/up/down x {full.llm.config.num_hidden_layers} layers)")
    if not a.no_torch:
        t_base, t_lora = torch_reference_counts(full.llm.config)
        print(f"PyTorch reference (meta device, transformers LLaMA + PEFT LoRA): LLM {t_base:,}, LoRA {t_lora:,}; "
              f"fairjax / torch: LLM {sizes['llm'] / t_base:.6f}, LoRA {lora_n / t_lora:.6f}")

    shape = Shapes.of(full, a.pairs_per_device, a.prompt_len)
    print(f"\nAnalytic per-device memory, BPO LoRA, {a.pairs_per_device} pairs/device = {shape.rows} sequences of "
          f"{shape.seq} tokens (prompt {a.prompt_len} + {shape.n - 1} image positions), remat, bf16 base; "
          f"activations with the depth head on all {shape.n} positions at once | {a.head_chunk} at a time:")
    totals = {}
    print(f"{'fsdp':>5}{'base GiB':>10}{'LoRA+grad+Adam':>16}{'activations':>16}{'total GiB':>16}")
    for f in (1, 4, 8):
        base = sum(sizes.values()) * 2 / f
        state = lora_n * 4 * 4 / f  # params, grads, Adam mu, nu (float32)
        act = [activation_bytes(shape), activation_bytes(shape, a.head_chunk)]
        totals[f] = [base + state + x for x in act]
        print(f"{f:>5}{base / GIB:>10.2f}{state / GIB:>16.2f}{act[0] / GIB:>8.2f} |{act[1] / GIB:>6.2f}"
              f"{totals[f][0] / GIB:>8.2f} |{totals[f][1] / GIB:>6.2f}")
    print(f"\nWhich GPUs fit the 7B BPO run (analytic total <= 90% of the card; head_chunk 0 | {a.head_chunk}):")
    cards = [("24 GB (RTX 4090 / A10G)", 24), ("40 GB (A100-40G)", 40), ("48 GB (L40S / A6000)", 48),
             ("80 GB (A100-80G / H100)", 80), ("94 GB (H100 NVL)", 94), ("141 GB (H200)", 141)]
    print(f"{'GPU':<26}" + "".join(f"{'fsdp ' + str(f):>12}" for f in totals))
    yn = lambda x, gb: "yes" if x <= 0.9 * gb * 1e9 else "no"  # noqa: E731
    for name, gb in cards:
        print(f"{name:<26}" + "".join(f"{yn(t[0], gb) + ' | ' + yn(t[1], gb):>12}" for t in totals.values()))
    print("(JAX preallocates 75% of a GPU by default: set XLA_PYTHON_CLIENT_MEM_FRACTION=.95 on the smaller cards)")

    if not a.skip_small:
        small = vila_u_small(scan_layers=a.scan_layers)
        for chunk in (0, a.head_chunk):
            compiled_table(f"smaller VILA-U (LLaMA 512 x 4 layers, depth head 256 x 2, 16384 codes)"
                           f"{', scanned layers' if a.scan_layers else ''}, head_chunk "
                           f"{chunk}, LoRA dropout {a.dropout}", small, a.pairs_per_device, a.prompt_len, (1, 4, 8),
                           chunk, a.dropout)
    if a.compile_7b:
        vu = vila_u_7b(a.layers, scan_layers=a.scan_layers)
        compiled_table(f"VILA-U 7B{'' if a.layers == 32 else f' width, {a.layers} LLaMA layers'}"
                       f"{', scanned layers' if a.scan_layers else ''}, head_chunk "
                       f"{a.head_chunk}, LoRA dropout {a.dropout}", vu, a.pairs_per_device, a.prompt_len, (8,),
                       a.head_chunk, a.dropout)
        if dump:
            print_peak(dump)


# ----------------------------------------------------------------------------- models

def vila_u_7b(layers=32, scan_layers=False):
    from fairjax.models import vila_u

    llm = dict(vocab_size=32004, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)
    vt = {"rqtransformer": {"block_size": [16, 16, 4], "input_embed_dim_1": 1024, "input_embed_dim_2": 4096,
                            "embed_dim": 2560, "vocab_size": 16384, "head": {"block": {"n_head": 40}, "n_layer": 6}},
          "rqvaesiglip": {"n_embed": 16384, "latent_shape": [16, 16, 1024], "code_shape": [16, 16, 4],
                          "shared_codebook": True}}
    return vila_u.build(llm, vt, {"mm_projector_type": "mlp2x_gelu"}, dtype=_bf16(), param_dtype=_bf16(), remat=True,
                        scan_layers=scan_layers)


def vila_u_small(scan_layers=False):
    from fairjax.models import vila_u

    llm = dict(vocab_size=32004, hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
               num_key_value_heads=8, max_position_embeddings=4096, rms_norm_eps=1e-5)
    vt = {"rqtransformer": {"block_size": [16, 16, 4], "input_embed_dim_1": 256, "input_embed_dim_2": 512,
                            "embed_dim": 256, "vocab_size": 16384, "head": {"block": {"n_head": 4}, "n_layer": 2}},
          "rqvaesiglip": {"n_embed": 16384, "latent_shape": [16, 16, 256], "code_shape": [16, 16, 4],
                          "shared_codebook": True}}
    return vila_u.build(llm, vt, {"mm_projector_type": "mlp2x_gelu"}, dtype=_bf16(), param_dtype=_bf16(), remat=True,
                        scan_layers=scan_layers)


def _bf16():
    import jax.numpy as jnp

    return jnp.bfloat16


def abstract_params(vu):
    import jax

    return jax.eval_shape(vu.init, jax.random.key(0))


def param_counts(vu) -> dict:
    import math

    import jax

    tree = abstract_params(vu)
    return {k: int(sum(math.prod(x.shape) for x in jax.tree.leaves(v))) for k, v in tree.items()}


def abstract_lora(vu, rank=32):
    import jax

    from fairjax import lora as lora_lib
    from fairjax.tasks.vila_u_pref import LORA_TARGETS

    llm = abstract_params(vu)["llm"]
    return jax.eval_shape(lambda p, k: lora_lib.init(p, LORA_TARGETS, rank, 32.0, k), llm, jax.random.key(0))


def lora_count(vu, rank=32) -> int:
    import math

    import jax

    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_lora(vu, rank))))


def torch_reference_counts(cfg) -> tuple[int, int]:
    import warnings

    import peft
    import torch
    import transformers

    warnings.filterwarnings("ignore")
    tc = transformers.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                                  intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                                  num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads)
    with torch.device("meta"):
        m = transformers.LlamaForCausalLM(tc)
        base = sum(p.numel() for p in m.parameters())
        pm = peft.get_peft_model(m, peft.LoraConfig(r=32, lora_alpha=32, lora_dropout=0.1, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        trainable, _ = pm.get_nb_trainable_parameters()
    return base, trainable


# ----------------------------------------------------------------------------- analytic model

@dataclasses.dataclass
class Shapes:
    rows: int  # sequences per device (2 per pair)
    seq: int  # LLM tokens per sequence
    n: int  # image positions
    depth: int
    hidden: int
    inter: int
    layers: int
    heads: int
    embed: int  # depth-transformer width
    head_layers: int
    code_vocab: int
    code_dim: int
    rank: int = 32

    @classmethod
    def of(cls, vu, pairs, prompt_len, rank=32):
        c, rq = vu.llm.config, vu.rqtransformer.config
        return cls(rows=2 * pairs, seq=prompt_len + vu.image_tokens - 1, n=vu.image_tokens, depth=vu.depth,
                   hidden=c.hidden_size, inter=c.intermediate_size, layers=c.num_hidden_layers,
                   heads=c.num_attention_heads, embed=rq.embed_dim, head_layers=rq.n_layer, code_vocab=rq.vocab_size,
                   code_dim=vu.codebook.config.embed_dim, rank=rank)


def activation_bytes(s: Shapes, chunk: int = 0) -> float:
    """Peak activation bytes per device (bf16 = 2 bytes, float32 = 4), remat on every block:

    * LLaMA: the input of each of the L layers is kept, ``L R S H 2``; the backward of one layer
      recomputes it and holds, with its gradients, about twice its forward intermediates
      ``(6 R S H + 3 R S I) 2`` (norm, q, k, v, attention out, o; gate, up, silu*up) plus attention
      scores and probabilities ``2 R heads S^2 4``; plus the embeddings and final hidden states ``2 R S H 2``;
    * depth transformer over ``R c`` sequences of length D, width E (``c`` = N, or the
      ``head_chunk`` positions evaluated at a time): kept block inputs ``NL R c D E 2``, one
      block's backward ``2 (14 R c D E) 2``;
    * the code logits ``R c D V`` in float32, their softmax gradient and the bf16 classifier output:
      ``R c D V (4 + 4 + 2)``; code embeddings ``R N D C 2``.
    """
    r, S, H, I = s.rows, s.seq, s.hidden, s.inter
    llm = s.layers * r * S * H * 2 + 2 * ((6 * r * S * H + 3 * r * S * I) * 2 + 2 * r * s.heads * S * S * 4)
    llm += 2 * r * S * H * 2
    rcd = r * (chunk or s.n) * s.depth
    head = s.head_layers * rcd * s.embed * 2 + 2 * 14 * rcd * s.embed * 2
    logits = rcd * s.code_vocab * (4 + 4 + 2) + r * s.n * s.depth * s.code_dim * 2
    return float(llm + head + logits)


# ----------------------------------------------------------------------------- compiled

def compiled_table(title, vu, pairs, prompt_len, fsdps, chunk, dropout=0.1):
    import jax

    print(f"\nCompiled train step, {title}: {pairs} pairs/device, 8 virtual CPU devices, compile only")
    sizes = param_counts(vu)
    lora_n = lora_count(vu)
    shape = Shapes.of(vu, pairs, prompt_len)
    print(f"  params {sum(sizes.values()):,} (LLM {sizes['llm']:,}), LoRA {lora_n:,}")
    print(f"{'fsdp':>5}{'args GiB':>10}{'temp GiB':>10}{'out-alias':>10}{'compiled':>10}{'analytic':>10}"
          f"{'ratio':>7}{'compile s':>11}")
    for f in fsdps:
        t0 = time.perf_counter()
        m = compile_step(vu, f, pairs, prompt_len, chunk, dropout)
        dt = time.perf_counter() - t0
        total = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
        ana = sum(sizes.values()) * 2 / f + lora_n * 16 / f + activation_bytes(shape, chunk)
        print(f"{f:>5}{m.argument_size_in_bytes / GIB:>10.3f}{m.temp_size_in_bytes / GIB:>10.3f}"
              f"{(m.output_size_in_bytes - m.alias_size_in_bytes) / GIB:>10.3f}{total / GIB:>10.3f}"
              f"{ana / GIB:>10.3f}{total / ana:>7.2f}{dt:>11.1f}")
    jax.clear_caches()


def compile_step(vu, fsdp, pairs, prompt_len, chunk, dropout=0.1):
    """``memory_analysis()`` of the jitted BPO step on a data x fsdp mesh of the 8 devices."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from fairjax import parallel, trainer
    from fairjax.tasks import vila_u_pref as vp

    cfg = vp.default_config()
    cfg.total_steps = 1000
    cfg.model.head_chunk = chunk
    mesh = parallel.make_mesh({"data": 8 // fsdp, "fsdp": fsdp})
    task = vp.VilaUPrefTask.__new__(vp.VilaUPrefTask)  # the task's loss, without a dataset or weights on disk
    task.config, task.loss_name, task.vu = cfg, "bpo", vu
    task.alpha, task.rank, task.dropout = 32.0, 32, dropout
    tx, schedule = trainer.make_optimizer(cfg.optimizer, cfg.total_steps)
    frozen = abstract_params(vu)
    lora = abstract_lora(vu)
    abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "trainable": lora,
                "opt_state": jax.eval_shape(tx.init, lora), "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
    min_size = int(cfg.fsdp_min_size)  # what the trainer shards with: small leaves stay replicated
    state_sh = trainer._state_shardings(abstract, tx, mesh, [], min_size)
    frozen_sh = parallel.param_shardings(frozen, mesh, min_size=min_size)
    b = 8 * pairs
    n, d = vu.image_tokens, vu.depth
    batch = {"index": jax.ShapeDtypeStruct((b,), jnp.int32),
             "prompt_ids": jax.ShapeDtypeStruct((b, prompt_len), jnp.int32),
             "prompt_mask": jax.ShapeDtypeStruct((b, prompt_len), jnp.bool_),
             "codes_a": jax.ShapeDtypeStruct((b, n, d), jnp.int32), "codes_b": jax.ShapeDtypeStruct((b, n, d), jnp.int32)}
    step = trainer.make_train_step(task, tx, schedule, 1, mesh)
    rep = parallel.replicated(mesh)
    jitted = jax.jit(step, in_shardings=(state_sh, frozen_sh, parallel.batch_sharding(mesh)),
                     out_shardings=(state_sh, rep), donate_argnums=(0,))
    with_sh = lambda t, s: jax.tree.map(lambda x, y: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=y), t, s)  # noqa: E731
    bsh = NamedSharding(mesh, parallel.batch_spec())
    args = (with_sh(abstract, state_sh), with_sh(frozen, frozen_sh),
            {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=bsh) for k, v in batch.items()})
    return jitted.lower(*args).compile().memory_analysis()


# ----------------------------------------------------------------------------- what is live at the peak

def print_peak(dump: str, top: int = 14) -> None:
    """Group the buffers XLA:CPU holds at its peak (``*live-range.txt`` of the step's dump) by what made them:
    a LLaMA layer or the depth head (from each HLO's ``op_name``, or its operands' for fused converts), the
    pass (forward, backward, the remat recomputation inside the backward), float32 copies of bf16 values,
    and the frozen weights (``param``) with their float32 copies."""
    import collections
    import glob
    import re

    files = sorted(glob.glob(os.path.join(dump, "*step*live-range.txt")), key=os.path.getsize)
    if not files:
        print(f"no live-range dump in {dump}")
        return
    live = files[-1]
    meta, shape, operands = {}, {}, {}
    for line in open(live.replace("-live-range.txt", ".txt")):
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ((?:\([^)]*\))|\S+?)(?:\{[^}]*\})? [\w\-]+\((.*)", line)
        if m:
            om = re.search(r'op_name="([^"]*)"', line)
            meta[m.group(1)], shape[m.group(1)] = (om.group(1) if om else ""), m.group(2)
            operands[m.group(1)] = re.findall(r"%([\w.\-]+)", m.group(3).split("calls=")[0])

    def origin(name, depth=0):
        if meta.get(name) or depth > 6:
            return meta.get(name, ""), depth
        for o in operands.get(name, []):
            op, d = origin(o, depth + 1)
            if op:
                return op, d
        return "", depth

    def group(name):
        op, derived = origin(name)
        layer, block = re.search(r"layers_(\d+)", op), re.search(r"blocks[_.]|RQTransformer|rqtransformer", op)
        scanned = re.search(r"layers\.body|LlamaForCausalLM\)/model/while", op)  # scan_layers: one loop body
        part = "LLaMA layers" if layer or scanned else ("depth head" if block else "other")
        if op.startswith(("frozen", "state")):
            return part, "weights" + (", float32 copy" if derived else "")
        phase = ("backward: remat recompute" if "rematted_computation" in op else
                 "backward" if "transpose(" in op else "forward" if op else "?")
        return part, phase + (", float32" if shape.get(name, "").startswith("f32") and derived else ""), \
            layer.group(1) if layer else None

    txt = open(live).read()
    m = re.search(r"Live ranges at (\d+) \(peak\):\n((?:    .*\n)+?)  \S", txt)
    rows = [(r.group(1), int(r.group(2))) for ln in m.group(2).splitlines()
            if (r := re.match(r"\s+(\S+?)\{[^}]*\}: (\d+) bytes", ln))]
    sizes, layers, recompute = collections.defaultdict(int), collections.defaultdict(set), collections.defaultdict(int)
    for name, b in rows:
        g = group(name)
        sizes[g[:2]] += b
        if len(g) > 2 and g[2] is not None:
            layers[g[:2]].add(g[2])
            if "recompute" in g[1]:
                recompute[int(g[2])] += b
    print(f"\nLive at the peak of {os.path.basename(live).split('.')[1]}: {sum(b for _, b in rows) / GIB:.2f} GiB in "
          f"{len(rows)} buffers (XLA dump in {dump})")
    for (part, phase), b in sorted(sizes.items(), key=lambda kv: -kv[1])[:top]:
        n = len(layers[(part, phase)])
        print(f"  {part:<14}{phase:<40}{b / GIB:8.2f} GiB" + (f"  ({n} layers)" if n else ""))
    held = sorted(k for k, b in recompute.items() if b > GIB / 2)
    print(f"  LLaMA layers whose recomputed forward (> 0.5 GiB each) is held at the peak: {len(held)} of "
          f"{len({int(x) for v in layers.values() for x in v})} ({held[:1]}..{held[-1:]})")


if __name__ == "__main__":
    main()
