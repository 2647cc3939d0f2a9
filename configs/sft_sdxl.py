"""SFT baseline for SDXL: plain denoising mse on the winning images only, no reference model
(batch_size = 16 winner images per step; otherwise PopAlign's recipe).

  python -m fairjax.train --config configs/sft_sdxl.py --workdir runs/sft \
      --config.model.dir=models/sdxl --config.data.path=data/prefs
  python -m fairjax.train --config configs/sft_sdxl.py:tiny --workdir runs/sft_tiny   # CPU, offline

Presets: full (default), lora, tiny, tiny_lora (see configs/popalign_sdxl.py).
"""

from fairjax.tasks.diffusion_pref import PRESETS, make_config  # noqa: F401


def get_config(arg=None):
    return make_config("sft", arg)
