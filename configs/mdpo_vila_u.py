"""mDPO for VILA-U understanding: answers conditioned on an image, with mDPO's corrupted-image term.

  python -m fairjax.train --config configs/mdpo_vila_u.py --workdir runs/mdpo \
      --config.model.dir=models/vila-u-7b-256 --config.data.path=data/mdpo
  python -m fairjax.train --config configs/mdpo_vila_u.py:tiny --workdir runs/mdpo_tiny

loss = -ls(b((c-rc)-(r-rr))) - ls(b((c-rc)-(c'-rc'))) - ls(b(c-rc)) (fairjax.losses.mdpo), c / r =
summed log-prob of the chosen / rejected answer given the image, c' = chosen given the corrupted
image (random resized crop keeping 1-20% of the area, resized back, re-encoded by the vision
tower every step), r* = the same without LoRA. docs/reference.md / luka-group/mDPO: beta 0.1, LoRA r 64,
alpha 128, lr 1e-5; the rest from its bunny/config.yaml: 3 epochs, global batch 32 (4 x 8
accumulation), AdamW b2 0.98, weight decay 0.05, warm-up 10% then cosine, LoRA dropout 0.05
(run_mdpo_bunny.py's default). Its LoRA covers all linear layers; here q/k/v/o/gate/up/down of
the LLaMA layers (lm_head, projector, depth head and vision tower frozen).
Data: an 'mdpo' dataset (fairjax.vila_u.data; images at the vision tower's resolution).
"""

from fairjax.tasks.vila_u_pref import default_config

PRESETS = ("mdpo", "tiny")


def get_config(arg=None):
    c = default_config()
    c.loss = "mdpo"
    c.beta = 0.1
    c.lora.rank = 64
    c.lora.alpha = 128.0
    c.lora.dropout = 0.05
    c.model.dtype = c.model.param_dtype = "bfloat16"
    c.model.remat = "nothing_saveable"
    c.optimizer.lr = 1e-5
    c.optimizer.b2 = 0.98
    c.optimizer.weight_decay = 0.05
    c.optimizer.grad_clip = 1.0
    c.warmup_ratio = 0.1
    c.epochs = 3.0
    c.batch_size = 32
    if arg == "tiny":
        c.tiny = "tiny"
        c.model.dtype = c.model.param_dtype = "float32"
        c.model.remat = "none"
        c.lora.rank, c.lora.alpha = 8, 16.0
        c.optimizer.lr = 1e-3
        c.epochs = 4.0
        c.batch_size = 8
        c.log_every_steps = 2
        c.checkpoint.every_steps = 100
    elif arg not in (None, "mdpo"):
        raise ValueError(f"unknown preset {arg!r}; choose one of {PRESETS}")
    return c
