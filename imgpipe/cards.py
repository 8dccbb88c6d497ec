"""Model cards: what a trained model is, what it saw, how well it does (with 95 % intervals), per
class, and where not to use it, as Markdown from the evaluate stage's facts; its summary is the
registered version's description. Pure text: nothing here reads files or calls MLflow."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

DESCRIPTION_LIMIT = 5000  # characters MLflow keeps of a version's description (PostgreSQL)
SPLITS = ("train", "val", "test")
HEADLINE = ("accuracy", "loss", "precision", "recall", "f1", "roc_auc")
_NAMES_SHOWN = 20  # classes named in the summary before "and N more"


@dataclass(frozen=True)
class CardData:
    """The data a model saw: where from, its view, each split's images per class, hashes."""

    source: str  # params.yaml's data.raw
    view: str
    height: int
    width: int
    color: str
    class_names: list[str]
    counts: dict[str, list[int]]  # {"train" | "val" | "test": images per class}
    data_hash: str  # the train and val tables' digest: the train run's data_hash tag
    test_hash: str  # the test table's digest


@dataclass(frozen=True)
class ModelCard:
    """Everything a model card says, gathered by the evaluate stage."""

    model: str
    run_id: str
    data: CardData
    params: dict[str, Any]  # the params that shaped the model, by section
    metrics: dict[str, Any]  # metrics/<model>.json
    confusion: list[list[int]]  # test images [actual][predicted]
    training: dict[str, Any]  # history.json without the per-epoch history
    resamples: int  # evaluate.bootstrap
    seed: int  # what seeded the bootstrap (train.seed)

    def summary(self) -> str:
        """One paragraph: the model, its data, its test figures with intervals, its limits."""
        data, metrics = self.data, self.metrics
        names = _names(data.class_names)
        figures = ", ".join(
            f"{_LABELS[key]} {_with_interval(metrics, key)}"
            for key in ("accuracy", "f1", "roc_auc")
            if key in metrics
        )
        weakest, recall = self.weakest_class()
        return (
            f"{self.model} classifies {_view(data)} images into {len(data.class_names)} "
            f"classes ({names}). Trained on {sum(data.counts['train']):,} images (validated on "
            f"{sum(data.counts['val']):,}) from {data.source} (tables {data.data_hash}). On "
            f"{metrics['n_test']:,} test images: {figures} (95 % intervals). Weakest class: "
            f"{weakest} (recall {recall:.4f}). Not for images of other classes: it always "
            f"answers one of these. Full card: evaluation/card.md of MLflow run {self.run_id}."
        )

    def weakest_class(self) -> tuple[str, float]:
        """The class with the lowest test recall, and that recall."""
        per_class = self.metrics["per_class"]
        name = min(per_class, key=lambda c: (per_class[c]["recall"], c))
        return name, per_class[name]["recall"]

    def markdown(self) -> str:
        """The whole card."""
        sections = [
            f"# Model card: {self.model}\n\n{self.summary()}",
            self._data_section(),
            _params_section(self.params),
            _training_section(self.training),
            self._results_section(),
            _per_class_section(self.metrics["per_class"]),
            _confusion_section(self.data.class_names, self.confusion),
            self._limits_section(),
        ]
        return "\n\n".join(sections) + "\n"

    def _data_section(self) -> str:
        """Source, view, hashes and the images of each class in each split."""
        data = self.data
        rows = [
            [_cell(name), *(_share(data.counts[s], index) for s in SPLITS)]
            for index, name in enumerate(data.class_names)
        ]
        rows.append(["**total**", *(f"{sum(data.counts[s]):,}" for s in SPLITS)])
        return (
            "## Data\n\n"
            f"- Source: `{data.source}` (params.yaml `data.raw`)\n"
            f"- View: {_view(data)} (`{data.view}`): every image is resized to it\n"
            f"- Hashes: train and val tables `{data.data_hash}` (the MLflow run's `data_hash` "
            f"tag), test table `{data.test_hash}`\n\n" + _table(["class", *SPLITS], rows)
        )

    def _results_section(self) -> str:
        """The headline test figures with their intervals, and how they were computed."""
        metrics = self.metrics
        rows = [
            [_LABELS[key], f"{metrics[key]:.4f}", _interval_text(metrics.get(f"{key}_ci95"))]
            for key in HEADLINE
            if key in metrics
        ]
        two = len(self.data.class_names) == 2
        averaging = (
            f"class `{self.data.class_names[1]}` as the positive class"
            if two
            else "the macro average (every class weighs the same)"
        )
        return (
            f"## Test results ({metrics['n_test']:,} images)\n\n"
            + _table(["metric", "value", "95 % interval"], rows)
            + f"\n\nPrecision, recall and F1: {averaging}. Intervals: Wilson score intervals "
            "for proportions (accuracy; one class's precision and recall), percentile "
            f"bootstrap intervals over the test images ({self.resamples:,} resamples, seed "
            f"{self.seed}) for the rest. They cover the sampling of the test images, not the "
            "randomness of training."
        )

    def _limits_section(self) -> str:
        """Intended use and known limits, from the figures."""
        data, metrics = self.data, self.metrics
        weakest, recall = self.weakest_class()
        low, high = metrics["accuracy_ci95"]
        lines = [
            f"- Intended use: sorting {_view(data)} images like those of `{data.source}` into "
            f"{_names(data.class_names)}.",
            f"- Only these {len(data.class_names)} classes: there is no 'none of these' answer, "
            "so an image of anything else still gets one of them, often with a high probability.",
            f"- Expected accuracy on images drawn like the test set: {low:.4f} to {high:.4f} "
            "(95 %). Images from other sources (cameras, crops, lighting, sizes) were not "
            "measured and may score lower.",
            f"- Weakest class: {_cell(weakest)} (recall {recall:.4f}).{self._confusion_note()}",
            f"- Inputs are resized to {data.height}x{data.width}: detail finer than that is lost.",
            "- The probabilities are the model's outputs; their calibration was not checked.",
        ]
        if _imbalanced(data.counts["train"]):
            lines.append(
                "- The training images are unbalanced across classes (see Data): rarer classes "
                "may be recognised less often."
            )
        return "## Intended use and limits\n\n" + "\n".join(lines)

    def _confusion_note(self) -> str:
        """` The most frequent mistake: A taken for B (n of m).`, or nothing without mistakes."""
        names, matrix = self.data.class_names, self.confusion
        mistakes = [
            (count, actual, predicted)
            for actual, row in enumerate(matrix)
            for predicted, count in enumerate(row)
            if actual != predicted and count
        ]
        if not mistakes:
            return ""
        count, actual, predicted = max(mistakes)
        return (
            f" The most frequent mistake: {_cell(names[actual])} taken for "
            f"{_cell(names[predicted])} ({count} of {sum(matrix[actual])} test images)."
        )


_LABELS = {
    "accuracy": "accuracy",
    "loss": "loss (cross-entropy)",
    "precision": "precision",
    "recall": "recall",
    "f1": "F1",
    "roc_auc": "ROC AUC",
}


def description(summary: str, limit: int = DESCRIPTION_LIMIT) -> str:
    """The summary cut to at most `limit` characters (MLflow's bound), marked when cut."""
    if len(summary) <= limit:
        return summary
    return summary[: limit - 1].rstrip() + "…"


def _cell(text: object) -> str:
    """Text that stays inside one Markdown table cell and line."""
    return " ".join(str(text).split()).replace("\\", "\\\\").replace("|", "\\|")


def _names(class_names: Sequence[str]) -> str:
    """`cat, dog` or, for many classes, the first few and how many more."""
    shown = ", ".join(_cell(name) for name in class_names[:_NAMES_SHOWN])
    more = len(class_names) - _NAMES_SHOWN
    return f"{shown} and {more} more" if more > 0 else shown


def _view(data: CardData) -> str:
    """`64x64 rgb`."""
    return f"{data.height}x{data.width} {'RGB' if data.color == 'rgb' else data.color}"


def _interval_text(bounds: Sequence[float] | None) -> str:
    """`0.9102 – 0.9313`, or a dash where it is undefined."""
    return "–" if bounds is None else f"{bounds[0]:.4f} – {bounds[1]:.4f}"


def _with_interval(figures: Mapping[str, Any], key: str) -> str:
    """`0.9213 [0.9102, 0.9313]`."""
    bounds = figures.get(f"{key}_ci95")
    inside = "" if bounds is None else f" [{bounds[0]:.4f}, {bounds[1]:.4f}]"
    return f"{figures[key]:.4f}{inside}"


def _share(counts: Sequence[int], index: int) -> str:
    """`1,000 (50.0 %)`: a class's images in a split and their share of it."""
    total = sum(counts)
    percent = 100 * counts[index] / total if total else 0.0
    return f"{counts[index]:,} ({percent:.1f} %)"


def _imbalanced(counts: Sequence[int]) -> bool:
    """The largest class holds more than 1.5 times the images of the smallest."""
    return min(counts) == 0 or max(counts) > 1.5 * min(counts)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table, numbers right-aligned (every column after the first)."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * (len(header) - 1),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    return "\n".join(lines)


def _params_section(params: Mapping[str, Any]) -> str:
    """The params that shaped the model, as JSON by section."""
    body = json.dumps(params, indent=2, sort_keys=False, default=str)
    return f"## Params\n\n```json\n{body}\n```"


def _training_section(training: Mapping[str, Any]) -> str:
    """Training time, speed, size, choices and the machine."""
    lines = [
        f"- Time: {training['train_seconds']:,.1f} s ({training['train_images_per_second']:,.1f}"
        f" images/s), {training['parameters']:,} parameters",
    ]
    if training.get("resumed_from_epoch"):
        lines.append(f"- Resumed from epoch {training['resumed_from_epoch']} after a stop")
    choices = training.get("choices") or {}
    for key in ("precision", "devices"):
        if key in choices:
            reason = choices.get(f"{key}_reason")
            because = f" ({reason})" if reason else ""
            lines.append(f"- {key.capitalize()}: {choices[key]}{because}")
    lines.append(f"- Machine: {_machine_text(training.get('machine'))}")
    return "## Training\n\n" + "\n".join(lines)


def _machine_text(machine: Mapping[str, Any] | None) -> str:
    """`AMD EPYC, 2 cores, 23.5 GiB; CPU flags avx2, avx512f; no NVIDIA GPU`."""
    if not machine:
        return "not recorded (the model was trained before imgpipe recorded it)"
    flags = ", ".join(machine["cpu_flags"]) or "none of avx2, avx512f, avx512_bf16, amx_bf16"
    gpus = ", ".join(machine["gpus"]) or "no NVIDIA GPU"
    return (
        f"{machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB; "
        f"CPU flags {flags}; {gpus}"
    )


def _per_class_section(per_class: Mapping[str, Mapping[str, Any]]) -> str:
    """Each class's test images, precision, recall and F1 with their intervals."""
    rows = [
        [
            _cell(name),
            f"{row['support']:,}",
            *(_with_interval(row, key) for key in ("precision", "recall", "f1")),
        ]
        for name, row in per_class.items()
    ]
    header = ["class", "test images", "precision [95 %]", "recall [95 %]", "F1 [95 %]"]
    return "## Per class\n\n" + _table(header, rows)


def _confusion_section(class_names: Sequence[str], confusion: Sequence[Sequence[int]]) -> str:
    """The test confusion matrix: a row per actual class, a column per predicted class."""
    names = [_cell(name) for name in class_names]
    rows = [
        [f"**{name}**", *(f"{count:,}" for count in row)]
        for name, row in zip(names, confusion, strict=True)
    ]
    return (
        "## Confusion matrix\n\nTest images; rows: the actual class, columns: the predicted "
        "class.\n\n" + _table(["actual \\ predicted", *names], rows)
    )
