"""BPO for VILA-U (issue 7): stage 1 SFT on balanced images, stage 2 BPO on explicit pairs, one LoRA.

  # stage 1: image-token cross-entropy on both images of every pair (balanced groups)
  python -m fairjax.train --config configs/bpo_vila_u.py:sft --workdir runs/bpo_sft \
      --config.model.dir=models/vila-u-7b-256 --config.data.path=data/bpo_pairs
  # stage 2: BPO, continuing the stage-1 adapter
  python -m fairjax.train --config configs/bpo_vila_u.py:bpo --workdir runs/bpo \
      --config.model.dir=models/vila-u-7b-256 --config.data.path=data/bpo_pairs \
      --config.lora.init=runs/bpo_sft/lora.safetensors
  # CPU demo on a tiny random model and generated data (built on first run, no download)
  python -m fairjax.train --config configs/bpo_vila_u.py:tiny_sft --workdir runs/bpo_tiny_sft
  python -m fairjax.train --config configs/bpo_vila_u.py:tiny --workdir runs/bpo_tiny \
      --config.lora.init=runs/bpo_tiny_sft/lora.safetensors

Recipe (docs/reference.md, Unified_MLLM_Fairness scripts lora_generation_*_v6.sh / *_bpo_*_v4.20.sh):
LoRA r 32, alpha 32, dropout 0.1 on q/k/v/o/gate/up/down of all LLaMA layers; AdamW, weight decay
0, warm-up 3% then cosine; bf16. Stage 1: lr 1e-4, 10 epochs, global batch 32. Stage 2
(loss = BPO only, the scripts' --alpha 0): lr 8e-7, 2 epochs, beta 1, 8 pairs per device (raise
batch_size to 8 x devices). Data: a 'pairs' dataset (fairjax.vila_u.data) whose halves are
two demographic variants of one neutral prompt; stage 1 trains on every half.
Deliberate difference: the released stage 1 adds the text cross-entropy of <im_start>, <im_end>
and </s>; here stage 1 is the image-token cross-entropy only.
"""

from fairjax.tasks.vila_u_pref import default_config

PRESETS = ("sft", "bpo", "tiny", "tiny_sft")


def get_config(arg=None):
    c = default_config()
    c.loss = "bpo"
    c.beta = 1.0
    c.bpo_variant = "v1"
    c.model.dtype = c.model.param_dtype = "bfloat16"
    c.model.remat = "nothing_saveable"
    c.model.head_chunk = 64  # depth head 64 image positions at a time (code logits 4x smaller)
    c.optimizer.grad_clip = 1.0
    if arg in (None, "bpo", "tiny"):
        c.optimizer.lr = 8e-7
        c.epochs = 2.0
        c.batch_size = 8  # pairs
    elif arg in ("sft", "tiny_sft"):
        c.loss = "sft"
        c.optimizer.lr = 1e-4
        c.epochs = 10.0
        c.batch_size = 32  # images
    else:
        raise ValueError(f"unknown preset {arg!r}; choose one of {PRESETS}")
    if arg in ("tiny", "tiny_sft"):
        c.tiny = "tiny"
        c.model.dtype = c.model.param_dtype = "float32"
        c.model.remat = "none"
        c.model.head_chunk = 0
        c.optimizer.lr = 1e-2 if arg == "tiny_sft" else 1e-3  # visible movement in a few steps
        c.epochs = 10.0 if arg == "tiny_sft" else 4.0
        c.batch_size = 8 if arg == "tiny" else 16
        c.log_every_steps = 4
        c.checkpoint.every_steps = 100
    return c
