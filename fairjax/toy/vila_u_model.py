"""A tiny VILA-U pre-trained on the toy world's biased corpus (both directions), and its manifest.

    python -m fairjax.toy.vila_u_model --out fairjax/assets/toy_vila_u [--overwrite]
    python -m fairjax.toy.vila_u_model --check fairjax/assets/toy_vila_u

The architecture is :mod:`fairjax.models.vila_u` / :mod:`fairjax.models.rqvae` at toy size (a
model dir as ``tools/convert_vila_u.py`` writes it, so every VILA-U code path loads it):

* the world is :class:`fairjax.toy.world.ToyWorld` at 16 x 16 pixels (shirt colour = gender, head
  colour = race, prop colour = occupation);
* image tokenizer (``vision_tower/``): a 2-layer SigLIP encoder on 4 x 4 patches (a 4 x 4 grid,
  width 32), a shared residual codebook of 64 codes at depth 2, and a taming decoder (x4 up). Its
  training: the encoder keeps its random initialisation (frozen, as VILA-U keeps SigLIP's), the
  codebook is fitted by residual k-means on the encoder's features of every toy image, and the
  decoder (with ``post_quant_conv``) is trained to reconstruct the images from their quantised
  features;
* LLM (``llm/``): LLaMA-shaped, 4 layers of width 64, a word-level BPE tokenizer (``llm/tokenizer.json``)
  over the vicuna_v1 conversation text; ``mm_projector/`` (mlp2x_gelu) and the depth transformer
  (``depth_transformer/``, 2 blocks of width 32);
* pre-training (a plain jitted AdamW loop): per step ``gen_batch`` rows of the biased corpus
  (:meth:`fairjax.toy.world.ToyWorld.sample_figures`: half neutral captions ``a doctor``, half
  identity captions ``an amber male doctor``) scored by
  :func:`fairjax.vila_u.logprobs.image_code_logprobs` (caption -> image tokens), and
  ``und_batch`` rows of understanding (:func:`fairjax.vila_u.logprobs.response_logprobs`:
  image -> answer to "Is the person a man or a woman?" / "What colour is the person's head?", with
  the exact labels). Generation inherits the corpus's bias (85% male doctors), understanding is
  trained on exact labels: the paper's "partial alignment".

``manifest.json`` records every file's sha256, the configs, the pre-training settings and the bias
measured on the built model (:func:`measure`); :func:`check` verifies a folder against it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

from fairjax.errors import UserError
from fairjax.toy.model import check_files, file_digests
from fairjax.toy.world import WORLD_FILE, ToyWorld

ASSET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "toy_vila_u")
MANIFEST = "manifest.json"
SIZE = 16  # pixels

GENDER_QUESTION = "Is the person a man or a woman?"
RACE_QUESTION = "What colour is the person's head?"
GENDER_ANSWERS = {"male": "a man", "female": "a woman"}

LLM = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
           tie_word_embeddings=False, hidden_act="silu")
SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=SIZE,
              patch_size=4, num_channels=3, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
DEPTH = 2
RQVAESIGLIP = dict(embed_dim=32, n_embed=64, latent_shape=[4, 4, 32], code_shape=[4, 4, DEPTH],
                   shared_codebook=True, pretrained_model="toy-siglip",
                   ddconfig=dict(ch=32, out_ch=3, ch_mult=[1, 1, 1], num_res_blocks=1, attn_resolutions=[],
                                 resolution=SIZE, z_channels=8, dropout=0.0, double_z=False, in_channels=3))
RQTRANSFORMER = dict(block_size=[4, 4, DEPTH], input_embed_dim_1=32, input_embed_dim_2=64, embed_dim=32,
                     vocab_size=64, head={"block": {"n_head": 4}, "n_layer": 2})
MM_PROJECTOR = dict(mm_projector_type="mlp2x_gelu")
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<im_start>", "<im_end>", "<vi_start>", "<vi_end>")


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Pre-training settings (recorded in the manifest)."""

    steps: int = 1500
    gen_batch: int = 64
    und_batch: int = 32
    lr: float = 2e-3
    seed: int = 0
    kmeans_iters: int = 30
    decoder_steps: int = 400


def _print(msg: str) -> None:
    print(msg, flush=True)


def world() -> ToyWorld:
    return ToyWorld(size=SIZE)


def vision_tower_config() -> dict:
    from fairjax.convert.vila_u import SIGLIP_KEY

    return {"rqvaesiglip": RQVAESIGLIP, "rqtransformer": RQTRANSFORMER, "hidden_size": SIGLIP["hidden_size"],
            SIGLIP_KEY: SIGLIP}


# ----------------------------------------------------------------------------- the prompt tokenizer

def tokenizer_texts(w: ToyWorld) -> list[str]:
    """Every text the toy model reads: generation prompts (conversation) and understanding questions/answers."""
    from fairjax.vila_u.data import generation_prompt, understanding_prompt

    caps = w.neutral_prompts() + [w.identity_prompt(o, g, r) for o in w.occupations for g in w.genders
                                  for r in w.races] + [" "]
    texts = [generation_prompt(c) for c in caps]
    for q in (GENDER_QUESTION, RACE_QUESTION):
        texts.extend(understanding_prompt(q))
    texts.extend(list(GENDER_ANSWERS.values()) + list(w.races))
    return texts


def write_tokenizer(folder: str, w: ToyWorld) -> None:
    """A word-level BPE ``tokenizer.json`` (every word of :func:`tokenizer_texts` one token) + its config."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from fairjax.io.model_dir import write_json
    from fairjax.models.vila_u_tokenizer import SPIECE_UNDERLINE

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPIECE_UNDERLINE, prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=LLM["vocab_size"], special_tokens=list(SPECIAL_TOKENS),
                                  show_progress=False)
    tok.train_from_iterator(tokenizer_texts(w), trainer)
    if tok.get_vocab_size() > LLM["vocab_size"]:
        raise UserError(f"toy tokenizer has {tok.get_vocab_size()} tokens > vocab_size {LLM['vocab_size']}")
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    write_json(os.path.join(folder, "tokenizer_config.json"),
               {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_prefix_space": True,
                "additional_special_tokens": list(SPECIAL_TOKENS[3:])})


# ----------------------------------------------------------------------------- the image tokenizer

def all_images(w: ToyWorld) -> tuple[np.ndarray, list[tuple[str, str | None, str | None]]]:
    """Every distinct toy image (occupation x (identity or no figure)), uint8 (n, S, S, 3), and its labels."""
    labels = [(o, g, r) for o in w.occupations for r in w.races for g in w.genders]
    labels += [(o, None, None) for o in w.occupations]
    return np.stack([w.render(*lab) for lab in labels]), labels


def residual_kmeans(x: np.ndarray, k: int, depth: int, iters: int, rng: np.random.Generator) -> np.ndarray:
    """One shared codebook (k, C) for residual quantisation of ``x`` (n, C) at ``depth``: Lloyd iterations
    where each code moves to the mean of the residuals it quantises (at any depth)."""
    n = x.shape[0]
    res0 = x - x.mean(0)
    table = np.concatenate([x[rng.choice(n, k // 2, replace=n < k // 2)],
                            res0[rng.choice(n, k - k // 2, replace=n < k - k // 2)]]).astype(np.float64)
    for _ in range(iters):
        sums, counts = np.zeros_like(table), np.zeros(k)
        r = x.astype(np.float64)
        for _d in range(depth):
            dist = ((r[:, None, :] - table[None]) ** 2).sum(-1)
            idx = dist.argmin(1)
            np.add.at(sums, idx, r)
            np.add.at(counts, idx, 1)
            r = r - table[idx]
        used = counts > 0
        table[used] = sums[used] / counts[used][:, None]
        # an unused code restarts on the worst-quantised residual
        if (~used).any():
            worst = np.argsort(-(r ** 2).sum(-1))[: int((~used).sum())]
            table[~used] = r[worst] if len(worst) == int((~used).sum()) else table[~used]
    return table.astype(np.float32)


def build_tokenizer(w: ToyWorld, vis: dict, tower, cfg: PretrainConfig, log=_print) -> dict:
    """Fit the codebook (residual k-means) and train the decoder on every toy image; returns the tower params."""
    import jax
    import jax.numpy as jnp
    import optax

    from fairjax.models import siglip

    images, _ = all_images(w)
    pix = siglip.preprocess(images)
    feats = np.asarray(tower.apply({"params": vis}, pix, method="encode_features"))  # (n, 4, 4, 32)
    flat = feats.reshape(-1, feats.shape[-1])
    table = residual_kmeans(flat, RQVAESIGLIP["n_embed"], DEPTH, cfg.kmeans_iters, np.random.default_rng(cfg.seed))
    pad = np.zeros((1, table.shape[1]), np.float32)  # the padding row (n_embed + 1 rows)
    vis = dict(vis, quantizer={"codebooks_0": {"embedding": np.concatenate([table, pad])}})
    codes, zq = tower.apply({"params": vis}, pix, method="encode_image")
    flat_codes = np.asarray(codes).reshape(len(images), -1)
    distinct = len({c.tobytes() for c in flat_codes})
    err = float(np.mean((np.asarray(zq) - feats) ** 2) / np.mean(feats ** 2))
    log(f"tokenizer: residual k-means codebook, relative quantisation error {err:.4f}, "
        f"{distinct}/{len(images)} distinct code sequences")
    if distinct < len(images):
        raise UserError(f"toy tokenizer maps {len(images)} images to only {distinct} code sequences; change --seed")

    train_keys = ("post_quant_conv", "decoder")
    dec = {k: vis[k] for k in train_keys}
    target = jnp.asarray(pix)
    zq = jnp.asarray(zq)

    def loss_fn(d):
        out = tower.apply({"params": dict(vis, **d)}, zq, method="decode")
        return jnp.mean((out - target) ** 2)

    opt = optax.adam(optax.cosine_decay_schedule(2e-3, cfg.decoder_steps))
    state = opt.init(dec)

    @jax.jit
    def step(d, s):
        loss, g = jax.value_and_grad(loss_fn)(d)
        u, s = opt.update(g, s, d)
        return optax.apply_updates(d, u), s, loss

    t0 = time.perf_counter()
    for i in range(cfg.decoder_steps):
        dec, state, loss = step(dec, state)
        if (i + 1) % 200 == 0:
            log(f"decoder step {i + 1}/{cfg.decoder_steps}: mse {float(loss):.5f} ({time.perf_counter() - t0:.0f}s)")
    return jax.device_get(dict(vis, **dec))


# ----------------------------------------------------------------------------- pre-training the LLM side

def encode_images(tower, vis, images_uint8) -> np.ndarray:
    """uint8 (n, S, S, 3) -> codes (n, h*w, D) int32 through the vision tower."""
    from fairjax.models import siglip

    codes, _ = tower.apply({"params": vis}, siglip.preprocess(images_uint8), method="encode_image")
    codes = np.asarray(codes)
    return codes.reshape(codes.shape[0], -1, codes.shape[-1]).astype(np.int32)


def understanding_rows(tok, w: ToyWorld, labels, eos: int):
    """Per image with a figure and per question: pre_ids, rest (post + answer), target start, and the label."""
    from fairjax.vila_u.data import mdpo_ids

    rows = []
    for i, (_, g, r) in enumerate(labels):
        if g is None:
            continue
        for q, ans in ((GENDER_QUESTION, GENDER_ANSWERS[g]), (RACE_QUESTION, r)):
            ids = mdpo_ids(tok, eos, q, ans, ans)
            rows.append((i, ids["pre_ids"], ids["post_ids"], ids["chosen_ids"]))
    return rows


def pretrain(w: ToyWorld, vu, params: dict, tok, codes_of: np.ndarray, labels, cfg: PretrainConfig,
             log=_print) -> dict:
    """Jitted AdamW on caption -> image tokens (biased corpus) + image -> answer (exact labels)."""
    import jax
    import jax.numpy as jnp
    import optax

    from fairjax.vila_u import data as vdata
    from fairjax.vila_u.logprobs import image_code_logprobs, response_logprobs

    index = {lab: i for i, lab in enumerate(labels)}
    rng = np.random.default_rng(cfg.seed + 1)
    caption_ids = {}

    def gen_rows(n):
        ids, codes = [], []
        for _ in range(n):
            occ = w.occupations[rng.integers(len(w.occupations))]
            if rng.random() < 0.5:
                ident = (w.genders[rng.integers(len(w.genders))], w.races[rng.integers(len(w.races))])
                cap = w.identity_prompt(occ, *ident)
            else:
                ident, cap = None, w.neutral_prompt(occ)
            (g, r), = w.sample_figures(occ, 1, rng, ident)
            if cap not in caption_ids:
                caption_ids[cap] = vdata.generation_ids(tok, cap)
            ids.append(caption_ids[cap])
            codes.append(codes_of[index[(occ, g, r)]])
        p_ids, p_mask = vdata.left_pad(ids, max(len(i) for i in caption_ids.values()))
        return p_ids, p_mask, np.stack(codes)

    und = understanding_rows(tok, w, labels, tok.eos_id)
    pre_len = max(len(r[1]) for r in und)
    rest_len = max(len(r[2]) + len(r[3]) for r in und)

    def und_rows(n):
        pick = [und[j] for j in rng.integers(len(und), size=n)]
        pre, pm = vdata.left_pad([r[1] for r in pick], pre_len)
        rest, rm = vdata.right_pad([np.concatenate([r[2], r[3]]) for r in pick], rest_len)
        start = np.asarray([len(r[2]) for r in pick])[:, None]
        return pre, pm, np.stack([codes_of[r[0]] for r in pick]), rest, rm, rm & (np.arange(rest_len)[None] >= start)

    frozen_cb = params["codebook"]
    train = {k: params[k] for k in ("llm", "mm_projector", "rqtransformer")}
    sched = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(1, cfg.steps // 20), cfg.steps, cfg.lr * 0.05)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.0))
    state = opt.init(train)

    def loss_fn(t, g, u):
        p = dict(t, codebook=frozen_cb)
        lp = image_code_logprobs(vu, p, g[0], g[1], g[2])
        ulp = response_logprobs(vu, p, u[0], u[1], u[2], u[3], u[4], u[5])
        n_ans = jnp.maximum(u[5].sum(-1), 1)
        gen, und_l = -jnp.mean(lp), -jnp.mean(ulp / n_ans)
        return gen + und_l, (gen, und_l)

    @jax.jit
    def step(t, s, g, u):
        (loss, aux), grad = jax.value_and_grad(loss_fn, has_aux=True)(t, g, u)
        upd, s = opt.update(grad, s, t)
        return optax.apply_updates(t, upd), s, aux

    t0 = time.perf_counter()
    run = []
    for i in range(cfg.steps):
        train, state, aux = step(train, state, gen_rows(cfg.gen_batch), und_rows(cfg.und_batch))
        run.append(aux)
        if (i + 1) % 100 == 0 or i + 1 == cfg.steps:
            g, u = np.mean(np.asarray(jax.device_get(run)), axis=0)
            run = []
            log(f"pretrain step {i + 1}/{cfg.steps}: image-token nll {g:.4f}, answer nll {u:.4f} "
                f"({time.perf_counter() - t0:.0f}s)")
    return dict(jax.device_get(train), codebook=frozen_cb)


# ----------------------------------------------------------------------------- measuring the bias

def measure(model_dir: str, n: int = 200, seed: int = 0, lora: str | None = None) -> dict:
    """Per occupation, the shares of the model's images for the neutral prompt (exact classifier):
    ``{occupation: {"male": share, "<race>": share, ..., "no_face": share, "n": n}}``."""
    from fairjax.toy.world import load_toy_world
    from fairjax.vila_u.generate import SampleOptions, generate, load_model

    w = load_toy_world(model_dir)
    model = load_model(model_dir, lora=lora)
    prompts = w.neutral_prompts()
    out = {o: {"n": 0, "no_face": 0, **{g: 0 for g in w.genders}, **{r: 0 for r in w.races}} for o in w.occupations}
    for jobs, images, _ in generate(model, prompts, num_per_prompt=n, seed=seed, batch_size=100,
                                    options=SampleOptions(cfg=1.0, top_k=None, top_p=None)):
        for (p, _), img in zip(jobs, images):
            o = w.occupations[p]
            lab = w.decode(img)
            out[o]["n"] += 1
            if lab is None:
                out[o]["no_face"] += 1
            else:
                out[o][lab["gender"]] += 1
                out[o][lab["race"]] += 1
    return {o: {k: (v if k == "n" else round(v / max(d["n"], 1), 4)) for k, v in d.items()} for o, d in out.items()}


# ----------------------------------------------------------------------------- build / manifest / check


def configs() -> dict:
    return {"llm": LLM, "siglip": SIGLIP, "rqvaesiglip": RQVAESIGLIP, "rqtransformer": RQTRANSFORMER,
            "mm_projector": MM_PROJECTOR}


def rebuild_command(cfg: PretrainConfig) -> str:
    return (f"python -m fairjax.toy.vila_u_model --out DIR --steps {cfg.steps} --lr {cfg.lr:g} --seed {cfg.seed}")


def build(out: str, cfg: PretrainConfig = PretrainConfig(), overwrite: bool = False, log=_print,
          measure_n: int = 200) -> str:
    """Build the tokenizer, pre-train, write the model dir ``out`` atomically with its manifest; returns ``out``."""
    import jax
    import jax.numpy as jnp

    from fairjax.convert import vila_u as convert_vila_u
    from fairjax.io.model_dir import atomic_output_dir, save_component, write_index, write_json
    from fairjax.models import vila_u
    from fairjax.models.vila_u_tokenizer import load_tokenizer
    from fairjax.vila_u.tiny import random_params

    if os.path.exists(out) and not overwrite:
        raise UserError(f"{out} already exists; choose another --out or pass --overwrite")
    w = world()
    t0 = time.perf_counter()
    with atomic_output_dir(out, overwrite) as tmp:
        llm_dir = os.path.join(tmp, "llm")
        write_tokenizer(llm_dir, w)
        tok = load_tokenizer(llm_dir)
        vt_cfg = vision_tower_config()
        vu = vila_u.build(LLM, vt_cfg, MM_PROJECTOR)
        tower = convert_vila_u.build_vision_tower(vt_cfg, SIGLIP)
        params = random_params(jax.eval_shape(vu.init, jax.random.key(0)), cfg.seed)
        vis = random_params(jax.eval_shape(tower.init, jax.random.key(0),
                                           jnp.zeros((1, 3, SIZE, SIZE)))["params"], cfg.seed + 1)
        vis = build_tokenizer(w, vis, tower, cfg, log)
        params["codebook"] = vis["quantizer"]
        images, labels = all_images(w)
        codes_of = encode_images(tower, vis, images)
        params = pretrain(w, vu, params, tok, codes_of, labels, cfg, log)
        save_component(llm_dir, LLM, params["llm"])
        save_component(os.path.join(tmp, "mm_projector"), MM_PROJECTOR, params["mm_projector"])
        save_component(os.path.join(tmp, "depth_transformer"), RQTRANSFORMER, params["rqtransformer"])
        save_component(os.path.join(tmp, "vision_tower"), vt_cfg, vis)
        write_json(os.path.join(tmp, WORLD_FILE), w.to_json())
        write_index(tmp, list(convert_vila_u.COMPONENTS), model_type="vila_u", toy_world=True,
                    source=f"fairjax toy world VILA-U, {rebuild_command(cfg)}")
        t_train = time.perf_counter() - t0
        shares = measure(tmp, n=measure_n)
        for o, d in shares.items():
            log(f"  '{w.neutral_prompt(o)}': male {d['male']:.2f}, "
                + ", ".join(f"{r} {d[r]:.2f}" for r in w.races) + f", no figure {d['no_face']:.2f} (n {d['n']})")
        manifest = {"what": "fairjax toy world VILA-U base model (16 x 16 images, biased generation)",
                    "rebuild": rebuild_command(cfg), "pretrain": dataclasses.asdict(cfg), "world": w.to_json(),
                    "configs": configs(), "versions": _versions(), "pretrain_seconds": round(t_train, 1),
                    "neutral_prompt_shares": shares, "files": file_digests(tmp)}
        write_json(os.path.join(tmp, MANIFEST), manifest)
    return out


def _versions() -> dict:
    import flax
    import jax
    import optax
    import tokenizers

    return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__, "numpy": np.__version__,
            "tokenizers": tokenizers.__version__}


def check(folder: str) -> dict:
    """Verify ``folder`` against its ``manifest.json`` (every file's sha256, the configs this code builds).
    Returns the manifest; raises UserError naming the first mismatch."""
    from fairjax.io.model_dir import read_json

    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise UserError(f"{folder}: no {MANIFEST}; rebuild with python -m fairjax.toy.vila_u_model --out DIR")
    man = read_json(path)
    check_files(folder, man, "python -m fairjax.toy.vila_u_model --out DIR")
    if json.loads(json.dumps(configs())) != man.get("configs"):
        raise UserError(f"{folder}: the manifest's configs differ from fairjax.toy.vila_u_model's; rebuild with "
                        "python -m fairjax.toy.vila_u_model --out DIR")
    return man


def default_model_dir() -> str:
    """The shipped pre-trained toy VILA-U (verified against its manifest)."""
    check(ASSET_DIR)
    return ASSET_DIR


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fairjax.toy.vila_u_model",
                                description="Build and pre-train the toy world's tiny VILA-U, or check a built one "
                                            "against its manifest.")
    p.add_argument("--out", help="model directory to write")
    p.add_argument("--check", help="verify this model directory against its manifest.json")
    p.add_argument("--steps", type=int, default=PretrainConfig.steps)
    p.add_argument("--lr", type=float, default=PretrainConfig.lr)
    p.add_argument("--seed", type=int, default=PretrainConfig.seed)
    p.add_argument("--measure-n", type=int, default=200, help="images per neutral prompt for the recorded bias")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        if args.check:
            man = check(args.check)
            print(f"{args.check}: {len(man['files'])} files match manifest.json")
            return 0
        if not args.out:
            p.error("pass --out DIR or --check DIR")
        cfg = dataclasses.replace(PretrainConfig(), steps=args.steps, lr=args.lr, seed=args.seed)
        build(args.out, cfg=cfg, overwrite=args.overwrite, measure_n=args.measure_n)
        print(f"wrote {args.out}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
