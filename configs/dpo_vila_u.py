"""DPO for VILA-U image generation: chosen vs rejected images of one prompt, reference = the base
model without LoRA (no second copy of the weights).

  python -m fairjax.train --config configs/dpo_vila_u.py --workdir runs/dpo \
      --config.model.dir=models/vila-u-7b-256 --config.data.path=data/dpo_pairs
  python -m fairjax.train --config configs/dpo_vila_u.py:tiny --workdir runs/dpo_tiny

Data: a 'pairs' dataset with half a = chosen, half b = rejected (fairjax.vila_u.data.pairs_from_sets
pairs winning and losing sets per prompt). The log-probability of an image is the SUM over its
256 x 4 codes (dpo_average_logp=True: the mean). There is no released DPO recipe for VILA-U:
beta 0.1, lr 5e-6, 1 epoch and the BPO LoRA settings (r 32, alpha 32, dropout 0.1) are our choices.
"""

from fairjax.tasks.vila_u_pref import default_config

PRESETS = ("dpo", "tiny")


def get_config(arg=None):
    c = default_config()
    c.loss = "dpo"
    c.beta = 0.1
    c.dpo_average_logp = False
    c.model.dtype = c.model.param_dtype = "bfloat16"
    c.model.remat = "nothing_saveable"
    c.model.head_chunk = 64  # depth head 64 image positions at a time (code logits 4x smaller)
    c.optimizer.lr = 5e-6
    c.optimizer.grad_clip = 1.0
    c.epochs = 1.0
    c.batch_size = 8  # pairs
    if arg == "tiny":
        c.tiny = "tiny"
        c.model.dtype = c.model.param_dtype = "float32"
        c.model.remat = "none"
        c.model.head_chunk = 0
        c.optimizer.lr = 1e-3
        c.epochs = 4.0
        c.log_every_steps = 4
        c.checkpoint.every_steps = 100
    elif arg not in (None, "dpo"):
        raise ValueError(f"unknown preset {arg!r}; choose one of {PRESETS}")
    return c
