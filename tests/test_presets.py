"""The presets of docs/presets.md are valid `dvc exp run -S` values, and the reference CNN preset is
the one benchmarks/train_speed.py times as E_ref."""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from typing import Any

import yaml

from imgpipe.params import parse_params
from tests.support import ROOT


def documented_presets() -> dict[str, list[str]]:
    """Each `dvc exp run` command of docs/presets.md's bash blocks, by its comment, as -S values."""
    text = (ROOT / "docs" / "presets.md").read_text(encoding="utf-8")
    blocks = [part.split("```", 1)[0] for part in text.split("```bash")[1:]]
    presets: dict[str, list[str]] = {}
    comment = ""
    for command in "\n".join(blocks).replace("\\\n", " ").splitlines():
        if command.startswith("#"):
            comment = command.lstrip("# ")
        elif command.startswith("dvc exp run"):
            words = shlex.split(command)
            presets[comment] = [words[i + 1] for i, word in enumerate(words) if word == "-S"]
    return presets


def apply(values: list[str]) -> dict[str, Any]:
    """The repository's params.yaml with `-S key=value` values set, as DVC sets them."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    for value in values:
        dotted, _, text = value.partition("=")
        adding = dotted.startswith("+")  # Hydra's syntax, which DVC uses: a key params.yaml lacks
        *parents, key = dotted.removeprefix("+").split(".")
        section = params
        for parent in parents:
            section = section.setdefault(parent, {}) if adding else section[parent]
        assert adding or key in section, f"{dotted} is not in params.yaml: write +{dotted}"
        section[key] = yaml.safe_load(text)
    return params


def test_every_preset_is_valid() -> None:
    presets = documented_presets()
    assert len(presets) >= 4
    for comment, values in presets.items():
        assert values, comment
        parse_params(apply(values))  # raises ParamsError naming the key


def test_the_reference_preset_is_what_the_benchmark_times() -> None:
    spec = importlib.util.spec_from_file_location(
        "train_speed", ROOT / "benchmarks" / "train_speed.py"
    )
    assert spec is not None and spec.loader is not None
    train_speed = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = train_speed  # (its dataclasses look their module up)
    try:
        spec.loader.exec_module(train_speed)
    finally:
        del sys.modules[spec.name]
    (reference,) = [v for c, v in documented_presets().items() if re.search(r"reference CNN", c)]
    params = parse_params(apply(reference))
    cnn = params.cnn.model_dump()
    assert {key: cnn[key] for key in train_speed.REFERENCE} == train_speed.REFERENCE
    view = params.views[params.models["cnn"]]  # what train_speed.py tabulates for it
    assert (view.height, view.width, view.color) == (64, 64, "rgb")


def test_the_dense_tutorial_preset_is_the_tutorials_optimizer() -> None:
    """Adamax at 0.001 with exponential decay and no weight decay, whatever the defaults are."""
    (values,) = [v for c, v in documented_presets().items() if c.startswith("the dense tutorial")]
    params = parse_params(apply(values))
    dense, twin = params.dense, params.numpy_mlp
    assert (dense.optimizer, dense.learning_rate, dense.weight_decay) == ("adamax", 0.001, 0.0)
    assert (twin.optimizer, twin.learning_rate, twin.weight_decay) == ("adam", 0.001, 0.0)
    assert dense.schedule == twin.schedule == "exponential"
    assert dense.flip == twin.flip == "none"
    assert params.models["dense"] == params.models["numpy_mlp"] == "gray96"
