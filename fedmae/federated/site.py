"""One site's part of a federated run, in plain PyTorch: a round of local training on the site's
own data, starting from the global weights, and evaluation on its own validation / test cases.

Pre-training sends and receives only the encoder; the MAE decoder, the mask token, the optimiser
state and the step counter stay at the site, on its disk (``state_dir``), so they survive a
restarted run. (Only those: every round starts by loading the server's weights over the rest,
so a fine-tuning site keeps just its optimiser state and step.) A round's state is saved after
the round, and the last two are kept: a round that is repeated after a server crash starts from
exactly the state it started from the first time.
In a simulation, whose processes keep their sites live between rounds, the state is written at
the rounds the server checkpoints (``federated.checkpoint_every``, and the last), and when the
process drops the site from memory (``federated.live_sites``); a resumed run starts from the
server's last checkpoint, whose round every site has on disk.

Round r trains epochs (r - 1) * E ... r * E - 1 of the run (E = local epochs), seeded like the
centralised run's epochs and on the same learning-rate schedule, so one site holding all the data
ends where ``fedmae pretrain`` ends.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import torch

from fedmae.checkpoint import CheckpointError, load_checkpoint, remove_checkpoint, save_checkpoint
from fedmae.config import ExperimentConfig
from fedmae.data.badfiles import BAD_CASES, BadFiles
from fedmae.data.datasets import finetuning_dataset, label_subset
from fedmae.data.loader import EpochLoader
from fedmae.data.preprocess import Preprocessing
from fedmae.data.splits import SiteData
from fedmae.data.tasks import TaskSpec
from fedmae.engine.device import resolve_device
from fedmae.engine.finetune import (
    evaluation_loader,
    finetune_epoch,
    finetune_schedule,
    finetuning_loader,
    loader_metrics,
    task_loss,
)
from fedmae.engine.loop import due, seed_everything
from fedmae.engine.optim import build_optimizer
from fedmae.engine.pretrain import (
    mae_loss,
    pretrain_epoch,
    pretrain_schedule,
    pretraining_loaders,
    reconstruction_loss,
    site_images,
)
from fedmae.engine.runs import Stopwatch
from fedmae.models.factory import build_finetune_model, build_mae
from fedmae.federated.updates import clip_update, update_to_wire
from fedmae.models.state import encoder_entries, load_encoder_entries, load_model_state, load_part_state, site_local_state

log = logging.getLogger(__name__)

KEEP_STATES = 2


class SiteStateError(RuntimeError):
    """This site's own state from an earlier round cannot be read: it refuses the round (one line)."""


class _SiteRounds:
    """Shared mechanics: a model and optimiser whose site-local state lives on disk per round."""

    phase: str
    total_rounds: int

    def __init__(self, cfg: ExperimentConfig, site: SiteData, state_dir: str | Path, device: str | None,
                 write_every_round: bool = True):
        self.cfg, self.site = cfg, site
        # A deployed site's ClientApp process ends after each message: what is not on disk is lost.
        self.write_every_round = write_every_round
        self.state_dir = Path(state_dir) / site.name.replace("/", "_") / self.phase
        self.device = resolve_device(device or cfg.device)
        self.step = 0
        # Files that fail to load while training: stop the round, or (data.skip_bad_cases) leave
        # them out, listed in this site's bad_cases.csv next to its state.
        cases = [c for split in ("train", "val", "test", "unlabelled") for c in site.split(split)]
        self.bad_files = BadFiles(cfg.data.skip_bad_cases, self.state_dir.parent / BAD_CASES, cases)
        # The model and optimiser after the last round this object trained, so the next round
        # skips rebuilding and reloading them; the disk copy is what survives a restart.
        self._live: tuple[int, torch.nn.Module, torch.optim.Optimizer] | None = None
        self._live_metrics: dict[str, Any] = {}
        self._on_disk: int | None = None  # the round of the newest state on disk, which the live state follows
        # int8 transport: what quantisation lost of this site's last update, added to its next
        # (error feedback); kept in the round's state file, so a resumed or rebuilt site has it.
        self.carried: dict[str, torch.Tensor] | None = None

    def _build(self) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        raise NotImplementedError

    def _kept_keys(self, model: torch.nn.Module) -> set[str]:
        """The model entries a site keeps between rounds: those the server does not send back
        (every round starts by loading the global weights over the others)."""
        raise NotImplementedError

    def _start_round(self, server_round: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """This site's model and optimiser as they were after its latest round before ``server_round``."""
        # The live state is used unless the state folder changed under it (a run started over in it).
        if self._live is not None and self._live[0] == server_round - 1 and self._latest_saved(server_round) == self._on_disk:
            return self._live[1], self._live[2]
        model, optimizer = self._build()
        self._restore(server_round, model, optimizer)
        # Live from here: a round's validation and its training (one message) build it once.
        self._live = (self._on_disk or 0, model, optimizer)
        return model, optimizer

    def _latest_saved(self, before: int) -> int | None:
        rounds = [r for r, _ in self._saved() if r < before]
        return rounds[-1] if rounds else None

    def _saved(self) -> list[tuple[int, Path]]:
        return sorted(
            (int(m.group(1)), p) for p in self.state_dir.glob("round_*.pt") if (m := re.match(r"round_(\d+)\.pt$", p.name))
        )

    def _state_path(self, server_round: int) -> Path:
        return self.state_dir / f"round_{server_round:05d}.pt"

    def _restore(self, server_round: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Load the state this site had after its latest round before ``server_round``.

        A state file that cannot be read (corrupt, truncated: its SHA-256 is checked) is not
        skipped for the one before it: the round would then start from a state other than the
        one this site ended its last round with, and the result would change without anyone
        noticing. The site refuses the round instead (SiteStateError, one line that the server
        logs as this site's failure), and every later round of the phase, until the file is dealt
        with. A site that missed rounds (it was down) continues from its latest state, and says so.
        """
        saved = self._saved()
        earlier = [(r, p) for r, p in saved if r < server_round]
        if any(r >= server_round for r, _ in saved) and earlier:
            log.info("site %s: %s round %d is a repeated round (it was trained here before): it starts again from "
                     "this site's state after round %d", self.site.name, self.phase, server_round, earlier[-1][0])
        if not earlier:
            if server_round > 1:
                log.warning("site %s: no %s state of an earlier round in %s: round %d starts from the initial state",
                            self.site.name, self.phase, self.state_dir, server_round)
            self.step, self.carried, self._on_disk = 0, None, None
            return
        latest, path = earlier[-1]
        try:
            payload = load_checkpoint(path, expect_kind="site")
        except CheckpointError as err:
            older = f"its state after round {earlier[-2][0]}" if len(earlier) > 1 else "its initial state"
            raise SiteStateError(
                f"site {self.site.name}: its {self.phase} state after round {latest} is unusable ({err}); this site "
                f"refuses the {self.phase} rounds that need it, since starting from an older state would change the "
                f"result, until {path.name} is restored or removed (removed: the site rejoins from {older}, as a site "
                "that missed rounds does)") from None
        if latest < server_round - 1:
            log.warning("site %s: %s continues from this site's state after round %d: it has none for round(s) %s "
                        "(it missed them)", self.site.name, self.phase, latest,
                        ", ".join(map(str, range(latest + 1, server_round))))
        load_part_state(model, payload["model"], self._kept_keys(model), str(path))
        optimizer.load_state_dict(payload["optimizer"])
        self.step = payload["step"]
        self.carried = payload["extra"].get("transport_carry")
        self._on_disk = latest  # the state on disk is this object's own from here on

    def _save(self, server_round: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, metrics: dict) -> None:
        """Keep the state after ``server_round`` live, and write it when it is due on disk."""
        self._live, self._live_metrics = (server_round, model, optimizer), metrics
        if self.write_every_round or due(server_round, self.cfg.federated.checkpoint_every, self.total_rounds):
            self._write(server_round, model, optimizer, metrics)

    def spill(self) -> None:
        """Write the live state if it is not on disk yet (the process is about to drop this site)."""
        if self._live is not None and self._on_disk != self._live[0]:
            self._write(*self._live, self._live_metrics)

    def _write(self, server_round: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, metrics: dict) -> None:
        kept = self._kept_keys(model)
        save_checkpoint(
            self._state_path(server_round), kind="site", config=self.cfg.to_dict(),
            model_state={k: v for k, v in model.state_dict().items() if k in kept},
            epoch=server_round, step=self.step, optimizer_state=optimizer.state_dict(), metrics=metrics,
            extra={"site": self.site.name, "phase": self.phase,
                   **({"transport_carry": self.carried} if self.carried is not None else {})},
        )
        for _, old in self._saved()[:-KEEP_STATES]:
            remove_checkpoint(old)
        self._on_disk = server_round

    def _leaving(self, state: dict[str, torch.Tensor], received: dict[str, torch.Tensor], metrics: dict[str, Any],
                 clip_to: float | None) -> dict[str, torch.Tensor]:
        """The weights as they leave this site, in the run's transport (call before ``_save``,
        which keeps what int8 carries to the next round)."""
        if clip_to is not None:
            # Client-side DP: the update is clipped here, in fp32, before it leaves. Flower's
            # fixedclipping_mod would clip the reply as sent, i.e. after the cast to the wire
            # precision (bf16 travels as int16 bits). norm_bit (clipped or not) is what Flower's
            # adaptive clipping counts to adapt the norm.
            state, norm = clip_update(state, received, clip_to)
            metrics.update(update_norm_before_clipping=norm, norm_bit=float(norm > clip_to))
        wire, self.carried = update_to_wire(state, received, self.cfg.federated.transport, self.carried)
        return wire


class SitePretraining(_SiteRounds):
    """MAE pre-training at one site; exchanges encoder weights only."""

    phase = "pretrain"

    def __init__(self, cfg: ExperimentConfig, site: SiteData, prep: Preprocessing, state_dir: str | Path,
                 device: str | None = None, write_every_round: bool = True):
        super().__init__(cfg, site, state_dir, device, write_every_round)
        self.total_rounds = cfg.pretrain_rounds
        images = {split: site_images([site], split) for split in ("train", "val")}
        if not images["train"]:
            raise ValueError(f"site {site.name}: no training images to pre-train on")
        self.train_loader, self.val_loader = pretraining_loaders(images, cfg, prep, self.device, self.bad_files)
        self.num_examples = len(images["train"])
        self.schedule = pretrain_schedule(cfg, self.num_examples)

    def _kept_keys(self, model: torch.nn.Module) -> set[str]:
        return set(site_local_state(model.state_dict()))  # the decoder and mask token

    def _build(self) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        # The same seeded initialisation as the centralised run: with one site, federated and
        # centralised pre-training start (and end) with the same decoder.
        seed_everything(self.cfg.seed)
        model = build_mae(self.cfg).to(self.device)
        p = self.cfg.pretrain
        return model, build_optimizer(model, self.cfg.pretrain_lr, p.weight_decay, p.betas)

    def train_round(
        self, global_encoder: dict[str, torch.Tensor], server_round: int, proximal_mu: float = 0.0,
        clip_to: float | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Local epochs from the global encoder; returns the new encoder (``encoder.*`` keys) as it
        leaves the site (clipped to ``clip_to`` under client-side DP, in the run's transport) and metrics."""
        watch = Stopwatch()
        model, optimizer = self._start_round(server_round)
        load_encoder_entries(model, global_encoder)
        loss_fn = mae_loss if proximal_mu <= 0 else _proximal(mae_loss, model, proximal_mu)
        E = self.cfg.federated.local_epochs
        losses = []
        for e in range(E):
            epoch = (server_round - 1) * E + e
            loss, self.step = pretrain_epoch(
                model, self.train_loader, optimizer, self.schedule, self.cfg, epoch, self.step, self.device,
                desc=f"{self.site.name} round {server_round}", loss_fn=loss_fn,
            )
            losses.append(loss)
        metrics = {"train_loss": sum(losses) / len(losses), "num-examples": self.num_examples,
                   "seconds": watch.seconds, "lr": optimizer.param_groups[0]["lr"]}
        wire = self._leaving(encoder_entries(model.state_dict()), global_encoder, metrics, clip_to)
        self._save(server_round, model, optimizer, metrics)
        return wire, metrics

    def evaluate(self, global_encoder: dict[str, torch.Tensor], server_round: int) -> dict[str, Any]:
        """Validation reconstruction loss of the global encoder with this site's decoder."""
        # The decoder after this round. Loading the global encoder into the live model changes
        # nothing the next round would not: it starts by loading the same global encoder.
        model, _ = self._start_round(server_round + 1)
        load_encoder_entries(model, global_encoder)
        cases = len(self.val_loader.dataset)
        loss = reconstruction_loss(model, self.val_loader, self.cfg, self.device) if cases else math.nan
        return {"val_loss": loss, "num-examples": cases}


class SiteFinetuning(_SiteRounds):
    """Fine-tuning at one site: the whole model is exchanged (federated fine-tuning)."""

    phase = "finetune"

    def __init__(self, cfg: ExperimentConfig, site: SiteData, prep: Preprocessing, task: TaskSpec,
                 state_dir: str | Path, device: str | None = None, write_every_round: bool = True):
        super().__init__(cfg, site, state_dir, device, write_every_round)
        self.total_rounds = cfg.finetune_rounds
        self.task, self.prep = task, prep
        labelled = label_subset(site.train, cfg.finetune.label_fraction, cfg.seed, site.name)
        self.train_loader = finetuning_loader(labelled, task, cfg, prep, self.device, self.bad_files)
        self._evaluation: dict[str, EpochLoader] = {}  # per split, built once: every round evaluates on them
        self.num_examples = len(labelled)
        self.schedule = finetune_schedule(cfg, self.num_examples)
        self.criterion = task_loss(task)

    def build_model(self) -> torch.nn.Module:
        seed_everything(self.cfg.seed)
        return build_finetune_model(self.cfg, self.task.num_outputs).to(self.device)

    def _kept_keys(self, model: torch.nn.Module) -> set[str]:
        return set()  # the whole model is exchanged: the site keeps its optimiser state only

    def _build(self) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = self.build_model()
        f = self.cfg.finetune
        return model, build_optimizer(model, self.cfg.finetune_lr, f.weight_decay, f.betas, f.layer_decay)

    def train_round(self, global_model: dict[str, torch.Tensor], server_round: int, clip_to: float | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        watch = Stopwatch()
        model, optimizer = self._start_round(server_round)
        load_model_state(model, global_model, "global model")
        E = self.cfg.federated.finetune_local_epochs
        losses = []
        for e in range(E):
            epoch = (server_round - 1) * E + e
            loss, self.step = finetune_epoch(model, self.train_loader, optimizer, self.schedule, self.criterion, self.cfg,
                                             epoch, self.step, self.device, f"{self.site.name} fine-tune round {server_round}")
            losses.append(loss)
        metrics = {"train_loss": sum(losses) / len(losses), "num-examples": self.num_examples, "seconds": watch.seconds}
        wire = self._leaving({k: v.detach().cpu() for k, v in model.state_dict().items()}, global_model, metrics, clip_to)
        self._save(server_round, model, optimizer, metrics)
        return wire, metrics

    def evaluate(self, global_model: dict[str, torch.Tensor], split: str) -> dict[str, float]:
        """Task metrics of the global model on this site's ``split``, in the flat form that may
        leave a site (:meth:`fedmae.metrics.Metrics.flat`)."""
        model = self.build_model()
        load_model_state(model, global_model, "global model")
        cases = self.site.split(split)
        if not cases:
            return {"num-examples": 0}
        if split not in self._evaluation:
            dataset = finetuning_dataset(cases, self.task, self.cfg, self.prep, train=False)
            self._evaluation[split] = evaluation_loader(dataset, self.task, self.cfg, self.device, self.bad_files)
        metrics = loader_metrics(model, self._evaluation[split], self.task, self.cfg, self.device)
        # The site's weight is its number of cases of the split (a file left out as bad still counts).
        return {**metrics.flat(), "num-examples": float(len(cases))}


def _proximal(base_loss, model: torch.nn.Module, mu: float):
    """FedProx: add mu/2 ||w - w_global||^2 over the encoder, the part that is averaged."""
    anchor = {n: p.detach().clone() for n, p in model.encoder.named_parameters()}

    def loss(net: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        penalty = sum(((p - anchor[n]) ** 2).sum() for n, p in net.encoder.named_parameters())
        return base_loss(net, batch) + 0.5 * mu * penalty

    return loss
