"""Stratified, seeded train/val/test split that keeps byte-identical duplicates together."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from imgpipe.images import Skipped

SPLITS = ("train", "val", "test")


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
