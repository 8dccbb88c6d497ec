"""Tests for finding raw images, labelling them, checking them and decoding them to uint8 arrays."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgpipe import images
from imgpipe.images import (
    RawSource,
    UnreadableImageError,
    assign_labels,
    check_image,
    decode_image,
    is_system_file,
    split_files,
)

SIZES = [(16, 16), (12, 20), (33, 7)]  # (height, width): square, landscape, portrait
COLORS = [("grayscale", 1), ("rgb", 3)]


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _halves(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean colour of the left and right halves of (H, W, C), leaving a margin at the seam."""
    width = pixels.shape[1]
    left = pixels[:, : width // 2 - 2].reshape(-1, pixels.shape[2]).mean(axis=0)
    right = pixels[:, width // 2 + 2 :].reshape(-1, pixels.shape[2]).mean(axis=0)
    return left, right


# --------------------------------------------------------------------------- labels


def test_kaggle_flat_names_give_the_class() -> None:
    paths = ["train/cat.1.jpg", "train/dog.12.jpg", "train/cat.2.jpeg", "train/dog.7.PNG"]
    entries, skipped = assign_labels(paths)
    assert skipped == []
    assert {entry.path: entry.label for entry in entries} == {
        "train/cat.1.jpg": "cat",
        "train/dog.12.jpg": "dog",
        "train/cat.2.jpeg": "cat",
        "train/dog.7.PNG": "dog",
    }


def test_kaggle_names_at_the_root_of_the_source() -> None:
    entries, skipped = assign_labels(["cat.0.jpg", "dog.0.jpg"])
    assert skipped == []
    assert sorted(entry.label for entry in entries) == ["cat", "dog"]


def test_flat_folder_without_kaggle_names_is_unlabelled() -> None:
    paths = ["train/cat.1.jpg", "train/holiday.jpg", "train/dog"]
    entries, skipped = assign_labels(paths)
    assert [entry.path for entry in entries] == ["train/cat.1.jpg"]
    assert sorted(item.path for item in skipped) == ["train/dog", "train/holiday.jpg"]
    assert all("class" in item.reason for item in skipped)


def test_class_folders_give_the_class() -> None:
    paths = ["cat/a.jpg", "cat/b.png", "dog/a.jpg", "animals/fox/c.jpg", "dog/dog.3.jpg"]
    entries, skipped = assign_labels(paths)
    assert skipped == []
    labels = {entry.path: entry.label for entry in entries}
    assert labels == {
        "cat/a.jpg": "cat",
        "cat/b.png": "cat",
        "dog/a.jpg": "dog",
        "animals/fox/c.jpg": "fox",  # the folder that holds the file
        "dog/dog.3.jpg": "dog",  # with class folders, the folder wins over a Kaggle-like name
    }


def test_file_outside_class_folders_is_unlabelled() -> None:
    entries, skipped = assign_labels(["cat/a.jpg", "dog/b.jpg", "stray.jpg", "cat.5.jpg"])
    assert sorted(entry.path for entry in entries) == ["cat/a.jpg", "dog/b.jpg"]
    assert sorted(item.path for item in skipped) == ["cat.5.jpg", "stray.jpg"]
    assert all(item.reason for item in skipped)


def test_unlabelled_files_are_all_skipped_with_a_reason() -> None:
    entries, skipped = assign_labels(["IMG_0001.jpg", "IMG_0002.png", "scan.tiff"])
    assert entries == []
    assert len(skipped) == 3
    assert all(item.reason for item in skipped)


@pytest.mark.parametrize(
    "paths",
    [
        [],
        ["train/cat.1.jpg", "train/x.jpg"],
        ["a/1.jpg", "b/2.jpg", "3.jpg", "c/d/4.jpg"],
    ],
)
def test_every_path_is_labelled_or_skipped_exactly_once(paths: list[str]) -> None:
    entries, skipped = assign_labels(paths)
    out = [entry.path for entry in entries] + [item.path for item in skipped]
    assert sorted(out) == sorted(paths)


@pytest.mark.parametrize(
    "path",
    [
        ".DS_Store",
        "cat/.DS_Store",
        "cat/.ds_store",
        "__MACOSX/cat/._a.jpg",
        "__macosx/a.jpg",
        "cat/._a.jpg",
        "Thumbs.db",
        "dog/thumbs.db",
        "desktop.ini",
        ".git/objects/ab",
        "cat/@eaDir/a.jpg",
        "train/.hidden.jpg",
    ],
)
def test_system_files_are_recognised(path: str) -> None:
    assert is_system_file(path)


@pytest.mark.parametrize(
    "path",
    ["cat/a.jpg", "cat.1.jpg", "train/dog.2.jpg", "macosx/a.jpg", "thumbs/a.jpg", "a.ds_store.jpg"],
)
def test_ordinary_files_are_not_system_files(path: str) -> None:
    assert not is_system_file(path)


# --------------------------------------------------------------------------- checking


def test_fixture_images_cover_the_modes(
    image_bytes: dict[str, bytes], image_modes: dict[str, str]
) -> None:
    for kind, data in image_bytes.items():
        with Image.open(io.BytesIO(data)) as image:
            assert image.mode == image_modes[kind], kind


def test_good_images_pass_the_check(image_bytes: dict[str, bytes]) -> None:
    for kind, data in image_bytes.items():
        assert check_image(data) is None, kind


def test_corrupt_files_fail_the_check_with_a_reason(corrupt_bytes: dict[str, bytes]) -> None:
    for name, data in corrupt_bytes.items():
        reason = check_image(data)
        assert isinstance(reason, str), name
        assert reason.strip(), name


def test_truncated_png_fails_the_check(image_bytes: dict[str, bytes]) -> None:
    data = image_bytes["gray.png"]
    reason = check_image(data[: len(data) - 30])
    assert reason


def test_truncated_jpeg_cannot_be_decoded_either(corrupt_bytes: dict[str, bytes]) -> None:
    with pytest.raises(UnreadableImageError, match="cannot decode: image file is truncated"):
        decode_image(corrupt_bytes["truncated.jpg"], height=8, width=8, color="rgb")


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize(("height", "width"), SIZES)
@pytest.mark.parametrize(("color", "channels"), COLORS)
def test_decode_gives_requested_shape_and_uint8(
    image_bytes: dict[str, bytes], height: int, width: int, color: str, channels: int
) -> None:
    for kind, data in image_bytes.items():
        pixels = decode_image(data, height=height, width=width, color=color)
        assert pixels.shape == (height, width, channels), kind
        assert pixels.dtype == np.uint8, kind


def test_decode_at_native_size_keeps_pixels_exactly() -> None:
    gray = np.random.default_rng(1).integers(0, 256, size=(11, 7), dtype=np.uint8)
    rgb = np.random.default_rng(2).integers(0, 256, size=(6, 9, 3), dtype=np.uint8)
    decoded_gray = decode_image(_png(gray), height=11, width=7, color="grayscale")
    decoded_rgb = decode_image(_png(rgb), height=6, width=9, color="rgb")
    np.testing.assert_array_equal(decoded_gray[..., 0], gray)
    np.testing.assert_array_equal(decoded_rgb, rgb)


def test_grayscale_decode_of_gray_rgb_is_the_same_gray() -> None:
    level = np.full((10, 10, 3), 77, dtype=np.uint8)
    pixels = decode_image(_png(level), height=5, width=5, color="grayscale")
    assert np.all(pixels == 77)


def test_rgb_decode_of_grayscale_repeats_the_channel() -> None:
    gray = np.random.default_rng(3).integers(0, 256, size=(8, 8), dtype=np.uint8)
    pixels = decode_image(_png(gray), height=8, width=8, color="rgb")
    for channel in range(3):
        np.testing.assert_array_equal(pixels[..., channel], gray)


def test_rgba_transparency_is_flattened_onto_white() -> None:
    rgba = np.zeros((10, 20, 4), dtype=np.uint8)  # transparent black
    rgba[:, 10:] = (255, 0, 0, 255)  # opaque red right half
    data = _png(rgba)
    rgb = decode_image(data, height=10, width=20, color="rgb")
    np.testing.assert_array_equal(rgb[:, :10], 255)
    np.testing.assert_array_equal(rgb[:, 10:], np.broadcast_to([255, 0, 0], (10, 10, 3)))
    gray = decode_image(data, height=10, width=20, color="grayscale")
    np.testing.assert_array_equal(gray[:, :10], 255)
    assert np.all(gray[:, 10:] < 128)  # red is darker than white


def test_half_transparent_pixels_blend_with_white() -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[...] = (0, 0, 0, 128)  # half-opaque black
    pixels = decode_image(_png(rgba), height=4, width=4, color="grayscale")
    assert np.all(np.abs(pixels.astype(int) - 127) <= 2)


def test_palette_transparency_is_flattened_onto_white() -> None:
    indices = np.ones((8, 16), dtype=np.uint8)
    indices[:, :8] = 0  # palette entry 0 is transparent black
    image = Image.fromarray(indices).convert("P")
    image.putpalette([0, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", transparency=0)
    rgb = decode_image(buffer.getvalue(), height=8, width=16, color="rgb")
    np.testing.assert_array_equal(rgb[:, :8], 255)
    np.testing.assert_array_equal(rgb[:, 8:], np.broadcast_to([0, 0, 255], (8, 8, 3)))


def test_la_transparency_is_flattened_onto_white() -> None:
    la = np.zeros((6, 6, 2), dtype=np.uint8)  # transparent black
    buffer = io.BytesIO()
    Image.fromarray(la).convert("LA").save(buffer, format="PNG")
    pixels = decode_image(buffer.getvalue(), height=6, width=6, color="grayscale")
    assert np.all(pixels == 255)


def test_cmyk_jpeg_decodes_to_the_right_colour() -> None:
    cmyk = Image.new("CMYK", (24, 16), (0, 255, 255, 0))  # pure red in CMYK
    buffer = io.BytesIO()
    cmyk.save(buffer, format="JPEG", quality=95)
    pixels = decode_image(buffer.getvalue(), height=16, width=24, color="rgb").astype(int)
    red, green, blue = pixels.reshape(-1, 3).mean(axis=0)
    assert red > 200
    assert green < 60
    assert blue < 60


def test_16_bit_png_is_scaled_to_8_bits() -> None:
    levels = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(levels).save(buffer, format="PNG")
    pixels = decode_image(buffer.getvalue(), height=1, width=4, color="grayscale")
    np.testing.assert_array_equal(pixels[0, :, 0], [0, 64, 128, 255])


def test_dark_16_bit_png_stays_dark() -> None:
    # 200 / 65535 of full scale is black in 8 bits, whatever the image's own maximum is
    levels = np.full((3, 3), 200, dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(levels).save(buffer, format="PNG")
    with Image.open(io.BytesIO(buffer.getvalue())) as image:
        assert image.mode == "I;16"
    pixels = decode_image(buffer.getvalue(), height=3, width=3, color="grayscale")
    assert np.all(pixels <= 1)


@pytest.mark.parametrize(("height", "width"), [(20, 40), (10, 20)])
def test_exif_rotated_jpeg_comes_out_upright(
    exif_jpeg: Callable[[int, int], bytes], height: int, width: int
) -> None:
    data = exif_jpeg(40, 20)  # upright: 40 wide, 20 tall, red left half, blue right half
    with Image.open(io.BytesIO(data)) as stored:
        assert stored.size == (20, 40)  # stored on its side
    rgb = decode_image(data, height=height, width=width, color="rgb").astype(int)
    left, right = _halves(rgb)
    assert left[0] > 180 and left[2] < 80, left  # red
    assert right[2] > 180 and right[0] < 80, right  # blue
    # top and bottom halves look alike: the colour split is left/right, not top/bottom
    top, bottom = rgb[: height // 2].mean(axis=(0, 1)), rgb[height // 2 :].mean(axis=(0, 1))
    assert np.all(np.abs(top - bottom) < 30)


def test_exif_rotated_jpeg_is_upright_in_grayscale(exif_jpeg: Callable[[int, int], bytes]) -> None:
    gray = decode_image(exif_jpeg(40, 20), height=20, width=40, color="grayscale").astype(int)
    left, right = _halves(gray)
    # red and blue have different luma (0.299 vs 0.114): a left/right difference, not top/bottom
    assert left[0] - right[0] > 30
    top, bottom = gray[:10].mean(), gray[10:].mean()
    assert abs(top - bottom) < 10


def test_large_jpeg_is_downscaled_to_the_target(image_factory: Callable[[str, int], bytes]) -> None:
    big = Image.new("RGB", (800, 600), (10, 200, 30))
    buffer = io.BytesIO()
    big.save(buffer, format="JPEG", quality=90)
    pixels = decode_image(buffer.getvalue(), height=24, width=32, color="rgb").astype(int)
    assert pixels.shape == (24, 32, 3)
    assert np.all(np.abs(pixels - [10, 200, 30]) <= 6)


# --------------------------------------------------------------------------- sources


@pytest.fixture
def raw_files(image_bytes: dict[str, bytes]) -> dict[str, bytes]:
    return {
        "cat/a.jpg": image_bytes["rgb.jpg"],
        "cat/b.png": image_bytes["gray.png"],
        "dog/deep/c.png": image_bytes["rgba.png"],
        "dog/.DS_Store": b"\x00\x00\x00\x01Bud1",
        "__MACOSX/cat/._a.jpg": b"\x00\x05\x16\x07",
    }


def test_raw_source_on_a_folder(
    tmp_path: Path, raw_files: dict[str, bytes], tree_writer: Callable
) -> None:
    root = tree_writer(tmp_path / "raw", raw_files)
    (root / "empty_dir").mkdir()
    source = RawSource(root)
    assert not source.is_zip
    assert source.list_files() == sorted(raw_files)
    for path, data in raw_files.items():
        assert source.read(path) == data


def test_raw_source_on_a_zip(
    tmp_path: Path, raw_files: dict[str, bytes], zip_writer: Callable
) -> None:
    archive = zip_writer(tmp_path / "raw.zip", raw_files, directories=("cat", "dog", "dog/deep"))
    source = RawSource(archive)
    assert source.is_zip
    assert source.list_files() == sorted(raw_files)  # directory entries are not files
    for path, data in raw_files.items():
        assert source.read(path) == data


def test_raw_source_that_does_not_exist_says_which_param(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data\.raw"):
        RawSource(tmp_path / "nowhere.zip")


def test_split_files_skips_system_files_and_sorts(tmp_path: Path, tree_writer: Callable) -> None:
    tree_writer(
        tmp_path,
        {"dog/2.png": b"x", "cat/b.png": b"x", "cat/a.png": b"x", "cat/.DS_Store": b"x"},
    )
    assert split_files(tmp_path) == ["cat/a.png", "cat/b.png", "dog/2.png"]


# --------------------------------------------------------------------------- JPEG fast path


def _photo_like(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth gradients plus noise: compresses like a photo, not like flat colour."""
    rows, cols = np.mgrid[0:height, 0:width]
    base = np.stack([rows * 255 / height, cols * 255 / width, (rows + cols) * 127 / width], -1)
    noise = np.random.default_rng(seed).normal(0, 12, size=base.shape)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _jpeg(pixels: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90, **options)
    return buffer.getvalue()


@pytest.mark.parametrize(("source", "target"), [((200, 200), (96, 96)), ((375, 500), (64, 64))])
@pytest.mark.parametrize(("color", "channels"), COLORS)
def test_jpeg_fast_path_matches_pillow(
    source: tuple[int, int], target: tuple[int, int], color: str, channels: int
) -> None:
    """Plain JPEGs skip Pillow's decoder; the pixels must still be Pillow's, up to rounding."""
    data = _jpeg(_photo_like(*source, seed=sum(source)))
    fast = images._decode_plain_jpeg(data, *target, color)
    assert fast is not None, "a plain YCbCr JPEG must take the fast path"
    assert fast.shape == (*target, channels)
    assert fast.dtype == np.uint8
    with Image.open(io.BytesIO(data)) as image:
        reference = np.asarray(
            image.convert("L" if color == "grayscale" else "RGB").resize(
                target[::-1], Image.Resampling.BILINEAR
            )
        ).reshape(*target, channels)
    difference = np.abs(fast.astype(int) - reference)
    assert difference.mean() < 2.5, difference.mean()
    np.testing.assert_array_equal(
        decode_image(data, height=target[0], width=target[1], color=color), fast
    )


def test_jpeg_fast_path_leaves_exif_cmyk_and_corrupt_files_to_pillow(
    exif_jpeg: Callable[[int, int], bytes], corrupt_bytes: dict[str, bytes]
) -> None:
    cmyk = io.BytesIO()
    Image.new("CMYK", (24, 16), (0, 255, 255, 0)).save(cmyk, format="JPEG")
    for data in (
        exif_jpeg(40, 20),
        cmyk.getvalue(),
        corrupt_bytes["truncated.jpg"],
        _png(np.zeros((4, 4), np.uint8)),
    ):
        assert images._decode_plain_jpeg(data, 8, 8, "rgb") is None
    grayscale_jpeg = _jpeg(_photo_like(32, 32, seed=5)[..., 0])
    assert images._decode_plain_jpeg(grayscale_jpeg, 16, 16, "rgb").shape == (16, 16, 3)


def test_decode_checked_gives_pixels_or_the_reason() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (80, 60), (200, 30, 30)).save(buffer, format="JPEG")
    pixels = images.decode_checked(buffer.getvalue(), height=16, width=16, color="rgb")
    assert isinstance(pixels, np.ndarray) and pixels.shape == (16, 16, 3)
    assert images.decode_checked(b"", height=16, width=16, color="rgb") == "empty file (0 bytes)"
    junk = images.decode_checked(b"not an image", height=16, width=16, color="rgb")
    assert junk == images.NOT_ACCEPTED


def test_decode_checked_applies_the_bomb_limit_to_plain_jpegs_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (80, 60), (200, 30, 30)).save(buffer, format="JPEG")  # a fast-path JPEG
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4,800 pixels: over twice the limit
    answer = images.decode_checked(buffer.getvalue(), height=16, width=16, color="rgb")
    assert isinstance(answer, str) and answer.startswith("decompression bomb refused")
