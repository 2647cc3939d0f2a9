"""PopAlign fine-tuning of SDXL (docs/reference.md's recipe: beta 5000, alpha 0.5, lr 5e-7 after 200
warm-up steps, AdamW, clip 1.0, 750 steps of 8 winner/loser pairs, 20% caption dropout).

  python -m fairjax.train --config configs/popalign_sdxl.py --workdir runs/popalign \
      --config.model.dir=models/sdxl --config.data.path=data/prefs
  python -m fairjax.train --config configs/popalign_sdxl.py:lora --workdir runs/popalign_lora \
      --config.model.dir=models/sdxl --config.data.path=data/prefs
  python -m fairjax.train --config configs/popalign_sdxl.py:tiny --workdir runs/popalign_tiny   # CPU, offline

Presets: full (default), lora (rank 32 on attention q/k/v/out), tiny, tiny_lora (a tiny random
SDXL-shaped model and dataset built in the workdir). Multi-GPU / TPU: --config.mesh.fsdp=N.
Outputs: <workdir>/model/unet/ (full) or <workdir>/unet_lora.safetensors (LoRA).
"""

from fairjax.tasks.diffusion_pref import PRESETS, make_config  # noqa: F401  (PRESETS: listed by the loader)


def get_config(arg=None):
    return make_config("popalign", arg)
