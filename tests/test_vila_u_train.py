"""VILA-U preference training (SFT / BPO / DPO / mDPO with LoRA) on a tiny random VILA-U.

References from outside the code under test: transformers ``LlamaForCausalLM`` (weights converted
into fairjax, LoRA merged into the torch weights by hand) and the torch re-implementation of the
depth transformer in ``test_vila_u.py`` (vila-u's equations) for every log-probability; torch
``F.interpolate`` for mDPO's crop; numpy for the loss formulas; a hand-written 1-device optax
loop for the sharded trainer step.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import torch
import transformers
F = torch.nn.functional

from test_vila_u import LLM, RQ, RQVAE, tiny_torch_parts, vision_tower_state  # noqa: E402

from fairjax import lora as lora_lib  # noqa: E402
from fairjax import trainer  # noqa: E402
from fairjax.convert.vila_u import load  # noqa: E402
from fairjax.io.safetensors import write_safetensors  # noqa: E402
from fairjax.vila_u import data as vd  # noqa: E402
from fairjax.errors import UserError  # noqa: E402
from fairjax.models import rqvae, siglip  # noqa: E402
from fairjax.tasks import vila_u_pref as vp  # noqa: E402
from fairjax.vila_u import augment  # noqa: E402

TOL = 1e-5
N, D, V = 6, 4, 50  # image positions (2 x 3), depths, codebook size of test_vila_u's tiny model
TOK = vd.TinyTokenizer(LLM["vocab_size"])


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """torch parts, and the same weights in fairjax (vila-u folder -> fairjax.convert.vila_u.load)."""
    root = tmp_path_factory.mktemp("vila_u")
    llm, rq, codebook, proj = tiny_torch_parts()
    llm.save_pretrained(root / "llm")
    (root / "vision_tower").mkdir()
    write_safetensors(root / "vision_tower" / "model.safetensors", vision_tower_state(rq, codebook))
    (root / "vision_tower" / "config.json").write_text(json.dumps({"rqtransformer": RQ, "rqvaesiglip": RQVAE}))
    (root / "mm_projector").mkdir()
    write_safetensors(root / "mm_projector" / "model.safetensors",
                      {f"layers.{k}": v.detach().numpy() for k, v in proj.state_dict().items()})
    (root / "mm_projector" / "config.json").write_text(json.dumps({"mm_projector_type": "mlp2x_gelu"}))
    vu, params, _, _ = load(str(root), vision_tower=False)
    return (llm, rq, codebook, proj), vu, params


def random_lora(params, rank=4, seed=0, scale=0.3):
    """LoRA on every q/k/v/o/gate/up/down kernel with random a AND b (so it changes the model)."""
    lora = lora_lib.init(params["llm"], vp.LORA_TARGETS, rank, 8.0, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    return {k: {"a": np.asarray(e["a"]), "b": (scale * rng.standard_normal(e["b"].shape)).astype(np.float32)}
            for k, e in lora.items()}


def merged_torch(llm, lora, alpha):
    """A copy of the torch LLM with W += (alpha / r) (a @ b)^T on every LoRA kernel."""
    import copy

    m = copy.deepcopy(llm)
    sd = m.state_dict()
    with torch.no_grad():
        for path, e in lora.items():
            name = path.replace("/kernel", ".weight").replace("/", ".").replace("layers_", "layers.")
            d = (alpha / e["a"].shape[1]) * (np.asarray(e["a"], np.float64) @ np.asarray(e["b"], np.float64))
            sd[name].add_(torch.tensor(d.T, dtype=torch.float32))
    return m


def prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    words = ["doctor", "nurse", "chef", "pilot", "farmer"]
    return [vd.generation_ids(TOK, "a photo of a " + " ".join(rng.choice(words, 1 + i % 3))) for i in range(n)]


def random_codes(shape, seed):
    return np.random.default_rng(seed).integers(0, V, shape).astype(np.int32)


# ----------------------------------------------------------------------------- torch references

def ref_image_lp(llm, rq, codebook, proj, prompt, codes):
    """Mean log p(codes | prompt) of one unpadded sample with transformers LLaMA + the torch depth head."""
    c = torch.tensor(codes, dtype=torch.long)
    with torch.no_grad():
        te = llm.model.embed_tokens(torch.tensor(prompt, dtype=torch.long)[None])
        ie = proj(F.embedding(c[:-1], codebook).sum(-2))[None]
        h = llm.model(inputs_embeds=torch.cat([te, ie], 1)).last_hidden_state[:, len(prompt) - 1:]
        logits = rq(h, F.embedding(c, codebook)[None])[0]
        lp = torch.log_softmax(logits.double(), -1).gather(-1, c[..., None])[..., 0]
    return float(lp.mean())


def ref_answer_lp(llm, codebook, proj, pre, codes, rest, n_answer):
    """Summed log-prob of the last ``n_answer`` tokens of ``rest`` after [pre, image, rest]."""
    c = torch.tensor(codes, dtype=torch.long)
    with torch.no_grad():
        x = torch.cat([llm.model.embed_tokens(torch.tensor(pre)[None]),
                       proj(F.embedding(c, codebook).sum(-2))[None],
                       llm.model.embed_tokens(torch.tensor(rest)[None])], 1)
        logits = llm(inputs_embeds=x).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    total = x.shape[1]
    pos = range(total - n_answer, total)
    ids = rest[-n_answer:]
    return float(sum(lp[p - 1, t] for p, t in zip(pos, ids)))


# ----------------------------------------------------------------------------- adapters vs torch

def test_image_code_logprobs_match_transformers(tiny, rel):
    (llm, rq, codebook, proj), vu, params = tiny
    ps = prompts(4)
    codes = random_codes((4, N, D), 1)
    ids, mask = vd.left_pad(ps, max(len(p) for p in ps) + 2)
    f = jax.jit(lambda lo, red, chunk=0: vp.image_code_logprobs(
        vu, params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(codes), lora=lo, lora_alpha=8.0, reduce=red,
        head_chunk=chunk), static_argnums=(1, 2))
    ref = [ref_image_lp(llm, rq, codebook, proj, p, c) for p, c in zip(ps, codes)]
    assert rel(f(None, "mean"), ref) < TOL
    assert rel(f(None, "sum", 2), np.asarray(ref) * N * D) < TOL  # depth head 2 positions at a time
    # with a LoRA (applied unmerged) = torch with the LoRA merged into its weights
    lora = random_lora(params)
    lp = f(lora, "mean")
    m = merged_torch(llm, lora, 8.0)
    ref_l = [ref_image_lp(m, rq, codebook, proj, p, c) for p, c in zip(ps, codes)]
    assert rel(lp, ref_l) < TOL and np.abs(np.asarray(ref_l) - ref).max() > 1e-3


def test_answer_logprobs_match_transformers(tiny, rel):
    (llm, rq, codebook, proj), vu, params = tiny
    recs = [vd.mdpo_ids(TOK, TOK.eos, q, a, "no") for q, a in
            [("what job?", "a doctor"), ("who is this person here?", "the nurse on duty")]]
    codes = random_codes((2, N, D), 3)
    pre_ids, pre_mask = vd.left_pad([r["pre_ids"] for r in recs], 30)
    rest = [np.concatenate([r["post_ids"], r["chosen_ids"]]) for r in recs]
    rest_ids, rest_mask = vd.right_pad(rest, 24)
    target = rest_mask & (np.arange(24)[None] >= np.asarray([len(r["post_ids"]) for r in recs])[:, None])
    lora = random_lora(params, seed=5)
    f = jax.jit(lambda lo: vp.response_logprobs(vu, params, *map(jnp.asarray, (
        pre_ids, pre_mask, codes, rest_ids, rest_mask, target)), lora=lo, lora_alpha=8.0))
    for lo, model in ((None, llm), (lora, merged_torch(llm, lora, 8.0))):
        lp = f(lo)
        ref = [ref_answer_lp(model, codebook, proj, r["pre_ids"], c, rr, len(r["chosen_ids"]))
               for r, c, rr in zip(recs, codes, rest)]
        assert rel(lp, ref) < TOL


# ----------------------------------------------------------------------------- tasks

def pair_dataset(path, n=16, seed=0):
    ps = prompts(n, seed)
    recs = [{"id": i, "prompt": f"p{i}", "prompt_ids": p, "codes_a": random_codes((N, D), 100 + i),
             "codes_b": random_codes((N, D), 200 + i), "group_a": "male", "group_b": "female"}
            for i, p in enumerate(ps)]
    vd.write_dataset(path, "pairs", recs, codebook_size=V)
    return recs


def task_config(loss, data_dir, **kw):
    c = vp.default_config()
    c.loss = loss
    c.data.path = str(data_dir)
    c.lora.rank, c.lora.alpha, c.lora.dropout = 4, 8.0, 0.1
    c.total_steps, c.warmup_ratio = 2, 0.0
    c.batch_size = 8
    c.optimizer.lr = 1e-2
    c.optimizer.schedule = "constant"
    c.optimizer.weight_decay = 1e-2
    c.checkpoint.every_steps = 0
    c.log_every_steps = 1
    c.progress_bar = False
    for k, v in kw.items():
        node = c
        *head, last = k.split(".")
        for h in head:
            node = node[h]
        node[last] = v
    return c


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs") / "ds"
    pair_dataset(d)
    return d


def _loss_and_grads(task, lora, frozen, batch, key):
    if not hasattr(task, "_vg"):
        task._vg = jax.jit(jax.value_and_grad(task.loss, has_aux=True))
    (loss, m), g = task._vg(lora, frozen, {k: jnp.asarray(v) for k, v in batch.items()}, key)
    return float(loss), m, g


def test_bpo_on_explicit_pairs_ignores_batch_order_and_size(tiny, pairs_dir, rel):
    _, vu, params = tiny
    task = vp.VilaUPrefTask(task_config("bpo", pairs_dir), model=(vu, params))
    _, frozen = task.init(jax.random.key(0))
    lora = random_lora(params)  # LoRA dropout 0.1 is on: its masks follow each record, not its row
    batch = task.batch(0, 0, 1)
    key = jax.random.key(3)
    loss, m, g = _loss_and_grads(task, lora, frozen, batch, key)
    perm = np.random.default_rng(0).permutation(8)
    loss_p, _, g_p = _loss_and_grads(task, lora, frozen, {k: v[perm] for k, v in batch.items()}, key)
    halves = [_loss_and_grads(task, lora, frozen, {k: v[s] for k, v in batch.items()}, key)
              for s in (slice(0, 4), slice(4, 8))]
    # float32: the loss is a function of differences of nearly equal log-odds, and the per-sample
    # reductions run in another order for another batch shape, hence 5e-5 for the split batch's gradient
    assert rel(loss_p, loss) < 1e-5
    assert rel(0.5 * (halves[0][0] + halves[1][0]), loss) < 1e-5
    for path in g:
        for ab in ("a", "b"):
            assert rel(g_p[path][ab], g[path][ab]) < 1e-5
            assert rel(0.5 * (halves[0][2][path][ab] + halves[1][2][path][ab]), g[path][ab]) < 5e-5
    # the loss is BPO on each record's own two images (numpy, from the adapter's per-sample log-probs)
    lp_fn = jax.jit(lambda b: task._lp(lora, frozen, b, jnp.stack([b["codes_a"], b["codes_b"]], 1), key, 2, "mean"))
    lp = np.asarray(lp_fn({k: jnp.asarray(v) for k, v in batch.items()}), np.float64)
    lo = lp - np.log1p(-np.exp(lp))
    want = np.mean(np.log1p((1 / (1 + np.exp(-(lo[:, 0] - lo[:, 1]))) - 0.5) ** 2))
    assert rel(loss, want) < 1e-5 and float(m["balance"]) > 0


def test_bpo_step_with_scan_layers_equals_unrolled(tiny, pairs_dir, rel):
    """model.scan_layers true: the task stacks the LLaMA layers and the depth blocks, the LoRA (unrolled keys,
    dropout 0.1 on) goes in as stacked 'lora' variables: the same loss and LoRA gradients as unrolled,
    the same per-row dropout masks included."""
    _, vu, params = tiny
    tasks = {s: vp.VilaUPrefTask(task_config("bpo", pairs_dir, **{"model.scan_layers": s}), model=(vu, params))
             for s in ("false", "true")}
    assert tasks["true"].vu.scan_layers and not tasks["false"].vu.scan_layers
    assert tasks["true"].base["llm"]["model"]["layers"]["mlp"]["up_proj"]["kernel"].shape[0] == LLM["num_hidden_layers"]
    assert tasks["true"].config.model.scan_layers == "true"
    lora = random_lora(params)
    assert sorted(tasks["true"].init(jax.random.key(0))[0]) == sorted(lora)  # init: the unrolled keys
    batch = tasks["false"].batch(0, 0, 1)
    key = jax.random.key(3)
    out = {s: _loss_and_grads(t, lora, t.init(jax.random.key(0))[1], batch, key) for s, t in tasks.items()}
    assert rel(out["true"][0], out["false"][0]) < 1e-5
    g_s, g_u = out["true"][2], out["false"][2]
    assert sorted(g_s) == sorted(g_u) == sorted(lora)
    for path in g_u:
        for ab in ("a", "b"):
            assert rel(g_s[path][ab], g_u[path][ab]) < 1e-5, (path, ab)
    no_drop = vp.VilaUPrefTask(task_config("bpo", pairs_dir, **{"lora.dropout": 0.0}), model=(vu, params))
    assert abs(_loss_and_grads(no_drop, lora, no_drop.init(jax.random.key(0))[1], batch, key)[0]
               - out["false"][0]) > 1e-6  # the dropout masks matter, so equal losses mean equal masks
    with pytest.raises(UserError) as e:
        vp.VilaUPrefTask(task_config("bpo", pairs_dir, **{"model.scan_layers": "maybe"}), model=(vu, params))
    one_line(e, "config.model.scan_layers='maybe'", "auto, true, false")


def reference_run(task, cfg, steps):
    """Single-device optax loop written from the trainer's documented contract (clip + SGD)."""
    init_key, train_key = jax.random.split(jax.random.key(cfg.seed))
    lora, frozen = task.init(init_key)
    o = cfg.optimizer
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), optax.sgd(o.lr))
    opt = tx.init(lora)
    step = jax.jit(lambda p, s, b, k: _update(task, tx, p, s, frozen, b, k))
    loss = None
    for s in range(steps):
        batch = {k: jnp.asarray(v) for k, v in task.batch(s, 0, 1).items()}
        lora, opt, loss = step(lora, opt, batch, jax.random.fold_in(jax.random.fold_in(train_key, s), 0))
    return float(loss), jax.device_get(lora)


def _update(task, tx, p, s, frozen, b, k):
    (loss, _), g = jax.value_and_grad(task.loss, has_aux=True)(p, frozen, b, k)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss


def test_sharded_bpo_step_equals_single_device(tiny, pairs_dir, tmp_path, rel):
    _, vu, params = tiny
    # SGD, not Adam: Adam's update g / (|g| + eps) turns float noise in the near-zero gradients (the
    # `a` factors get exactly 0 at step 1, as b = 0) into O(lr) differences
    over = {"optimizer.name": "sgd", "optimizer.lr": 0.5}
    cfg = task_config("bpo", pairs_dir, **over)
    cfg.mesh = dict(data=2, fsdp=4, tensor=1)
    task = vp.VilaUPrefTask(cfg, model=(vu, params))
    summary = trainer.train(cfg, task, str(tmp_path))
    ref_loss, ref_lora = reference_run(vp.VilaUPrefTask(task_config("bpo", pairs_dir, **over), model=(vu, params)),
                                       cfg, 2)
    assert summary["step"] == 2
    assert rel(summary["loss"], ref_loss) <= 1e-5
    saved, meta = lora_lib.load(summary["lora"])
    assert meta["alpha"] == 8.0 and meta["loss"] == "bpo" and sorted(saved) == sorted(ref_lora)
    for k in ref_lora:
        for ab in ("a", "b"):
            assert rel(saved[k][ab], ref_lora[k][ab]) <= 1e-5
    assert max(float(np.abs(ref_lora[k]["b"]).max()) for k in ref_lora) > 1e-5  # the steps moved the adapter (b0 = 0)
    # stage 2 continues the saved adapter (lora.init), e.g. BPO after SFT
    cont = vp.VilaUPrefTask(task_config("bpo", pairs_dir, **{"lora.init": summary["lora"]}), model=(vu, params))
    start, _ = cont.init(jax.random.key(5))
    for k in ref_lora:
        np.testing.assert_array_equal(start[k]["b"], saved[k]["b"])
    with pytest.raises(UserError) as e:
        vp.VilaUPrefTask(task_config("bpo", pairs_dir, **{"lora.init": summary["lora"], "lora.rank": 8}),
                         model=(vu, params)).init(jax.random.key(5))
    one_line(e, "rank 4", "lora.rank=8")


def test_dpo_step_ignores_accumulation_and_tensor_axis(tiny, pairs_dir, tmp_path, rel):
    """DPO (reference = base without LoRA, LoRA dropout 0.1 keyed by record): 3 SGD steps with
    grad_accum_steps=4 on a data=2 x tensor=4 mesh (the LLaMA / depth-transformer tensor rules) ==
    the 1-device whole-batch loop (the 8-device K=1 step is checked above for BPO)."""
    _, vu, params = tiny
    over = {"optimizer.name": "sgd", "optimizer.lr": 0.5, "total_steps": 3, "beta": 0.5}
    cfg = task_config("dpo", pairs_dir, grad_accum_steps=4, **over)
    cfg.mesh = dict(data=2, fsdp=1, tensor=4)
    cfg.fsdp_min_size = 0
    summary = trainer.train(cfg, vp.VilaUPrefTask(cfg, model=(vu, params)), str(tmp_path))
    ref_loss, ref_lora = reference_run(vp.VilaUPrefTask(task_config("dpo", pairs_dir, **over), model=(vu, params)),
                                       cfg, 3)
    assert summary["step"] == 3 and rel(summary["loss"], ref_loss) <= 1e-5
    saved, _ = lora_lib.load(summary["lora"])
    for k in ref_lora:
        for ab in ("a", "b"):
            assert rel(saved[k][ab], ref_lora[k][ab]) <= 1e-5, (k, ab)
    assert max(float(np.abs(ref_lora[k]["b"]).max()) for k in ref_lora) > 1e-4  # the steps moved the adapter


def test_sft_loss_is_the_mean_code_cross_entropy(tiny, pairs_dir, rel):
    """SFT = mean over images of the mean over the N x D codes of -log softmax(logits)[code], with the
    logits from transformers' LLaMA (LoRA merged into its weights by hand) + the torch depth head, in
    float64 -- computed here, not by the adapter."""
    (llm, rq, codebook, proj), vu, params = tiny
    task = vp.VilaUPrefTask(task_config("sft", pairs_dir, **{"lora.dropout": 0.0}), model=(vu, params))
    _, frozen = task.init(jax.random.key(0))
    lora = random_lora(params, seed=3, scale=0.1)
    batch = task.batch(0, 0, 1)
    loss, m = jax.jit(task.loss)(lora, frozen, {k: jnp.asarray(v) for k, v in batch.items()}, jax.random.key(2))
    pol = merged_torch(llm, lora, 8.0)
    lp = [ref_image_lp(pol, rq, codebook, proj, p[mk], c)
          for p, mk, c in zip(batch["prompt_ids"], batch["prompt_mask"], batch["codes"])]
    assert len(lp) == 8 and rel(loss, -np.mean(lp)) < 1e-5 and rel(m["nll"], -np.mean(lp)) < 1e-5
    base_lp = [ref_image_lp(llm, rq, codebook, proj, p[mk], c)
               for p, mk, c in zip(batch["prompt_ids"], batch["prompt_mask"], batch["codes"])]
    assert rel(-np.mean(base_lp), -np.mean(lp)) > 1e-4  # the LoRA matters, so the check can fail


def test_dpo_reference_is_base_without_lora(tiny, pairs_dir, rel):
    (llm, rq, codebook, proj), vu, params = tiny
    task = vp.VilaUPrefTask(task_config("dpo", pairs_dir, beta=0.05, **{"lora.dropout": 0.0}), model=(vu, params))
    lora, frozen = task.init(jax.random.key(0))
    batch = task.batch(0, 0, 1)
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    loss, m, g = _loss_and_grads(task, lora, frozen, batch, jax.random.key(1))
    # b = 0: policy = reference on every image, up to float32 noise of the two compiled passes (the
    # gradient pass fuses differently), so the rewards are ~0 and accuracy (g_w > g_l) is undecided
    assert abs(loss - math.log(2)) < 1e-6
    assert abs(float(m["g_w"])) < 1e-4 and abs(float(m["g_l"])) < 1e-4 and 0.0 <= float(m["accuracy"]) <= 1.0
    assert max(float(jnp.abs(e["b"]).max()) for e in g.values()) > 0  # yet the LoRA gets a gradient
    fwd = jax.jit(task.loss)
    ev, m = fwd(lora, frozen, jb, jax.random.key(1))
    assert float(ev) == pytest.approx(math.log(2), abs=1e-7) and float(m["accuracy"]) == 0.0  # exact ties
    # a trained-looking LoRA: numpy DPO on torch log-probs (policy = merged weights, reference = base)
    lora = random_lora(params, seed=2, scale=0.1)
    loss, m = fwd(lora, frozen, jb, jax.random.key(1))
    pol = merged_torch(llm, lora, 8.0)
    nd = N * D
    lp = {(w, s): np.asarray([nd * ref_image_lp(mdl, rq, codebook, proj, p[mk], c)
                              for p, mk, c in zip(batch["prompt_ids"], batch["prompt_mask"], batch[f"codes_{s}"])])
          for w, mdl in (("pol", pol), ("ref", llm)) for s in ("a", "b")}
    gw, gl = lp["pol", "a"] - lp["ref", "a"], lp["pol", "b"] - lp["ref", "b"]
    want = np.mean(np.log1p(np.exp(-0.05 * (gw - gl))))
    assert rel(loss, want) < 1e-4
    assert float(m["accuracy"]) == np.mean(gw > gl) and 0 < float(m["accuracy"]) < 1


# ----------------------------------------------------------------------------- mDPO

SIGLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=16,
              patch_size=8)
TOWER = dict(embed_dim=16, n_embed=V, latent_shape=[2, 2, 16], code_shape=[2, 2, 4], shared_codebook=True,
             ddconfig=dict(ch=32, out_ch=3, ch_mult=[1], num_res_blocks=1, attn_resolutions=[], resolution=2,
                           z_channels=4))


@pytest.fixture(scope="module")
def mdpo_setup(tiny, tmp_path_factory):
    _, vu, params = tiny
    tower = rqvae.from_config(TOWER, SIGLIP)
    vis = jax.jit(tower.init)(jax.random.key(7), jnp.zeros((1, 3, 16, 16)))["params"]
    vis["quantizer"] = params["codebook"]  # the generation head's codebook, as in vila-u
    rng = np.random.default_rng(0)
    recs = [dict(id=i, image=rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
                 **vd.mdpo_ids(TOK, TOK.eos, "what job?", f"a {a} for sure", "a pilot"))
            for i, a in enumerate(["doctor", "nurse", "chef", "baker", "farmer", "cook", "judge", "clerk"])]
    d = tmp_path_factory.mktemp("mdpo") / "ds"
    vd.write_dataset(d, "mdpo", recs, codebook_size=V)
    return (vu, params, tower, vis), d


def test_mdpo_terms_and_corrupted_image(tiny, mdpo_setup, rel):
    (llm, rq, codebook, proj), _, params = tiny
    model, d = mdpo_setup
    task = vp.VilaUPrefTask(task_config("mdpo", d, beta=0.1, **{"lora.dropout": 0.0}), model=model)
    _, frozen = task.init(jax.random.key(0))
    lora = random_lora(params, seed=4, scale=0.1)
    batch = {k: jnp.asarray(v) for k, v in task.batch(0, 0, 1).items()}
    key = jax.random.key(9)
    def run(lora, frozen, batch, key):
        return task.loss(lora, frozen, batch, key), task.mdpo_logprobs(lora, frozen, batch, key), \
            task.mdpo_codes(frozen, batch, key)

    (loss, m), (pol, ref), (clean, bad, boxes) = jax.jit(run)(lora, frozen, batch, key)
    pol, ref = np.asarray(pol, np.float64), np.asarray(ref, np.float64)
    ls = lambda x: -np.log1p(np.exp(-x))  # noqa: E731  log-sigmoid
    gc, gr, gx = pol[:, 0] - ref[:, 0], pol[:, 1] - ref[:, 1], pol[:, 2] - ref[:, 2]
    terms = {"loss_response": -ls(0.1 * (gc - gr)).mean(), "loss_image": -ls(0.1 * (gc - gx)).mean(),
             "loss_anchor": -ls(0.1 * gc).mean()}
    for k, v in terms.items():
        assert rel(m[k], v) < 1e-5
    assert rel(loss, sum(terms.values())) < 1e-5
    # the columns are: chosen | image, rejected | image, chosen | corrupted image -- vs torch
    assert not np.array_equal(np.asarray(clean), np.asarray(bad))
    pix = np.asarray(siglip.preprocess(batch["image"]))
    boxes = np.asarray(boxes)
    crops = np.stack([F.interpolate(torch.tensor(x[None, :, t:t + h, l:l + w]), size=(16, 16), mode="bilinear",
                                    align_corners=False)[0].numpy() for x, (t, l, h, w) in zip(pix, boxes)])
    want_bad = jax.jit(lambda x: vp.encode_codes(task.tower, frozen, x))(jnp.asarray(crops))
    np.testing.assert_array_equal(np.asarray(bad), np.asarray(want_bad))
    merged = merged_torch(llm, lora, 8.0)
    raw = task.data.read(np.asarray(batch["index"]))  # the batch's records, in batch order
    for i in (0, 5):
        for col, codes, rest in ((0, clean, raw["chosen_ids"]), (1, clean, raw["rejected_ids"]), (2, bad, raw["chosen_ids"])):
            rest_i = np.concatenate([raw["post_ids"][i], rest[i]])
            n_ans = len(rest[i])
            for lp, mdl in ((pol, merged), (ref, llm)):
                want = ref_answer_lp(mdl, codebook, proj, raw["pre_ids"][i], np.asarray(codes[i]), rest_i, n_ans)
                assert rel(lp[i, col], want) < TOL


def test_lora_dropout_mask_rate_and_independence():
    kd = jax.random.key_data(jax.random.split(jax.random.key(0), 8))
    m = np.asarray(jax.jit(lora_lib.hash_keep_mask, static_argnums=(1, 2, 3))(kd, 7, 0.1, (8, 200, 64)))
    m2 = np.asarray(lora_lib.hash_keep_mask(kd, 8, 0.1, (8, 200, 64)))
    n = m[0].size
    assert np.all(np.abs(m.mean(axis=(1, 2)) - 0.9) < 5 * np.sqrt(0.09 / n))  # per row, binomial 5 sigma
    for a, b in ((m, m2), (m[0], m[1]), (m[0, :, :-1], m[0, :, 1:])):  # layers (salts), rows, neighbours
        assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 5 / np.sqrt(a.size)


def test_lora_dropout_mask_is_the_documented_hash_of_the_flat_index():
    """keep[i, ...] = mix(mix(j ^ k_i0 ^ salt) ^ k_i1) >= rate 2^32, j the row-major index within row i
    (numpy uint32 arithmetic), for 2-D to 4-D shapes."""
    def mix(h):
        h = h ^ (h >> np.uint32(16))
        h = h * np.uint32(0x7FEB352D)
        h = h ^ (h >> np.uint32(15))
        h = h * np.uint32(0x846CA68B)
        return h ^ (h >> np.uint32(16))

    kd = np.asarray(jax.random.key_data(jax.random.split(jax.random.key(1), 3)), np.uint32)
    for shape in [(3, 50), (3, 7, 33), (3, 4, 5, 6)]:
        j = np.arange(int(np.prod(shape[1:])), dtype=np.uint32)[None]
        with np.errstate(over="ignore"):
            h = mix(mix(j ^ kd[:, :1] ^ np.uint32(1234)) ^ kd[:, -1:])
        want = (h >= np.uint32(int(0.25 * 2**32))).reshape(shape)
        np.testing.assert_array_equal(np.asarray(lora_lib.hash_keep_mask(jnp.asarray(kd), 1234, 0.25, shape)), want)


def test_crop_keeps_1_to_20_percent_and_matches_torch_resize(rel):
    keys = jax.random.split(jax.random.key(0), 4000)
    boxes = np.asarray(jax.jit(jax.vmap(lambda k: augment.crop_box(k, 256, 256)))(keys), np.float64)
    t, l, h, w = boxes.T
    frac = h * w / 256**2
    slack = (0.5 * (h + w) + 0.25) / 256**2  # rounding h and w to whole pixels
    assert np.all(frac >= 0.01 - slack) and np.all(frac <= 0.2 + slack)
    assert frac.min() < 0.012 and frac.max() > 0.195  # the whole 1-20% range is used
    assert np.all(w / h >= 0.75 - 1 / h) and np.all(w / h <= 4 / 3 + 1 / h)
    assert np.all(t >= 0) and np.all(l >= 0) and np.all(t + h <= 256) and np.all(l + w <= 256)
    img = np.random.default_rng(0).standard_normal((8, 3, 40, 56)).astype(np.float32)
    out, bx = jax.jit(vp.random_resized_crop)(keys[:8], jnp.asarray(img))
    for x, y, (t, l, h, w) in zip(img, np.asarray(out), np.asarray(bx)):
        ref = F.interpolate(torch.tensor(x[None, :, t:t + h, l:l + w]), size=(40, 56), mode="bilinear",
                            align_corners=False)[0].numpy()
        assert rel(y, ref) < 1e-5


# ----------------------------------------------------------------------------- data and bad input

def test_pairs_roundtrip_and_sft_view(tmp_path):
    recs = pair_dataset(tmp_path / "ds", n=5)
    data = vd.VilaUData(tmp_path / "ds")
    assert data.kind == "pairs" and len(data) == 5 and data.code_shape == (N, D)
    got = data.read([3, 1])
    np.testing.assert_array_equal(got["codes_b"][0], recs[3]["codes_b"])
    np.testing.assert_array_equal(got["prompt_ids"][1], recs[1]["prompt_ids"])
    view = vd.SampleView(data)
    s = view.read([6, 7])  # pair 3, halves a and b
    np.testing.assert_array_equal(s["codes"], np.stack([recs[3]["codes_a"], recs[3]["codes_b"]]))


def one_line(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_bad_pairs_are_one_line_errors(tmp_path):
    ids = vd.generation_ids(TOK, "a photo of a doctor")
    a = {"id": 3, "prompt": "a photo of a doctor", "prompt_ids": ids, "codes": random_codes((N, D), 0)}
    with pytest.raises(vd.DataError) as e:
        vd.pair_record(a, dict(a, prompt="a photo of a nurse"))
    one_line(e, "different prompts", "a photo of a nurse")
    with pytest.raises(vd.DataError) as e:
        vd.pair_record(a, dict(a, id=4))
    one_line(e, "different ids", "3 vs 4")
    f = tmp_path / "pairs.jsonl"
    half = {"id": 1, "prompt": "a chef", "codes": random_codes((N, D), 1).tolist()}
    f.write_text(json.dumps({"a": half, "b": dict(half, group="f")}) + "\n" +
                 json.dumps({"a": half, "b": dict(half, prompt="a pilot")}) + "\n")
    with pytest.raises(vd.DataError) as e:
        vd.read_pair_manifest(str(f), TOK)
    one_line(e, f"{f}:2", "different prompts")
    f.write_text(json.dumps({"a": half, "b": dict(half, group="f")}) + "\n")
    (p,) = vd.read_pair_manifest(str(f), TOK)
    assert p["id"] == 1 and p["group_b"] == "f"
    np.testing.assert_array_equal(p["prompt_ids"], vd.generation_ids(TOK, "a chef"))


def test_empty_and_out_of_range_data_are_one_line_errors(tiny, mdpo_setup, tmp_path):
    _, vu, params = tiny
    with pytest.raises(vd.DataError) as e:
        vd.write_dataset(tmp_path / "empty", "pairs", [], codebook_size=V)
    one_line(e, "no 'pairs' records")
    assert not (tmp_path / "empty").exists()
    with pytest.raises(vd.DataError) as e:
        vd.VilaUData(tmp_path / "nothing")
    one_line(e, "no VILA-U dataset")
    rec = {"id": 0, "prompt": "p", "prompt_ids": prompts(1)[0], "codes_a": random_codes((N, D), 0),
           "codes_b": random_codes((N, D), 1), "group_a": "m", "group_b": "f"}
    bad = dict(rec, codes_b=np.where(np.arange(N * D).reshape(N, D) == 5, V, rec["codes_b"]))
    with pytest.raises(vd.DataError) as e:
        vd.write_dataset(tmp_path / "range", "pairs", [rec, bad], codebook_size=V)
    one_line(e, "record 1", "codes_b", f"code {V}", f"[0, {V})")
    assert not (tmp_path / "range").exists()
    # data that do not fit the model: codebook size, and fewer pairs than one batch
    vd.write_dataset(tmp_path / "big", "pairs", [rec], codebook_size=V + 10)
    with pytest.raises(UserError) as e:
        vp.VilaUPrefTask(task_config("bpo", tmp_path / "big"), model=(vu, params))
    one_line(e, f"codebook of {V + 10}", f"from {V}")
    vd.write_dataset(tmp_path / "one", "pairs", [rec], codebook_size=V)
    with pytest.raises(UserError) as e:
        vp.VilaUPrefTask(task_config("bpo", tmp_path / "one"), model=(vu, params))
    one_line(e, "fewer than the global batch 8")
    with pytest.raises(UserError) as e:
        vp.VilaUPrefTask(task_config("mdpo", tmp_path / "one"), model=mdpo_setup[0])
    one_line(e, "holds 'pairs' records", "'mdpo'")


@pytest.mark.slow
@pytest.mark.parametrize("loss, metric", [("bpo", "balance"), ("dpo", "margin"), ("mdpo", "loss_image")])
def test_tiny_preset_runs_through_the_cli(tmp_path, loss, metric):
    """configs/{bpo,dpo,mdpo}_vila_u.py:tiny: builds the tiny model and data on first use, trains, saves the LoRA."""
    from fairjax import train

    s = train.run(["--config", f"configs/{loss}_vila_u.py:tiny", "--workdir", str(tmp_path / loss),
                   "--config.tiny_root", str(tmp_path / "tiny"), "--config.progress_bar=False",
                   "--config.total_steps=1"])
    assert s["step"] == 1 and np.isfinite(s["loss"]) and metric in s
    assert lora_lib.load(s["lora"])[1]["loss"] == loss
