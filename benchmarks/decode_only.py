"""The ceiling for tabulate: decode_image on every file with all cores, writing nothing.

Reads every file under a split folder (<split>/<class>/<image>) and decodes it exactly as the
`tabulate` stage does (stages.tabulate.decode_chunk, same tasks, one process per core), but
keeps only a count: no pixels leave the workers, no Parquet. Run by benchmarks/data_stages.py.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
from pathlib import Path

import numpy as np

from imgpipe.images import split_files
from stages.tabulate import chunks, decode_chunk, task_size


def _decode_count(job: tuple[list[str], tuple[int, int, str]]) -> int:
    paths, (height, width, color) = job
    out = np.empty((len(paths), height, width, 1 if color == "grayscale" else 3), np.uint8)
    return len(decode_chunk(paths, (height, width, color), out)[0])


def main() -> None:
    """Decode every image of a split folder; print how many decoded."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--split", required=True, type=Path, help="split folder (data/split)")
    parser.add_argument("--size", required=True, type=int)
    parser.add_argument("--color", required=True, choices=("grayscale", "rgb"))
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()
    view = (args.size, args.size, args.color)
    paths = [
        os.path.join(args.split, split_name, source)
        for split_name in ("train", "val", "test")
        for source in split_files(args.split / split_name)
    ]
    per_task = task_size((args.size, args.size, 1 if args.color == "grayscale" else 3))
    jobs = [(chunk, view) for chunk in chunks(paths, per_task)]
    with multiprocessing.Pool(args.workers) as pool:
        decoded = sum(pool.imap_unordered(_decode_count, jobs))
    print(f"decoded {decoded} of {len(paths)} images")


if __name__ == "__main__":
    main()
