"""The image-format allow-list, decoding each image once, and reading sizes from headers only:
every decoding path (split's check, tabulate's decode, imgpipe-predict, the served model) opens
only JPEG, MPO, PNG, GIF, BMP, WebP and TIFF, and refuses the rest before their plugin runs."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from imgpipe import images
from imgpipe.classifier import Classifier
from imgpipe.model_folder import META_FILE, ModelMeta
from imgpipe.numpy_net import NumpyMLP
from tests.support import ROOT, encode, exif_rotated_jpeg, make_image

PICTURE = Image.fromarray(np.random.default_rng(3).integers(0, 256, (12, 10, 3), dtype=np.uint8))
# Formats Pillow reads and writes that the pipeline refuses (EPS: Pillow's writer needs no gs)
REFUSED = {
    "EPS": lambda: encode(PICTURE, "EPS"),
    "ICO": lambda: encode(PICTURE.resize((16, 16)), "ICO", sizes=[(16, 16)]),
    "PCX": lambda: encode(PICTURE, "PCX"),
    "SGI": lambda: encode(PICTURE, "SGI"),
    "TGA": lambda: encode(PICTURE, "TGA"),
    "PPM": lambda: encode(PICTURE, "PPM"),
    "IM": lambda: encode(PICTURE, "IM"),
    "DDS": lambda: encode(PICTURE.convert("RGBA"), "DDS"),
}


def accepted_images() -> dict[str, bytes]:
    """One image of each accepted format; the phone-style MPO has a second frame."""
    return {
        "JPEG": encode(PICTURE, "JPEG", quality=95),
        "MPO": encode(PICTURE, "MPO", save_all=True, append_images=[PICTURE.rotate(90)]),
        "PNG": encode(PICTURE, "PNG"),
        "GIF": encode(PICTURE.convert("P"), "GIF"),
        "BMP": encode(PICTURE, "BMP"),
        "WEBP": encode(PICTURE, "WEBP", lossless=True),
        "TIFF": encode(PICTURE, "TIFF"),
    }


@pytest.mark.parametrize("image_format", sorted(accepted_images()))
def test_every_accepted_format_passes_every_path(image_format: str) -> None:
    data = accepted_images()[image_format]
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == image_format  # the fixture is what it says (MPO included)
    assert images.check_image(data) is None
    assert images.image_size(data) == (10, 12)
    pixels = images.decode_checked(data, height=6, width=5, color="rgb")
    assert isinstance(pixels, np.ndarray) and pixels.shape == (6, 5, 3)


@pytest.mark.parametrize("image_format", sorted(REFUSED))
def test_other_formats_are_refused_before_their_plugin_runs(
    image_format: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = REFUSED[image_format]()
    Image.init()
    factory, accept = Image.OPEN[image_format]
    runs: list[str] = []

    def spy(*args: Any, **kwargs: Any) -> Image.Image:
        runs.append(image_format)
        return factory(*args, **kwargs)

    monkeypatch.setitem(Image.OPEN, image_format, (spy, accept))
    assert images.check_image(data) == images.NOT_ACCEPTED
    assert images.image_size(data) == images.NOT_ACCEPTED
    assert images.decode_checked(data, height=4, width=4, color="rgb") == images.NOT_ACCEPTED
    with pytest.raises(images.UnreadableImageError, match=r"accepted format .*WebP, TIFF"):
        images.decode_image(data, height=4, width=4, color="grayscale")
    assert runs == []
    with Image.open(io.BytesIO(data)) as image:  # Pillow left to itself runs the plugin
        assert image.format == image_format
    assert runs == [image_format]


EPS_PROBE = """
import io, json, os, sys
from PIL import Image
from imgpipe import images

image = Image.new("RGB", (8, 6), (200, 10, 10))
buffer = io.BytesIO()
image.save(buffer, "EPS")
data = buffer.getvalue()
marker = os.environ["GS_MARKER"]
answers = [
    images.check_image(data),
    images.image_size(data),
    images.decode_checked(data, height=4, width=4, color="rgb"),
]
started_by_imgpipe = os.path.exists(marker)
try:
    with Image.open(io.BytesIO(data)) as opened:  # the control: Pillow left to itself
        opened.load()
        control = list(opened.getpixel((2, 2)))
except OSError as error:
    control = str(error)
print(json.dumps([answers, started_by_imgpipe, os.path.exists(marker), control]))
"""


def test_eps_never_starts_ghostscript(tmp_path: Path) -> None:
    """An EPS is refused without a Ghostscript process; Pillow alone would start one."""
    real_gs = shutil.which("gs")
    if real_gs is None and os.environ.get("CI"):
        pytest.fail("Ghostscript is missing: apt-get install ghostscript")
    bin_dir, marker = tmp_path / "bin", tmp_path / "gs-started"
    bin_dir.mkdir()
    wrapper = bin_dir / "gs"  # records each start, then runs the real gs (if installed)
    run_real = f'exec {real_gs} "$@"' if real_gs else "exit 1"
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> "$GS_MARKER"\n{run_real}\n')
    wrapper.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "GS_MARKER": str(marker),
        "PYTHONPATH": str(ROOT),
    }
    result = subprocess.run(
        [sys.executable, "-c", EPS_PROBE], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    answers, started_by_imgpipe, started_at_all, control = json.loads(result.stdout)
    assert answers == [images.NOT_ACCEPTED] * 3
    assert not started_by_imgpipe
    assert started_at_all  # the control did start it: the wrapper would have seen imgpipe's
    if real_gs:
        assert control == [200, 10, 10]  # and Ghostscript really decodes EPS here


@pytest.fixture
def count_opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every Image.open from now on, by format (a spy: Pillow still does the work)."""
    opened: list[str] = []
    real_open = Image.open

    def spy(*args: Any, **kwargs: Any) -> Image.Image:
        image = real_open(*args, **kwargs)
        opened.append(str(image.format))
        return image

    monkeypatch.setattr(Image, "open", spy)
    return opened


def tiny_classifier(folder: Path) -> Classifier:
    """An untrained NumpyMLP for 4x4 grayscale pixels, as a model folder."""
    NumpyMLP([16, 4, 2], output="softmax", init="he", seed=0).save(folder / "model.npz")
    meta = ModelMeta("numpy_mlp", "v", 4, 4, "grayscale", ["a", "b"])
    (folder / META_FILE).write_text(json.dumps(meta.to_json()))
    return Classifier.load(folder)


def test_each_image_is_decoded_once(
    count_opens: list[str], tmp_path: Path, image_factory: Callable[[str, int], bytes]
) -> None:
    """The decoding that gives the pixels is the check: one open per image, none for a plain
    JPEG (libjpeg-turbo's fast path), in decode_checked and the served model's decode."""
    classifier = tiny_classifier(tmp_path)
    kinds = {
        **accepted_images(),
        "EXIF JPEG": exif_rotated_jpeg(20, 10),
        "CMYK JPEG": make_image("cmyk.jpg", 4),
        "16-bit PNG": image_factory("gray16.png", 5),
    }
    for kind, data in kinds.items():
        for decode in (
            lambda data: images.decode_checked(data, height=5, width=7, color="rgb"),
            classifier.decode,
        ):
            count_opens.clear()
            assert isinstance(decode(data), np.ndarray), kind
            plain_jpeg = kind in ("JPEG", "MPO")  # no EXIF block: the fast path, no Pillow
            assert len(count_opens) == (0 if plain_jpeg else 1), (kind, count_opens)
    count_opens.clear()
    assert images.check_image(kinds["PNG"]) is None  # split only checks: one open
    assert count_opens == ["PNG"]


def truncated_png(width: int, height: int) -> bytes:
    """A PNG whose header is whole but whose pixel data is cut short."""
    data = encode(Image.new("L", (width, height), 7), "PNG")
    return data[: len(data) // 2]


def test_image_size_reads_the_header_only() -> None:
    data = truncated_png(300, 200)
    assert images.image_size(data) == (300, 200)  # nothing decoded: the cut data is not seen
    reason = images.check_image(data)
    assert reason is not None and reason.startswith("cannot decode")


def big_header_png(width: int, height: int) -> bytes:
    """A tiny one-bit PNG whose header claims width x height (its data is not all there)."""
    png = encode(Image.new("1", (1, 1)), "PNG")
    chunk = b"IHDR" + struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    ihdr = struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return png[:8] + ihdr + png[8 + len(ihdr) :]


def test_image_size_refuses_what_decoding_refuses() -> None:
    assert images.image_size(b"") == "empty file (0 bytes)"
    assert images.image_size(b"plain text") == images.NOT_ACCEPTED
    answer = images.image_size(big_header_png(9_000, 9_000))  # 81 MP: over the 64 MP limit
    assert isinstance(answer, str) and answer.startswith("decompression bomb refused")
    assert images.image_size(big_header_png(7_990, 7_990)) == (7_990, 7_990)  # just under


def test_bomb_limit_holds_without_the_warnings_filter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Between 1x and 2x the limit Pillow only warns; the explicit check refuses even when the
    process-wide warnings filters let the warning through (another thread reset them)."""
    monkeypatch.setattr(images.warnings, "simplefilter", lambda *args, **kwargs: None)
    data = big_header_png(8_500, 8_500)  # 72 MP: over 64 MP, under 128 MP
    with pytest.warns(Image.DecompressionBombWarning):
        answer = images.image_size(data)
    assert isinstance(answer, str) and answer.startswith("decompression bomb refused")
