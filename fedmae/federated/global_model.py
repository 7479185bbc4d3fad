"""The server's side in plain PyTorch: the initial global weights, and the global checkpoints.

Every ``federated.checkpoint_every``-th round's global model (and the last round's) is written
atomically with the config, phase and round number (``<phase>_round_NNNN.pt``, the newest ``keep``
of them) and as ``<phase>_last.pt``; a stopped run resumes from ``<phase>_last.pt`` with the right
round numbers. Fine-tuning also keeps the model that scored best on the sites' validation data
as ``finetune_best.pt``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fedmae.checkpoint import link_checkpoint, load_checkpoint, remove_checkpoint, save_checkpoint
from fedmae.config import ExperimentConfig
from fedmae.engine.loop import seed_everything
from fedmae.models.factory import build_finetune_model, build_mae
from fedmae.models.state import ENCODER_PREFIX, encoder_entries, load_encoder_entries


def initial_encoder(cfg: ExperimentConfig) -> dict[str, torch.Tensor]:
    """The seeded MAE's encoder (``encoder.*`` keys): what centralised pre-training starts from."""
    seed_everything(cfg.seed)
    model = build_mae(cfg)
    return encoder_entries(model.state_dict())


def initial_finetune_model(cfg: ExperimentConfig, num_outputs: int, encoder: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fine-tune model as a site would build it (same seed), with the global encoder loaded."""
    seed_everything(cfg.seed)
    model = build_finetune_model(cfg, num_outputs)
    load_encoder_entries(model, encoder)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def frozen_keys(cfg: ExperimentConfig, phase: str) -> list[str]:
    """Names of the averaged tensors that training never changes (the fixed sin-cos position
    embedding): differential-privacy noise must not accumulate in them. (Which parameters are
    frozen does not depend on the number of task outputs.)"""
    if phase == "pretrain":
        model = build_mae(cfg)
        return [name for name, p in model.named_parameters() if not p.requires_grad and name.startswith(ENCODER_PREFIX)]
    model = build_finetune_model(cfg, 2)
    return [name for name, p in model.named_parameters() if not p.requires_grad]


class GlobalCheckpoints:
    def __init__(self, folder: str | Path, cfg: ExperimentConfig, keep: int = 3):
        self.folder, self.cfg, self.keep = Path(folder), cfg, keep

    def last(self, phase: str) -> Path:
        return self.folder / f"{phase}_last.pt"

    def best(self, phase: str) -> Path:
        return self.folder / f"{phase}_best.pt"

    def save(self, phase: str, server_round: int, state: dict[str, torch.Tensor], metrics: dict[str, Any],
             best: bool = False) -> Path:
        """This round's global model: a per-round file (newest ``keep`` kept), the last, and the best
        when ``best``. The weights are written once; the last and the best are links to that file."""
        path = self._write(self.folder / f"{phase}_round_{server_round:04d}.pt", phase, server_round, state, metrics)
        link_checkpoint(path, self.last(phase))
        if best:
            link_checkpoint(path, self.best(phase))
        if self.keep > 0:
            for old in sorted(self.folder.glob(f"{phase}_round_*.pt"))[: -self.keep]:
                remove_checkpoint(old)
        return path

    def save_best(self, phase: str, server_round: int, state: dict[str, torch.Tensor], metrics: dict[str, Any]) -> Path:
        """Only the best model, of a round that is not checkpointed (``federated.checkpoint_every``)."""
        return self._write(self.best(phase), phase, server_round, state, metrics)

    def _write(self, path: Path, phase: str, server_round: int, state: dict[str, torch.Tensor],
               metrics: dict[str, Any]) -> Path:
        return save_checkpoint(path, kind="global", model_state=state, config=self.cfg.to_dict(), epoch=server_round,
                               step=server_round, metrics=metrics, extra={"phase": phase, "round": server_round})

    def resume_point(self, phase: str) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]] | None:
        """(round, global state, metrics) of the last saved round of ``phase``, if any."""
        if not self.last(phase).is_file():
            return None
        payload = load_checkpoint(self.last(phase), expect_kind="global")
        return payload["extra"]["round"], payload["model"], payload["metrics"]
