"""Shared fixtures: tiny images in every Pillow mode the pipeline meets, corrupt files, params."""

from __future__ import annotations

import copy
import io
import os
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

REPO_ROOT = Path(__file__).parents[1]
EXIF_ORIENTATION = 0x0112
RED = (255, 0, 0)
BLUE = (0, 0, 255)


@pytest.fixture(autouse=True)
def _no_mlflow_uri_leaks() -> Iterator[None]:
    """Every test starts and ends with the MLflow tracking URI it found.

    mlflow.set_tracking_uri (called by Store.start_run and by tests) sets MLflow's global URI and
    the MLFLOW_TRACKING_URI variable, which imgpipe.tracking reads first: left behind, it would
    send a later test's runs, or its checks, to an earlier test's store.
    """
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    after = os.environ.get("MLFLOW_TRACKING_URI")
    if after != before:
        import mlflow

        mlflow.set_tracking_uri(before)  # None: back to MLflow's default, variable cleared
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before


def encode(image: Image.Image, image_format: str, **options: Any) -> bytes:
    """Encode a Pillow image in memory."""
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def upright_halves(width: int, height: int) -> Image.Image:
    """An RGB image whose left half is red and right half blue: shows which way is up."""
    image = Image.new("RGB", (width, height), BLUE)
    image.paste(RED, (0, 0, width // 2, height))
    return image


def exif_rotated_jpeg(width: int, height: int, mark: int = 0) -> bytes:
    """A JPEG that displays as `upright_halves(width, height)` only after EXIF orientation 6.

    Orientation 6 means "rotate 90 degrees clockwise to display", so the stored pixels are the
    upright picture turned 90 degrees counter-clockwise: (height x width), red half at the bottom.
    A non-zero mark changes one corner pixel, so that each mark gives different bytes.
    """
    upright = upright_halves(width, height)
    if mark:
        upright.putpixel((width - 1, 0), (mark % 256, (mark // 256) % 256, 128))
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes())


def noise(seed: int, shape: tuple[int, ...], dtype: type = np.uint8, high: int = 256) -> np.ndarray:
    """Seeded random pixels, so every generated image has different bytes."""
    return np.random.default_rng(seed).integers(0, high, size=shape, dtype=dtype)


def _transparent_palette_png(width: int, height: int) -> bytes:
    # index 0: transparent black on the left half; index 1: opaque blue on the right half
    indices = np.ones((height, width), dtype=np.uint8)
    indices[:, : width // 2] = 0
    image = Image.fromarray(indices).convert("P")
    image.putpalette([0, 0, 0, *BLUE] + [0, 0, 0] * 254)
    return encode(image, "PNG", transparency=0)


def _half_transparent_rgba_png(width: int, height: int) -> bytes:
    # left half fully transparent black, right half opaque red
    pixels = np.zeros((height, width, 4), dtype=np.uint8)
    pixels[:, width // 2 :] = (*RED, 255)
    return encode(Image.fromarray(pixels), "PNG")


def make_image(kind: str, seed: int = 0) -> bytes:
    """Bytes of one small image of a given kind; sizes differ between kinds on purpose."""
    if kind == "rgb.jpg":
        return encode(Image.fromarray(noise(seed, (30, 40, 3))), "JPEG", quality=90)
    if kind == "gray.png":
        return encode(Image.fromarray(noise(seed, (23, 17))), "PNG")
    if kind == "rgba.png":
        return encode(Image.fromarray(noise(seed, (20, 20, 4))), "PNG")
    if kind == "la.png":
        return encode(Image.fromarray(noise(seed, (9, 13, 2))).convert("LA"), "PNG")
    if kind == "palette.png":
        image = Image.fromarray(noise(seed, (18, 12), high=4)).convert("P")
        image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (252 * 3))
        return encode(image, "PNG", transparency=3)
    if kind == "cmyk.jpg":
        return encode(Image.fromarray(noise(seed, (20, 30, 4)), mode="CMYK"), "JPEG", quality=90)
    if kind == "gray16.png":
        return encode(Image.fromarray(noise(seed, (15, 25), np.uint16, 65536)), "PNG")
    if kind == "exif6.jpg":
        return exif_rotated_jpeg(40 + seed % 7, 20, mark=seed)
    raise ValueError(f"unknown image kind {kind!r}")


IMAGE_KINDS = (
    "rgb.jpg",
    "gray.png",
    "rgba.png",
    "la.png",
    "palette.png",
    "cmyk.jpg",
    "gray16.png",
    "exif6.jpg",
)
# Pillow mode each kind opens as: proves the fixtures really cover the modes they claim to
IMAGE_MODES = {
    "rgb.jpg": "RGB",
    "gray.png": "L",
    "rgba.png": "RGBA",
    "la.png": "LA",
    "palette.png": "P",
    "cmyk.jpg": "CMYK",
    "gray16.png": "I;16",
    "exif6.jpg": "RGB",
}


def corrupt_files() -> dict[str, bytes]:
    """Files named like images that no decoder can read."""
    jpeg = make_image("rgb.jpg", seed=99)
    return {
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "empty.jpg": b"",
        "notes.jpg": b"this is a text file, not a JPEG\n",
    }


def write_tree(root: Path, files: Mapping[str, bytes]) -> Path:
    """Write {relative POSIX path: bytes} under root."""
    for relative, data in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def write_zip(path: Path, files: Mapping[str, bytes], directories: tuple[str, ...] = ()) -> Path:
    """Write {entry name: bytes} into a zip, with optional explicit directory entries."""
    with zipfile.ZipFile(path, "w") as archive:
        for directory in directories:
            archive.writestr(zipfile.ZipInfo(directory.rstrip("/") + "/"), b"")
        for name, data in files.items():
            archive.writestr(name, data)
    return path


def load_repo_params() -> dict[str, Any]:
    """The repository's params.yaml as a plain mapping."""
    with open(REPO_ROOT / "params.yaml", encoding="utf-8") as handle:
        return yaml.safe_load(handle)


@pytest.fixture(scope="session")
def image_bytes() -> dict[str, bytes]:
    """One good image of each kind in IMAGE_KINDS."""
    return {kind: make_image(kind) for kind in IMAGE_KINDS}


@pytest.fixture(scope="session")
def image_modes() -> dict[str, str]:
    """The Pillow mode each image kind opens as."""
    return dict(IMAGE_MODES)


@pytest.fixture(scope="session")
def corrupt_bytes() -> dict[str, bytes]:
    """Corrupt files named like images."""
    return corrupt_files()


@pytest.fixture(scope="session")
def image_factory() -> Callable[[str, int], bytes]:
    """make_image(kind, seed): a small image of a kind; different seeds give different bytes."""
    return make_image


@pytest.fixture(scope="session")
def exif_jpeg() -> Callable[..., bytes]:
    """exif_rotated_jpeg(width, height, mark=0): upright only after EXIF orientation 6."""
    return exif_rotated_jpeg


@pytest.fixture(scope="session")
def tree_writer() -> Callable[[Path, Mapping[str, bytes]], Path]:
    """write_tree(root, {relative path: bytes})."""
    return write_tree


@pytest.fixture(scope="session")
def zip_writer() -> Callable[..., Path]:
    """write_zip(path, {entry name: bytes}, directories=())."""
    return write_zip


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (for its params.yaml only; tests never read data/)."""
    return REPO_ROOT


@pytest.fixture
def repo_params() -> dict[str, Any]:
    """A fresh, editable copy of the repository's params.yaml."""
    return copy.deepcopy(load_repo_params())
