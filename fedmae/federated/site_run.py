"""A site's side of a federated run, in plain Python: which site a node is, where it keeps its
state, and its answer to each request of the server. ``sites/app.py`` turns Flower messages into
calls of :meth:`SiteRun.train` / :meth:`SiteRun.evaluate` and their results back into replies.

Where each setting comes from: the run's resolved experiment and output folder travel in every
request (``experiment``, ``output-dir``); which site this node is and where its data and state
live come from the node's own config (``partition-id`` / ``num-partitions`` in simulation;
``site``, ``data-dir``, ``state-dir`` in a deployment); the request says what to do (``phase``,
``round``, ``split``). Nothing but weights and scalar metrics with the site's name leaves here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fedmae.config import ExperimentConfig, config_from_dict
from fedmae.data.cohort import Cohort, load_cohort
from fedmae.data.splits import SiteData
from fedmae.federated.settings import VALIDATE_ROUND, site_config
from fedmae.federated.site import SiteFinetuning, SitePretraining
from fedmae.metrics import Metrics

Weights = dict[str, torch.Tensor]
# Where Flower's client-side adaptive-clipping wrapper puts the round's clipping norm
# (flwr.supercore.differential_privacy.KEY_CLIPPING_NORM; the library does not import Flower).
CLIPPING_NORM_KEY = "clipping_norm"


@dataclasses.dataclass
class SiteRun:
    """What one site knows during a run; built once per process and site (loading data is slow)."""

    name: str
    cfg: ExperimentConfig
    cohort: Cohort  # this site's cohort (one site)
    state_dir: Path
    # A simulation's process serves its sites for the whole run, so their state stays live between
    # rounds; a deployed site's ClientApp process ends after each message (Flower 1.42's SuperNode).
    stays_live: bool = False
    pretraining: SitePretraining | None = None
    finetuning: SiteFinetuning | None = None

    @property
    def site(self) -> SiteData:
        return self.cohort.sites[0]

    def pretrainer(self) -> SitePretraining:
        if self.pretraining is None:
            self.pretraining = SitePretraining(self.cfg, self.site, self.cohort.prep, self.state_dir,
                                               write_every_round=not self.stays_live)
        return self.pretraining

    def finetuner(self) -> SiteFinetuning:
        if self.finetuning is None:
            self.finetuning = SiteFinetuning(self.cfg, self.site, self.cohort.prep, self.cohort.task, self.state_dir,
                                             write_every_round=not self.stays_live)
        return self.finetuning

    def spill(self) -> None:
        """Write whatever live state is not on disk yet: this process is dropping the site."""
        for rounds in (self.pretraining, self.finetuning):
            if rounds is not None:
                rounds.spill()

    def describe(self) -> tuple[dict[str, float], dict[str, str]]:
        """The site's task outputs and size (no weights), and its class names."""
        task = self.cohort.task_or_problem
        outputs = 0 if isinstance(task, str) else task.num_outputs
        metrics = {"num-outputs": outputs, "num-examples": len(self.site.train) + len(self.site.unlabelled)}
        return metrics, {"class-names": "" if isinstance(task, str) else "\t".join(task.class_names)}

    def train(self, request: Mapping[str, Any], received: Weights) -> tuple[Weights, dict[str, Any]]:
        """One training round of ``request["phase"]`` from the server's weights: the new weights
        as they leave the site (clipped under client-side DP, in the run's transport) and metrics."""
        phase, server_round = str(request["phase"]), int(request["round"])
        fed = self.cfg.federated
        clip_to = None
        if fed.privacy.dp == "client":
            # Adaptive clipping: the server sends this round's norm (under Flower's key); fixed: the configured one.
            clip_to = float(request.get(CLIPPING_NORM_KEY, fed.privacy.clipping_norm))
        if phase == "pretrain":
            validation = {}
            if VALIDATE_ROUND in request:
                # The server's weights are its model of the previous round: validated here first, with
                # this site's decoder of that round (what a separate evaluate request would do),
                # so the round needs one message exchange instead of two.
                result = self.pretrainer().evaluate(received, int(request[VALIDATE_ROUND]))
                validation = {"val_loss": result["val_loss"], "val-examples": result["num-examples"]}
            mu = fed.proximal_mu if fed.strategy == "fedprox" else 0.0
            state, metrics = self.pretrainer().train_round(received, server_round, proximal_mu=mu, clip_to=clip_to)
            metrics.update(validation)
        elif phase == "finetune":
            state, metrics = self.finetuner().train_round(received, server_round, clip_to=clip_to)
        else:
            raise ValueError(f"unknown training phase {phase!r}")
        return state, metrics

    def evaluate(self, request: Mapping[str, Any], received: Weights) -> dict[str, Any]:
        """Metrics of the server's weights: ``pretrain`` validation reconstruction loss, ``finetune``
        task metrics on ``request["split"]``, ``finetune-local`` a fine-tune on this site alone."""
        phase = str(request["phase"])
        if phase == "pretrain":
            return self.pretrainer().evaluate(received, int(request.get("round", 0)))
        if phase == "finetune":
            return self.finetuner().evaluate(received, str(request.get("split", "val")))
        if phase == "finetune-local":
            return self.finetune_locally(received)
        raise ValueError(f"unknown evaluation phase {phase!r}")

    def finetune_locally(self, encoder: Weights) -> dict[str, float]:
        """Fine-tune the global encoder on this site's labels alone (model selected on its
        validation cases); its test metrics."""
        from fedmae.checkpoint import save_checkpoint
        from fedmae.engine.finetune import finetune

        folder = self.state_dir / self.name.replace("/", "_") / "finetune-local"
        init = save_checkpoint(folder / "global_encoder.pt", kind="global", model_state=encoder,
                               config=self.cfg.to_dict(), epoch=0, step=0, extra={"phase": "pretrain"})
        result = finetune(self.cfg, folder / "run", encoder=init, resume=True, cohort=self.cohort)
        # Weighted by its test cases (a file left out as bad still counts), as its evaluate replies are.
        return {**Metrics.from_json(result.metrics["pooled"]).flat(), "num-examples": float(len(self.site.test))}


# The sites this process keeps live (model, optimiser, loaders), least recently used first. A
# simulation process serves many virtual sites; past federated.live_sites the oldest is dropped,
# which costs only a rebuild: its latest state is written to disk as it is dropped, and a rebuilt
# site restores it exactly, so memory stays bounded however many sites there are.
_RUNS: OrderedDict[tuple, SiteRun] = OrderedDict()
_COHORTS: dict[tuple, Cohort] = {}


def site_run(run_id: int, request: Mapping[str, Any], node_config: Mapping[str, Any]) -> SiteRun:
    """This node's site in the run the request belongs to (built on the first request)."""
    if "experiment" not in request:
        raise ValueError("the server's request carries no experiment: the server runs another fedmae version; "
                         "deploy the same fedmae app at the server and the sites")
    node = dict(node_config)
    key = (run_id, str(request["experiment"]), str(request.get("output-dir", "")),
           tuple(sorted((k, str(v)) for k, v in node.items())))
    if key in _RUNS:
        _RUNS.move_to_end(key)
        return _RUNS[key]
    cfg = config_from_dict(json.loads(str(request["experiment"])), source="the server's experiment")
    _RUNS[key] = _new_site_run(run_id, site_config(cfg, node), Path(str(request["output-dir"])), node)
    while len(_RUNS) > cfg.federated.live_sites:
        _RUNS.popitem(last=False)[1].spill()
    return _RUNS[key]


def forget_site_runs() -> None:
    """Drop every cached site (as a new ClientApp process would start without them)."""
    _RUNS.clear()


def _new_site_run(run_id: int, cfg: ExperimentConfig, out: Path, node: dict[str, Any]) -> SiteRun:
    cohort = _cohort(cfg, run_id)
    if "partition-id" in node:
        index, count = int(node["partition-id"]), int(node["num-partitions"])
        if count != len(cohort.sites):
            raise ValueError(f"the simulation has {count} nodes but the data have {len(cohort.sites)} sites; "
                             f"start it with num-supernodes={len(cohort.sites)}")
        site = cohort.sites[index]
    elif "site" in node and ("data-dir" not in node or cfg.data.source == "synthetic"):
        by_name = {s.name: s for s in cohort.sites}
        if str(node["site"]) not in by_name:
            raise ValueError(f"node_config site={node['site']!r} is not one of the data's sites {sorted(by_name)}")
        site = by_name[str(node["site"])]
    else:
        site = dataclasses.replace(cohort.sites[0], name=str(node.get("site", cohort.sites[0].name)))
    if "state-dir" in node or "data-dir" in node:
        # A deployed site's state folder outlives runs: keep each run's state apart (a resumed run
        # has the same output-dir, so it finds its own state again).
        base = Path(str(node["state-dir"])) if "state-dir" in node else Path(str(node["data-dir"])) / ".fedmae-state"
        state_dir = base / f"{cfg.name}-{hashlib.sha256(str(out).encode()).hexdigest()[:10]}"
    else:
        state_dir = out / "sites"
    return SiteRun(name=site.name, cfg=cfg, cohort=dataclasses.replace(cohort, sites=[site]), state_dir=state_dir,
                   stays_live="partition-id" in node)


def _cohort(cfg: ExperimentConfig, run_id: int) -> Cohort:
    # In simulation every virtual site of a process shares one loaded data set.
    key = (run_id, repr(cfg.data), cfg.seed, cfg.model.name, tuple(cfg.model.img_size), cfg.model.in_channels)
    if key not in _COHORTS:
        _COHORTS[key] = load_cohort(cfg)
    return _COHORTS[key]
