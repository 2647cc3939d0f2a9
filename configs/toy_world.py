"""The toy world: tiny rendered figures, a tiny SDXL-architecture pixel-space model pre-trained on a
biased corpus (shipped in fairjax/assets/toy/), PopAlign / SFT / Diffusion-DPO on CPU.

  python -m fairjax.toy.run --workdir runs/toy                          # the whole main job
  python -m fairjax.data.build_prefs --config configs/toy_world.py --out runs/toy/prefs
  python -m fairjax.train --config configs/toy_world.py --workdir runs/toy/popalign \
      --config.data.path=runs/toy/prefs
  python -m fairjax.train --config configs/toy_world.py:sft --workdir runs/toy/sft --config.data.path=runs/toy/prefs
  python -m fairjax.evaluate --config configs/toy_world.py --model fairjax/assets/toy \
      --lora runs/toy/popalign/unet_lora.safetensors --base fairjax/assets/toy --out runs/toy/report

Presets: popalign (default: rank-8 LoRA), full (the whole UNet), sft, dpo, quick, quick_sft, smoke, smoke_sft
(see fairjax/toy/config.py).
"""

from fairjax.toy.config import PRESETS, make_config  # noqa: F401  (PRESETS: listed by the loader)


def get_config(arg=None):
    return make_config(arg)
