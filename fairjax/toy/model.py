"""The toy world's text-to-image model: a tiny SDXL-architecture pixel-space model, pre-trained here.

Components (a fairjax model directory, see :mod:`fairjax.io.model_dir`):

* ``unet/``: the Flax SDXL UNet (:mod:`fairjax.models.unet`) with a tiny SDXL-shaped
  config (DownBlock2D + CrossAttnDownBlock2D, linear projections, ``text_time``
  added embedding of pooled text + 6 micro-conditioning ids), 3 channels in and
  out: it denoises 8 x 8 RGB images directly (pixel space, no VAE).
* ``text_encoder/``, ``text_encoder_2/`` (+ projection): tiny CLIP text encoders,
  random and frozen; the UNet learns to read them.
* ``tokenizer/``, ``tokenizer_2/``: CLIP BPE files over the toy vocabulary (every
  toy word is one token), built deterministically by :func:`write_tokenizer`.
* ``scheduler/scheduler_config.json``: DDPM linear betas, epsilon prediction,
  DDIM sampling (trailing timesteps, x0 clipped to the pixel range).
* ``toy_world.json``: the :class:`~fairjax.toy.world.ToyWorld` it was trained on.

Pre-training (:func:`pretrain`): epsilon-prediction mse
``mean((unet(x_t, t, c) - eps)^2)`` on the biased toy corpus, ``x_t =
sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``, t uniform, 10% of captions dropped
to zero conditioning (what the pipeline feeds the unconditional branch), AdamW with
warm-up and cosine decay. Deterministic for a fixed seed and software stack.

The pre-trained model ships in ``fairjax/assets/toy/`` with ``manifest.json``
(sha256 of every file, the configs, the pre-training settings);
``python -m fairjax.toy.model --out DIR`` rebuilds it, ``--check DIR`` verifies
a directory against its manifest.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time

import numpy as np

from fairjax.errors import UserError
from fairjax.toy.world import WORLD_FILE, ToyWorld, images_to_model

ASSET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "toy")
MANIFEST = "manifest.json"
MAX_LENGTH = 8  # tokens per prompt incl. BOS/EOS ("an amber female teacher" is 6)
TEXT_DIM = 32
BLOCK_OUT_CHANNELS = (32, 64)

SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
    "clip_sample": True,  # x0 estimates clamped to the pixel range [-1, 1]
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "timestep_spacing": "trailing",
    "steps_offset": 0,
}


def unet_config(size: int = 8, channels=None) -> dict:
    """A tiny SDXL-shaped diffusers UNet config for ``size x size`` RGB (3 channels)."""
    channels = list(channels or BLOCK_OUT_CHANNELS)
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": size,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": channels,
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "attention_head_dim": [max(1, ch // 16) for ch in channels],
        "transformer_layers_per_block": [1, 1],
        "use_linear_projection": True,
        "cross_attention_dim": 2 * TEXT_DIM,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 6 * 8 + TEXT_DIM,
        "norm_num_groups": 8,
    }


def text_encoder_config(vocab_size: int, ids: dict, projection: bool) -> dict:
    """A tiny transformers ``CLIPTextConfig`` dict (hidden 32, 2 layers, 2 heads, 8 positions)."""
    return {
        "architectures": ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab_size,
        "hidden_size": TEXT_DIM,
        "intermediate_size": 64,
        "projection_dim": TEXT_DIM,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": MAX_LENGTH,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["eos"],
    }


# ----------------------------------------------------------------------------- tokenizer

def _bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP byte -> printable unicode table (the base alphabet of a CLIP vocab)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def bpe_for_words(words) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """``(vocab, merges)`` of a CLIP BPE that encodes each word of ``words`` as one token.

    Base alphabet: the 256 byte symbols and their ``</w>`` forms; each word ``c1..cn``
    gets the merge chain ``(c1, c2), (c1c2, c3), ..., (c1..c(n-1), cn</w>)``.
    Words are taken longest first so a shorter word's chain never pre-empts a longer
    word's (checked by the tokenizer test).
    """
    base = _bytes_to_unicode()
    tokens = base + [b + "</w>" for b in base]
    merges: list[tuple[str, str]] = []
    seen = set(tokens)
    for w in sorted(set(words), key=lambda s: (-len(s), s)):
        if len(w) < 2:
            continue
        cur = w[0]
        for i, ch in enumerate(w[1:], 1):
            nxt = ch + "</w>" if i == len(w) - 1 else ch
            pair = (cur, nxt)
            merged = cur + nxt
            if pair not in merges:
                merges.append(pair)
            if merged not in seen:
                seen.add(merged)
                tokens.append(merged)
            cur = w[: i + 1]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer(folder: str, words, max_length: int = MAX_LENGTH) -> None:
    """CLIP tokenizer files (vocab.json, merges.txt, tokenizer_config.json) for the toy vocabulary."""
    vocab, merges = bpe_for_words(words)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False, sort_keys=True)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    cfg = {"model_max_length": max_length, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
           "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer"}
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


# ----------------------------------------------------------------------------- building the model dir

@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Pre-training settings (recorded in the manifest)."""

    seed: int = 0
    steps: int = 5000
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 1e-4
    caption_dropout: float = 0.1
    identity_fraction: float = 0.5


def init_components(world: ToyWorld, seed: int, folder: str, channels=None) -> dict:
    """Write tokenizers + configs and return random ``{component: (module, params)}``.

    ``folder`` receives ``tokenizer/`` and ``tokenizer_2/`` (the encoders' vocabulary size
    comes from them).
    """
    import jax

    from fairjax.models import clip_text, tokenizer, unet

    for name in ("tokenizer", "tokenizer_2"):
        write_tokenizer(os.path.join(folder, name), world.vocabulary())
    tok = tokenizer.CLIPTokenizer.from_folder(os.path.join(folder, "tokenizer"))
    ids = {"bos": tok.bos_token_id, "eos": tok.eos_token_id}
    vocab_size = tok.backend.get_vocab_size()
    key = jax.random.key(seed)
    out = {}
    for i, (name, proj) in enumerate((("text_encoder", False), ("text_encoder_2", True))):
        cfg = text_encoder_config(vocab_size, ids, proj)
        mod = clip_text.from_config(cfg)
        dummy = np.zeros((1, MAX_LENGTH), np.int32)
        out[name] = (cfg, mod, mod.init(jax.random.fold_in(key, i), dummy)["params"])
    ucfg = unet_config(world.size, channels)
    umod = unet.UNet2DConditionModel.from_config(ucfg)
    out["unet"] = (ucfg, umod, unet.init_params(umod, jax.random.fold_in(key, 2)))
    return out


def time_ids(size: int) -> np.ndarray:
    """SDXL micro-conditioning of a toy image: (orig_h, orig_w, 0, 0, target_h, target_w)."""
    return np.asarray([size, size, 0, 0, size, size], np.float32)


def encode_captions(components: dict, tok_dir: str, captions) -> tuple[np.ndarray, np.ndarray]:
    """``(context (N, T, 64), text_embeds (N, 32))`` as the SDXL pipeline encodes prompts."""
    import jax.numpy as jnp

    from fairjax.models import tokenizer

    tok = tokenizer.CLIPTokenizer.from_folder(os.path.join(tok_dir, "tokenizer"))
    tok2 = tokenizer.CLIPTokenizer.from_folder(os.path.join(tok_dir, "tokenizer_2"))
    _, te, p1 = components["text_encoder"]
    _, te2, p2 = components["text_encoder_2"]
    o1 = te.apply({"params": p1}, jnp.asarray(tok(list(captions))), output_hidden_states=True)
    o2 = te2.apply({"params": p2}, jnp.asarray(tok2(list(captions))), output_hidden_states=True)
    ctx = jnp.concatenate([o1.hidden_states[-2], o2.hidden_states[-2]], axis=-1)
    return np.asarray(ctx), np.asarray(o2.text_embeds)


def _print(msg: str) -> None:
    print(msg, flush=True)


def pretrain(world: ToyWorld, components: dict, tok_dir: str, cfg: PretrainConfig, log=_print) -> dict:
    """Train the UNet on the biased corpus (see module docstring); returns the trained UNet params."""
    import jax
    import jax.numpy as jnp
    import optax

    from fairjax.diffusion import schedules

    _, unet_mod, params = components["unet"]
    captions = sorted({world.neutral_prompt(o) for o in world.occupations}
                      | {world.identity_prompt(o, g, r) for o in world.occupations
                         for g in world.genders for r in world.races})
    index = {c: i for i, c in enumerate(captions)}
    ctx_table, emb_table = encode_captions(components, tok_dir, captions)
    ctx_table, emb_table = jnp.asarray(ctx_table), jnp.asarray(emb_table)
    sched = schedules.ddpm_schedule(SCHEDULER_CONFIG)
    tids = jnp.asarray(time_ids(world.size))
    warm = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    decay = optax.cosine_decay_schedule(cfg.lr, max(cfg.steps - cfg.warmup_steps, 1), alpha=0.05)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(optax.join_schedules([warm, decay], [cfg.warmup_steps]),
                                 weight_decay=cfg.weight_decay))
    opt = tx.init(params)

    def loss_fn(p, x0, cap, key):
        b = x0.shape[0]
        k1, k2, k3 = jax.random.split(key, 3)
        t = schedules.sample_timesteps(k1, b, sched.num_train_timesteps)
        eps = jax.random.normal(k2, x0.shape, jnp.float32)
        keep = (jax.random.uniform(k3, (b,)) >= cfg.caption_dropout).astype(jnp.float32)
        ctx = ctx_table[cap] * keep[:, None, None]
        emb = emb_table[cap] * keep[:, None]
        xt = schedules.add_noise(sched, x0, eps, t)
        pred = unet_mod.apply({"params": p}, xt, t, ctx,
                              {"text_embeds": emb, "time_ids": jnp.broadcast_to(tids, (b, 6))})
        return jnp.mean((pred - eps) ** 2)

    @jax.jit
    def step(p, o, x0, cap, key):
        loss, g = jax.value_and_grad(loss_fn)(p, x0, cap, key)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    rng = np.random.default_rng(cfg.seed)
    key = jax.random.key(cfg.seed + 1)
    t0, run = time.perf_counter(), []
    for s in range(cfg.steps):
        imgs, caps = world.corpus_batch(cfg.batch_size, rng, cfg.identity_fraction)
        x0 = jnp.asarray(images_to_model(imgs))
        cap = jnp.asarray([index[c] for c in caps], jnp.int32)
        params, opt, loss = step(params, opt, x0, cap, jax.random.fold_in(key, s))
        run.append(loss)
        if (s + 1) % 250 == 0 or s + 1 == cfg.steps:
            m = float(np.mean(jax.device_get(run)))
            run = []
            log(f"pretrain step {s + 1}/{cfg.steps}: loss {m:.4f} ({time.perf_counter() - t0:.0f}s)")
    return jax.device_get(params)


def file_digests(folder: str) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder`` except the manifest."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in sorted(files):
            path = os.path.join(root, f)
            rel = os.path.relpath(path, folder)
            if rel == MANIFEST:
                continue
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            out[rel.replace(os.sep, "/")] = h.hexdigest()
    return dict(sorted(out.items()))


def build(out: str, world: ToyWorld | None = None, cfg: PretrainConfig = PretrainConfig(), overwrite: bool = False,
          log=_print, channels=None) -> str:
    """Build, pre-train and write the toy model directory ``out`` (atomically); returns ``out``."""
    import jax

    from fairjax.io.model_dir import atomic_output_dir, save_component, write_index, write_json

    world = world or ToyWorld()
    if os.path.exists(out) and not overwrite:
        raise UserError(f"{out} already exists; choose another --out or pass --overwrite")
    with atomic_output_dir(out, overwrite) as tmp:
        comps = init_components(world, cfg.seed, tmp, channels)
        trained = pretrain(world, comps, tmp, cfg, log=log)
        ucfg, umod, _ = comps["unet"]
        comps["unet"] = (ucfg, umod, trained)
        for name, (c, _, p) in comps.items():
            save_component(os.path.join(tmp, name), c, jax.device_get(p))
        os.makedirs(os.path.join(tmp, "scheduler"))
        write_json(os.path.join(tmp, "scheduler", "scheduler_config.json"), SCHEDULER_CONFIG)
        write_json(os.path.join(tmp, "model_index.json"),
                   {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
                    "pixel_space": True})
        write_json(os.path.join(tmp, WORLD_FILE), world.to_json())
        write_index(tmp, ["unet", "text_encoder", "text_encoder_2"], toy_world=True)
        manifest = {"what": "fairjax toy world base model (pixel space, no VAE)",
                    "rebuild": rebuild_command(cfg, channels),
                    "pretrain": dataclasses.asdict(cfg), "world": world.to_json(),
                    "unet_config": unet_config(world.size, channels), "scheduler_config": SCHEDULER_CONFIG,
                    "versions": _versions(), "files": file_digests(tmp)}
        write_json(os.path.join(tmp, MANIFEST), manifest)
    return out


def rebuild_command(cfg: PretrainConfig, channels=None) -> str:
    """The command line that rebuilds a model with these settings."""
    ch = ",".join(str(c) for c in (channels or BLOCK_OUT_CHANNELS))
    return (f"python -m fairjax.toy.model --out DIR --steps {cfg.steps} --batch-size {cfg.batch_size} "
            f"--lr {cfg.lr:g} --seed {cfg.seed} --channels {ch}")


def _versions() -> dict:
    import flax
    import jax
    import optax

    return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__, "numpy": np.__version__}


def check_files(folder: str, man: dict, rebuild: str) -> None:
    """The files under ``folder`` are exactly those ``man["files"]`` lists, with their sha256; else a
    UserError naming the missing, unexpected and changed ones and the ``rebuild`` command."""
    have, want = file_digests(folder), man.get("files", {})
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    changed = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or extra or changed:
        raise UserError(f"{folder} does not match its manifest: missing {missing}, unexpected {extra}, "
                        f"changed {changed}; rebuild with {rebuild}")


def check(folder: str) -> dict:
    """Verify ``folder`` against its ``manifest.json``: every file's sha256 and the recorded configs
    equal what this code builds. Returns the manifest; raises UserError naming the first mismatch."""
    from fairjax.io.model_dir import read_json

    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise UserError(f"{folder}: no {MANIFEST}; rebuild the toy model with python -m fairjax.toy.model --out DIR")
    man = read_json(path)
    check_files(folder, man, "python -m fairjax.toy.model --out DIR")
    world = ToyWorld.from_json(man["world"])
    if man.get("unet_config") != unet_config(world.size) or man.get("scheduler_config") != SCHEDULER_CONFIG:
        raise UserError(f"{folder}: the manifest's UNet/scheduler config differs from fairjax.toy.model's; "
                        "rebuild with python -m fairjax.toy.model --out DIR")
    return man


def default_model_dir() -> str:
    """The shipped pre-trained toy model (verified against its manifest)."""
    check(ASSET_DIR)
    return ASSET_DIR


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fairjax.toy.model",
                                description="Build and pre-train the toy world's tiny SDXL-architecture model, "
                                            "or check a built one against its manifest.")
    p.add_argument("--out", help="model directory to write")
    p.add_argument("--check", help="verify this model directory against its manifest.json")
    p.add_argument("--steps", type=int, default=PretrainConfig.steps)
    p.add_argument("--seed", type=int, default=PretrainConfig.seed)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--channels", default=None, help="UNet block_out_channels, e.g. 16,32 (experiments)")
    p.add_argument("--batch-size", type=int, default=PretrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=PretrainConfig.lr)
    args = p.parse_args(argv)
    try:
        if args.check:
            man = check(args.check)
            print(f"{args.check}: {len(man['files'])} files match manifest.json")
            return 0
        if not args.out:
            p.error("pass --out DIR or --check DIR")
        cfg = dataclasses.replace(PretrainConfig(), steps=args.steps, seed=args.seed, batch_size=args.batch_size,
                                  lr=args.lr)
        channels = tuple(int(x) for x in args.channels.split(",")) if args.channels else None
        build(args.out, cfg=cfg, overwrite=args.overwrite, channels=channels)
        print(f"wrote {args.out}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
