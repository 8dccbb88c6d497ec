"""The ceiling for tabulate: decode_image on every file with all cores, writing nothing.

Reads every file under a split folder (<split>/<class>/<image>) and decodes it exactly as the
`tabulate` stage does (imgpipe.tabulating.decode_chunk, same tasks, one process per core), but
keeps only a count: no pixels leave the workers, no Parquet. Run by benchmarks/data_stages.py.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
from pathlib import Path

import numpy as np

from imgpipe.images import PILLOW_MODES, channel_count, split_files
from imgpipe.tabulating import chunks, decode_chunk, task_size


def _decode_count(job: tuple[list[str], tuple[int, int, str]]) -> int:
    paths, (height, width, color) = job
    out = np.empty((len(paths), height, width, channel_count(color)), np.uint8)
    return len(decode_chunk(paths, (height, width, color), out)[0])


def main() -> None:
    """Decode every image of a split folder; print how many decoded."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--split", required=True, type=Path, help="split folder (data/split)")
    parser.add_argument("--size", required=True, type=int)
    parser.add_argument("--color", required=True, choices=tuple(PILLOW_MODES))
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()
    view = (args.size, args.size, args.color)
    paths = [
        os.path.join(args.split, split_name, source)
        for split_name in ("train", "val", "test")
        for source in split_files(args.split / split_name)
    ]
    per_task = task_size((args.size, args.size, channel_count(args.color)))
    jobs = [(chunk, view) for chunk in chunks(paths, per_task)]
    with multiprocessing.Pool(args.workers) as pool:
        decoded = sum(pool.imap_unordered(_decode_count, jobs))
    print(f"decoded {decoded} of {len(paths)} images")


if __name__ == "__main__":
    main()
