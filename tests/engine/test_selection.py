"""Model selection on validation data."""

from __future__ import annotations

import dataclasses

import fedmae.engine.finetune as finetuning
from tests.tiny import tiny_config


def test_a_tie_on_validation_keeps_the_later_epoch(tmp_path, monkeypatch):
    # A small validation set saturates (AUC 1.0 from the first epoch on); the choice must not
    # freeze at the first, least-trained epoch that reached it.
    real = finetuning.loader_metrics

    def saturated(*args, **kwargs):
        result = real(*args, **kwargs)
        return dataclasses.replace(result, values={**result.values, result.main: 1.0})

    monkeypatch.setattr(finetuning, "loader_metrics", saturated)
    result = finetuning.finetune(tiny_config(2, finetune={"epochs": 3, "warmup_epochs": 1}), tmp_path / "ft")
    assert result.metrics["selected_epoch"] == 3
