"""PopAlign / Diffusion-DPO / SFT fine-tuning of an SDXL (or SD 1.x / 2.x) UNet.

The model adapter of the one loss interface (docs/design.md): a batch of latents
becomes per-sample denoising errors, and :mod:`fairjax.losses` turns them into
the loss.  For row ``i`` (a winner or a loser image's latents ``x0_i``)::

    eps_i, t_i   shared by the two rows of a pair: eps ~ N(0, I), t ~ U{t_min..t_max-1} (all T by default)
    x_t          = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps                 (add_noise)
    mse_i        = mean_{C,H,W} (unet_policy(x_t, t, c_i) - eps)^2        float32
    r_i          = the same with the frozen reference UNet (the initial weights)
    g_i          = r_i - mse_i                                            (implicit reward)

* ``popalign``: ``losses.popalign(g, is_winner, beta, alpha)`` over the whole global batch
  ``[winners; losers]`` (the centring term ``k`` is a global mean under ``jit``; with
  ``grad_accum_steps > 1`` the trainer's batch-statistics pass (:func:`fairjax.trainer.batch_stats_pass`)
  hands every micro-batch the sums over the whole global batch, so ``k`` stays the global batch's);
* ``diffusion_dpo``: ``losses.diffusion_dpo(g_w, g_l, beta)`` over the pairs;
* ``sft``: ``losses.sft(mse)`` on winners only, no reference.

Identity anchor (``config.anchor_weight = w > 0``; popalign / diffusion_dpo): every winner was
generated from an identity prompt (``a female doctor``) and is trained under its set's neutral
caption (``a doctor``). The anchor adds ``w * mean_i mean_{C,H,W} (unet_policy(x'_i, t'_i, p_i) -
sg(unet_ref(x'_i, t'_i, p_i)))^2`` over the pairs' winners conditioned on their own prompts
``p_i`` (the dataset's ``prompt`` field), each winner at two fresh ``(eps', t')`` draws: it
holds the identity prompts' predictions at the reference's, so that the population shift the
preference term asks of neutral prompts does not carry over to prompts that name an identity
(the recall on identity-specific prompts). For a Gaussian step this is the KL from the
reference's step to the policy's, up to t's weighting.

Conditioning ``c_i``: the pair's caption (the winner's), dropped to ``""`` with probability
``data.caption_dropout`` (both rows of a pair together), as precomputed per caption by
:mod:`fairjax.diffusion.text_embeds`; SDXL's ``time_ids`` come from ``config.time_ids``.

Parameters: full fine-tuning (``lora.rank = 0``) trains the whole UNet, the reference is a
frozen copy sharded like it; LoRA trains only ``{path: {a, b}}`` and the reference is the base
tree itself (``policy = lora.merge(base, lora)``), so only the LoRA has optimizer state.

Batch layout (one process's rows; the global batch is the processes' rows in order): for
``n`` pairs, ``n`` winners then their ``n`` losers, ``slot`` = the pair's position in the
global batch. Noise and timestep are keyed by ``(step, slot)`` only and the pairs are matched
by slot, so ``grad_accum_steps``, the device count and the process count do not change what a
pair draws (the trainer's strided micro-batches keep both rows of a pair together).  Data order: epoch-wise permutation of the pairs (SFT: of the winner
records), a pure function of ``(seed, step)``, as :class:`fairjax.data.prefs.PreferenceBatches`.
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fairjax import config as config_lib
from fairjax import losses
from fairjax.data.pairs import PairSource, all_captions, caption_dropout, latent_shape, open_source, step_units
from fairjax.diffusion.rewards import by_slot, per_sample_mse, shared_noise
from fairjax.errors import ConfigError, UserError
from fairjax.io import fs
from fairjax.models import attention as attention_lib
from fairjax.models.layers import REMAT_POLICIES, SCAN_LAYERS, remat_policy, scan_layers_setting

log = logging.getLogger(__name__)

LOSSES = ("popalign", "diffusion_dpo", "sft")
DEFAULT_LORA_TARGETS = r"transformer_blocks_\d+/attn[12]/to_(q|k|v|out_0)/kernel$"
PRESETS = ("full", "lora", "tiny", "tiny_lora")


# ----------------------------------------------------------------------------- config


def make_config(loss: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of ``configs/{popalign,dpo,sft}_sdxl.py``: docs/reference.md's PopAlign recipe.

    Presets: ``full`` (default: full UNet), ``lora`` (rank 32 on the attention projections),
    ``tiny`` / ``tiny_lora`` (a tiny random SDXL-shaped model and dataset built in the workdir;
    runs on a CPU in seconds per step).
    """
    from fairjax.trainer import default_train_config

    if arg not in (None,) + PRESETS:
        raise ValueError(f"unknown preset {arg!r}; choose one of {PRESETS}")
    c = default_train_config()
    c.task = "diffusion_pref"
    c.loss = loss
    c.beta = 5000.0
    c.alpha = 0.5  # PopAlign's normaliser weight (paper's alpha); popalign only
    c.noise_draws = 1  # (eps, t) draws averaged per image's mse: K draws = 1/K variance, K x compute
    # with noise_draws = K > 1: draw k's t is uniform within the k-th of K equal ranges of
    # [t_min, t_max) and the draws are weighted by their range's size (the same expectation as K
    # independent draws, without the variance of where the K timesteps fall)
    c.stratify_draws = False
    # t ~ U{t_min .. t_max - 1} (t_max 0 = the scheduler's num_train_timesteps): the reference draws
    # every timestep; a narrower range spends the batch on the timesteps where the preferred
    # attribute is decided (README, toy world: `python -m fairjax.analysis.reward_probe` shows where)
    c.t_min = 0
    c.t_max = 0
    # identity anchor (module docstring): > 0 adds w * |eps_policy - eps_ref|^2 on the winners under
    # their identity prompts (the dataset's `prompt` field, written by fairjax.data.build_prefs);
    # 0 = off (the reference recipe). It costs one more policy and reference pass per image.
    c.anchor_weight = 0.0
    c.model = ml_collections.ConfigDict(dict(
        dir="",  # a fairjax model dir: unet/, text_encoder*/, tokenizer*/, scheduler/
        dtype="auto",  # compute dtype: auto = bfloat16 on GPU/TPU, float32 on CPU
        param_dtype="float32",  # the frozen params (reference UNet / LoRA base); trained params stay float32
        # activation checkpointing of each transformer block: none | nothing_saveable (recompute the
        # block in the backward) | dots_saveable | dots_with_no_batch_dims_saveable (keep matmuls)
        remat="nothing_saveable",
        # auto (cuDNN flash on GPU, Pallas on TPU, where their rules allow) | xla | cudnn | pallas | einsum | chunked
        attention="auto",
        # nn.scan over each transformer stack (params stacked per stack; files stay unrolled): "auto" =
        # "true" on GPU / TPU, "false" on CPU; the run's config.json records what "auto" resolved to
        scan_layers="auto",
    ))
    c.tiny = ""  # "tiny" | "micro": build that random model + dataset under <workdir>/tiny_<name>/
    c.data = ml_collections.ConfigDict(dict(path="", split="train", caption_dropout=0.2, shuffle=True))
    c.text_embeds = ml_collections.ConfigDict(dict(path="", batch_size=16))  # "" = <workdir>/text_embeds.safetensors
    c.time_ids = (1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0)  # SDXL micro-conditioning at 1024 px
    # dropout: the one schema's key; the SDXL LoRA is merged into the kernels before the UNet runs,
    # so it has no dropout (PopAlign's recipe uses none): any other value than 0 is refused
    c.lora = ml_collections.ConfigDict(dict(rank=0, alpha=32.0, targets=DEFAULT_LORA_TARGETS, dropout=0.0))

    c.total_steps = 750
    c.batch_size = 16  # images per global step: 8 winner/loser pairs (SFT: 16 winners)
    c.optimizer.name = "adamw"
    c.optimizer.lr = 5e-7
    c.optimizer.warmup_steps = 200
    c.optimizer.schedule = "constant"
    c.optimizer.b1, c.optimizer.b2 = 0.9, 0.999
    c.optimizer.weight_decay = 1e-2
    c.optimizer.grad_clip = 1.0
    c.checkpoint.every_steps = 250
    c.log_every_steps = 10

    if arg in ("lora", "tiny_lora"):
        c.lora.rank = 32
        c.lora.alpha = 32.0
        c.optimizer.lr = 1e-4  # the usual LoRA rate (BPO's); full fine-tuning keeps 5e-7
    if arg in ("tiny", "tiny_lora"):
        c.tiny = "tiny"
        c.time_ids = (128.0, 128.0, 0.0, 0.0, 128.0, 128.0)
        c.total_steps = 12
        c.optimizer.lr = 1e-4 if c.lora.rank == 0 else 1e-3
        c.optimizer.warmup_steps = 2
        c.checkpoint.every_steps = 6
        c.log_every_steps = 2
        c.model.remat = "none"
    return c


#: valid values of the keys :func:`make_config` adds to the trainer's (checked with
#: :data:`fairjax.trainer.TRAIN_RANGES` before anything is built)
RANGES = {
    "loss": config_lib.one_of(*LOSSES),
    "beta": config_lib.floats(0, lo_open=True),
    "alpha": config_lib.floats(0, 1),
    "noise_draws": config_lib.ints(1),
    "stratify_draws": config_lib.BOOL,
    "t_min": config_lib.ints(0),
    "t_max": config_lib.ints(0, note="0 = the scheduler's num_train_timesteps"),
    "anchor_weight": config_lib.floats(0, note="0 = no identity anchor"),
    "tiny": config_lib.one_of("", "tiny", "micro"),
    "model.dtype": config_lib.one_of("auto", "float32", "bfloat16", "float16"),
    "model.param_dtype": config_lib.one_of("float32", "bfloat16", "float16"),
    "model.remat": config_lib.one_of(*REMAT_POLICIES, "true", "false"),
    "model.attention": config_lib.one_of(*attention_lib.IMPLEMENTATIONS, ""),
    "model.scan_layers": config_lib.one_of(*SCAN_LAYERS),
    "data.caption_dropout": config_lib.floats(0, 1),
    "data.shuffle": config_lib.BOOL,
    "text_embeds.batch_size": config_lib.ints(1),
    "lora.rank": config_lib.ints(0, note="0 = full fine-tuning"),
    "lora.alpha": config_lib.floats(0, lo_open=True),
    "lora.dropout": config_lib.floats(0, 0, note="the SDXL LoRA is merged into the kernels before the UNet runs"),
}


def _compute_dtype(name: str, key: str = "model.dtype", auto: bool = True):
    if name == "auto" and auto:
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    try:
        return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
    except KeyError:
        choices = ("auto, " if auto else "") + "float32, bfloat16, float16"
        raise ConfigError(f"config.{key}={name!r} is not one of {choices}") from None


# ----------------------------------------------------------------------------- the task


_ANCHOR_STREAM = 0x7A4C  # fold_in key of the anchor's (eps', t') draws; the preference draws use 0..K-1


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


class DiffusionPrefTask:
    """Task for :func:`fairjax.trainer.train` (contract in its docstring); see the module docstring.

    ``source`` (a :class:`PairSource`) and ``table`` (a :class:`fairjax.diffusion.text_embeds.TextTable`)
    may be given directly (tests); otherwise they come from ``config.data.path`` and the
    model dir's text encoders.
    """

    init_in_jit = False  # params are read from the model dir

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | None = None, *,
                 source: PairSource | None = None, table=None):
        from fairjax.diffusion import schedules
        from fairjax.io.model_dir import CONFIG_FILE, component_dir, read_json
        from fairjax.models import unet as unet_mod

        self.config = c = config
        self.workdir = workdir
        _check(c.loss in LOSSES, f"config.loss={c.loss!r} is not one of {', '.join(LOSSES)}")
        _check(int(c.get("noise_draws", 1)) >= 1,
               f"config.noise_draws={c.get('noise_draws')} must be >= 1 (noise draws per image)")
        self.scan_layers = scan_layers_setting(c.model.get("scan_layers", "auto"), key="config.model.scan_layers")
        c.model.scan_layers = "true" if self.scan_layers else "false"  # a resume on another backend is refused
        self.model_dir, data_path = str(c.model.dir), str(c.data.path)
        if c.get("tiny") and not (self.model_dir and data_path):  # both given: nothing of the tiny world is needed
            from fairjax.diffusion import tiny as tiny_sdxl

            _check(workdir is not None, "config.tiny builds its model in the workdir; pass --workdir")
            tiny_model, tiny_data = tiny_sdxl.ensure(os.path.join(workdir, f"tiny_{c.tiny}"), c.tiny, seed=0)
            self.model_dir = self.model_dir or tiny_model
            data_path = data_path or tiny_data
        _check(bool(self.model_dir), "config.model.dir is empty; point it at a fairjax model dir "
                                     "(tools/convert_diffusers.py) or use the :tiny preset")
        try:
            self.unet_dir = component_dir(self.model_dir, "unet")
            self.unet_config = read_json(os.path.join(self.unet_dir, CONFIG_FILE))
            sched = read_json(os.path.join(self.model_dir, "scheduler", "scheduler_config.json"))
        except UserError as e:
            raise ConfigError(str(e)) from None
        self.schedule = schedules.ddpm_schedule(sched)
        T = self.schedule.num_train_timesteps
        self.t_min, self.t_max = int(c.get("t_min", 0)), int(c.get("t_max", 0)) or T
        _check(0 <= self.t_min < self.t_max <= T,
               f"config.t_min={self.t_min} / config.t_max={c.get('t_max', 0)} need 0 <= t_min < t_max <= "
               f"{T} (the scheduler's num_train_timesteps; t_max 0 = {T})")
        draws = int(c.get("noise_draws", 1))
        self.draw_ranges = [(self.t_min, self.t_max)] * draws
        if bool(c.get("stratify_draws", False)) and draws > 1:
            _check(draws <= self.t_max - self.t_min,
                   f"config.stratify_draws needs noise_draws={draws} <= t_max - t_min = {self.t_max - self.t_min} "
                   "(one timestep range per draw); lower noise_draws or turn stratify_draws off")
            edges = np.round(np.linspace(self.t_min, self.t_max, draws + 1)).astype(np.int64)
            self.draw_ranges = [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]
        sizes = np.asarray([b - a for a, b in self.draw_ranges], np.float64)
        self.draw_weights = (sizes / sizes.sum()).astype(np.float32)  # equal for independent draws
        self.dtype = _compute_dtype(str(c.model.dtype))
        self.param_dtype = _compute_dtype(str(c.model.param_dtype), key="model.param_dtype", auto=False)
        self.unet = unet_mod.UNet2DConditionModel.from_config(
            self.unet_config, dtype=self.dtype, param_dtype=jnp.float32, remat=remat_policy(c.model.remat),
            attention_implementation=str(c.model.attention) or None, scan_layers=self.scan_layers)
        self.rank = int(c.lora.rank)
        _check(self.rank >= 0, f"config.lora.rank={self.rank} must be >= 0 (0 = full fine-tuning)")
        self.lora_alpha = float(c.lora.alpha)
        _check(float(c.lora.get("dropout", 0.0)) == 0.0,
               f"config.lora.dropout={c.lora.get('dropout')}: the SDXL LoRA is merged into the kernels before the "
               "UNet runs and has no dropout; set lora.dropout=0")

        self.source = source if source is not None else open_source(data_path, str(c.data.split))
        self.anchor_weight = float(c.get("anchor_weight", 0.0))
        _check(self.anchor_weight >= 0, f"config.anchor_weight={self.anchor_weight} must be >= 0 (0 = no identity anchor)")
        if self.anchor_weight:
            _check(c.loss != "sft", "config.anchor_weight needs a reference model; SFT has none: set it to 0 for sft")
            _check(bool(getattr(self.source, "has_prompt", False)),
                   "config.anchor_weight > 0 needs each winner's identity prompt, but the preference dataset has no "
                   "'prompt' field (written before it existed): rebuild it with python -m fairjax.data.build_prefs, "
                   "or set anchor_weight=0")
        self.k = int(c.get("grad_accum_steps", 1) or 1)
        self._set_up_units()
        self._check_latents()
        if table is None:
            from fairjax.diffusion import text_embeds

            cache = str(c.text_embeds.path) or (os.path.join(workdir, "text_embeds.safetensors") if workdir else None)
            _check(not (cache and os.path.isdir(cache)),
                   f"config.text_embeds.path={cache!r} is a folder; pass the path of the text-embedding cache file")
            table = text_embeds.cached_table(self.model_dir, all_captions(self.source, prompts=self.anchor_weight > 0), cache,
                                             batch_size=int(c.text_embeds.batch_size))
        self.table = table
        self._check_conditioning()

    # -- set-up checks ----------------------------------------------------------------

    def _set_up_units(self) -> None:
        c = self.config
        rows = int(c.batch_size)
        n_proc = jax.process_count()
        if c.loss == "sft":
            self.units = np.flatnonzero(np.asarray(self.source.is_winner, bool))
            self.per_step = rows
            what = "winner records"
        else:
            _check(rows % 2 == 0, f"batch_size={rows} must be even: it counts the images of winner/loser pairs")
            self.units = self.source.pairs()
            self.per_step = rows // 2
            what = "winner/loser pairs"
            per_proc = self.per_step // n_proc if self.per_step % n_proc == 0 else None
            _check(per_proc is not None and per_proc % self.k == 0,
                   f"{self.per_step} pairs per step must split into {n_proc} process(es) x grad_accum_steps={self.k} "
                   "equal parts (so both images of a pair stay in one micro-batch); change batch_size")
        _check(len(self.units) > 0, f"the preference dataset has no {what} (it needs records with is_winner "
                                    "True and False under the same set_id)")
        _check(len(self.units) >= self.per_step,
               f"the preference dataset has {len(self.units)} {what}, fewer than the {self.per_step} per step; "
               "lower batch_size or add data")

    def _check_latents(self) -> None:
        cfg = self.unet.config
        shape = latent_shape(self.source)
        factor = 2 ** (cfg.num_blocks - 1)
        _check(len(shape) == 3 and shape[0] == cfg["in_channels"] and shape[1] % factor == 0 and shape[2] % factor == 0,
               f"dataset latents have shape {shape} but the UNet takes ({cfg['in_channels']}, H, W) with H and W "
               f"multiples of {factor}; the dataset was made with another model")

    def _check_conditioning(self) -> None:
        cfg = self.unet.config
        d = self.table.context_shape[-1]
        _check(d == cfg.cross_attention_dim,
               f"text embeddings are {d} wide but the UNet's cross_attention_dim is {cfg.cross_attention_dim}; "
               "the text encoders do not belong to this UNet")
        self.time_ids = None
        if cfg["addition_embed_type"] == "text_time":
            _check(self.table.pooled_dim is not None, "this UNet needs pooled text_embeds (SDXL): the model dir "
                                                      "needs text_encoder_2/ (CLIPTextModelWithProjection)")
            want = cfg["projection_class_embeddings_input_dim"]
            got = self.table.pooled_dim + len(self.config.time_ids) * cfg["addition_time_embed_dim"]
            _check(got == want, f"text_embeds ({self.table.pooled_dim}) + {len(self.config.time_ids)} time_ids x "
                                f"{cfg['addition_time_embed_dim']} = {got}, but the UNet's "
                                f"projection_class_embeddings_input_dim is {want}; fix config.time_ids")
            self.time_ids = np.asarray(self.config.time_ids, np.float32)

    # -- the contract -----------------------------------------------------------------

    def init(self, rng):
        """``(trainable, frozen)``: full: (params, reference copy) or (params, {}) for SFT; LoRA: (lora, base).
        With ``model.scan_layers`` the params are stacked per transformer stack; a LoRA is keyed by the
        unrolled kernel paths either way (:mod:`fairjax.lora`)."""
        from fairjax.models import unet as unet_mod

        try:
            _, params = unet_mod.load(self.model_dir, dtype=self.dtype, param_dtype=jnp.float32,
                                      scan_layers=self.scan_layers)
        except UserError as e:
            raise ConfigError(str(e)) from None
        frozen = params if self.param_dtype == jnp.float32 else jax.tree.map(lambda x: x.astype(self.param_dtype), params)
        if self.rank == 0:
            return params, ({} if self.config.loss == "sft" else frozen)
        from fairjax import lora

        return lora.init(params, str(self.config.lora.targets), self.rank, self.lora_alpha, rng), frozen

    def data_fingerprint(self) -> str | None:
        """Digest of the preference dataset's files (:func:`fairjax.io.fs.folder_fingerprint`); None for an
        in-memory source."""
        d = getattr(self.source, "dir", None)
        return fs.folder_fingerprint(d) if d else None

    def batch(self, step: int, process_index: int, process_count: int) -> dict[str, np.ndarray]:
        c = self.config
        per = self.per_step // process_count
        units = step_units(len(self.units), self.per_step, int(c.seed), step, bool(c.data.shuffle))
        pos = process_index * per + np.arange(per)
        units = units[pos]
        drop = caption_dropout(int(c.seed), step, self.per_step, float(c.data.caption_dropout))[pos]
        slot = pos.astype(np.int32)
        if c.loss == "sft":
            rec = self.source.read(self.units[units])
            latents, caps, is_w = rec["latents"], rec["caption"], np.ones(per, bool)
        else:
            w = self.source.read(self.units[units, 0])
            l = self.source.read(self.units[units, 1])
            latents = np.concatenate([w["latents"], l["latents"]])
            caps = np.concatenate([w["caption"], w["caption"]])  # a pair is conditioned on its winner's caption
            is_w = np.arange(2 * per) < per
            drop, slot = np.tile(drop, 2), np.tile(slot, 2)
        ids = np.where(drop, 0, self.table.ids(caps))
        out = {"latents": np.asarray(latents, np.float32), "is_winner": is_w, "slot": slot, **self.table.gather(ids)}
        if self.anchor_weight:  # each winner twice under its own prompt (rows line up with the pair layout)
            emb = self.table.gather(np.tile(self.table.ids(w["prompt"]), 2))
            out["anchor_latents"] = np.tile(np.asarray(w["latents"], np.float32), (2,) + (1,) * (w["latents"].ndim - 1))
            out.update({f"anchor_{k}": v for k, v in emb.items()})
        return out

    def param_partition_rules(self) -> list:
        """The UNet's ``tensor``-axis rules (:data:`fairjax.models.unet.PARTITION_RULES`); they place the
        full UNet and the frozen reference / LoRA base (a LoRA's ``a`` / ``b`` fall to the FSDP default)."""
        from fairjax.models import unet as unet_mod

        return list(unet_mod.PARTITION_RULES)

    def policy_params(self, trainable, frozen):
        if self.rank == 0:
            return trainable
        from fairjax import lora

        return lora.merge(frozen, trainable, self.lora_alpha)

    def predict(self, params, batch, noise, t) -> tuple[jax.Array, jax.Array]:
        """``(prediction, training target)`` of the UNet with ``params`` at ``x_t`` of ``batch['latents']``."""
        from fairjax.diffusion import schedules

        x0 = batch["latents"].astype(jnp.float32)
        xt = schedules.add_noise(self.schedule, x0, noise, t)
        target = schedules.training_target(self.schedule, x0, noise, t)
        added = None
        if self.time_ids is not None:
            rows = x0.shape[0]
            added = {"text_embeds": batch["text_embeds"],
                     "time_ids": jnp.broadcast_to(jnp.asarray(self.time_ids), (rows, self.time_ids.shape[0]))}
        return self._apply(params, xt, t, batch["encoder_hidden_states"], added), target

    @functools.cached_property
    def _apply(self):
        """``unet.apply`` as an inlined ``jit``: its Python trace is cached per input shapes and dtypes, so the
        reference forward (and the anchor's calls) reuse the policy forward's trace instead of running Flax's
        module code again. The jaxpr is inlined: the staged program is the same as without the ``jit``."""
        unet = self.unet

        def apply(params, xt, t, context, added):
            return unet.apply({"params": params}, xt, t, context, added)

        return jax.jit(apply, inline=True)

    def denoise_mse(self, params, batch, noise, t) -> jax.Array:
        """Per-row float32 mse of the UNet with ``params`` against the training target."""
        return per_sample_mse(*self.predict(params, batch, noise, t))

    def anchor(self, trainable, frozen, anchor_batch, is_winner, slot, rng) -> jax.Array:
        """The identity anchor (module docstring): mean over rows of ``mean_{C,H,W} (eps_policy -
        sg(eps_ref))^2`` on ``anchor_batch`` (the winners under their prompts, twice). Row ``r``'s
        ``(eps', t')`` is keyed by ``slot`` (+ the global batch's pair count on the second copy),
        independent of the preference term's draws, of the sharding and of gradient accumulation."""
        aslot = slot + jnp.where(is_winner.astype(bool), 0, self.per_step)
        shape = anchor_batch["latents"].shape[1:]
        noise, t = shared_noise(jax.random.fold_in(rng, _ANCHOR_STREAM), aslot, shape, self.t_max, self.t_min)
        pol, _ = self.predict(self.policy_params(trainable, frozen), anchor_batch, noise, t)
        ref, _ = self.predict(jax.lax.stop_gradient(frozen), anchor_batch, noise, t)
        return jnp.mean(per_sample_mse(pol, jax.lax.stop_gradient(ref)))

    def rewards(self, trainable, frozen, batch, rng, ref=None) -> tuple[jax.Array, jax.Array | None]:
        """``(mse_policy, mse_ref)`` per row (``mse_ref`` None for SFT; ``ref`` given: that, not recomputed).

        With ``config.noise_draws = K > 1`` each row's mse is the mean over ``K`` independent
        ``(eps, t)`` draws (draw ``k`` keyed by ``fold_in(rng, k)``, still shared by the two rows
        of a pair): the same expectation as one draw, with ``1/K`` of its variance, for ``K``
        times the UNet work. ``K = 1`` is the reference recipe (one draw per image). With
        ``config.stratify_draws`` draw ``k``'s ``t`` is uniform within the ``k``-th of ``K`` equal
        ranges of ``[t_min, t_max)`` and the mean is weighted by the ranges' sizes: still the
        expectation of one uniform draw, less the variance of where the ``K`` timesteps fall.
        """
        draws = len(self.draw_ranges)
        shape = batch["latents"].shape[1:]
        if draws == 1:
            noise, t = shared_noise(rng, batch["slot"], shape, self.t_max, self.t_min)
        else:
            ks = [shared_noise(jax.random.fold_in(rng, k), batch["slot"], shape, hi, lo)
                  for k, (lo, hi) in enumerate(self.draw_ranges)]
            noise = jnp.concatenate([n for n, _ in ks])
            t = jnp.concatenate([tt for _, tt in ks])
            batch = jax.tree.map(lambda v: jnp.concatenate([v] * draws), batch)  # row r of draw k: k * rows + r

        def mean_over_draws(x):
            return x if draws == 1 else jnp.tensordot(jnp.asarray(self.draw_weights), x.reshape(draws, -1), 1)

        mse = mean_over_draws(self.denoise_mse(self.policy_params(trainable, frozen), batch, noise, t))
        if self.config.loss == "sft":
            return mse, None
        if ref is None:
            ref = mean_over_draws(self.denoise_mse(jax.lax.stop_gradient(frozen), batch, noise, t))
        return mse, jax.lax.stop_gradient(ref)

    @property
    def uses_batch_stats(self) -> bool:
        """PopAlign's ``k`` is a statistic of the whole global batch (trainer contract)."""
        return self.config.loss == "popalign"

    def batch_stats(self, trainable, frozen, batch, rng) -> dict:
        """Per row: :func:`fairjax.losses.popalign_rows` of ``g`` and the reference mse ``mse_ref``
        (reused by the gradient pass in place of a second reference forward)."""
        batch = {k: v for k, v in batch.items() if not k.startswith("anchor_")}
        mse, ref = self.rewards(trainable, frozen, batch, rng)
        return {**losses.popalign_rows(ref - mse, batch["is_winner"]), "mse_ref": ref}

    def loss(self, trainable, frozen, batch, rng, stats=None):
        """``(loss, metrics)`` (module docstring). ``stats`` (trainer, ``grad_accum_steps > 1``,
        PopAlign): this micro-batch's :meth:`batch_stats` rows and their sums over the global batch."""
        c = self.config
        anchor_batch = {k[len("anchor_"):]: v for k, v in batch.items() if k.startswith("anchor_")}
        batch = {k: v for k, v in batch.items() if not k.startswith("anchor_")}
        ref = None if stats is None else stats["rows"]["mse_ref"]
        mse, ref = self.rewards(trainable, frozen, batch, rng, ref=ref)
        if c.loss == "sft":
            return losses.sft(mse)
        g = ref - mse
        g_w, g_l = by_slot(g, batch["is_winner"], batch["slot"])
        if c.loss == "popalign":
            totals = None if stats is None else {k: stats["total"][k] for k in ("g_w", "n_w", "g_l", "n_l")}
            loss, m = losses.popalign(g, batch["is_winner"], float(c.beta), alpha=float(c.alpha), totals=totals)
            m["pair_accuracy"] = jax.lax.stop_gradient(jnp.mean(g_w > g_l).astype(jnp.float32))
        else:
            loss, m = losses.diffusion_dpo(g_w, g_l, float(c.beta))
        m["mse_policy"] = jax.lax.stop_gradient(jnp.mean(mse))
        m["mse_ref"] = jax.lax.stop_gradient(jnp.mean(ref))
        if anchor_batch:
            a = self.anchor(trainable, frozen, anchor_batch, batch["is_winner"], batch["slot"], rng)
            m["preference_loss"] = jax.lax.stop_gradient(loss)
            m["anchor"] = jax.lax.stop_gradient(a)
            loss = loss + self.anchor_weight * a
        return loss, m

    def finish(self, trainable, frozen, workdir: str) -> dict:
        """Write the trained UNet (full: ``<workdir>/model/unet/``, a fairjax model dir; LoRA:
        ``<workdir>/unet_lora.safetensors``) on process 0 and say where. Both hold the unrolled layout
        whatever ``model.scan_layers`` was."""
        from fairjax.models import unet as unet_mod
        from fairjax.trainer import params_on_host

        host = params_on_host(trainable)
        if self.rank:
            out = os.path.join(workdir, "unet_lora.safetensors")
        else:
            out = os.path.join(workdir, "model")
            host = unet_mod.unstack_params(host)
        if jax.process_index() == 0:
            if self.rank:
                from fairjax import lora

                lora.save(out, host, alpha=self.lora_alpha, targets=str(self.config.lora.targets),
                          base_model=os.path.abspath(self.model_dir), loss=str(self.config.loss))
                how = f"export with: python tools/export_diffusers.py {self.model_dir} OUT --lora {out} [--merge]"
            else:
                from fairjax.io.model_dir import atomic_output_dir, save_component, write_index

                with atomic_output_dir(out, overwrite=True) as tmp:
                    save_component(os.path.join(tmp, "unet"), self.unet_config, host)
                    write_index(tmp, ["unet"], base_model=os.path.abspath(self.model_dir),
                                loss=str(self.config.loss))
                how = (f"the other components are those of {self.model_dir}; "
                       f"export with: python tools/export_diffusers.py {out} OUT")
            print(f"trained UNet written to {out} ({how})", flush=True)
        return {"output": out, "lora": bool(self.rank)}
