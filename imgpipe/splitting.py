"""The split stage: a stratified, duplicate-aware split of records (split_dataset, pure) and
split_images, which applies it to a folder or zip of raw images and copies them into
data/split/{train,val,test}/<class>/."""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from imgpipe.images import (
    SPLITS,
    Entry,
    RawSource,
    Skipped,
    UnsafeArchiveError,
    assign_labels,
    check_image,
    is_system_file,
    printable,
)
from imgpipe.runtime import StageError, atomic_directory, cpu_count, write_json_atomic

if TYPE_CHECKING:
    from multiprocessing.pool import Pool

    from imgpipe.params import SplitParams

log = logging.getLogger("imgpipe.splitting")


@dataclass(frozen=True)
class Record:
    """A readable raw image: its path in the source, its class and a digest of its bytes."""

    path: str
    label: str
    digest: str


@dataclass
class Split:
    """Which records go to which split, and which were left out and why."""

    assigned: dict[str, list[Record]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    left_out: list[Skipped] = field(default_factory=list)
    duplicate_groups: int = 0  # digests shared by more than one file

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per class in each split."""
        counts: dict[str, dict[str, int]] = {}
        for split_name, records in self.assigned.items():
            per_class: dict[str, int] = defaultdict(int)
            for record in records:
                per_class[record.label] += 1
            counts[split_name] = dict(sorted(per_class.items()))
        return counts


def _order_key(seed: int, digest: str) -> bytes:
    # Content-keyed order: renaming or adding files does not reshuffle the others.
    return hashlib.blake2b(f"{seed}:{digest}".encode(), digest_size=16).digest()


def _split_sizes(n: int, ratios: Mapping[str, float]) -> dict[str, int]:
    """How many of n groups go to each split; a positive ratio gets at least one if n allows."""
    sizes = {name: round(n * ratios[name]) for name in ("val", "test")}
    wanted = [name for name in ("test", "val") if ratios[name] > 0]
    for name in wanted:
        if sizes[name] == 0 and n > len(wanted):
            sizes[name] = 1
    while sizes["val"] + sizes["test"] > max(n - 1, 0):
        largest = max(("val", "test"), key=lambda s: sizes[s])
        sizes[largest] -= 1
    sizes["train"] = n - sizes["val"] - sizes["test"]
    return sizes


def split_dataset(
    records: Iterable[Record],
    *,
    ratios: Mapping[str, float],
    seed: int,
    max_per_class: int | None,
) -> Split:
    """Split records per class by ratios, keeping identical files in one split.

    Groups of byte-identical files move as one unit. Identical bytes under two different classes
    are contradictory labels: all copies are left out. The order inside each class comes from
    a seeded hash of the content, so the result depends only on the files and the seed.
    """
    by_digest: dict[str, list[Record]] = defaultdict(list)
    for record in sorted(records, key=lambda r: r.path):
        by_digest[record.digest].append(record)

    result = Split()
    groups_by_label: dict[str, list[list[Record]]] = defaultdict(list)
    for group in by_digest.values():
        if len(group) > 1:
            result.duplicate_groups += 1
        labels = sorted({r.label for r in group})
        if len(labels) > 1:
            reason = f"identical bytes appear under classes {', '.join(labels)}"
            result.left_out.extend(Skipped(r.path, reason) for r in group)
            continue
        groups_by_label[labels[0]].append(group)

    for label in sorted(groups_by_label):
        groups = sorted(groups_by_label[label], key=lambda g: _order_key(seed, g[0].digest))
        if max_per_class is not None:
            kept, taken = [], 0
            for group in groups:
                if taken + len(group) > max_per_class:
                    continue  # duplicate groups move whole: skip one that would overshoot
                kept.append(group)
                taken += len(group)
            groups = kept
        sizes = _split_sizes(len(groups), ratios)
        start = 0
        for split_name in ("test", "val", "train"):
            for group in groups[start : start + sizes[split_name]]:
                result.assigned[split_name].extend(group)
            start += sizes[split_name]
    return result


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


_source: RawSource | None = None  # one per worker process


def _init_worker(raw: str) -> None:
    global _source
    _source = RawSource(raw)


def _inspect(path: str) -> tuple[str, str | None]:
    """(content digest, reason it is unreadable or None) for one raw file."""
    assert _source is not None
    try:
        data = _source.read(path)
    except (OSError, ValueError) as error:  # changed since it was listed: this file's problem
        return "", f"cannot read: {error}"
    return hashlib.blake2b(data, digest_size=16).hexdigest(), check_image(data)


def _copy(job: tuple[str, str]) -> int:
    """Copy one raw file to its destination; returns its size in bytes."""
    assert _source is not None
    source_path, destination = job
    data = _source.read(source_path)
    Path(destination).write_bytes(data)
    return len(data)


@dataclass(frozen=True)
class SplitOutcome:
    """What split_images did: the report it wrote, and the bytes copied."""

    report: dict[str, Any]
    skipped: list[Skipped]
    bytes_written: int
    seconds: float


def split_images(raw: str, out_dir: Path, report_path: Path, settings: SplitParams) -> SplitOutcome:
    """Check, label, split and copy the raw images (a zip or a folder) into out_dir.

    Every file is decoded once to check it and hashed to keep duplicates together; unreadable
    and unlabelled files are skipped and listed, with the reason, in the JSON report. out_dir
    appears whole or not at all.
    """
    started = time.perf_counter()
    listing = _list_raw(raw)
    skipped: list[Skipped] = list(listing.unlabelled)
    with multiprocessing.Pool(cpu_count(), initializer=_init_worker, initargs=(raw,)) as pool:
        records, unreadable = _check_images(pool, listing.entries)
        skipped.extend(unreadable)
        labels = _classes(records, raw)
        split = split_dataset(
            records,
            ratios=settings.ratios.model_dump(),
            seed=settings.seed,
            max_per_class=settings.max_per_class,
        )
        skipped.extend(split.left_out)
        written = _write_split(pool, split, labels, out_dir)

    report = _report(raw, settings, listing, records, split, labels, skipped)
    write_json_atomic(report_path, report)
    return SplitOutcome(report, skipped, written, time.perf_counter() - started)


@dataclass(frozen=True)
class _Listing:
    """The raw source's files: all of them, the system files among them (ignored), the others
    with their classes, and those left out before reading (no class, or too large)."""

    all_files: list[str]
    system_files: list[str]
    entries: list[Entry]
    unlabelled: list[Skipped]


def _list_raw(raw: str) -> _Listing:
    """List and label the raw files, without reading any; those never to be read (too large,
    symlinks not followed) are skipped with the reason."""
    try:
        source = RawSource(raw)
        all_files = source.list_files()
    except (FileNotFoundError, UnsafeArchiveError) as error:
        raise StageError(str(error)) from None
    system_files = [f for f in all_files if is_system_file(f)]
    refused = source.refused(f for f in all_files if not is_system_file(f))
    entries, unlabelled = assign_labels(
        f for f in all_files if not is_system_file(f) and f not in refused
    )
    unlabelled.extend(Skipped(path, reason) for path, reason in sorted(refused.items()))
    log.info(
        "found %d files in %s (%d ignored as system files)", len(all_files), raw, len(system_files)
    )
    return _Listing(all_files, system_files, entries, unlabelled)


def _check_images(pool: Pool, entries: list[Entry]) -> tuple[list[Record], list[Skipped]]:
    """Decode and hash every entry in the workers: the readable ones as records, in entry
    order, and the unreadable ones with the reason."""
    records: list[Record] = []
    unreadable: list[Skipped] = []
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
            unreadable.append(Skipped(entry.path, reason))
    return records, unreadable


def _classes(records: list[Record], raw: str) -> list[str]:
    """The sorted class names of the readable images; fewer than two is an error."""
    labels = sorted({r.label for r in records})
    if len(labels) < 2:
        raise StageError(
            f"found {len(labels)} class(es) ({', '.join(labels) or 'none'}) in {raw}: "
            "need at least two. Use class folders (<class>/<image>) or Kaggle names "
            "(<class>.<id>.jpg)."
        )
    return labels


def _write_split(pool: Pool, split: Split, labels: list[str], out_dir: Path) -> int:
    """Copy the selected images into out_dir/<split>/<class>/ by the workers, atomically;
    the bytes written."""
    names = destination_names([r for s in SPLITS for r in split.assigned[s]])
    with atomic_directory(out_dir) as staging:
        jobs = [
            (record.path, str(staging / split_name / names[record.path]))
            for split_name in SPLITS
            for record in split.assigned[split_name]
        ]
        for directory in {Path(d).parent for _, d in jobs}:
            directory.mkdir(parents=True, exist_ok=True)
        for split_name in SPLITS:  # every class folder exists in every split, even if empty
            for label in labels:
                (staging / split_name / label).mkdir(parents=True, exist_ok=True)
        return sum(
            tqdm(
                pool.imap_unordered(_copy, jobs, chunksize=64),
                total=len(jobs),
                desc="split: writing",
                unit="img",
            )
        )


def _report(
    raw: str,
    settings: SplitParams,
    listing: _Listing,
    records: list[Record],
    split: Split,
    labels: list[str],
    skipped: list[Skipped],
) -> dict[str, Any]:
    """The split report (data/split-report.json): the settings, what was found and kept, and
    every skipped file with the reason."""
    selected = sum(len(split.assigned[s]) for s in SPLITS)
    return {
        "dataset": Path(raw).name,
        "source": raw,
        "seed": settings.seed,
        "ratios": settings.ratios.model_dump(),
        "max_per_class": settings.max_per_class,
        "files_found": len(listing.all_files),
        "system_files_ignored": len(listing.system_files),
        "readable": len(records),
        "selected": selected,
        "not_selected_by_cap": len(records) - selected - len(split.left_out),
        "duplicate_groups": split.duplicate_groups,
        "classes": labels,
        "totals": {s: len(split.assigned[s]) for s in SPLITS},
        "counts": split.counts(),
        "skipped": [{"path": printable(s.path), "reason": s.reason} for s in skipped],
    }
