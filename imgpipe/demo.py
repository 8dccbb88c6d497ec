"""The demo data set: scikit-learn's handwritten digits as PNG files, one folder per class."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from imgpipe.runtime import atomic_directory


def digits_images() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits as (N, 8, 8) uint8 images scaled to 0..255, and their labels (N,)."""
    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)  # (N, 8, 8), 0..16 -> 0..255
    return pixels, digits.target.astype(np.int64)


def png_bytes(image: np.ndarray) -> bytes:
    """Encode one (H, W) uint8 image as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def write_demo_images(out_dir: Path) -> tuple[int, int]:
    """Write out_dir/<digit>/<index>.png whole or not at all; returns (images, classes)."""
    pixels, labels = digits_images()
    with atomic_directory(out_dir) as staging:
        for index, (image, label) in enumerate(zip(pixels, labels, strict=True)):
            class_dir = staging / str(label)
            class_dir.mkdir(exist_ok=True)
            (class_dir / f"{index:04d}.png").write_bytes(png_bytes(image))
    return len(labels), len(set(labels.tolist()))
