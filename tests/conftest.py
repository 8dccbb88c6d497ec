"""Shared fixtures: tiny images in every Pillow mode the pipeline meets, corrupt files, params,
scikit-learn's digits. The plain helpers behind them are in tests/support.py."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from imgpipe.params import Params, load_params
from tests.support import (
    IMAGE_KINDS,
    IMAGE_MODES,
    ROOT,
    corrupt_files,
    digits_split,
    exif_rotated_jpeg,
    load_repo_params,
    make_image,
    write_tree,
    write_zip,
)


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
    return ROOT


@pytest.fixture
def repo_params() -> dict[str, Any]:
    """A fresh, editable copy of the repository's params.yaml."""
    return copy.deepcopy(load_repo_params())


@pytest.fixture(scope="module")
def params() -> Params:
    """The repository's params.yaml, validated."""
    return load_params(ROOT / "params.yaml")


@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    """Scikit-learn's digits as uint8 images (N, 8, 8, 1) in 0..255, shuffled: 1,400 to train on
    (x_train, y_train), the other 397 to validate on (x_val, y_val)."""
    return digits_split(1400)
