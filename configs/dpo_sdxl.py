"""Diffusion-DPO fine-tuning of SDXL: loss mean(-logsigmoid(0.5 beta (g_w - g_l))) over pairs,
g = mse_ref - mse_policy; otherwise PopAlign's recipe (beta 5000, lr 5e-7 after 200 warm-up
steps, AdamW, clip 1.0, 750 steps of 8 pairs, 20% caption dropout).

  python -m fairjax.train --config configs/dpo_sdxl.py --workdir runs/dpo \
      --config.model.dir=models/sdxl --config.data.path=data/prefs
  python -m fairjax.train --config configs/dpo_sdxl.py:tiny --workdir runs/dpo_tiny   # CPU, offline

Presets: full (default), lora, tiny, tiny_lora (see configs/popalign_sdxl.py).
"""

from fairjax.tasks.diffusion_pref import PRESETS, make_config  # noqa: F401


def get_config(arg=None):
    return make_config("diffusion_dpo", arg)
