"""dvc.yaml's deps and params cannot go stale: every project module a stage's code imports
(transitively) and every params section it reads is declared, so that `dvc repro` reruns the
stage when either changes. And `plots:` covers every model under `models:`.

How a stage's code is found: its `cmd` runs `python -m stages.<name>`; from there every
`import imgpipe...` / `from imgpipe... import` (also inside functions, where the slow imports
are deferred; not under `if TYPE_CHECKING:`, which never runs) is followed. A stage made per
model (`foreach: ${models}`) also runs that model's type, which the registry imports by name
(imgpipe/registry.py): imgpipe/models/<model>.py and what it imports. A params section is read
where the code says `params.<section>`, `params.model_section(...)` (the model's own section)
or `params.view_of(...)` (views and models).
"""

from __future__ import annotations

import ast
import copy
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest
import yaml

from imgpipe.checkpoints import NOT_MODEL_SHAPING
from imgpipe.registry import module_file
from tests.support import ROOT

# Modules that shape no stage output, so that editing them does not retrain every model. They
# are not required in deps and their imports are not followed.
NOT_OUTPUT_SHAPING = {
    "imgpipe/params.py": "validates params.yaml and builds the typed config; values come from "
    "params.yaml, which DVC tracks key by key",
    "imgpipe/runtime.py": "logging set-up, error reporting and atomic writes: how outputs are "
    "written, never what they hold",
    "imgpipe/stall.py": "the stall watchdog: it ends a run that has stopped, never changes what "
    "a finished one holds",
    "imgpipe/tracking/connection.py": "decides where runs are logged (tracking URI, local "
    "fallback) and checks the server and the login before any work: it never shapes a model, a "
    "metric or a plot. Its one trace in an output is the tracking URI that mlflow_run.json "
    "records beside the run id: where the run was logged, as new on every run as the id",
}


def _module_path(name: str) -> str | None:
    """imgpipe.models.cnn -> imgpipe/models/cnn.py (or the package's __init__.py), if ours."""
    if not name.startswith(("imgpipe", "stages")):
        return None
    base = ROOT / Path(*name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py").relative_to(ROOT).as_posix()
    if (base / "__init__.py").is_file():
        return (base / "__init__.py").relative_to(ROOT).as_posix()
    return None


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node of a module, except the bodies of `if TYPE_CHECKING:` blocks."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in ast.walk(child))
            continue
        yield node
        yield from _runtime_nodes(node)


@cache
def _parsed(path: str) -> ast.Module:
    return ast.parse((ROOT / path).read_text(encoding="utf-8"))


def imported_modules(path: str) -> set[str]:
    """The project modules that one module imports when it runs."""
    found: set[str] = set()
    for node in _runtime_nodes(_parsed(path)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from imgpipe.tracking import runs` imports the module imgpipe.tracking.runs
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        for name in names:
            module = _module_path(name)
            if module is not None and module != path:
                found.add(module)
    return found - {"imgpipe/__init__.py", "stages/__init__.py", "imgpipe/models/__init__.py"}


def module_closure(start: str) -> set[str]:
    """start and every project module it imports, transitively; NOT_OUTPUT_SHAPING are neither
    listed nor followed."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        path = todo.pop()
        if path in seen or path in NOT_OUTPUT_SHAPING:
            continue
        seen.add(path)
        todo.extend(imported_modules(path))
    return seen


def params_read(path: str, model: str | None) -> set[str]:
    """The params sections (top-level params.yaml keys) that one module reads."""
    sections = set(_params_yaml())
    read: set[str] = set()
    for node in _runtime_nodes(_parsed(path)):
        if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)):
            continue
        if node.value.id != "params":
            continue
        if node.attr in sections:
            read.add(node.attr)
        elif node.attr == "model_section":
            assert model is not None, f"{path} reads a model's section outside a model stage"
            read.add(model)
        elif node.attr == "view_of":
            read |= {"views", "models"}
    return read


@cache
def _params_yaml() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))


def _dvc_yaml() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))


def expanded_stages(dvc: dict) -> dict[str, tuple[dict, str | None]]:
    """stage name -> (its definition with ${key}/${item} filled in, its model or None)."""
    models = _params_yaml()["models"]
    stages: dict[str, tuple[dict, str | None]] = {}
    for name, stage in dvc["stages"].items():
        if "foreach" not in stage:
            stages[name] = (stage, None)
            continue
        assert stage["foreach"] == "${models}", f"{name}: foreach over something else"
        for key, item in models.items():
            text = yaml.safe_dump(stage["do"])
            text = text.replace("${key}", key).replace("${item}", item)
            stages[f"{name}@{key}"] = (yaml.safe_load(text), key)
    return stages


def missing_declarations(dvc: dict) -> list[str]:
    """Every module or params section a stage uses but dvc.yaml does not declare."""
    problems: list[str] = []
    for name, (stage, model) in expanded_stages(dvc).items():
        match = re.search(r"python -m (stages\.\w+)", stage["cmd"])
        assert match, f"{name}: cmd does not run a stages module"
        modules = module_closure(_module_path(match[1]) or "")
        if model is not None and "imgpipe/registry.py" in modules:
            modules |= module_closure(module_file(model).as_posix())
        deps = {str(dep) for dep in stage.get("deps", [])}
        problems += [f"{name}: deps lack {m}" for m in sorted(modules - deps)]
        declared = [str(p) for p in stage.get("params", [])]
        read = set().union(*(params_read(m, model) for m in modules))
        for section in sorted(read):
            if not any(d == section or d.startswith(f"{section}.") for d in declared):
                problems.append(f"{name}: params lack {section}")
    return problems


def test_every_stage_declares_the_modules_and_params_its_code_uses() -> None:
    problems = missing_declarations(_dvc_yaml())
    assert not problems, "dvc.yaml is missing:\n" + "\n".join(problems)


def test_the_check_fails_when_a_module_or_a_params_section_is_removed() -> None:
    dvc = _dvc_yaml()
    without_tables = copy.deepcopy(dvc)
    without_tables["stages"]["train"]["do"]["deps"].remove("imgpipe/tables.py")
    assert [p for p in missing_declarations(without_tables) if "tables.py" in p] == [
        f"train@{model}: deps lack imgpipe/tables.py" for model in _params_yaml()["models"]
    ]
    without_model = copy.deepcopy(dvc)
    without_model["stages"]["evaluate"]["do"]["deps"].remove("imgpipe/models/${key}.py")
    assert "evaluate@numpy_mlp: deps lack imgpipe/models/numpy_mlp.py" in missing_declarations(
        without_model
    )
    without_tracking = copy.deepcopy(dvc)
    without_tracking["stages"]["evaluate"]["do"]["params"].remove("tracking")
    assert "evaluate@cnn: params lack tracking" in missing_declarations(without_tracking)


def test_the_check_sees_deferred_imports_and_skips_type_checking_ones() -> None:
    training = imported_modules("imgpipe/training.py")
    assert "imgpipe/tracking/runs.py" in training  # imported inside a function
    assert "imgpipe/params.py" not in training  # only under TYPE_CHECKING


def test_not_output_shaping_modules_exist() -> None:
    for path in NOT_OUTPUT_SHAPING:
        assert (ROOT / path).is_file(), path


def test_the_checkpoint_digest_leaves_out_exactly_these_modules() -> None:
    """A checkpoint's code digest covers what train@<model>'s deps cover: one list of the
    modules left out (imgpipe/checkpoints.py), the reasons for each here."""
    assert set(NOT_OUTPUT_SHAPING) == NOT_MODEL_SHAPING


def _plotted_models(plot: dict | str) -> set[str]:
    if isinstance(plot, str):
        return {Path(plot).parent.name}
    (definition,) = plot.values()
    return {Path(path).parent.name for path in definition["y"]}


def test_plots_cover_exactly_the_models_under_models() -> None:
    models = set(_params_yaml()["models"])
    plots = _dvc_yaml()["plots"]
    for plot in plots:
        if isinstance(plot, dict):
            assert _plotted_models(plot) == models, plot
    grids = {Path(p).parent.name for p in plots if isinstance(p, str)}
    assert grids == models


@pytest.mark.parametrize("model", sorted(_params_yaml()["models"]))
def test_every_listed_model_has_a_module_and_a_params_section(model: str) -> None:
    assert (ROOT / module_file(model)).is_file()
    assert model in _params_yaml()
