"""Image files that generation and evaluation write."""

from __future__ import annotations

import numpy as np


def image_stem(prompt_index: int, image_index: int) -> str:
    """File stem of image ``image_index`` of prompt ``prompt_index``: ``00012_0003``."""
    return f"{prompt_index:05d}_{image_index:04d}"


def write_png(path: str, image: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 image as PNG."""
    from PIL import Image

    Image.fromarray(np.asarray(image, np.uint8)).save(path)
