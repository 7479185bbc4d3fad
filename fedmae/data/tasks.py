"""What fine-tuning predicts: outputs, their names, and how a case's annotation becomes a target."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedmae.data.catalog import Case, Catalog

if TYPE_CHECKING:
    from fedmae.config import ExperimentConfig


@dataclass(frozen=True)
class TaskSpec:
    """The fine-tune model's outputs and how targets are encoded."""

    type: str  # classification | segmentation
    multi_label: bool  # sigmoid outputs (else softmax over exclusive classes)
    class_names: tuple[str, ...]  # one per output
    exclusive_source: bool = False  # classification: the source's classes are one-hot already
    seg_classes: tuple[str, ...] = ()  # segmentation: the label map's values, 0 = background
    channel_values: tuple[tuple[int, ...], ...] = ()  # sigmoid segmentation: label values per output channel
    finding_columns: tuple[int, ...] | None = None  # classification: which of the data's findings are predicted

    @property
    def num_outputs(self) -> int:
        return len(self.class_names)


def resolve_task(cfg: ExperimentConfig, catalog: Catalog) -> TaskSpec | str:
    """The task for these data, or a one-line reason why the data cannot be fine-tuned on."""
    t = cfg.task
    if t.type == "classification":
        findings = catalog.findings
        if not findings:
            return f"{catalog.root}: the {catalog.source} data have no classification labels; set task.type: segmentation"
        if t.class_names is not None:
            if len(t.class_names) != len(findings):
                return f"task.class_names: {len(t.class_names)} names for {len(findings)} classes in {catalog.root}"
            findings = tuple(t.class_names)
        columns = None
        if t.findings is not None:
            unknown = [name for name in t.findings if name not in findings]
            if unknown:
                return f"task.findings: {unknown[0]!r} is not one of the data's findings {list(findings)}"
            if catalog.exclusive:
                return "task.findings: the data's classes are exclusive (multi-class); a subset would leave cases without a class"
            columns = tuple(findings.index(name) for name in t.findings)
            findings = tuple(t.findings)
        multi_label = not catalog.exclusive if t.multi_label is None else t.multi_label
        if multi_label or catalog.exclusive:
            names = findings
        else:
            names = ("no_finding", *findings)  # multi-class from multi-label findings: the first one present
        return TaskSpec("classification", multi_label, names, exclusive_source=catalog.exclusive, finding_columns=columns)

    classes = tuple(t.class_names) if t.class_names is not None else catalog.seg_classes
    if not classes:
        return f"task.class_names: name the segmentation classes of {catalog.root} (background first)"
    if not any(c.label is not None for c in catalog.cases) and catalog.cases:
        return f"{catalog.root}: no case has a label map; segmentation needs some"
    if t.regions is not None:
        too_high = [v for values in t.regions.values() for v in values if v >= len(classes)]
        if too_high:
            return f"task.regions: label value {too_high[0]} is not among the {len(classes)} classes {list(classes)}"
        return TaskSpec("segmentation", True, tuple(t.regions), seg_classes=classes,
                        channel_values=tuple(tuple(v) for v in t.regions.values()))
    if cfg.multi_label:
        return TaskSpec("segmentation", True, classes[1:], seg_classes=classes,
                        channel_values=tuple((v,) for v in range(1, len(classes))))
    return TaskSpec("segmentation", False, classes, seg_classes=classes)


def target_of(case: Case, task: TaskSpec) -> np.ndarray | str:
    """The fine-tuning target of one case as it enters the data pipeline.

    classification, multi-label: (K,) float 0/1; multi-class: () int64 class index (for
    multi-label findings, the first finding present, 1..K, or 0 for none). Segmentation: the label
    map, (1, *S) int64 in memory or its file path; :func:`label_to_channels` makes sigmoid targets
    after cropping.
    """
    if task.type == "classification":
        if case.findings is None:
            raise ValueError(f"case {case.case_id} has no findings, needed for classification")
        findings = np.asarray(case.findings, dtype=np.float32)
        if task.finding_columns is not None:
            findings = findings[list(task.finding_columns)]
        if task.multi_label:
            return findings
        positive = np.flatnonzero(findings > 0.5)
        if task.exclusive_source:
            return np.asarray(positive[0] if positive.size else 0, dtype=np.int64)
        return np.asarray(positive[0] + 1 if positive.size else 0, dtype=np.int64)
    if case.label is None:
        raise ValueError(f"case {case.case_id} has no label map, needed for segmentation")
    if isinstance(case.label, str):
        return case.label
    return np.asarray(case.label, dtype=np.int64)[None]


def label_to_channels(task: TaskSpec):
    """A function mapping a (1, *S) class map to the target the loss expects."""
    if not task.channel_values:
        return lambda label: torch.as_tensor(label).long()

    def channels(label: torch.Tensor) -> torch.Tensor:
        label = torch.as_tensor(label).round().long()[0]
        return torch.stack([torch.isin(label, torch.tensor(values)).float() for values in task.channel_values])

    return channels
