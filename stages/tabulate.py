"""Stage `tabulate`: data/split -> data/tables/<view>/{train,val,test}.parquet of uint8 pixels."""

from __future__ import annotations

import argparse
import multiprocessing
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from imgpipe.images import decode_image, iter_split_files
from imgpipe.params import ParamsError, ViewParams, load_params
from imgpipe.runtime import atomic_directory, cpu_count, setup_logging
from imgpipe.splitting import SPLITS
from imgpipe.tables import TableWriter, record_batch, table_schema


def decode_chunk(
    paths: Sequence[str], view: tuple[int, int, str]
) -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
    """Decode files into (n_ok, H, W, C) uint8; returns pixels, indices decoded, (index, error)s."""
    height, width, color = view
    channels = 1 if color == "grayscale" else 3
    pixels = np.empty((len(paths), height, width, channels), dtype=np.uint8)
    decoded: list[int] = []
    errors: list[tuple[int, str]] = []
    for index, path in enumerate(paths):
        try:
            data = Path(path).read_bytes()
            pixels[len(decoded)] = decode_image(data, height=height, width=width, color=color)
            decoded.append(index)
        except Exception as error:  # any decoder failure becomes a reported skip, not a crash
            errors.append((index, f"{type(error).__name__}: {error}"))
    return pixels[: len(decoded)], decoded, errors


def _decode_job(job: tuple[Sequence[str], tuple[int, int, str]]):
    return decode_chunk(*job)


def chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    """Consecutive slices of at most `size` items."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def tabulate_split(
    pool: multiprocessing.pool.Pool,
    files: list[tuple[str, Path]],
    class_names: list[str],
    view_name: str,
    view: ViewParams,
    out_path: Path,
    rows_per_group: int,
    progress: tqdm,
) -> tuple[int, list[tuple[str, str]]]:
    """Decode one split's files in parallel and stream them into a Parquet table by row groups."""
    schema = table_schema(view.shape, class_names, view_name)
    index_of = {name: i for i, name in enumerate(class_names)}
    view_key = (view.height, view.width, view.color)
    paths = [str(p) for _, p in files]
    jobs = [(chunk, view_key) for chunk in chunks(paths, rows_per_group)]
    failures: list[tuple[str, str]] = []
    with TableWriter(out_path, schema) as writer:
        for chunk_number, (pixels, decoded, errors) in enumerate(pool.imap(_decode_job, jobs)):
            offset = chunk_number * rows_per_group
            rows = [files[offset + i] for i in decoded]
            labels = np.array([index_of[label] for label, _ in rows], dtype=np.int16)
            sources = [f"{label}/{path.name}" for label, path in rows]
            if len(rows):
                writer.write(record_batch(schema, pixels, labels, sources))
            failures.extend((paths[offset + i], reason) for i, reason in errors)
            progress.update(len(decoded) + len(errors))
        rows_written = writer.rows
    return rows_written, failures


def main(argv: list[str] | None = None) -> None:
    """Write one Parquet table per view and split."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--split", required=True, type=Path, help="split folder (data/split)")
    parser.add_argument("--out", required=True, type=Path, help="output folder (data/tables)")
    args = parser.parse_args(argv)
    log = setup_logging("tabulate")
    started = time.perf_counter()
    try:
        params = load_params()
    except ParamsError as error:
        raise SystemExit(f"[tabulate] {error}") from None

    files = {s: list(iter_split_files(args.split / s)) for s in SPLITS}
    class_names = sorted({p.name for s in SPLITS for p in (args.split / s).iterdir() if p.is_dir()})
    total = sum(len(f) for f in files.values()) * len(params.views)
    workers = params.tabulate.workers or cpu_count()
    log.info(
        "%d images, %d classes, %d view(s): %s; %d worker processes",
        total // len(params.views),
        len(class_names),
        len(params.views),
        ", ".join(params.views),
        workers,
    )
    failures: list[tuple[str, str]] = []
    with (
        atomic_directory(args.out) as staging,
        multiprocessing.Pool(workers) as pool,
        tqdm(total=total, desc="tabulate", unit="img") as progress,
    ):
        for view_name, view in params.views.items():
            for split_name in SPLITS:
                progress.set_postfix_str(f"{view_name}/{split_name}")
                _, failed = tabulate_split(
                    pool,
                    files[split_name],
                    class_names,
                    view_name,
                    view,
                    staging / view_name / f"{split_name}.parquet",
                    params.tabulate.rows_per_group,
                    progress,
                )
                failures.extend(failed)
    for path, reason in failures:
        log.warning("skipped %s: %s", path, reason)
    size_mb = sum(p.stat().st_size for p in args.out.rglob("*.parquet")) / 1e6
    elapsed = time.perf_counter() - started
    log.info(
        "wrote %d rows (%.1f MB) to %s in %.1f s (%.0f images/s)",
        total - len(failures),
        size_mb,
        args.out,
        elapsed,
        total / max(elapsed, 1e-9),
    )


if __name__ == "__main__":
    main()
