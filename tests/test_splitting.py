"""Tests for the stratified, seeded, duplicate-aware train/val/test split on in-memory records."""

from __future__ import annotations

import hashlib
import random
from collections import Counter

import pytest

from imgpipe.splitting import SPLITS, Record, Split, split_dataset

DEFAULT_RATIOS = {"train": 0.8, "val": 0.1, "test": 0.1}


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _records(per_class: dict[str, int], prefix: str = "") -> list[Record]:
    """Records with unique content: n per class."""
    return [
        Record(f"{label}/{prefix}{index:04d}.jpg", label, _digest(f"{label}/{prefix}{index}"))
        for label, count in per_class.items()
        for index in range(count)
    ]


def _split(records: list[Record], **overrides: object) -> Split:
    options: dict = {"ratios": DEFAULT_RATIOS, "seed": 0, "max_per_class": None}
    options.update(overrides)
    return split_dataset(records, **options)


def _where(split: Split) -> dict[str, str]:
    """Record path -> split name; fails if a record is assigned twice."""
    where: dict[str, str] = {}
    for split_name in SPLITS:
        for record in split.assigned[split_name]:
            assert record.path not in where, f"{record.path} assigned twice"
            where[record.path] = split_name
    return where


def _paths(split: Split) -> dict[str, list[str]]:
    return {name: sorted(r.path for r in split.assigned[name]) for name in SPLITS}


@pytest.mark.parametrize(
    "ratios",
    [
        DEFAULT_RATIOS,
        {"train": 0.6, "val": 0.2, "test": 0.2},
        {"train": 0.5, "val": 0.3, "test": 0.2},
        {"train": 0.7, "val": 0.0, "test": 0.3},
    ],
)
def test_each_class_is_split_by_the_ratios(ratios: dict[str, float]) -> None:
    per_class = {"cat": 50, "dog": 23, "fox": 10, "owl": 101}
    split = _split(_records(per_class), ratios=ratios)
    counts = split.counts()
    for label, total in per_class.items():
        in_class = {name: counts[name].get(label, 0) for name in SPLITS}
        assert sum(in_class.values()) == total
        for name in SPLITS:
            # within rounding: val and test are rounded, train takes the rest
            assert abs(in_class[name] - total * ratios[name]) <= 1, (label, name, in_class)
    if ratios["val"] == 0:
        assert split.assigned["val"] == []


def test_every_record_is_assigned_exactly_once() -> None:
    records = _records({"a": 37, "b": 12, "c": 3, "d": 1})
    split = _split(records)
    where = _where(split)
    assert set(where) == {r.path for r in records}
    assert split.left_out == []
    assert sum(len(split.assigned[name]) for name in SPLITS) == len(records)


def test_records_keep_their_class() -> None:
    records = _records({"a": 20, "b": 20})
    split = _split(records)
    label_of = {r.path: r.label for r in records}
    for name in SPLITS:
        assert all(label_of[r.path] == r.label for r in split.assigned[name])


def test_small_classes_get_one_image_per_split_when_they_can() -> None:
    split = _split(_records({"three": 3, "one": 1}))
    counts = split.counts()
    assert all(counts[name].get("three") == 1 for name in SPLITS)
    assert counts["train"].get("one") == 1  # a lone image goes to train, never only to test


def test_same_seed_gives_the_same_split() -> None:
    records = _records({"a": 40, "b": 30})
    assert _paths(_split(records, seed=7)) == _paths(_split(records, seed=7))


def test_different_seed_gives_a_different_split() -> None:
    records = _records({"a": 40, "b": 30})
    first, second = _paths(_split(records, seed=7)), _paths(_split(records, seed=8))
    assert first["test"] != second["test"]
    # ... with the same sizes
    assert {k: len(v) for k, v in first.items()} == {k: len(v) for k, v in second.items()}


def test_input_order_does_not_matter() -> None:
    records = _records({"a": 40, "b": 30})
    shuffled = records[:]
    random.Random(3).shuffle(shuffled)
    assert _paths(_split(records, seed=1)) == _paths(_split(shuffled, seed=1))


def test_renaming_files_does_not_move_them() -> None:
    records = _records({"a": 40, "b": 30})
    renamed = [
        Record(f"renamed/{r.label}/{i}.png", r.label, r.digest) for i, r in enumerate(records)
    ]
    by_digest = {r.digest: n for n, recs in _split(records).assigned.items() for r in recs}
    by_digest_renamed = {r.digest: n for n, recs in _split(renamed).assigned.items() for r in recs}
    assert by_digest == by_digest_renamed


def test_adding_an_unrelated_file_moves_few_others() -> None:
    records = _records({"a": 100, "b": 60})
    before = _where(_split(records))
    extra = Record("a/new.jpg", "a", _digest("a brand-new image"))
    after = _where(_split([*records, extra]))
    moved = [path for path, split_name in before.items() if after[path] != split_name]
    assert len(moved) <= 2  # at most one record crosses each boundary
    assert not [path for path in moved if path.startswith("b/")]  # other classes untouched


def test_byte_identical_duplicates_stay_in_one_split() -> None:
    records = _records({"a": 30, "b": 30})
    for group in range(6):  # six groups of three identical files in class a
        digest = _digest(f"duplicate {group}")
        records += [Record(f"a/dup{group}_{copy}.jpg", "a", digest) for copy in range(3)]
    for seed in range(5):
        split = _split(records, seed=seed)
        where = _where(split)
        assert len(where) == len(records)
        for group in range(6):
            homes = {where[f"a/dup{group}_{copy}.jpg"] for copy in range(3)}
            assert len(homes) == 1, (seed, group, homes)
        assert split.duplicate_groups == 6


def test_identical_bytes_under_two_classes_are_left_out() -> None:
    records = _records({"cat": 10, "dog": 10})
    shared = _digest("the same picture")
    conflicting = [Record("cat/x.jpg", "cat", shared), Record("dog/x.jpg", "dog", shared)]
    split = _split([*records, *conflicting])
    assert {item.path for item in split.left_out} == {"cat/x.jpg", "dog/x.jpg"}
    for item in split.left_out:
        assert "cat" in item.reason and "dog" in item.reason
    where = _where(split)
    assert "cat/x.jpg" not in where and "dog/x.jpg" not in where
    assert len(where) + len(split.left_out) == len(records) + len(conflicting)


@pytest.mark.parametrize("cap", [1, 5, 12, 1000])
def test_max_per_class_caps_each_class(cap: int) -> None:
    per_class = {"a": 30, "b": 12, "c": 4}
    split = _split(_records(per_class), max_per_class=cap)
    counts = split.counts()
    for label, total in per_class.items():
        assert sum(counts[name].get(label, 0) for name in SPLITS) == min(cap, total)


def test_max_per_class_caps_classes_with_duplicates() -> None:
    records = []
    for group in range(10):  # class a: ten pairs of identical files
        digest = _digest(f"pair {group}")
        records += [Record(f"a/{group}_{copy}.jpg", "a", digest) for copy in range(2)]
    records += _records({"b": 10})
    for cap in (1, 3, 5, 7):
        for seed in range(4):
            counts = _split(records, max_per_class=cap, seed=seed).counts()
            kept_a = sum(counts[name].get("a", 0) for name in SPLITS)
            assert kept_a <= cap, (cap, seed, kept_a)
            assert kept_a >= cap - 1  # whole pairs only, but no fewer than the cap allows


def test_max_per_class_subset_is_stable_as_the_cap_grows() -> None:
    records = _records({"a": 40, "b": 40})
    small = set(_where(_split(records, max_per_class=10)))
    large = set(_where(_split(records, max_per_class=20)))
    assert small <= large  # a bigger cap adds images; it does not swap the subset


def test_counts_agree_with_assignments() -> None:
    split = _split(_records({"a": 17, "b": 9}))
    counts = split.counts()
    for name in SPLITS:
        assert Counter(r.label for r in split.assigned[name]) == Counter(counts[name])


def test_no_records_gives_an_empty_split() -> None:
    split = _split([])
    assert all(split.assigned[name] == [] for name in SPLITS)
    assert split.left_out == []
