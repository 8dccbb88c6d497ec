"""The benchmarks share one harness: the targets check lives there alone, and no benchmark
imports another."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from benchmarks import harness
from tests.support import ROOT

BENCHMARKS = ROOT / "benchmarks"


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (`from benchmarks import harness` counts as
    benchmarks.harness)."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


def test_only_the_harness_defines_the_targets_check() -> None:
    defining = sorted(
        path.name
        for path in BENCHMARKS.glob("*.py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.FunctionDef) and node.name == "check"
    )
    assert defining == ["harness.py"]


def test_no_benchmark_imports_another_but_the_harness() -> None:
    names = {path.stem for path in BENCHMARKS.glob("*.py")}
    for path in BENCHMARKS.glob("*.py"):
        imported = _imported_modules(path)
        others = {name for name in names - {"harness"} if {name, f"benchmarks.{name}"} & imported}
        assert not others, f"{path.name} imports {sorted(others)}"


def test_targets_print_each_check_and_end_with_the_count_and_exit_status(
    capsys: pytest.CaptureFixture[str],
) -> None:
    targets = harness.Targets()
    targets.check("fast enough", True, "3.0x")
    targets.info("beside the targets")
    targets.check("small enough", False, "2 GB")
    assert targets.summary() == 1
    assert capsys.readouterr().out.splitlines() == [
        "  [met] fast enough: 3.0x",
        "  [info] beside the targets",
        "  [MISSED] small enough: 2 GB",
        "1 of 2 targets met",
    ]
    met = harness.Targets()
    met.check("fast enough", True, "3.0x")
    capsys.readouterr()
    assert met.summary(repeat=True) == 0
    assert capsys.readouterr().out.splitlines() == [
        "  [met] fast enough: 3.0x",
        "1 of 1 targets met",
    ]


def test_print_table_pads_a_markdown_table(capsys: pytest.CaptureFixture[str]) -> None:
    harness.print_table(("step", "wall s"), [["split", "3.25"], ["tabulate stage", "10.50"]])
    assert capsys.readouterr().out.splitlines() == [
        "| step           | wall s |",
        "|----------------|--------|",
        "| split          |   3.25 |",
        "| tabulate stage |  10.50 |",
    ]
