"""Locate-then-fix for a unified MLLM (VILA-U): where does its demographic bias come from?

    python -m fairjax.locate_bias --model M [--lora F] --out DIR [--n 64] [--seed 0]
    python -m fairjax.locate_bias --model CONVERTED --images BALANCED_DIR --prompts "a doctor" ... --out DIR

The Unified_MLLM_Fairness analysis, on a toy-world VILA-U (a model dir with ``toy_world.json``, whose
images are labelled exactly) or a converted VILA-U with ``--images DIR`` (balanced PNGs, labelled by the
DeepFace classifier):

(a) ``tokenizer_flip_rate``: encode balanced images with the image tokenizer, decode, classify both:
    the share whose gender / race label flips (an unbiased tokenizer flips none; one that flips towards
    a group is a bias source of its own);
(b) ``understanding_accuracy``: ask the model the attribute of each balanced image ("Is the person a man
    or a woman?"; toy: "What colour is the person's head?") and score every candidate answer
    (:func:`fairjax.vila_u.logprobs.response_logprobs`); accuracy and ``answer_bias`` (the answers'
    class shares minus the images' shares) per attribute;
(c) ``generation_discrepancy``: the pooled discrepancy of the model's images for the neutral prompts
    (:func:`fairjax.fairness.metrics.discrepancy_of`), and its per-prompt class shares. High
    understanding accuracy next to biased generation is the paper's partial alignment;
(d) ``probe``: where in the LLM the attribute is decided: the hidden state at the first image token
    (the position whose input is the first image code's embedding; ``embed`` = the LLM's input, then
    after each decoder layer) of the model's own neutral-prompt images, teacher-forced, and a linear
    probe (:func:`linear_probe`) of each image's label per layer, held-out accuracy against the
    majority-class rate; the same probe at every image position (``by_position``, ``probe_decided_at``: the
    first position where some layer reads the attribute at >= 0.9);
(fix) with ``fix_steps`` (toy models): the same short BPO on pairs (a balanced image of another identity vs
    the model's own neutral image) with the LoRA on the LLM (the BPO recipe) or on the image head (the depth
    transformer) only, and the generation discrepancy each leaves (:func:`fix_experiment`).

``DIR/locate.json`` holds every number (``summary`` the headline keys), ``DIR/probe.png``,
``DIR/probe_positions.png`` and ``DIR/shares.png`` the plots, ``DIR/index.html`` the page. DIR is written
to a temporary folder and renamed at the end; the command refuses, before it loads the model, a DIR that
exists (unless ``--overwrite``), is a file, or equals, contains or is inside ``--model``, ``--lora`` or
``--images``. SIGTERM / SIGINT stop the command between generation batches (or before DIR is written)
with one line and exit status 128 + the signal number, writing nothing; a re-run starts over.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from fairjax.errors import UserError

Classify = Callable[[np.ndarray], list]  # uint8 (n, H, W, 3) -> [labels dict | None]


# ----------------------------------------------------------------------------- the pieces (pure)

def tokenizer_flip_rate(images: np.ndarray, round_trip: Callable[[np.ndarray], np.ndarray], classify: Classify,
                        attributes: Sequence[str]) -> dict:
    """Label ``images`` and ``round_trip(images)``; per attribute the share of labelled originals whose label
    changed (a reconstruction with no label counts as a flip), ``lost`` the share that lost their label, and
    ``moves`` ``{"from->to": count}``."""
    before, after = classify(np.asarray(images)), classify(np.asarray(round_trip(np.asarray(images))))
    out = {"n": 0, "lost": 0}
    moves: dict = {}
    flips = {a: 0 for a in attributes}
    for b, a in zip(before, after):
        if b is None:
            continue
        out["n"] += 1
        if a is None:
            out["lost"] += 1
        for attr in attributes:
            if a is None or a[attr] != b[attr]:
                flips[attr] += 1
                k = f"{b[attr]}->{None if a is None else a[attr]}"
                moves[k] = moves.get(k, 0) + 1
    n = max(out["n"], 1)
    return {"flip_rate": {a: flips[a] / n for a in attributes}, "n": out["n"], "lost": out["lost"] / n,
            "moves": dict(sorted(moves.items()))}


def linear_probe(features: np.ndarray, labels: Sequence, seed: int = 0, ridge: float = 1e-2,
                 test_fraction: float = 0.5) -> dict:
    """Held-out accuracy of a linear read-out of ``labels`` from ``features (n, L, H)`` at each of the L layers.

    One-vs-rest ridge regression on standardised features (fit on a random ``1 - test_fraction`` of the
    rows, each class present in both parts where possible), argmax on the rest. ``chance`` is the
    majority class's share of the test rows."""
    x = np.asarray(features, np.float64)
    classes = sorted(set(labels))
    y = np.asarray([classes.index(v) for v in labels])
    n = len(y)
    if x.ndim != 3 or x.shape[0] != n:
        raise UserError(f"linear_probe: features must be (n, layers, hidden) with n = {n} labels, got {x.shape}")
    if len(classes) < 2 or n < 4:
        return {"classes": classes, "accuracy": [float("nan")] * x.shape[1], "chance": float("nan"), "n": n}
    rng = np.random.default_rng(seed)
    test = np.zeros(n, bool)
    for c in range(len(classes)):  # stratified split
        idx = rng.permutation(np.flatnonzero(y == c))
        test[idx[:int(round(len(idx) * test_fraction))]] = True
    train = ~test
    onehot = np.eye(len(classes))[y]
    acc = []
    for layer in range(x.shape[1]):
        f = x[:, layer]
        mu, sd = f[train].mean(0), f[train].std(0) + 1e-6
        z = np.concatenate([(f - mu) / sd, np.ones((n, 1))], axis=1)
        a = z[train]
        w = np.linalg.solve(a.T @ a + ridge * len(a) * np.eye(a.shape[1]), a.T @ onehot[train])
        acc.append(float(np.mean((z[test] @ w).argmax(1) == y[test])))
    chance = float(np.bincount(y[test], minlength=len(classes)).max() / max(test.sum(), 1))
    return {"classes": classes, "accuracy": acc, "chance": chance, "n": n, "n_test": int(test.sum())}


def shares(labels: Sequence[Mapping | None], attribute: str, classes: Sequence[str]) -> dict:
    got = [lab[attribute] for lab in labels if lab]
    return {c: (got.count(c) / len(got) if got else float("nan")) for c in classes}


# ----------------------------------------------------------------------------- the model side

def layer_hidden_states(vu, params, prompt_ids, prompt_mask, codes, position: int | None = 0):
    """Teacher-forced hidden states at image position ``position`` (0 = the first image token's input), at the
    LLM's input and after every decoder layer: (B, 1 + layers, H) float32; ``position=None``: at every image
    position, (B, 1 + layers, N, H)."""
    import jax.numpy as jnp

    from fairjax.models import llama, vila_u

    te = vu.llm.apply({"params": params["llm"]}, prompt_ids, method=llama.LlamaForCausalLM.embed)
    ie = vila_u.image_embeds(vu, params, codes).astype(te.dtype)
    x = jnp.concatenate([te, ie], axis=1)
    mask = jnp.concatenate([prompt_mask.astype(bool), jnp.ones(codes.shape[:2], bool)], 1)
    p = prompt_ids.shape[1] + position if position is not None else slice(prompt_ids.shape[1], None)

    def keep(mdl, name):
        return isinstance(mdl, llama.LlamaDecoderLayer) and name == "__call__"

    _, state = vu.llm.apply({"params": params["llm"]}, inputs_embeds=x, attention_mask=mask, logits=False,
                            capture_intermediates=keep, mutable=["intermediates"])
    layers = []
    for path in sorted(_find_calls(state["intermediates"]), key=lambda t: t[0]):
        out = path[1][0]
        layers.append((out[0] if isinstance(out, tuple) else out)[:, p])
    if not layers:
        raise UserError("locate: could not capture the LLaMA layers' outputs (scanned layers are not supported)")
    return jnp.stack([x[:, p]] + layers, axis=1).astype(jnp.float32)


def _find_calls(tree, prefix=()):
    """``[(layer index, outputs)]`` of every captured ``__call__`` under ``layers_<i>``."""
    out = []
    for k, v in tree.items():
        if k == "__call__":
            idx = next((int(s.split("_")[-1]) for s in reversed(prefix) if s.startswith("layers_")), len(out))
            out.append((idx, v))
        elif isinstance(v, Mapping):
            out.extend(_find_calls(v, prefix + (k,)))
    return out


def answer_scores(vu, params, tok, codes: np.ndarray, question: str, answers: Sequence[str], batch: int = 64):
    """``(n, len(answers))`` log-probabilities of each candidate answer to ``question`` about each image."""
    import jax

    from fairjax.vila_u import data as vdata
    from fairjax.vila_u.logprobs import response_logprobs

    fn = jax.jit(lambda p, *a: response_logprobs(vu, p, *a))
    eos = tok.eos_id if tok.eos_id is not None else 0
    rows = [vdata.mdpo_ids(tok, eos, question, a, a) for a in answers]
    pre_len = len(rows[0]["pre_ids"])
    rest_len = max(len(r["post_ids"]) + len(r["chosen_ids"]) for r in rows)
    out = np.zeros((len(codes), len(answers)))
    for j, r in enumerate(rows):
        rest, rm = vdata.right_pad([np.concatenate([r["post_ids"], r["chosen_ids"]])], rest_len)
        target = rm & (np.arange(rest_len)[None] >= len(r["post_ids"]))
        for s in range(0, len(codes), batch):
            c = codes[s:s + batch]
            b = len(c)
            pre = np.repeat(r["pre_ids"][None], b, 0)
            out[s:s + b, j] = np.asarray(fn(params, pre, np.ones((b, pre_len), bool), c, np.repeat(rest, b, 0),
                                            np.repeat(rm, b, 0), np.repeat(target, b, 0)))
    return out


HEAD_TARGETS = (r"blocks_\d+/attn/(query|key|value|proj)/kernel$", r"blocks_\d+/mlp_(0|2)/kernel$")


def head_code_logprobs(vu, params, prompt_ids, prompt_mask, codes, lora, alpha: float):
    """:func:`fairjax.vila_u.logprobs.image_code_logprobs` (mean over the codes) with the LoRA on the image
    head (the depth transformer's kernels) instead of the LLM's."""
    import flax.linen as nn
    import jax.numpy as jnp

    from fairjax.lora import lora_interceptor, lora_variables
    from fairjax.models import llama, vila_u
    from fairjax.vila_u.logprobs import token_logprobs

    p = prompt_ids.shape[1]
    te = vu.llm.apply({"params": params["llm"]}, prompt_ids, method=llama.LlamaForCausalLM.embed)
    ie = vila_u.image_embeds(vu, params, codes[:, :-1]).astype(te.dtype)
    mask = jnp.concatenate([prompt_mask.astype(bool), jnp.ones((codes.shape[0], codes.shape[1] - 1), bool)], 1)
    h = vu.llm.apply({"params": params["llm"]}, inputs_embeds=jnp.concatenate([te, ie], 1), attention_mask=mask,
                     logits=False).hidden_states[:, p - 1:]
    with nn.intercept_methods(lora_interceptor()):
        logits = vu.rqtransformer.apply({"params": params["rqtransformer"],
                                         "lora": lora_variables(lora, params["rqtransformer"], alpha)},
                                        h, vila_u.code_embeds(vu, params, codes))
    return jnp.mean(token_logprobs(logits, codes), axis=(1, 2))


def fix_experiment(model, tokenizer, prompts, pairs, *, steps: int, n_per_prompt: int, seed: int, classify,
                   classes, rank: int = 8, lr: float = 1e-3, batch: int = 16, log=print) -> dict:
    """The "fix" half: the same short BPO (:func:`fairjax.losses.bpo`, rank-``rank`` LoRA, ``steps`` AdamW steps
    of ``batch`` pairs) once with the LoRA on the LLM (the BPO recipe) and once on the image head only; each
    result's neutral-prompt generation discrepancy. ``pairs``: ``[(prompt index, codes a, codes b)]``."""
    import jax
    import jax.numpy as jnp
    import optax

    from fairjax import lora as lora_lib
    from fairjax import losses
    from fairjax.fairness.metrics import discrepancy_of
    from fairjax.tasks.vila_u_pref import LORA_TARGETS
    from fairjax.vila_u import data as vdata
    from fairjax.vila_u.generate import RecordGenerator, SampleOptions
    from fairjax.vila_u.logprobs import image_code_logprobs

    vu, params = model.vu, model.params
    ids = [vdata.generation_ids(tokenizer, p) for p in prompts]
    plen = max(len(i) for i in ids)
    pid, pm = vdata.left_pad(ids, plen)
    alpha = float(rank)
    out = {"steps": steps, "rank": rank, "lr": lr, "pairs": len(pairs)}
    for where, part, targets in (("llm", "llm", LORA_TARGETS), ("head", "rqtransformer", HEAD_TARGETS)):
        lora = lora_lib.init(params[part], list(targets), rank, alpha, jax.random.key(seed))

        def lp(lo, rows, codes, where=where):
            if where == "llm":
                return image_code_logprobs(vu, params, jnp.asarray(pid)[rows], jnp.asarray(pm)[rows], codes, lora=lo,
                                           lora_alpha=alpha)
            return head_code_logprobs(vu, params, jnp.asarray(pid)[rows], jnp.asarray(pm)[rows], codes, lo, alpha)

        def loss_fn(lo, rows, ca, cb):
            return losses.bpo(lp(lo, rows, ca), lp(lo, rows, cb))[0]

        opt = optax.adam(lr)
        state = opt.init(lora)

        @jax.jit
        def step(lo, st, rows, ca, cb):
            loss, g = jax.value_and_grad(loss_fn)(lo, rows, ca, cb)
            upd, st = opt.update(g, st, lo)
            return optax.apply_updates(lo, upd), st, loss

        rng = np.random.default_rng(seed)
        for _ in range(steps):
            pick = [pairs[j] for j in rng.integers(len(pairs), size=batch)]
            lora, state, _ = step(lora, state, np.asarray([p[0] for p in pick]), np.stack([p[1] for p in pick]),
                                  np.stack([p[2] for p in pick]))
        merged = dict(params, **{part: lora_lib.merge(jax.device_get(params[part]), jax.device_get(lora), alpha)})
        gen = RecordGenerator(model._replace(params=merged), SampleOptions(cfg=1.0, top_k=None, top_p=None),
                              batch_size=64)
        labs = [classify(img[None])[0] for _, _, img, _ in gen.run(list(prompts), [n_per_prompt] * len(prompts),
                                                                   7919 + seed)]
        out[where] = {"generation_discrepancy": {a: float(discrepancy_of([x[a] for x in labs if x], c))
                                                 for a, c in classes.items()},
                      "no_face": float(np.mean([x is None for x in labs])),
                      "lora_params": int(lora_lib.num_params(jax.device_get(lora)))}
        log(f"locate: fix with LoRA on the {where}: generation discrepancy "
            + ", ".join(f"{a} {v:.3f}" for a, v in out[where]["generation_discrepancy"].items()))
    return out


def _toy_setup(model_dir: str):
    """Balanced images (every occupation x identity, rendered), labels, the classifier and the questions."""
    from fairjax.toy.vila_u_model import GENDER_ANSWERS, GENDER_QUESTION, RACE_QUESTION
    from fairjax.toy.world import identity_grid, load_toy_world

    w = load_toy_world(model_dir)
    labs = [{"gender": g, "race": r} for _ in w.occupations for g, r in identity_grid(w)]
    images = np.stack([w.render(o, g, r) for o in w.occupations for g, r in identity_grid(w)])
    questions = {"gender": (GENDER_QUESTION, {GENDER_ANSWERS[g]: g for g in w.genders}),
                 "race": (RACE_QUESTION, {r: r for r in w.races})}
    occ = [i for i, _ in enumerate(w.occupations) for _ in identity_grid(w)]
    return {"world": w, "images": images, "labels": labs, "occupation": occ,
            "classify": lambda ims: [w.decode(i) for i in ims],
            "classes": w.classes, "questions": questions, "prompts": w.neutral_prompts()}


def _real_setup(images_dir: str, prompts: Sequence[str], detector: str = "yunet"):
    from PIL import Image

    from fairjax.data.build_prefs import make_classifier

    if not os.path.isdir(images_dir):
        raise UserError(f"--images {images_dir}: folder not found")
    clf, classes = make_classifier("deepface", detector=detector)
    files = sorted(f for f in os.listdir(images_dir) if f.lower().endswith((".png", ".jpg", ".jpeg")))
    if not files:
        raise UserError(f"--images {images_dir}: no PNG / JPEG images")
    images = np.stack([np.asarray(Image.open(os.path.join(images_dir, f)).convert("RGB")) for f in files])
    labs = clf.classify(list(images)).labels
    questions = {"gender": ("Is the person a man or a woman?", {"a man": "male", "a woman": "female"})}
    return {"world": None, "images": images, "labels": labs, "classify": lambda ims: clf.classify(list(ims)).labels,
            "classes": classes, "questions": questions, "prompts": list(prompts)}


def locate_bias(model_dir: str, out: str, *, lora: str | None = None, n_per_prompt: int = 64, seed: int = 0,
                images_dir: str | None = None, prompts: Sequence[str] = (), fix_steps: int = 0,
                detector: str = "yunet", overwrite: bool = True, log=print) -> dict:
    """Run (a)-(d) of the module docstring on ``model_dir`` (+ ``lora``), write ``out`` (atomically; an existing
    ``out`` is replaced when ``overwrite``, else refused); returns locate.json's dict."""
    import jax

    from fairjax.checkpoint import raise_if_stopped
    from fairjax.fairness.metrics import discrepancy_of
    from fairjax.models import rqvae, siglip
    from fairjax.vila_u import data as vdata
    from fairjax.vila_u.generate import RecordGenerator, SampleOptions, load_model

    if not os.path.isdir(model_dir):
        raise UserError(f"{model_dir}: model directory not found")
    if lora and not os.path.isfile(lora):
        raise UserError(f"{lora}: LoRA file not found")
    toy = os.path.isfile(os.path.join(model_dir, "toy_world.json"))
    if toy:
        setup = _toy_setup(model_dir)
    elif images_dir:
        if not prompts:
            raise UserError("a model that is not a toy-world model needs --prompts (neutral prompts) and --images")
        setup = _real_setup(images_dir, prompts, detector)
    else:
        raise UserError(f"{model_dir} is not a toy-world model; pass --images DIR (balanced face images) and --prompts")
    model = load_model(model_dir, lora=lora)
    vu, params, tower, vis = model.vu, model.params, model.tower, model.vis_params
    attrs = list(setup["classes"])
    images = setup["images"]
    s = tower.config.siglip.image_size
    if images.shape[1:3] != (s, s):
        images = np.asarray(jax.image.resize(images.astype(np.float32), (len(images), s, s, 3), "linear")
                            ).clip(0, 255).astype(np.uint8)

    @jax.jit
    def encode(x):
        codes, z = tower.apply({"params": vis}, siglip.preprocess(x), method="encode_image")
        return codes, rqvae.to_pixels(tower.apply({"params": vis}, z, method="decode"))

    codes_hw, _ = encode(images)
    img_codes = np.asarray(codes_hw).reshape(len(images), -1, codes_hw.shape[-1])
    # (a) the tokenizer round trip
    tok_res = tokenizer_flip_rate(images, lambda x: rqvae.to_uint8_hwc(np.asarray(encode(x)[1])),
                                  setup["classify"], attrs)
    log(f"locate: tokenizer round trip flips gender {tok_res['flip_rate'].get('gender', 0):.3f}, "
        f"race {tok_res['flip_rate'].get('race', 0):.3f} of {tok_res['n']} balanced images")
    # (b) understanding
    und = {}
    for attr, (q, answers) in setup["questions"].items():
        sc = answer_scores(vu, params, model.tokenizer, img_codes, q, list(answers))
        pred = [list(answers.values())[j] for j in sc.argmax(1)]
        true = [lab[attr] if lab else None for lab in setup["labels"]]
        ok = [p == t for p, t in zip(pred, true) if t is not None]
        cls = setup["classes"][attr]
        true_sh = shares([{attr: t} for t in true if t], attr, cls)
        pred_sh = shares([{attr: p} for p, t in zip(pred, true) if t], attr, cls)
        und[attr] = {"question": q, "accuracy": float(np.mean(ok)) if ok else float("nan"), "n": len(ok),
                     "answer_shares": pred_sh, "answer_bias": {c: pred_sh[c] - true_sh[c] for c in cls}}
    log("locate: understanding accuracy " + ", ".join(f"{a} {d['accuracy']:.3f}" for a, d in und.items()))
    # (c) generation
    gen = RecordGenerator(model, SampleOptions(cfg=1.0, top_k=None, top_p=None), batch_size=64)
    prompts_ = setup["prompts"]
    g_labels, g_codes, g_prompt = [], [], []
    for p, _, img, c in gen.run(prompts_, [n_per_prompt] * len(prompts_), 7919 + seed):
        g_labels.append(setup["classify"](img[None])[0])
        g_codes.append(np.asarray(c))
        g_prompt.append(p)
    gen_res = {"n_per_prompt": n_per_prompt, "discrepancy": {}, "per_prompt": {}}
    for attr in attrs:
        got = [lab[attr] for lab in g_labels if lab]
        gen_res["discrepancy"][attr] = float(discrepancy_of(got, setup["classes"][attr])) if got else float("nan")
    for i, pr in enumerate(prompts_):
        labs = [lab for lab, p in zip(g_labels, g_prompt) if p == i]
        gen_res["per_prompt"][pr] = {a: shares(labs, a, setup["classes"][a]) for a in attrs}
        gen_res["per_prompt"][pr]["no_face"] = float(np.mean([lab is None for lab in labs]))
    log("locate: generation discrepancy " + ", ".join(f"{a} {v:.3f}" for a, v in gen_res["discrepancy"].items()))
    # (d) the probe at the first image token of the model's own neutral images
    keep = [i for i, lab in enumerate(g_labels) if lab]
    probe = {"position": "first image token (input = its code embedding)", "layers": [], "by_attribute": {}}
    if keep:
        ids = [vdata.generation_ids(model.tokenizer, prompts_[g_prompt[i]]) for i in keep]
        pid, pm = vdata.left_pad(ids, max(len(x) for x in ids))
        codes = np.stack([g_codes[i] for i in keep])
        fn = jax.jit(lambda p, a, b, c: layer_hidden_states(vu, p, a, b, c, position=None))
        every = np.concatenate([np.asarray(fn(params, pid[s:s + 64], pm[s:s + 64], codes[s:s + 64]))
                                for s in range(0, len(keep), 64)])  # (n, 1 + layers, N, H)
        feats = every[:, :, 0]
        probe["layers"] = ["embed"] + [f"layer_{i}" for i in range(feats.shape[1] - 1)]
        probe["by_position"], probe["decided_at"] = {}, {}
        for attr in attrs:
            labs = [g_labels[i][attr] for i in keep]
            probe["by_attribute"][attr] = linear_probe(feats, labs, seed=seed)
            # every image position: accuracy[layer][position]; the attribute is "decided" at the first position
            # where some layer reads it at >= 0.9
            acc = np.asarray([linear_probe(every[:, :, t], labs, seed=seed)["accuracy"]
                              for t in range(every.shape[2])]).T
            probe["by_position"][attr] = acc.tolist()
            hit = np.flatnonzero(acc.max(0) >= 0.9)
            probe["decided_at"][attr] = int(hit[0]) if len(hit) else None
        log("locate: probe accuracy per layer " + "; ".join(
            f"{a}: " + " ".join(f"{x:.2f}" for x in d["accuracy"]) + f" (chance {d['chance']:.2f})"
            for a, d in probe["by_attribute"].items()))
        log(f"locate: first image position where a layer reads the attribute at >= 0.9: {probe['decided_at']}")
    fix = None
    if fix_steps > 0 and "occupation" in setup:  # pairs: a balanced image of another identity vs the model's own
        rng = np.random.default_rng(seed)
        pairs = []
        for i in keep:
            lab = g_labels[i]
            cand = [j for j, o in enumerate(setup["occupation"]) if o == g_prompt[i] and setup["labels"][j] != lab]
            if cand:
                pairs.append((g_prompt[i], img_codes[cand[rng.integers(len(cand))]], g_codes[i]))
        if pairs:
            fix = fix_experiment(model, model.tokenizer, prompts_, pairs, steps=fix_steps, n_per_prompt=n_per_prompt,
                                 seed=seed, classify=setup["classify"], classes=setup["classes"], log=log)
    summary = {"tokenizer_flip_rate": tok_res["flip_rate"],
               "understanding_accuracy": {a: d["accuracy"] for a, d in und.items()},
               "answer_bias": {a: d["answer_bias"] for a, d in und.items()},
               "generation_discrepancy": gen_res["discrepancy"],
               "probe_accuracy": {a: d["accuracy"] for a, d in probe["by_attribute"].items()},
               "probe_decided_at": probe.get("decided_at", {})}
    if fix:
        summary["fix_generation_discrepancy"] = {k: fix[k]["generation_discrepancy"] for k in ("llm", "head")}
    result = {"model": model_dir, "lora": lora, "summary": summary, "tokenizer": tok_res, "understanding": und,
              "generation": gen_res, "probe": probe, "fix": fix, **summary}
    raise_if_stopped(f"before {out} was written: nothing written; run the same command again to start over")
    from fairjax.io.model_dir import atomic_output_dir

    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        with open(os.path.join(tmp, "locate.json"), "w") as f:
            json.dump(result, f, indent=2, default=float)
        _plots(result, tmp)
        _html(result, tmp)
    return result


def _plots(result: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pr = result["probe"]
    if pr["by_attribute"]:
        fig, ax = plt.subplots(figsize=(5, 3))
        for a, d in pr["by_attribute"].items():
            ax.plot(range(len(d["accuracy"])), d["accuracy"], marker="o", label=f"{a} (chance {d['chance']:.2f})")
        ax.set_xticks(range(len(pr["layers"])), pr["layers"], rotation=30)
        ax.set_ylabel("held-out probe accuracy")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "probe.png"), dpi=100)
        plt.close(fig)
    if pr.get("by_position"):
        attrs_ = list(pr["by_position"])
        fig, axes = plt.subplots(1, len(attrs_), figsize=(4.5 * len(attrs_), 2.8), squeeze=False)
        for ax, a in zip(axes[0], attrs_):
            im = ax.imshow(np.asarray(pr["by_position"][a]), vmin=0, vmax=1, aspect="auto", cmap="viridis")
            ax.set_yticks(range(len(pr["layers"])), pr["layers"], fontsize=7)
            ax.set_xlabel("image position (raster order)", fontsize=8)
            ax.set_title(f"{a}: probe accuracy per layer and position", fontsize=8)
            fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "probe_positions.png"), dpi=100)
        plt.close(fig)
    per = result["generation"]["per_prompt"]
    attrs = [a for a in result["generation"]["discrepancy"]]
    fig, axes = plt.subplots(1, len(attrs), figsize=(4 * len(attrs), 3), squeeze=False)
    for ax, a in zip(axes[0], attrs):
        prompts = list(per)
        classes = list(next(iter(per.values()))[a]) if per else []
        bottom = np.zeros(len(prompts))
        for c in classes:
            v = np.asarray([per[p][a][c] for p in prompts], float)
            ax.bar(range(len(prompts)), np.nan_to_num(v), bottom=bottom, label=c)
            bottom += np.nan_to_num(v)
        ax.set_xticks(range(len(prompts)), prompts, rotation=30, fontsize=7)
        ax.set_title(f"{a} shares of the neutral prompts' images", fontsize=8)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "shares.png"), dpi=100)
    plt.close(fig)


def _html(result: dict, out: str) -> None:
    s = result["summary"]
    rows = []
    for key, val in s.items():
        if key == "probe_accuracy":
            continue
        rows.append(f"<tr><td>{html.escape(key)}</td><td><code>{html.escape(json.dumps(val, default=float))}"
                    f"</code></td></tr>")
    imgs = "".join(f'<p><img src="{n}"></p>' for n in ("probe.png", "probe_positions.png", "shares.png") if os.path.isfile(os.path.join(out, n)))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>locate-then-fix</title></head><body>"
            f"<h1>Locate-then-fix: {html.escape(result['model'])}"
            f"{' + ' + html.escape(result['lora']) if result['lora'] else ''}</h1>"
            "<p>(a) the image tokenizer's round trip, (b) understanding of balanced images, (c) generation for neutral "
            "prompts, (d) a linear probe of the attribute at the first image token per LLM layer.</p>"
            f"<table border='1' cellpadding='4'>{''.join(rows)}</table>{imgs}"
            f"<pre>{html.escape(json.dumps(result['probe'], indent=1, default=float))}</pre></body></html>")
    with open(os.path.join(out, "index.html"), "w") as f:
        f.write(page)


def compare_html(dirs: Mapping[str, str], out: str) -> str:
    """One side-by-side page over several locate runs (``{name: DIR}``, each holding ``locate.json`` and its
    plots; e.g. the base and the BPO model): every summary number per model, what changed from the first
    model to each other one, and the plots next to each other. Writes ``out/index.html`` (links to the
    plots by relative path) and returns its path."""
    names = list(dirs)
    res = {}
    for n in names:
        path = os.path.join(dirs[n], "locate.json")
        if not os.path.isfile(path):
            raise UserError(f"{path}: no locate result to compare (run python -m fairjax.locate_bias --out {dirs[n]})")
        with open(path) as f:
            res[n] = json.load(f)["summary"]
    first = names[0]
    keys = [k for k in res[first] if k not in ("probe_accuracy", "fix_generation_discrepancy")]

    def cell(v):
        if isinstance(v, Mapping):
            return "<br>".join(f"{html.escape(str(k))}: {cell(x)}" for k, x in v.items())
        return f"{v:.3f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else html.escape(str(v))

    def delta(a, b):
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            return {k: delta(a[k], b[k]) for k in a if k in b}
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
            return f"{float(b) - float(a):+.3f}"
        return ""

    head = "".join(f"<th>{html.escape(n)}</th>" for n in names) + "".join(
        f"<th>{html.escape(n)} - {html.escape(first)}</th>" for n in names[1:])
    rows = "".join(f"<tr><td>{html.escape(k)}</td>" + "".join(f"<td>{cell(res[n].get(k))}</td>" for n in names)
                   + "".join(f"<td>{cell(delta(res[first].get(k), res[n].get(k)))}</td>" for n in names[1:]) + "</tr>"
                   for k in keys)
    os.makedirs(out, exist_ok=True)
    plots = ""
    for plot in ("shares.png", "probe.png", "probe_positions.png"):
        have = [n for n in names if os.path.isfile(os.path.join(dirs[n], plot))]
        if have:
            plots += (f"<h2>{html.escape(plot)}</h2><table><tr>" + "".join(f"<th>{html.escape(n)}</th>" for n in have)
                      + "</tr><tr>" + "".join(
                          f'<td><img src="{html.escape(os.path.relpath(os.path.join(dirs[n], plot), out))}"></td>'
                          for n in have) + "</tr></table>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>locate-then-fix, side by side</title></head><body>"
            f"<h1>Locate-then-fix: {' vs '.join(html.escape(n) for n in names)}</h1>"
            "<p>(a) tokenizer round-trip flips, (b) understanding of balanced images, (c) generation for neutral "
            "prompts, (d) the probe; the last columns are what changed from the first model.</p>"
            f"<table border='1' cellpadding='4'><tr><th></th>{head}</tr>{rows}</table>"
            "<p>Each model's own page: " + ", ".join(
                f'<a href="{html.escape(os.path.relpath(os.path.join(dirs[n], "index.html"), out))}">{html.escape(n)}</a>'
                for n in names) + f"</p>{plots}</body></html>")
    path = os.path.join(out, "index.html")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(page)
    os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fairjax.locate_bias", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a VILA-U model dir (toy world or converted)")
    p.add_argument("--lora", default=None, help="a fairjax LoRA over the LLM (what fairjax.train writes)")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=64, help="images per neutral prompt for (c) and (d)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fix-steps", type=int, default=0,
                   help="toy models: also run the short BPO with the LoRA on the LLM vs on the image head (e.g. 60)")
    p.add_argument("--images", default=None, help="balanced face images (a model that is not a toy-world model)")
    p.add_argument("--prompts", nargs="*", default=[], help="neutral prompts (a model that is not a toy-world model)")
    p.add_argument("--detector", default="yunet",
                   help="DeepFace face detector for --images and the generated images (default yunet, as PopAlign's "
                        "evaluation; 'skip' = the whole image is the face); weights under $DEEPFACE_HOME")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    args = p.parse_args(argv)
    from fairjax.io import fs

    def body():  # SIGTERM / SIGINT: stop between generation batches, one line, 128 + the signal
        if args.n < 2:
            raise UserError(f"--n {args.n}: need at least 2 images per prompt")
        if not 0 <= args.seed < 2**32:
            raise UserError(f"--seed must be in [0, 2**32) (got {args.seed})")
        if args.fix_steps < 0:
            raise UserError(f"--fix-steps {args.fix_steps} must be >= 0 (0 = no fix experiment)")
        fs.check_output(args.out, what="--out", overwrite=args.overwrite,
                        inputs={"--model": args.model, "--lora": args.lora, "--images": args.images})
        with fs.locked(args.out, what="--out"):  # a second run on OUT is refused before it loads a model
            r = locate_bias(args.model, args.out, lora=args.lora, n_per_prompt=args.n, seed=args.seed,
                            images_dir=args.images, prompts=args.prompts, fix_steps=args.fix_steps,
                            detector=args.detector, overwrite=args.overwrite)
        print(json.dumps(r["summary"], indent=1, default=float))

    return fs.run_entry(body)


if __name__ == "__main__":
    sys.exit(main())
