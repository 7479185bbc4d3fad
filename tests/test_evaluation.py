"""Metrics on predictions whose scores are known."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedmae.data.datasets import TaskSpec
from fedmae.evaluation import evaluate

CPU = torch.device("cpu")


class Fixed(nn.Module):
    """Returns stored outputs in order, ignoring its input (a stand-in for a trained model)."""

    def __init__(self, outputs: torch.Tensor):
        super().__init__()
        self.outputs, self.cursor = outputs, 0

    def forward(self, x):
        out = self.outputs[self.cursor : self.cursor + x.shape[0]]
        self.cursor += x.shape[0]
        return out


def batches(images, labels, size=2):
    return [{"image": images[i : i + size], "label": labels[i : i + size]} for i in range(0, len(images), size)]


def test_multilabel_auc_per_class_and_mean():
    labels = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]], dtype=torch.float32)
    logits = torch.tensor([[3.0, 1.0], [-3.0, 0.0], [2.0, -1.0], [-2.0, -0.5]])  # class a perfect; class b AUC 0.25
    task = TaskSpec("classification", True, ("a", "b"))
    result = evaluate(Fixed(logits), batches(torch.zeros(4, 1, 8, 8), labels), task, CPU, (8, 8))
    assert result.main == "mean_auc"
    assert result.per_class["auc"] == {"a": 1.0, "b": 0.25}
    assert result.values["mean_auc"] == pytest.approx(0.625)


def test_auc_undefined_for_a_class_with_one_label_value():
    labels = torch.tensor([[1, 0], [0, 0]], dtype=torch.float32)
    task = TaskSpec("classification", True, ("a", "b"))
    result = evaluate(Fixed(torch.tensor([[1.0, 0.0], [0.0, 1.0]])), batches(torch.zeros(2, 1, 8, 8), labels), task, CPU, (8, 8))
    assert result.per_class["auc"]["b"] is None and result.values["mean_auc"] == 1.0


def test_multiclass_accuracy_and_recall():
    labels = torch.tensor([0, 1, 2, 2])
    logits = torch.nn.functional.one_hot(torch.tensor([0, 2, 2, 2]), 3).float()
    task = TaskSpec("classification", False, ("none", "x", "y"))
    result = evaluate(Fixed(logits), batches(torch.zeros(4, 1, 8, 8), labels), task, CPU, (8, 8))
    assert result.values["accuracy"] == 0.75
    assert result.per_class["recall"] == {"none": 1.0, "x": 0.0, "y": 1.0}


class Oracle(nn.Module):
    """Segments by reading the class map planted in the image (channel 0), one window at a time."""

    def __init__(self, classes: int):
        super().__init__()
        self.classes = classes

    def forward(self, x):
        return torch.nn.functional.one_hot(x[:, 0].long(), self.classes).movedim(-1, 1).float() * 10


@pytest.mark.parametrize("dims", [2, 3])
def test_sliding_window_dice_is_one_for_perfect_segmentation_of_larger_images(dims):
    size = (24, 20) if dims == 2 else (24, 20, 12)
    label = torch.zeros(1, 1, *size, dtype=torch.long)
    label[(0, 0, slice(2, 10), slice(3, 15))] = 1
    label[(0, 0, slice(12, 20), slice(0, 6))] = 2
    task = TaskSpec("segmentation", False, ("background", "a", "b"))
    roi = (8,) * dims  # smaller than the image: the sliding window has to cover it
    result = evaluate(Oracle(3), batches(label.float(), label), task, CPU, roi, overlap=0.5, hd95=True)
    assert result.per_class["dice"] == {"a": pytest.approx(1.0), "b": pytest.approx(1.0)}
    assert result.per_class["hd95"] == {"a": 0.0, "b": 0.0}


def test_dice_of_half_overlap():
    label = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    label[0, 0, :4] = 1  # 32 pixels
    image = torch.zeros(1, 1, 8, 8)
    image[0, 0, 2:6] = 1  # predicts 32 pixels, 16 of them right: Dice 0.5
    task = TaskSpec("segmentation", False, ("background", "a"))
    result = evaluate(Oracle(2), batches(image, label), task, CPU, (8, 8))
    assert result.values["mean_dice"] == pytest.approx(0.5)
