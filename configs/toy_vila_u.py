"""The unified-MLLM toy world: the toy VILA-U (fairjax/assets/toy_vila_u/), SFT + BPO and DPO on CPU.

  python -m fairjax.toy.vila_u --workdir runs/toy_vila_u                   # the whole main job
  python -m fairjax.train --config configs/toy_vila_u.py:sft --workdir runs/toy_vila_u/sft \
      --config.data.path=runs/toy_vila_u/data/images
  python -m fairjax.train --config configs/toy_vila_u.py:bpo --workdir runs/toy_vila_u/bpo \
      --config.data.path=runs/toy_vila_u/data/pairs --config.lora.init=runs/toy_vila_u/sft/lora.safetensors
  python -m fairjax.evaluate --config configs/toy_vila_u.py --model fairjax/assets/toy_vila_u \
      --lora runs/toy_vila_u/bpo/lora.safetensors --base fairjax/assets/toy_vila_u --out runs/toy_vila_u/eval
  python -m fairjax.locate_bias --model fairjax/assets/toy_vila_u --out runs/toy_vila_u/locate_base

Presets: bpo (default), sft, dpo, and quick_bpo / quick_sft / quick_dpo (the CI sizes); the data come from
the main job's pair stage (fairjax/toy/vila_u.py).
"""

from fairjax.toy.vila_u import make_config

PRESETS = ("bpo", "sft", "dpo", "quick_bpo", "quick_sft", "quick_dpo")


def get_config(arg=None):
    arg = arg or "bpo"
    if arg not in PRESETS:
        raise ValueError(f"unknown preset {arg!r}; choose one of {PRESETS}")
    quick = arg.startswith("quick_")
    return make_config("quick" if quick else "default", arg.removeprefix("quick_"))
