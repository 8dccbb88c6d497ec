"""Stage `demo`: write scikit-learn's bundled digits as PNG files, one folder per class."""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from imgpipe.runtime import atomic_directory, setup_logging


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


def main(argv: list[str] | None = None) -> None:
    """Write data/demo/<digit>/<index>.png."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, type=Path, help="output folder (data/demo)")
    args = parser.parse_args(argv)
    log = setup_logging("demo")
    started = time.perf_counter()
    pixels, labels = digits_images()
    with atomic_directory(args.out) as staging:
        for index, (image, label) in enumerate(zip(pixels, labels, strict=True)):
            class_dir = staging / str(label)
            class_dir.mkdir(exist_ok=True)
            (class_dir / f"{index:04d}.png").write_bytes(png_bytes(image))
    log.info(
        "wrote %d digit images in %d classes to %s in %.1f s",
        len(labels),
        len(set(labels.tolist())),
        args.out,
        time.perf_counter() - started,
    )


if __name__ == "__main__":
    main()
