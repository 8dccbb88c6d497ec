"""Stage `split`: raw images -> data/split/{train,val,test}/<class>/, plus a report of skips."""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import time
from collections import Counter
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from imgpipe.images import (
    RawSource,
    Skipped,
    UnsafeArchiveError,
    assign_labels,
    check_image,
    is_system_file,
    printable,
)
from imgpipe.params import ParamsError, load_params
from imgpipe.runtime import atomic_directory, cpu_count, setup_logging, write_json_atomic
from imgpipe.splitting import SPLITS, Record, split_dataset

_source: RawSource | None = None  # one per worker process


def _init_worker(raw: str) -> None:
    global _source
    _source = RawSource(raw)


def _inspect(path: str) -> tuple[str, str | None]:
    """(content digest, reason it is unreadable or None) for one raw file."""
    assert _source is not None
    data = _source.read(path)
    return hashlib.blake2b(data, digest_size=16).hexdigest(), check_image(data)


def _copy(job: tuple[str, str]) -> int:
    """Copy one raw file to its destination; returns its size in bytes."""
    assert _source is not None
    source_path, destination = job
    data = _source.read(source_path)
    Path(destination).write_bytes(data)
    return len(data)


def destination_names(records: list[Record]) -> dict[str, str]:
    """<class>/<file name> for each record, made unique when two folders hold the same name."""
    names: dict[str, str] = {}
    taken: Counter[str] = Counter()
    for record in sorted(records, key=lambda r: r.path):
        file_name = printable(PurePosixPath(record.path).name)  # valid UTF-8 for tables
        name = f"{record.label}/{file_name}"
        if taken[name]:
            name = f"{record.label}/{record.digest[:8]}-{file_name}"
        copy_number = 1
        while taken[name]:  # identical bytes under the same file name in several folders
            copy_number += 1
            name = f"{record.label}/{record.digest[:8]}-{copy_number}-{file_name}"
        taken[name] += 1
        names[record.path] = name
    return names


def main(argv: list[str] | None = None) -> None:
    """Split the raw images named by data.raw into train/val/test folders."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, type=Path, help="output folder (data/split)")
    parser.add_argument("--report", required=True, type=Path, help="JSON report path")
    args = parser.parse_args(argv)
    log = setup_logging("split")
    started = time.perf_counter()
    try:
        params = load_params()
    except ParamsError as error:
        raise SystemExit(f"[split] {error}") from None
    raw = params.data.raw
    try:
        source = RawSource(raw)
    except FileNotFoundError as error:
        raise SystemExit(f"[split] {error}") from None

    try:
        all_files = source.list_files()
    except UnsafeArchiveError as error:
        raise SystemExit(f"[split] {error}") from None
    system_files = [f for f in all_files if is_system_file(f)]
    oversized = source.oversized()
    entries, unlabelled = assign_labels(
        f for f in all_files if not is_system_file(f) and f not in oversized
    )
    unlabelled.extend(Skipped(path, reason) for path, reason in sorted(oversized.items()))
    log.info(
        "found %d files in %s (%d ignored as system files)", len(all_files), raw, len(system_files)
    )

    workers = cpu_count()
    skipped: list[Skipped] = list(unlabelled)
    records: list[Record] = []
    with multiprocessing.Pool(workers, initializer=_init_worker, initargs=(raw,)) as pool:
        results = pool.imap(_inspect, [e.path for e in entries], chunksize=64)
        for entry, (digest, reason) in tqdm(
            zip(entries, results, strict=True),
            total=len(entries),
            desc="split: checking images",
            unit="img",
        ):
            if reason is None:
                records.append(Record(entry.path, entry.label or "", digest))
            else:
                skipped.append(Skipped(entry.path, reason))

        labels = sorted({r.label for r in records})
        if len(labels) < 2:
            raise SystemExit(
                f"[split] found {len(labels)} class(es) ({', '.join(labels) or 'none'}) in {raw}: "
                "need at least two. Use class folders (<class>/<image>) or Kaggle names "
                "(<class>.<id>.jpg)."
            )
        split = split_dataset(
            records,
            ratios=params.split.ratios.model_dump(),
            seed=params.split.seed,
            max_per_class=params.split.max_per_class,
        )
        skipped.extend(split.left_out)
        selected = [r for s in SPLITS for r in split.assigned[s]]
        names = destination_names(selected)

        with atomic_directory(args.out) as staging:
            jobs = []
            for split_name in SPLITS:
                for record in split.assigned[split_name]:
                    destination = staging / split_name / names[record.path]
                    jobs.append((record.path, str(destination)))
            for directory in {Path(d).parent for _, d in jobs}:
                directory.mkdir(parents=True, exist_ok=True)
            for split_name in SPLITS:  # every class folder exists in every split, even if empty
                for label in labels:
                    (staging / split_name / label).mkdir(parents=True, exist_ok=True)
            written = sum(
                tqdm(
                    pool.imap_unordered(_copy, jobs, chunksize=64),
                    total=len(jobs),
                    desc="split: writing",
                    unit="img",
                )
            )

    counts = split.counts()
    report = {
        "dataset": Path(raw).name,
        "source": raw,
        "seed": params.split.seed,
        "ratios": params.split.ratios.model_dump(),
        "max_per_class": params.split.max_per_class,
        "files_found": len(all_files),
        "system_files_ignored": len(system_files),
        "readable": len(records),
        "selected": len(selected),
        "not_selected_by_cap": len(records) - len(selected) - len(split.left_out),
        "duplicate_groups": split.duplicate_groups,
        "classes": labels,
        "totals": {s: len(split.assigned[s]) for s in SPLITS},
        "counts": counts,
        "skipped": [{"path": printable(s.path), "reason": s.reason} for s in skipped],
    }
    write_json_atomic(args.report, report)
    elapsed = time.perf_counter() - started
    totals = ", ".join(f"{s} {len(split.assigned[s])}" for s in SPLITS)
    log.info(
        "read %d files from %s; wrote %d classes (%s images, %.1f MB) to %s and %s in %.1f s",
        len(all_files),
        raw,
        len(labels),
        totals,
        written / 1e6,
        args.out,
        args.report,
        elapsed,
    )
    if skipped:
        log.warning("skipped %d unreadable or unlabelled files: see %s", len(skipped), args.report)
        for item in skipped[:5]:
            log.warning("  %s: %s", printable(item.path), item.reason)


if __name__ == "__main__":
    main()
