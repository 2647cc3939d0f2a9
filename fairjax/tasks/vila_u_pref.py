"""VILA-U preference fine-tuning with LoRA: SFT / BPO / DPO on image tokens, mDPO on text answers.

Model adapters (pure, jittable; ``params = {'llm', 'mm_projector', 'rqtransformer', 'codebook'}``
as :func:`fairjax.convert.vila_u.load` returns them; ``lora`` a flat :mod:`fairjax.lora` tree over
the LLM's kernels, applied unmerged -- see :func:`lora_interceptor`):

* :func:`image_code_logprobs` -- teacher-forced log-probability of an image's codes given its
  prompt (vila-u ``VILAULlamaModel.forward`` on a generation sample). A row is
  ``[prompt, left-padded, ending with <im_start>] [e_1 .. e_{N-1}]`` with
  ``e_t = mm_projector(sum_d emb(c_{t,d}))``; the LLM's final-norm hidden state at
  ``<im_start>`` and at ``e_1 .. e_{N-1}`` feeds the depth transformer, whose logits at
  depth ``d`` of position ``t`` score ``c_{t,d}``. Per sample
  ``lp = mean_{t,d} log softmax(logits_{t,d})[c_{t,d}]`` over the N x D codes (BPO, SFT) or
  the sum (DPO, ``reduce='sum'``).
* :func:`response_logprobs` -- ``sum_j log p(y_j | prefix)`` of an answer conditioned on an
  image (the understanding side): a row is ``[pre (left-padded)] [e_1 .. e_N] [post + answer
  (right-padded)]`` and ``lm_head`` scores the answer tokens.
* :func:`random_resized_crop` -- mDPO's corrupted image, torchvision ``RandomResizedCrop(size,
  scale=(0.01, 0.2))`` (the crop keeps 1-20% of the area, aspect in [3/4, 4/3]) with bilinear
  resizing back to the full size; :func:`encode_codes` turns pixels into codes.

Losses (:mod:`fairjax.losses`): ``sft`` = ``mean(-lp)`` (image-token cross-entropy);
``bpo`` = ``losses.bpo(lp_a, lp_b)`` on the two halves of each explicit pair, no reference;
``dpo`` = ``losses.dpo`` with the reference = the same base params without LoRA;
``mdpo`` = ``losses.mdpo(c, r, c', ...)``, reference = the base without LoRA, the same crop for
policy and reference (the released mDPO code draws a new crop for the reference pass).

Every random draw of a row (LoRA dropout mask, crop) comes from
``fold_in(step key, record index)``, so a pair's loss does not depend on the batch it is
in, on its position or on the device layout.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from fairjax import config as config_lib
from fairjax import lora as lora_lib
from fairjax import losses
from fairjax.errors import UserError
from fairjax.io import fs
from fairjax.models import attention as attention_lib
from fairjax.models import siglip
from fairjax.models import vila_u as vila_u_mod
from fairjax.models.layers import REMAT_POLICIES, SCAN_LAYERS, remat_policy, scan_layers_setting
from fairjax.vila_u import data as vdata
from fairjax.vila_u.augment import random_resized_crop
from fairjax.vila_u.logprobs import encode_codes, image_code_logprobs, response_logprobs
from fairjax.vila_u.tiny import ensure_tiny

LOSSES = ("sft", "bpo", "dpo", "mdpo")
DATA_KIND = {"sft": ("images", "pairs"), "bpo": ("pairs",), "dpo": ("pairs",), "mdpo": ("mdpo",)}
LORA_TARGETS = (r"layers_\d+/self_attn/(q|k|v|o)_proj/kernel$", r"layers_\d+/mlp/(gate|up|down)_proj/kernel$")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# ----------------------------------------------------------------------------- the task

def default_config():
    """Every key :class:`VilaUPrefTask` reads, on top of :func:`fairjax.trainer.default_train_config`
    (docs/reference.md defaults: LoRA r 32, alpha 32, dropout 0.1 on q/k/v/o/gate/up/down of every LLaMA
    layer; depth transformer, codec and projector frozen)."""
    import ml_collections

    from fairjax.trainer import default_train_config

    c = default_train_config()
    c.task = "vila_u_pref"
    c.loss = "bpo"  # sft | bpo | dpo | mdpo
    c.beta = 1.0
    c.bpo_variant = "v1"  # fairjax.losses.bpo: v1 = the released bpo_loss_v1
    c.dpo_average_logp = False  # DPO on image tokens: summed (False) or mean (True) code log-probs
    c.anchor_delta = 0.0  # mDPO anchor margin
    c.epochs = 1.0  # used when total_steps <= 0: total_steps = round(epochs * steps_per_epoch)
    c.total_steps = 0
    c.warmup_ratio = 0.03  # > 0: optimizer.warmup_steps = ceil(warmup_ratio * total_steps)
    c.tiny = ""  # non-empty: build / reuse the tiny random model and data under tiny_root
    c.tiny_root = os.path.join(os.path.expanduser("~"), ".cache", "fairjax", "tiny_vila_u")
    c.tiny_seed = 0
    c.model = ml_collections.ConfigDict(dict(
        dir="",  # a fairjax VILA-U model dir (tools/convert_vila_u.py) or the vila-u checkpoint folder
        dtype="float32",  # compute: bfloat16 on accelerators
        param_dtype="float32",  # frozen base params: bfloat16 on accelerators (LoRA stays float32)
        remat="none",  # each LLaMA / depth-transformer block: none | nothing_saveable | dots_saveable | ...
        attention="auto",  # auto | xla | cudnn | pallas | einsum | chunked (fairjax.models.attention)
        head_chunk=0,  # > 0: image positions per rematerialised depth-head chunk (bounds the code logits)
        # nn.scan over the LLaMA layers and the depth transformer's blocks (files stay unrolled): "auto" =
        # "true" on GPU / TPU, "false" on CPU; the run's config.json records what "auto" resolved to
        scan_layers="auto",
    ))
    c.data = ml_collections.ConfigDict(dict(path="", split="train", shuffle=True, max_prompt_len=0))
    c.lora = ml_collections.ConfigDict(dict(rank=32, alpha=32.0, dropout=0.1, targets=LORA_TARGETS,
                                            init=""))  # init: a LoRA file to continue (BPO stage 2)
    c.corrupt = ml_collections.ConfigDict(dict(scale=(0.01, 0.2), ratio=(3 / 4, 4 / 3)))  # mDPO crop
    c.optimizer.weight_decay = 0.0
    c.optimizer.schedule = "cosine"
    c.checkpoint.every_steps = 1000
    c.log_every_steps = 10
    return c


#: valid values of the keys :func:`default_config` adds to the trainer's, and of ``total_steps``, whose
#: 0 here means "from epochs" (checked with :data:`fairjax.trainer.TRAIN_RANGES` before anything is built)
RANGES = {
    "loss": config_lib.one_of(*LOSSES),
    "beta": config_lib.floats(0, lo_open=True),
    "bpo_variant": config_lib.one_of("v1", "v2", "squared"),
    "dpo_average_logp": config_lib.BOOL,
    "anchor_delta": config_lib.floats(),
    "epochs": config_lib.floats(0, lo_open=True),
    "total_steps": config_lib.ints(0, note="0 = epochs x steps per epoch"),
    "warmup_ratio": config_lib.floats(0, 1, hi_open=True),
    "tiny_seed": config_lib.SEED,
    "model.dtype": config_lib.one_of(*_DTYPES),
    "model.param_dtype": config_lib.one_of(*_DTYPES),
    "model.remat": config_lib.one_of(*REMAT_POLICIES, "true", "false"),
    "model.attention": config_lib.one_of(*attention_lib.IMPLEMENTATIONS, ""),
    "model.scan_layers": config_lib.one_of(*SCAN_LAYERS),
    "model.head_chunk": config_lib.ints(0, note="0 = the whole depth head at once"),
    "data.shuffle": config_lib.BOOL,
    "data.max_prompt_len": config_lib.ints(0, note="0 = the longest prompt"),
    "lora.rank": config_lib.ints(1),
    "lora.alpha": config_lib.floats(0, lo_open=True),
    "lora.dropout": config_lib.floats(0, 1, hi_open=True),
}


def load_model(model_dir: str, *, dtype=jnp.float32, param_dtype=None, remat=False, attention_impl=None,
               scan_layers=False):
    """``(VilaU, params, RQVAESiglip, vision params)`` of a fairjax VILA-U model dir or a vila-u checkpoint
    folder (:func:`fairjax.convert.vila_u.load`)."""
    from fairjax.convert import vila_u as convert_vila_u

    if not os.path.isdir(model_dir):
        raise UserError(f"model.dir {model_dir!r} is not a folder; pass vila-u-7b-256's folder or its "
                        "tools/convert_vila_u.py output (or use a :tiny preset)")
    return convert_vila_u.load(model_dir, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
                               remat=remat, scan_layers=scan_layers)


def _dtype(name: str, key: str):
    if name not in _DTYPES:
        raise UserError(f"{key}={name!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


class VilaUPrefTask:
    """Task for :func:`fairjax.trainer.train` (contract in its docstring). ``model`` optionally gives
    ``(VilaU, params[, RQVAESiglip, vision params])`` in place of ``config.model.dir`` (tests); it is put
    into the layout ``model.scan_layers`` asks for."""

    init_in_jit = False

    def __init__(self, config, model=None):
        self.config = c = config
        self.loss_name = str(c.loss)
        if self.loss_name not in LOSSES:
            raise UserError(f"config.loss={self.loss_name!r} is not one of {', '.join(LOSSES)}")
        self.scan_layers = scan_layers_setting(c.model.get("scan_layers", "auto"), key="config.model.scan_layers")
        c.model.scan_layers = "true" if self.scan_layers else "false"  # a resume on another backend is refused
        if c.get("tiny"):
            dirs = ensure_tiny(os.path.join(c.tiny_root, f"seed{int(c.tiny_seed)}"), int(c.tiny_seed))
            c.model.dir = c.model.dir or dirs["model"]
            c.data.path = c.data.path or dirs["mdpo" if self.loss_name == "mdpo" else "pairs"]
        dtype = _dtype(str(c.model.dtype), "model.dtype")
        self.param_dtype = _dtype(str(c.model.param_dtype), "model.param_dtype")
        remat = remat_policy(c.model.remat)  # both checked before anything is loaded or compiled
        attention = attention_lib.check(c.model.attention)
        if model is None:
            model = load_model(str(c.model.dir), dtype=dtype, param_dtype=self.param_dtype, remat=remat,
                               attention_impl=attention, scan_layers=self.scan_layers)
        self.vu, self.base = model[0], model[1]
        if self.vu.scan_layers != self.scan_layers:
            stack = vila_u_mod.stack_params if self.scan_layers else vila_u_mod.unstack_params
            self.vu, self.base = self.vu.with_scan_layers(self.scan_layers), stack(self.base)
        self.tower, vis = (model[2], model[3]) if len(model) > 2 else (None, None)
        if self.loss_name == "mdpo":
            if self.tower is None:
                raise UserError("mDPO needs the vision tower (to encode the corrupted image); load a converted model dir")
            self.base = dict(self.base, vision_model=vis["vision_model"])
        self._open_data()
        self.alpha, self.rank = float(c.lora.alpha), int(c.lora.rank)
        self.dropout = float(c.lora.dropout)
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"lora.dropout={self.dropout} must be in [0, 1)")
        if int(c.total_steps) <= 0:
            c.total_steps = max(1, int(round(float(c.epochs) * self.batches.steps_per_epoch)))
        if float(c.get("warmup_ratio", 0.0)) > 0:
            c.optimizer.warmup_steps = int(math.ceil(float(c.warmup_ratio) * int(c.total_steps)))

    # -- data

    def _open_data(self):
        from fairjax.data.prefs import PreferenceBatches

        c = self.config
        data = vdata.VilaUData(str(c.data.path), str(c.data.split))
        self.data_dir = data.dir
        if data.kind not in DATA_KIND[self.loss_name]:
            raise UserError(f"{data.out_dir} holds {data.kind!r} records; loss {self.loss_name!r} needs "
                            f"{' or '.join(repr(k) for k in DATA_KIND[self.loss_name])} records")
        vocab = self.vu.llm.config.vocab_size
        if data.info["max_token_id"] >= vocab:
            raise UserError(f"{data.out_dir}: token id {data.info['max_token_id']} is outside the LLM vocabulary "
                            f"({vocab}); tokenize with this model's tokenizer")
        if data.kind != "mdpo":
            n_embed, want = self.vu.codebook.config.n_embed, (self.vu.image_tokens, self.vu.depth)
            if data.info["codebook_size"] != n_embed or tuple(data.code_shape) != want:
                raise UserError(f"{data.out_dir}: codes of shape {tuple(data.code_shape)} from a codebook of "
                                f"{data.info['codebook_size']}, but the model takes {want} codes from {n_embed}; "
                                "encode the images with this model's vision tower")
        else:
            s = self.tower.config.siglip.image_size
            if tuple(data.info["image_shape"]) != (s, s, 3):
                raise UserError(f"{data.out_dir}: images are {tuple(data.info['image_shape'])}, the vision tower takes "
                                f"({s}, {s}, 3); resize them when writing the dataset")
        self.data = vdata.SampleView(data) if self.loss_name == "sft" else data
        self.batches = PreferenceBatches(self.data, int(c.batch_size), seed=int(c.seed), shuffle=bool(c.data.shuffle))
        L = self.data.lengths
        if data.kind == "mdpo":
            self.pre_len = int(L["pre_ids"].max())
            self.rest_len = int((L["post_ids"] + np.maximum(L["chosen_ids"], L["rejected_ids"])).max())
        else:
            longest = int(L["prompt_ids"].max())
            self.prompt_len = int(c.data.max_prompt_len) or longest
            if longest > self.prompt_len:
                raise UserError(f"{data.out_dir}: a prompt has {longest} tokens, more than data.max_prompt_len="
                                f"{self.prompt_len}; raise it (0 = the longest prompt)")

    def data_fingerprint(self) -> str:
        """Digest of the dataset's files (:func:`fairjax.io.fs.folder_fingerprint`)."""
        return fs.folder_fingerprint(self.data_dir)

    def batch(self, step: int, process_index: int, process_count: int) -> dict[str, np.ndarray]:
        units = self.batches.global_indices(step)
        per = len(units) // process_count
        units = units[process_index * per:(process_index + 1) * per]
        raw = self.data.read(units)
        out = {"index": np.asarray(units, np.int32)}
        if self.loss_name == "mdpo":
            out["pre_ids"], out["pre_mask"] = vdata.left_pad(raw["pre_ids"], self.pre_len)
            for side in ("chosen", "rejected"):
                rest = [np.concatenate([p, a]) for p, a in zip(raw["post_ids"], raw[f"{side}_ids"])]
                ids, mask = vdata.right_pad(rest, self.rest_len)
                start = np.asarray([len(p) for p in raw["post_ids"]])[:, None]
                out[f"{side}_ids"], out[f"{side}_mask"] = ids, mask
                out[f"{side}_target"] = mask & (np.arange(self.rest_len)[None] >= start)
            out["image"] = raw["image"]
            return out
        out["prompt_ids"], out["prompt_mask"] = vdata.left_pad(raw["prompt_ids"], self.prompt_len)
        if self.loss_name == "sft":
            out["codes"] = raw["codes"]
        else:
            out["codes_a"], out["codes_b"] = raw["codes_a"], raw["codes_b"]
        return out

    # -- params

    def init(self, rng):
        c = self.config
        frozen = jax.tree.map(lambda a: np.asarray(a).astype(self.param_dtype), self.base)
        targets = list(c.lora.targets)
        if c.lora.init:
            lora, meta = lora_lib.load(str(c.lora.init))
            want = lora_lib.match_kernels(frozen["llm"], targets)
            if sorted(lora) != want:
                raise UserError(f"LoRA file {c.lora.init} adapts {len(lora)} kernels, lora.targets select {len(want)} "
                                f"of this model; continue with the same targets and model")
            if abs(float(meta.get("alpha", self.alpha)) - self.alpha) > 1e-9 or lora_lib.rank_of(
                    next(iter(lora.values()))) != self.rank:
                raise UserError(f"LoRA file {c.lora.init} has rank {meta.get('rank')} alpha {meta.get('alpha')}, the "
                                f"config lora.rank={self.rank} lora.alpha={self.alpha}; make them equal")
            lora_lib.merge(frozen["llm"], lora, self.alpha)  # checks every entry's shape (result discarded)
            lora = {k: {n: np.asarray(v, np.float32) for n, v in e.items()} for k, e in lora.items()}
        else:
            lora = jax.device_get(lora_lib.init(frozen["llm"], targets, self.rank, self.alpha, rng))
        return lora, frozen

    def param_partition_rules(self) -> list:
        """VILA-U's ``tensor``-axis rules (:data:`fairjax.models.vila_u.PARTITION_RULES`) for the frozen base
        (LLaMA, depth transformer, vision tower); the LoRA's ``a`` / ``b`` fall to the FSDP default."""
        from fairjax.models.vila_u import PARTITION_RULES

        return list(PARTITION_RULES)

    # -- loss

    def _row_keys(self, rng, index, slots: int):
        """(B * slots,) keys ``fold_in(fold_in(fold_in(rng, 1), index_i), slot)``, rows ordered (i, slot)."""
        per = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(rng, 1), i))(index)
        return jax.vmap(lambda k: jax.vmap(lambda s: jax.random.fold_in(k, s))(jnp.arange(slots)))(per).reshape(-1)

    def _lp(self, lora, frozen, batch, codes, rng, slots, reduce):
        """Image-code log-probs of ``codes (B, slots, N, D)`` under the prompt of each record -> (B, slots)."""
        b = codes.shape[0]
        ids = jnp.repeat(batch["prompt_ids"], slots, axis=0)
        mask = jnp.repeat(batch["prompt_mask"], slots, axis=0)
        keys = self._row_keys(rng, batch["index"], slots) if lora else None
        lp = image_code_logprobs(self.vu, frozen, ids, mask, codes.reshape((b * slots,) + codes.shape[2:]),
                                 lora=lora, lora_alpha=self.alpha, dropout=self.dropout if lora else 0.0,
                                 row_keys=keys, reduce=reduce, head_chunk=int(self.config.model.get("head_chunk", 0)))
        return lp.reshape(b, slots)

    def loss(self, trainable, frozen, batch, rng):
        c = self.config
        if self.loss_name == "sft":
            lp = self._lp(trainable, frozen, batch, batch["codes"][:, None], rng, 1, "mean")[:, 0]
            nll = -jnp.mean(lp)
            return nll, {"nll": jax.lax.stop_gradient(nll), "lp": jax.lax.stop_gradient(jnp.mean(lp))}
        if self.loss_name == "mdpo":
            return self._mdpo(trainable, frozen, batch, rng)
        codes = jnp.stack([batch["codes_a"], batch["codes_b"]], axis=1)
        if self.loss_name == "bpo":
            lp = self._lp(trainable, frozen, batch, codes, rng, 2, "mean")
            loss, m = losses.bpo(lp[:, 0], lp[:, 1], beta=float(c.beta), variant=str(c.bpo_variant))
            m.update(lp_a=jax.lax.stop_gradient(jnp.mean(lp[:, 0])), lp_b=jax.lax.stop_gradient(jnp.mean(lp[:, 1])))
            return loss, m
        reduce = "mean" if c.dpo_average_logp else "sum"
        lp = self._lp(trainable, frozen, batch, codes, rng, 2, reduce)
        ref = jax.lax.stop_gradient(self._lp(None, frozen, batch, codes, rng, 2, reduce))
        return losses.dpo(lp[:, 0], lp[:, 1], ref[:, 0], ref[:, 1], beta=float(c.beta))

    def mdpo_codes(self, frozen, batch, rng):
        """``(clean codes, corrupted codes, crop boxes)`` of the batch's images: each image's crop box
        from ``fold_in(fold_in(rng, 2), index)``; both images encoded by the frozen vision tower."""
        c = self.config
        pix = siglip.preprocess(batch["image"])
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(rng, 2), i))(batch["index"])
        bad, boxes = random_resized_crop(keys, pix, tuple(c.corrupt.scale), tuple(c.corrupt.ratio))
        b = pix.shape[0]
        both = encode_codes(self.tower, frozen, jnp.stack([pix, bad], 1).reshape((2 * b,) + pix.shape[1:]))
        both = jax.lax.stop_gradient(both.reshape((b, 2) + both.shape[1:]))
        return both[:, 0], both[:, 1], boxes

    def mdpo_logprobs(self, trainable, frozen, batch, rng):
        """``(policy, reference)`` answer log-probs, each (B, 3): columns chosen | image,
        rejected | image, chosen | corrupted image (the same crop for both)."""
        clean, bad, _ = self.mdpo_codes(frozen, batch, rng)
        b = clean.shape[0]
        codes = jnp.stack([clean, clean, bad], 1).reshape((3 * b,) + clean.shape[1:])
        rest = {k: jnp.stack([batch[f"chosen_{k}"], batch[f"rejected_{k}"], batch[f"chosen_{k}"]], 1).reshape(3 * b, -1)
                for k in ("ids", "mask", "target")}
        pre_ids, pre_mask = jnp.repeat(batch["pre_ids"], 3, axis=0), jnp.repeat(batch["pre_mask"], 3, axis=0)

        def run(lora):
            keys3 = self._row_keys(rng, batch["index"], 3) if lora else None
            lp = response_logprobs(self.vu, frozen, pre_ids, pre_mask, codes, rest["ids"], rest["mask"],
                                   rest["target"], lora=lora, lora_alpha=self.alpha,
                                   dropout=self.dropout if lora else 0.0, row_keys=keys3)
            return lp.reshape(b, 3)

        return run(trainable), jax.lax.stop_gradient(run(None))

    def _mdpo(self, trainable, frozen, batch, rng):
        pol, ref = self.mdpo_logprobs(trainable, frozen, batch, rng)
        return losses.mdpo(pol[:, 0], pol[:, 1], pol[:, 2], ref[:, 0], ref[:, 1], ref[:, 2], beta=float(self.config.beta),
                           anchor_delta=float(self.config.get("anchor_delta", 0.0)))

    # -- outputs

    def finish(self, trainable, frozen, workdir: str) -> dict:
        from fairjax.trainer import params_on_host

        host = params_on_host(trainable)
        path = os.path.join(workdir, "lora.safetensors")
        if jax.process_index() == 0:
            lora_lib.save(path, host, alpha=self.alpha, targets=list(self.config.lora.targets),
                          loss=self.loss_name, base_model=str(self.config.model.dir))
        return {"lora": path, "lora_params": lora_lib.num_params(host)}
