"""Benchmark: KV-cached greedy generation, fairjax LLaMA vs transformers ``generate``.

Same random weights on both sides (a tiny ``LlamaForCausalLM`` saved with
``save_pretrained`` and read with ``fairjax.convert.llama.load_hf_llama``),
float32. fairjax: one jitted ``greedy_generate`` (prefill + ``lax.scan`` of
decode steps over a preallocated cache). transformers: ``model.generate(...,
do_sample=False, use_cache=True)``. Prints the median wall time of a whole
generation, tokens/s (batch * new tokens / time), the ratio fairjax/torch
tokens/s (> 1: fairjax faster) and whether both produced the same tokens.

    python bench/bench_llama_generate.py                                  # CPU, tiny config
    python bench/bench_llama_generate.py --hidden 4096 --layers 32 --heads 32 --intermediate 11008 \\
        --batch 2 --prompt 64 --new 256 --iters 3                          # LLaMA-2-7B shape (GPU)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np


def median_time(fn, iters: int) -> tuple[float, float]:
    """(first call seconds incl. compile / warm-up, median of ``iters`` further calls)."""
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return first, float(np.median(ts))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--torch-device", default="cpu", help="cpu or cuda (jax uses its default backend)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for both sides (torch.set_num_threads and XLA's intra-op pool); 0 = "
                        "each library's default. 1 gives stable numbers on a shared machine")
    return p.parse_args()


def main(a):
    import jax
    import jax.numpy as jnp
    import torch
    import transformers

    from fairjax.convert.llama import load_hf_llama
    from fairjax.models import llama

    if a.threads:
        torch.set_num_threads(a.threads)

    cfg = transformers.LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                                   num_hidden_layers=a.layers, num_attention_heads=a.heads,
                                   num_key_value_heads=a.kv_heads or a.heads,
                                   max_position_embeddings=max(2048, a.prompt + a.new))
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        llm_cfg, params = load_hf_llama(d)
    hf = hf.to(a.torch_device)
    model = llama.from_config(llm_cfg)
    params = jax.device_put(params)

    ids = np.random.RandomState(0).randint(3, a.vocab, (a.batch, a.prompt))
    mask = np.ones_like(ids, bool)

    gen = jax.jit(llama.greedy_generate, static_argnums=0, static_argnames="max_new_tokens")
    jids, jmask = jnp.asarray(ids), jnp.asarray(mask)
    out_jax = {}

    def run_jax():
        out_jax["t"] = np.asarray(gen(model, params, jids, jmask, max_new_tokens=a.new))

    tids = torch.tensor(ids, device=a.torch_device)
    tmask = torch.ones_like(tids)
    out_torch = {}

    def run_torch():
        with torch.no_grad():
            o = hf.generate(tids, attention_mask=tmask, max_new_tokens=a.new, do_sample=False, use_cache=True,
                            eos_token_id=None, pad_token_id=0)
        if a.torch_device == "cuda":
            torch.cuda.synchronize()
        out_torch["t"] = o[:, a.prompt:].cpu().numpy()

    first_j, t_j = median_time(run_jax, a.iters)
    first_t, t_t = median_time(run_torch, a.iters)
    n_tok = a.batch * a.new
    same = np.array_equal(out_jax["t"], out_torch["t"])
    agree = float((out_jax["t"] == out_torch["t"]).mean())
    print(f"config: hidden {a.hidden}, layers {a.layers}, heads {a.heads}/{a.kv_heads or a.heads} kv, "
          f"vocab {a.vocab}, batch {a.batch}, prompt {a.prompt}, new {a.new}; jax {jax.devices()[0].platform}, "
          f"torch {a.torch_device} ({torch.get_num_threads()} threads)")
    print(f"fairjax      : {t_j * 1e3:9.1f} ms/generate  {n_tok / t_j:9.1f} tok/s   (first call incl. compile "
          f"{first_j:.1f} s)")
    print(f"transformers : {t_t * 1e3:9.1f} ms/generate  {n_tok / t_t:9.1f} tok/s   (first call {first_t:.1f} s)")
    print(f"ratio fairjax/transformers tokens/s: {t_t / t_j:.2f}x")
    print(f"same tokens: {same} ({agree:.1%} of positions agree)")


if __name__ == "__main__":
    args = parse_args()
    if args.threads:  # must be set before jax initialises its CPU backend
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                                   f"intra_op_parallelism_threads={args.threads}").strip()
    if "jax" in sys.modules:
        raise RuntimeError("jax was imported before the thread settings")
    main(args)
