"""The SDXL preference task (PopAlign / Diffusion-DPO / SFT) through the trainer, on a tiny
random SDXL-shaped model (``fairjax.diffusion.tiny`` preset ``micro``) on CPU.

References come from outside the task: a hand-written single-device step (plain JAX + optax,
per the trainer's documented key schedule), diffusers' PyTorch UNet and DDPMScheduler with
the same weights, noise, timesteps and embeddings (float64) with the reference code's loss
formulas, transformers' CLIP text encoders, and diffusers' ``load_lora_adapter``.
"""

from __future__ import annotations

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fairjax import lora as lora_lib
from fairjax.diffusion import text_embeds
from fairjax import trainer
from fairjax.config import load_config_file
from fairjax.convert.core import export_state
from fairjax.io.tree import flatten, path_str, shapes_of
from fairjax.io.model_dir import load_params
from fairjax.tasks import diffusion_pref as dp
from fairjax.diffusion import tiny as tiny_sdxl
from fairjax.data import pairs as pairs_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model_dir, data_dir, text-embedding cache path) of the micro preset, built once."""
    root = tmp_path_factory.mktemp("tiny")
    model_dir, data_dir = tiny_sdxl.ensure(str(root / "micro"), "micro")
    cache = str(root / "text_embeds.safetensors")
    text_embeds.cached_table(model_dir, tiny_sdxl.CAPTIONS, cache)
    return model_dir, data_dir, cache


def config(tiny, loss="popalign", **over):
    model_dir, data_dir, cache = tiny
    c = dp.make_config(loss, "tiny")
    c.tiny = ""
    c.model.dir, c.data.path, c.text_embeds.path = model_dir, data_dir, cache
    c.total_steps, c.progress_bar, c.log_every_steps = 1, False, 1
    c.checkpoint.every_steps = 0
    for k, v in over.items():
        node = c
        *head, last = k.split(".")
        for h in head:
            node = node[h]
        node[last] = v
    return c


def max_rel(a, b, rel):
    return max(jax.tree.leaves(jax.tree.map(rel, a, b)))


# ----------------------------------------------------------------------------- sharding


class PerturbedPolicy(dp.DiffusionPrefTask):
    """The task with the policy moved off the reference at step 0 (else g is pure rounding noise)."""

    def init(self, rng):
        params, frozen = super().init(rng)
        r = np.random.default_rng(5)
        return jax.tree.map(lambda w: (w * (1 + 0.05 * r.standard_normal(w.shape))).astype(w.dtype), params), frozen


def reference_step(task, cfg):
    """One SGD step (clip + lr) on the default device, by the trainer's documented key schedule."""
    init_key, train_key = jax.random.split(jax.random.key(cfg.seed))
    params, frozen = task.init(init_key)
    batch = task.batch(0, 0, 1)
    key = jax.random.fold_in(jax.random.fold_in(train_key, 0), 0)
    (loss, _), g = jax.jit(jax.value_and_grad(task.loss, has_aux=True))(params, frozen, batch, key)
    g, _ = optax.clip_by_global_norm(cfg.optimizer.grad_clip).update(g, optax.EmptyState())
    new = jax.tree.map(lambda p, d: p - cfg.optimizer.lr * d, params, g)
    return float(loss), jax.device_get(params), jax.device_get(new)


@pytest.mark.parametrize("mesh", [dict(data=8), pytest.param(dict(data=2, fsdp=4), marks=pytest.mark.slow)],
                         ids=["data8", "data2xfsdp4"])
def test_sharded_step_equals_single_device(tiny, tmp_path, rel, mesh):
    """PopAlign, full UNet: loss and update of one step on 8 devices == the 1-device step.

    SGD (lr 1, clip 1) makes the update the clipped gradient itself, so comparing the updates
    checks the sharded gradient (Adam's first step is ~lr*sign(g): rounding-level gradients
    would flip whole updates).  beta 20: with beta 5000, float32 rounding of the two ~1.0 mse
    terms (~1e-7) moves the logits by ~5e-4 whatever the sharding."""
    cfg = config(tiny, beta=20.0, **{"optimizer.name": "sgd", "optimizer.lr": 1.0, "optimizer.warmup_steps": 0})
    cfg.mesh = mesh
    summary = trainer.train(cfg, PerturbedPolicy(cfg, str(tmp_path)), str(tmp_path))
    ref_loss, before, ref_new = reference_step(PerturbedPolicy(cfg, str(tmp_path)), cfg)
    out = str(tmp_path / "model" / "unet" / "params.safetensors")
    got = load_params(out, shapes_of(before))
    assert rel(summary["loss"], ref_loss) <= 1e-5
    assert max_rel(got, ref_new, rel) <= 1e-5
    flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])  # noqa: E731
    assert rel(flat(got) - flat(before), flat(ref_new) - flat(before)) <= 1e-5
    assert abs(summary["loss"] - np.log(2)) > 1e-2  # the policy really differs from the reference
    assert {"loss", "accuracy", "pair_accuracy", "g_w", "g_l", "grad_norm", "lr", "mse_policy"} <= set(summary)


# ----------------------------------------------------------------------------- loss vs diffusers


def _torch_pieces(task, params_list):
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from fairjax.convert import unet as unet_convert

    cfg = {k: v for k, v in task.unet_config.items() if not k.startswith("_")}
    models = []
    for params in params_list:
        m = UNet2DConditionModel.from_config(cfg)
        state = {k: torch.from_numpy(np.array(v, np.float64)) for k, v in
                 export_state(params, literal=unet_convert.LITERAL)}
        m.load_state_dict(state, strict=True)
        models.append(m.double().eval())
    sched = DDPMScheduler.from_config(tiny_sdxl.SDXL_SCHEDULER)
    return models, sched


def test_loss_matches_diffusers_reference(tiny, rel):
    """PopAlign and Diffusion-DPO losses (and per-row mse) of the task == the reference code's
    formulas on diffusers' UNet (float64) with the same weights, noise, timesteps and embeddings."""
    import torch
    import diffusers  # noqa: F401
    import torch.nn.functional as F

    beta = 20.0
    pop = dp.DiffusionPrefTask(config(tiny, beta=beta))
    dpo = dp.DiffusionPrefTask(config(tiny, "diffusion_dpo", beta=beta))
    base, _ = pop.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    policy = jax.tree.map(lambda w: (w + 0.05 * rng.standard_normal(w.shape) * np.abs(w).mean()).astype(np.float32),
                          base)
    batch = pop.batch(3, 0, 1)
    key = jax.random.key(7)

    @jax.jit
    def run(p, f, b, k):
        return pop.rewards(p, f, b, k), pop.loss(p, f, b, k), dpo.loss(p, f, b, k)

    (mse, ref), (l_pop, m_pop), (l_dpo, m_dpo) = run(policy, base, batch, key)
    eps, t = dp.shared_noise(key, batch["slot"], batch["latents"].shape[1:], 1000)  # the task's draws (inputs)

    (pol_t, ref_t), sched = _torch_pieces(pop, [policy, base])
    d = lambda x: torch.from_numpy(np.asarray(x, np.float64))  # noqa: E731
    x0, noise, tt = d(batch["latents"]), d(eps), torch.from_numpy(np.asarray(t, np.int64))
    noisy = sched.add_noise(x0, noise, tt)
    n = x0.shape[0]
    added = {"text_embeds": d(batch["text_embeds"]), "time_ids": d(pop.time_ids).repeat(n, 1)}
    with torch.no_grad():
        pred = pol_t(noisy, tt, d(batch["encoder_hidden_states"]), added_cond_kwargs=added).sample
        pred_ref = ref_t(noisy, tt, d(batch["encoder_hidden_states"]), added_cond_kwargs=added).sample
    model_losses = (pred - noise).pow(2).mean(dim=[1, 2, 3])
    ref_losses = (pred_ref - noise).pow(2).mean(dim=[1, 2, 3])
    assert rel(mse, model_losses.numpy()) <= 1e-5 and rel(ref, ref_losses.numpy()) <= 1e-5
    # batch = [winners; losers] of one process: slot i is row i and row n/2 + i
    assert np.array_equal(batch["slot"][: n // 2], batch["slot"][n // 2:]) and batch["is_winner"][: n // 2].all()
    model_w, model_l = model_losses.chunk(2)
    ref_w, ref_l = ref_losses.chunk(2)
    # Diffusion-DPO (DiffusionDPO train.py)
    inside = -0.5 * beta * ((model_w - model_l) - (ref_w - ref_l))
    want_dpo = -F.logsigmoid(inside).mean()
    assert rel(l_dpo, want_dpo.numpy()) <= 1e-5
    assert float(m_dpo["accuracy"]) == float((inside > 0).double().mean())
    # PopAlign (docs/reference.md): g = ref - model, s = +-1, k = 0.5 mean g_w + 0.5 mean g_l
    g = ref_losses - model_losses
    s = torch.cat([torch.ones(n // 2), -torch.ones(n // 2)]).double()
    k = 0.5 * g[: n // 2].mean() + 0.5 * g[n // 2:].mean()
    want_pop = -F.logsigmoid(s * beta * (g - k)).mean()
    assert rel(l_pop, want_pop.numpy()) <= 1e-5
    assert rel(m_pop["g_w"], g[: n // 2].mean().numpy()) <= 1e-4
    assert 0.0 < float(jnp.abs(jnp.asarray(ref - mse)).max())  # the policy differs from the reference


def _prompted(tiny):
    """The micro records with a ``prompt`` per record: a winner's is the next caption (the
    "identity prompt" it was generated from), a loser's its own caption."""
    caps = list(tiny_sdxl.CAPTIONS)
    recs = _records(tiny)
    for r in recs:
        r["prompt"] = caps[(caps.index(r["caption"]) + 1) % len(caps)] if r["is_winner"] else r["caption"]
    return recs


def test_identity_anchor_is_the_distance_to_the_reference_on_winner_prompts(tiny, rel):
    """``anchor_weight = w``: loss = the preference loss, unchanged, + w * mean over each winner
    at two draws of mean (eps_policy - eps_ref)^2 under the winner's own prompt; draw ``c`` of
    pair slot ``i`` keyed ``fold_in(fold_in(key, 0x7A4C), i + c * pairs)``. Predictions from
    diffusers' UNet (float64) with the same weights."""
    import torch
    import diffusers  # noqa: F401
    recs = _prompted(tiny)
    src = pairs_lib.ArrayPrefs.from_records(recs)
    w = 30.0
    plain = dp.DiffusionPrefTask(config(tiny, beta=20.0), source=src)
    task = dp.DiffusionPrefTask(config(tiny, beta=20.0, anchor_weight=w), source=src)
    base, _ = task.init(jax.random.key(0))
    rng = np.random.default_rng(4)
    policy = jax.tree.map(lambda v: (v + 0.05 * rng.standard_normal(v.shape) * np.abs(v).mean()).astype(np.float32),
                          base)
    step, key = 1, jax.random.key(11)
    batch = task.batch(step, 0, 1)
    loss, m = jax.jit(task.loss)(policy, base, batch, key)
    pref, _ = jax.jit(plain.loss)(policy, base, plain.batch(step, 0, 1), key)

    # the winners of global batch `step` and their prompts, straight from the records
    pairs = src.pairs()
    units = dp.step_units(len(pairs), task.per_step, task.config.seed, step)
    winners = [recs[i] for i in pairs[units, 0]]
    n = len(winners)
    assert n == 8 and all(r["prompt"] != r["caption"] for r in winners)
    table, _ = text_embeds.read_cache(tiny[2])
    rows = [table.captions.index(r["prompt"]) for r in winners] * 2
    sub = jax.random.fold_in(key, 0x7A4C)
    eps, t = [], []
    for j in range(2 * n):
        k_eps, k_t = jax.random.split(jax.random.fold_in(sub, j))  # j = slot i + copy c * n
        eps.append(np.asarray(jax.random.normal(k_eps, (4, 8, 8), jnp.float32), np.float64))
        t.append(int(jax.random.randint(k_t, (), 0, 1000, jnp.int32)))
    (pol_t, ref_t), sched = _torch_pieces(task, [policy, base])
    d = lambda x: torch.from_numpy(np.asarray(x, np.float64))  # noqa: E731
    tt = torch.tensor(t)
    noisy = sched.add_noise(d(np.stack([r["latents"] for r in winners] * 2)), d(np.stack(eps)), tt)
    added = {"text_embeds": d(table.text_embeds[rows]), "time_ids": d(task.time_ids).repeat(2 * n, 1)}
    with torch.no_grad():
        a = pol_t(noisy, tt, d(table.encoder_hidden_states[rows]), added_cond_kwargs=added).sample
        b = ref_t(noisy, tt, d(table.encoder_hidden_states[rows]), added_cond_kwargs=added).sample
    want = float((a - b).pow(2).mean())
    assert want > 0 and rel(m["anchor"], want) <= 1e-4
    assert rel(m["preference_loss"], pref) <= 1e-6
    assert rel(loss, float(pref) + w * want) <= 1e-5


def test_identity_anchor_pulls_identity_prompts_back_to_the_reference(tiny, tmp_path):
    """Trained LoRA, same data and steps: with the anchor the winners' own prompts end nearer to
    the reference's predictions (the anchor metric measured on fresh draws after training)."""
    src = pairs_lib.ArrayPrefs.from_records(_prompted(tiny))
    over = {"lora.rank": 4, "lora.alpha": 4.0, "optimizer.lr": 3e-2, "optimizer.warmup_steps": 0, "beta": 2000.0,
            "total_steps": 12}
    probe = dp.DiffusionPrefTask(config(tiny, anchor_weight=1.0, **over), source=src)
    _, base = probe.init(jax.random.key(0))
    dist = {}
    for w in (0.0, 3000.0):
        cfg = config(tiny, anchor_weight=w, **over)
        wd = tmp_path / f"w{w:g}"
        trainer.train(cfg, dp.DiffusionPrefTask(cfg, str(wd), source=src), str(wd))
        trained, _ = lora_lib.load(str(wd / "unet_lora.safetensors"))
        trained = jax.tree.map(jnp.asarray, trained)
        dist[w] = np.mean([float(jax.jit(probe.loss)(trained, base, probe.batch(s, 0, 1), jax.random.key(100 + s))[1]
                                 ["anchor"]) for s in range(4)])
    assert dist[0.0] > 0 and dist[3000.0] < 0.5 * dist[0.0], dist


def test_noise_and_timestep_shared_within_pairs(tiny):
    task = dp.DiffusionPrefTask(config(tiny))
    batch = task.batch(0, 0, 1)
    eps, t = dp.shared_noise(jax.random.key(1), batch["slot"], batch["latents"].shape[1:], 1000)
    half = len(t) // 2
    np.testing.assert_array_equal(eps[:half], eps[half:])
    np.testing.assert_array_equal(t[:half], t[half:])
    assert len(np.unique(np.asarray(t[:half]))) > 1 and float(jnp.abs(eps[0] - eps[1]).max()) > 0


def test_timestep_range_is_drawn_from_and_used(tiny, rel):
    """``config.t_min / t_max``: t ~ U{t_min..t_max-1}, still shared within pairs, and the task's
    rewards are the denoising errors at exactly those draws."""
    task = dp.DiffusionPrefTask(config(tiny, t_min=300, t_max=700))
    batch, key = task.batch(0, 0, 1), jax.random.key(5)
    many = dp.shared_noise(key, jnp.arange(4000), batch["latents"].shape[1:], 700, 300)[1]
    assert int(many.min()) == 300 and int(many.max()) == 699  # both ends reached, nothing outside
    eps, t = dp.shared_noise(key, batch["slot"], batch["latents"].shape[1:], 700, 300)
    half = len(t) // 2
    np.testing.assert_array_equal(t[:half], t[half:])
    base, _ = task.init(jax.random.key(0))
    rng = np.random.default_rng(1)
    policy = jax.tree.map(lambda w: (w + 0.05 * rng.standard_normal(w.shape) * np.abs(w).mean()).astype(np.float32),
                          base)
    mse, ref = jax.jit(task.rewards)(policy, base, batch, key)
    assert rel(mse, task.denoise_mse(policy, batch, eps, t)) <= 1e-6
    assert rel(ref, task.denoise_mse(base, batch, eps, t)) <= 1e-6
    full = dp.DiffusionPrefTask(config(tiny))  # the default range draws other timesteps from the same key
    assert rel(jax.jit(full.rewards)(policy, base, batch, key)[0], mse) > 1e-3


def test_noise_draws_average_independent_single_draws(tiny, rel):
    """``noise_draws = K``: each row's mse (policy and reference) is the mean of K one-draw
    evaluations with keys ``fold_in(key, k)`` (one-draw rewards are checked against diffusers above),
    pairs still share every draw, and the loss is PopAlign's formula on the averaged rewards."""
    one = dp.DiffusionPrefTask(config(tiny))
    three = dp.DiffusionPrefTask(config(tiny, noise_draws=3))
    base, _ = one.init(jax.random.key(0))
    rng = np.random.default_rng(1)
    policy = jax.tree.map(lambda w: (w + 0.05 * rng.standard_normal(w.shape) * np.abs(w).mean()).astype(np.float32),
                          base)
    batch, key = one.batch(2, 0, 1), jax.random.key(3)
    singles = [jax.jit(one.rewards)(policy, base, batch, jax.random.fold_in(key, k)) for k in range(3)]
    mse, ref = jax.jit(three.rewards)(policy, base, batch, key)
    want_mse = np.mean([np.asarray(m, np.float64) for m, _ in singles], axis=0)
    want_ref = np.mean([np.asarray(r, np.float64) for _, r in singles], axis=0)
    assert rel(mse, want_mse) <= 1e-6 and rel(ref, want_ref) <= 1e-6
    assert float(np.abs(np.asarray(singles[0][0]) - np.asarray(singles[1][0])).max()) > 0  # draws differ
    g = want_ref - want_mse
    n = len(g)
    s = np.where(np.arange(n) < n // 2, 1.0, -1.0)
    k = 0.5 * g[: n // 2].mean() + 0.5 * g[n // 2:].mean()
    z = s * float(three.config.beta) * (g - k)
    loss, _ = jax.jit(three.loss)(policy, base, batch, key)
    assert rel(loss, np.mean(np.logaddexp(0.0, -z))) <= 1e-5


def test_stratified_draws_weight_one_draw_per_timestep_range(tiny, rel):
    """``stratify_draws``: draw ``k`` is a one-draw evaluation restricted to the ``k``-th of ``K`` ranges of
    ``[t_min, t_max)`` (key ``fold_in(key, k)``), weighted by the range's share of the timesteps."""
    t_min, t_max, draws = 100, 900, 3  # ranges [100, 367), [367, 633), [633, 900): 267, 266, 267 timesteps
    strat = dp.DiffusionPrefTask(config(tiny, noise_draws=draws, stratify_draws=True, t_min=t_min, t_max=t_max))
    edges = [(100, 367), (367, 633), (633, 900)]
    base, _ = strat.init(jax.random.key(0))
    rng = np.random.default_rng(2)
    policy = jax.tree.map(lambda w: (w + 0.05 * rng.standard_normal(w.shape) * np.abs(w).mean()).astype(np.float32),
                          base)
    batch, key = strat.batch(1, 0, 1), jax.random.key(4)
    want_mse, want_ref = 0.0, 0.0
    for k, (lo, hi) in enumerate(edges):
        one = dp.DiffusionPrefTask(config(tiny, t_min=lo, t_max=hi))
        m, r = jax.jit(one.rewards)(policy, base, batch, jax.random.fold_in(key, k))
        want_mse = want_mse + (hi - lo) / (t_max - t_min) * np.asarray(m, np.float64)
        want_ref = want_ref + (hi - lo) / (t_max - t_min) * np.asarray(r, np.float64)
        _, t = dp.shared_noise(jax.random.fold_in(key, k), jnp.asarray(batch["slot"]), batch["latents"].shape[1:],
                               hi, lo)
        assert lo <= int(np.min(t)) and int(np.max(t)) < hi
    mse, ref = jax.jit(strat.rewards)(policy, base, batch, key)
    assert rel(mse, want_mse) <= 1e-6 and rel(ref, want_ref) <= 1e-6
    independent = dp.DiffusionPrefTask(config(tiny, noise_draws=draws, t_min=t_min, t_max=t_max))
    assert rel(jax.jit(independent.rewards)(policy, base, batch, key)[0], mse) > 1e-4  # not the unstratified draws


# ----------------------------------------------------------------------------- data, conditioning


def test_batches_follow_the_dataset(tiny):
    """Winner/loser latents, captions (dropped to "" per pair) and the process split of a batch."""
    from fairjax.data import prefs

    cfg = config(tiny, **{"data.caption_dropout": 0.5})
    task = dp.DiffusionPrefTask(cfg)
    data = prefs.PreferenceData(tiny[1])
    pairs = data.pairs()
    step = 2
    units = prefs.PreferenceBatches(data, 8, seed=cfg.seed, unit="pair").global_indices(step)
    full = task.batch(step, 0, 1)
    w, l = data.read(pairs[units, 0]), data.read(pairs[units, 1])
    np.testing.assert_array_equal(full["latents"], np.concatenate([w["latents"], l["latents"]]))
    table, _ = text_embeds.read_cache(tiny[2])
    drop = np.random.default_rng([cfg.seed, 1, step]).random(8) < 0.5
    assert 0 < drop.sum() < 8
    for i in range(8):
        cap = "" if drop[i] else w["caption"][i]
        want = table.encoder_hidden_states[table.captions.index(cap)]
        np.testing.assert_array_equal(full["encoder_hidden_states"][i], want)
        np.testing.assert_array_equal(full["encoder_hidden_states"][8 + i], want)
    halves = [task.batch(step, i, 2) for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([h["latents"][:4] for h in halves]), full["latents"][:8])
    np.testing.assert_array_equal(np.concatenate([h["slot"] for h in halves]),
                                  np.r_[0:4, 0:4, 4:8, 4:8])


def test_text_embeddings_match_transformers(tiny, tmp_path, rel):
    """The cached SDXL conditioning == transformers' CLIP encoders (penultimate states, pooled
    projection) on the same weights and token ids; a changed encoder file invalidates the cache."""
    import torch
    import transformers
    from fairjax.convert import clip as clip_convert
    from fairjax.io.model_dir import read_json

    model_dir, _, cache = tiny
    table, fp = text_embeds.read_cache(cache)
    enc = text_embeds.load_encoders(model_dir)
    assert fp == enc.fingerprint and table.captions[0] == ""
    ids = [tok(table.captions) for tok in enc.tokenizers]
    outs = []
    for i, name in enumerate(("text_encoder", "text_encoder_2")):
        folder = os.path.join(model_dir, name)
        cfg = read_json(os.path.join(folder, "config.json"))
        exported = str(tmp_path / name)  # transformers' own loader reads the exported folder
        clip_convert.export_clip_text(exported, cfg, load_params(os.path.join(folder, "params.safetensors")))
        model = getattr(transformers, cfg["architectures"][0]).from_pretrained(exported).eval()
        with torch.no_grad():
            outs.append(model(torch.from_numpy(ids[i].astype(np.int64)), output_hidden_states=True))
    want = torch.cat([outs[0].hidden_states[-2], outs[1].hidden_states[-2]], -1).numpy()
    assert rel(table.encoder_hidden_states, want) <= 1e-5
    assert rel(table.text_embeds, outs[1].text_embeds.numpy()) <= 1e-5


def test_text_cache_is_reused_and_invalidated(tiny, tmp_path, monkeypatch):
    import shutil

    model_dir = str(tmp_path / "model")
    shutil.copytree(tiny[0], model_dir)
    cache = str(tmp_path / "te.safetensors")
    first = text_embeds.cached_table(model_dir, ["a photo of a chef"], cache)
    calls = []
    real = text_embeds.load_encoders
    monkeypatch.setattr(text_embeds, "load_encoders", lambda d: calls.append(d) or real(d))
    again = text_embeds.cached_table(model_dir, ["a photo of a chef"], cache)
    assert calls == [] and again.captions == first.captions
    text_embeds.cached_table(model_dir, ["a photo of a nurse"], cache)  # a new caption: recompute
    assert len(calls) == 1
    p = os.path.join(model_dir, "text_encoder", "params.safetensors")
    with open(p, "r+b") as f:  # change a weight byte: other encoders
        f.seek(os.path.getsize(p) - 2)
        f.write(b"\x11\x22")
    text_embeds.cached_table(model_dir, ["a photo of a nurse"], cache)
    assert len(calls) == 2


# ----------------------------------------------------------------------------- LoRA


@pytest.fixture(scope="module")
def lora_run(tiny, tmp_path_factory):
    """Two AdamW steps of PopAlign LoRA (rank 4) on 8 devices; returns (workdir, task, frozen seen by finish)."""
    workdir = str(tmp_path_factory.mktemp("lora_run"))
    cfg = config(tiny, total_steps=2, **{"lora.rank": 4, "lora.alpha": 8.0, "optimizer.lr": 1e-2,
                                         "optimizer.warmup_steps": 0})
    cfg.mesh = dict(data=2, fsdp=4)
    task = dp.DiffusionPrefTask(cfg, workdir)
    seen = {}
    finish = task.finish

    def spy(trainable, frozen, wd):
        seen["frozen"] = jax.device_get(frozen)
        seen["trainable"] = jax.device_get(trainable)
        return finish(trainable, frozen, wd)

    task.finish = spy
    summary = trainer.train(cfg, task, workdir)
    return workdir, task, seen, summary


def test_lora_keeps_base_bit_identical_and_optimizer_state_lora_only(lora_run):
    import orbax.checkpoint as ocp

    workdir, task, seen, summary = lora_run
    from fairjax.models import unet as unet_mod

    _, base = unet_mod.load(task.model_dir)
    for (p, a), (q, b) in zip(sorted(flatten(seen["frozen"]).items()), sorted(flatten(base).items())):
        assert p == q and a.dtype == b.dtype and np.array_equal(a, b), path_str(p)
    lora = seen["trainable"]
    assert set(lora) == set(lora_lib.match_kernels(base, dp.DEFAULT_LORA_TARGETS))
    assert all(np.abs(e["b"]).max() > 0 for e in lora.values())  # trained (b starts at 0)
    saved, meta = lora_lib.load(os.path.join(workdir, "unet_lora.safetensors"))
    assert meta["alpha"] == 8.0 and meta["rank"] == 4
    for k in lora:
        np.testing.assert_array_equal(saved[k]["b"], lora[k]["b"])
    # the checkpoint's state: trainable and optimizer moments hold LoRA-shaped leaves only
    meta_tree = ocp.StandardCheckpointer().metadata(os.path.join(workdir, "checkpoints", "2", "state"))
    tree = getattr(meta_tree, "item_metadata", meta_tree)
    tree = getattr(tree, "tree", tree)
    from fairjax.io.tree import path_str as key_path

    leaves = {key_path(p): tuple(v.shape) for p, v in
              jax.tree_util.tree_leaves_with_path(dict(tree), is_leaf=lambda x: hasattr(x, "shape"))}
    lora_shapes = sorted(tuple(np.shape(x)) for x in jax.tree.leaves(lora))
    trainable = sorted(s for p, s in leaves.items() if p.startswith("trainable/"))
    opt = [s for p, s in leaves.items() if p.startswith("opt_state/") and len(s) > 0]
    assert trainable == lora_shapes
    assert sorted(opt) == sorted(lora_shapes * 2)  # Adam mu and nu, nothing else
    assert summary["step"] == 2 and np.isfinite(summary["loss"])


def test_trained_lora_exports_to_diffusers(lora_run, tmp_path, rel):
    """tools/export_diffusers.py: the LoRA trained above, loaded with load_lora_adapter, moves the
    PyTorch UNet's output exactly as the Flax merge moves the Flax UNet's."""
    import torch
    import diffusers
    import peft  # noqa: F401
    tool_path = os.path.join(ROOT, "tools", "export_diffusers.py")
    spec = importlib.util.spec_from_file_location("export_diffusers", tool_path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)

    workdir, task, seen, _ = lora_run
    lora_file = os.path.join(workdir, "unet_lora.safetensors")
    base_out, lora_out = str(tmp_path / "base"), str(tmp_path / "lora")
    assert tool.main([task.model_dir, base_out]) == 0
    assert tool.main([task.model_dir, lora_out, "--lora", lora_file]) == 0
    from safetensors.numpy import load_file

    sd = load_file(os.path.join(lora_out, "pytorch_lora_weights.safetensors"))
    sd = {k: torch.from_numpy(v) for k, v in sd.items()}
    model = diffusers.UNet2DConditionModel.from_pretrained(base_out, subfolder="unet").eval()
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    t = np.array([10.0, 600.0], np.float32)
    ctx = rng.standard_normal((2, 77, task.unet.config.cross_attention_dim)).astype(np.float32)
    added = {"text_embeds": rng.standard_normal((2, task.table.pooled_dim)).astype(np.float32),
             "time_ids": np.tile(task.time_ids, (2, 1))}
    tk = {k: torch.from_numpy(v) for k, v in added.items()}
    tx, tt, tctx = (torch.from_numpy(v) for v in (x, t, ctx))

    def forward():
        with torch.no_grad():
            return model(tx, tt, tctx, added_cond_kwargs=tk).sample.numpy()

    base_pt = forward()
    model.load_lora_adapter(sd, prefix="unet", adapter_name="fair")
    lora_pt = forward()
    apply = jax.jit(task.unet.apply)
    base_fx = apply({"params": seen["frozen"]}, x, t, ctx, added)
    lora_fx = apply({"params": lora_lib.merge(seen["frozen"], seen["trainable"], task.lora_alpha)}, x, t, ctx, added)
    assert rel(lora_fx, lora_pt) <= 1e-5
    assert rel(base_pt, lora_pt) > 1e-3  # the LoRA moves the output
    assert rel(np.asarray(lora_fx) - np.asarray(base_fx), lora_pt - base_pt) <= 1e-3


# ----------------------------------------------------------------------------- bad input


def _records(tiny, **kw):
    return tiny_sdxl.records("micro", **kw)


def _one_line(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg


def test_latents_that_do_not_fit_the_unet(tiny):
    src = pairs_lib.ArrayPrefs.from_records(_records(tiny, channels=3))
    with pytest.raises(dp.ConfigError) as e:
        dp.DiffusionPrefTask(config(tiny), source=src)
    _one_line(e, "(3, 8, 8)", "(4, H, W)")


def test_empty_or_pairless_dataset(tiny):
    from fairjax.errors import DataError

    with pytest.raises(DataError) as e:
        pairs_lib.ArrayPrefs.from_records([])
    _one_line(e, "empty")
    winners_only = [r for r in _records(tiny) if r["is_winner"]]
    with pytest.raises(dp.ConfigError) as e:
        dp.DiffusionPrefTask(config(tiny), source=pairs_lib.ArrayPrefs.from_records(winners_only))
    _one_line(e, "no winner/loser pairs")
    with pytest.raises(dp.ConfigError) as e:
        dp.DiffusionPrefTask(config(tiny, batch_size=64))
    _one_line(e, "16 winner/loser pairs, fewer than the 32 per step")


@pytest.mark.parametrize("over, words", [
    (dict(loss="kto"), ["config.loss='kto'"]),
    (dict(batch_size=15), ["batch_size=15 must be even"]),
    (dict(batch_size=16, grad_accum_steps=3), ["grad_accum_steps=3"]),
    (dict(time_ids=(128.0, 128.0, 0.0, 0.0)), ["4 time_ids", "projection_class_embeddings_input_dim is 32"]),
    ({"model.dir": "/nonexistent/model"}, ["/nonexistent/model"]),
    ({"lora.dropout": 0.1}, ["config.lora.dropout=0.1", "set lora.dropout=0"]),
    ({"model.param_dtype": "int8"}, ["config.model.param_dtype='int8'"]),
    (dict(noise_draws=0), ["config.noise_draws=0"]),
    (dict(noise_draws=8, stratify_draws=True, t_min=10, t_max=14), ["noise_draws=8", "t_max - t_min = 4"]),
    (dict(t_min=500, t_max=500), ["config.t_min=500", "t_min < t_max"]),
    (dict(t_max=1001), ["config.t_max=1001", "<= 1000"]),
    (dict(anchor_weight=-1.0), ["config.anchor_weight=-1.0", ">= 0"]),
    (dict(anchor_weight=1.0), ["no 'prompt' field", "build_prefs", "anchor_weight=0"]),
    ({"model.scan_layers": "sometimes"}, ["config.model.scan_layers='sometimes'", "auto, true, false"]),
])
def test_bad_config_is_one_line_error(tiny, over, words):
    from fairjax.errors import UserError

    with pytest.raises(UserError) as e:
        dp.DiffusionPrefTask(config(tiny, **over))
    _one_line(e, *words)


def test_identity_anchor_needs_a_reference(tiny):
    src = pairs_lib.ArrayPrefs.from_records(_prompted(tiny))
    with pytest.raises(dp.ConfigError) as e:
        dp.DiffusionPrefTask(config(tiny, "sft", anchor_weight=1.0), source=src)
    _one_line(e, "anchor_weight", "SFT has no")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny, tmp_path):
    """A NaN latent in batch 1 (SFT, no shuffling): the run stops at step 1 keeping checkpoint 1."""
    recs = _records(tiny)
    winners = [i for i, r in enumerate(recs) if r["is_winner"]]
    recs[winners[9]]["latents"] = np.full_like(recs[0]["latents"], np.nan)  # winner record 9: batch 1 of 8
    cfg = config(tiny, "sft", total_steps=3, batch_size=8, **{"data.shuffle": False, "checkpoint.every_steps": 1})
    cfg.mesh = dict(data=8)
    task = dp.DiffusionPrefTask(cfg, source=pairs_lib.ArrayPrefs.from_records(recs))
    with pytest.raises(trainer.NonFiniteLossError) as e:
        trainer.train(cfg, task, str(tmp_path))
    _one_line(e, "at step 1", f"{tmp_path}/checkpoints/1 is kept")
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]
    assert not os.path.exists(tmp_path / "model")


# ----------------------------------------------------------------------------- configs and CLI


def test_configs_carry_the_reference_recipe():
    for name, loss in (("popalign", "popalign"), ("dpo", "diffusion_dpo"), ("sft", "sft")):
        c = load_config_file(os.path.join(ROOT, "configs", f"{name}_sdxl.py"))
        assert (c.task, c.loss, c.beta, c.total_steps, c.batch_size) == ("diffusion_pref", loss, 5000.0, 750, 16)
        o = c.optimizer
        assert (o.name, o.lr, o.warmup_steps, o.schedule, o.b1, o.b2, o.weight_decay, o.grad_clip) == \
            ("adamw", 5e-7, 200, "constant", 0.9, 0.999, 1e-2, 1.0)
        assert c.data.caption_dropout == 0.2 and c.lora.rank == 0 and c.alpha == 0.5
        assert tuple(c.time_ids) == (1024, 1024, 0, 0, 1024, 1024)
        lora = load_config_file(os.path.join(ROOT, "configs", f"{name}_sdxl.py:lora"))
        assert lora.lora.rank == 32 and lora.lora.targets == dp.DEFAULT_LORA_TARGETS


@pytest.mark.slow
def test_tiny_preset_trains_from_the_command_line(tmp_path, capsys):
    """``python -m fairjax.train --config configs/dpo_sdxl.py:tiny`` builds the tiny model and data in
    the workdir, trains, resumes, and writes the UNet."""
    from fairjax import train

    argv = ["--config", os.path.join(ROOT, "configs", "dpo_sdxl.py:tiny"), "--workdir", str(tmp_path),
            "--config.tiny=micro", "--config.total_steps=2", "--config.progress_bar=false",
            "--config.time_ids=(64.0, 64.0, 0.0, 0.0, 64.0, 64.0)"]
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    assert f"trained UNet written to {tmp_path}/model" in out
    summary = json.loads(out[out.index("{"):])
    assert summary["step"] == 2 and np.isfinite(summary["loss"])
    assert os.path.isfile(tmp_path / "text_embeds.safetensors")
    assert os.path.isfile(tmp_path / "tiny_micro" / "model" / "unet" / "params.safetensors")
    assert os.path.isfile(tmp_path / "model" / "unet" / "params.safetensors")
