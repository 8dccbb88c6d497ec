"""The tutorial way, kept as the baseline: Pillow per image, float64 rows, pandas, pickle.

Reads a split folder (<split>/<class>/<image>) like the `tabulate` stage and writes
<out>/<split>.pkl, one pickled DataFrame per split: one float64 column per pixel value in [0, 1]
plus a `label` column. One process, as in the tutorials. Run by benchmarks/data_stages.py.
"""

from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

SPLITS = ("train", "val", "test")


def load_class(folder: Path, label: int, size: int, mode: str, frame: str) -> pd.DataFrame:
    """Every image of one class folder as a row of size*size*channels floats, plus its label.

    frame "rows" builds the DataFrame from the list of rows, as the tutorial does; "array" stacks
    the rows into one float64 array first, which pandas turns into a frame much faster (a
    kinder baseline than the tutorial itself).
    """
    rows = []
    for name in sorted(os.listdir(folder)):
        img = Image.open(folder / name).convert(mode)
        img = img.resize((size, size))
        rows.append(np.ravel(img) / 255.0)
    data = pd.DataFrame(rows) if frame == "rows" else pd.DataFrame(np.array(rows))
    data["label"] = label
    return data


def main() -> None:
    """Write one pickled DataFrame per split."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--split", required=True, type=Path, help="split folder (data/split)")
    parser.add_argument("--out", required=True, type=Path, help="folder for <split>.pkl")
    parser.add_argument("--size", required=True, type=int, help="images are resized to size^2")
    parser.add_argument("--color", required=True, choices=("grayscale", "rgb"))
    parser.add_argument(
        "--frame",
        choices=("rows", "array"),
        default="rows",
        help="rows: pd.DataFrame(list of rows), as the tutorial; array: np.array first (faster)",
    )
    args = parser.parse_args()
    mode = "L" if args.color == "grayscale" else "RGB"
    args.out.mkdir(parents=True, exist_ok=True)
    for split_name in SPLITS:
        split_dir = args.split / split_name
        classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
        frames = [
            load_class(split_dir / name, label, args.size, mode, args.frame)
            for label, name in enumerate(classes)
            if any((split_dir / name).iterdir())
        ]
        frame = pd.concat(frames) if frames else pd.DataFrame()
        with open(args.out / f"{split_name}.pkl", "wb") as handle:
            pickle.dump(frame, handle)


if __name__ == "__main__":
    main()
