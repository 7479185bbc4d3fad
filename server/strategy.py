"""Flower strategies for fedmae: Flower's own FedAvg / FedProx / FedAvgM / FedAdam, extended
through their hooks (``configure_train``, ``aggregate_train``), never by copying ``start``.

What the hooks add:
- the run's true round number (a resumed run continues its numbering) and the phase go out
  with every train message, and the weights go out in the configured wire precision;
- every reply is checked before averaging: a failed site, a malformed reply, an update with
  missing / extra keys, wrong shapes or NaN/Inf is left out and logged with the site's name;
- with fewer usable updates than ``min_sites`` the round keeps the previous global model;
- one JSON line per site and per round goes to the metrics log.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx

from fedmae.config import ExperimentConfig
from fedmae.engine.loop import MetricsLog
from fedmae.evaluation import weighted_mean
from fedmae.federated.updates import from_wire, to_wire, update_problem

log = logging.getLogger("fedmae.server")

STRATEGIES = {"fedavg": FedAvg, "fedprox": FedProx, "fedavgm": FedAvgM, "fedadam": FedAdam}


class GuardedRounds:
    """Mixin placed before a Flower strategy class: checked replies, logging, wire precision."""

    def setup_rounds(self, *, phase: str, round_offset: int, transport: str, min_usable: int, metrics_log: MetricsLog,
                     site_names: dict[int, str], evaluate_extra: dict[str, Any] | None = None) -> None:
        self.phase, self.round_offset, self.transport = phase, round_offset, transport
        self.min_usable, self.metrics_log, self.site_names = min_usable, metrics_log, site_names
        self.evaluate_extra = evaluate_extra or {}
        self.last_evaluation: dict[str, float] = {}
        self.reference: dict[str, torch.Tensor] = {}
        self.sampled: list[int] = []
        self.round_started = 0.0
        self.kept_previous: list[int] = []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        config["round"] = server_round + self.round_offset
        config["phase"] = self.phase
        config["transport"] = self.transport
        self.reference = arrays.to_torch_state_dict()
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.sampled = [m.metadata.dst_node_id for m in messages]
        self.round_started = time.monotonic()
        if self.transport != "fp32":
            # The strategy keeps the fp32 arrays it was given (FedAvgM / FedAdam need them); only
            # the messages carry the cast copy. All messages share one payload.
            wire = ArrayRecord(to_wire(self.reference, self.transport))
            for message in messages:
                message.content[self.arrayrecord_key] = wire
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        config["round"] = server_round + self.round_offset
        config["phase"] = self.phase
        config["transport"] = self.transport
        for key, value in self.evaluate_extra.items():
            config[key] = value
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        if self.transport != "fp32" and messages:
            wire = ArrayRecord(to_wire(arrays.to_torch_state_dict(), self.transport))
            for message in messages:
                message.content[self.arrayrecord_key] = wire
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Per-site validation metrics to the log; their example-weighted mean (NaNs skipped) kept
        in ``last_evaluation`` for model selection."""
        run_round = server_round + self.round_offset
        per_site = {}
        for message in replies:
            if message.has_error():
                self._record(run_round, self.site_names.get(message.metadata.src_node_id, "?"), "evaluation failed",
                             reason=message.error.reason)
                continue
            site = str(message.content["site"]["name"])
            per_site[site] = _numbers(dict(message.content["metrics"]))
            self.metrics_log.write({"phase": self.phase, "round": run_round, "site": site, "evaluation": per_site[site]})
        self.last_evaluation = weighted_mean(per_site.values())
        return MetricRecord(self.last_evaluation) if self.last_evaluation else None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        run_round = server_round + self.round_offset
        replies = list(replies)
        usable: list[Message] = []
        answered = set()
        for message in replies:
            node = message.metadata.src_node_id
            answered.add(node)
            site = self.site_names.get(node, f"node {node}")
            if message.has_error():
                self._record(run_round, site, "failed", reason=message.error.reason)
                continue
            try:
                site = str(message.content["site"]["name"])
                metrics = dict(message.content["metrics"])
                update = from_wire(message.content[self.arrayrecord_key].to_torch_state_dict(), self.transport, self.reference)
                problem = update_problem(update, self.reference)
            except (KeyError, TypeError, ValueError) as err:
                self._record(run_round, site, "rejected", reason=f"malformed reply ({type(err).__name__}: {err})")
                continue
            self.site_names[node] = site
            if problem is None and not math.isfinite(float(metrics.get(self.weighted_by_key, math.nan))):
                problem = f"{self.weighted_by_key} is not a number"
            if problem is not None:
                self._record(run_round, site, "rejected", reason=problem, **_numbers(metrics))
                continue
            message.content[self.arrayrecord_key] = ArrayRecord(update)  # fp32 for averaging
            usable.append(message)
            self._record(run_round, site, "ok", **_numbers(metrics))
        for node in self.sampled:
            if node not in answered:
                self._record(run_round, self.site_names.get(node, f"node {node}"), "no reply",
                             reason="no answer within federated.round_timeout")
        summary = {"phase": self.phase, "round": run_round, "sampled": len(self.sampled), "usable": len(usable),
                   "seconds": round(time.monotonic() - self.round_started, 3)}
        if len(usable) < self.min_usable:
            log.warning("%s round %d: %d usable update(s), fewer than federated.min_sites=%d; keeping the previous "
                        "global model", self.phase, run_round, len(usable), self.min_usable)
            self.kept_previous.append(run_round)
            self.metrics_log.write({**summary, "kept_previous_model": True})
            return None, None
        arrays, metrics = super().aggregate_train(server_round, usable)
        self.metrics_log.write({**summary, "kept_previous_model": False, **_numbers(dict(metrics or {}))})
        return arrays, metrics

    def _record(self, run_round: int, site: str, status: str, **fields: Any) -> None:
        if status != "ok":
            log.warning("%s round %d: site %s %s: %s", self.phase, run_round, site, status, fields.get("reason", ""))
        self.metrics_log.write({"phase": self.phase, "round": run_round, "site": site, "status": status, **fields})


def build_strategy(cfg: ExperimentConfig, phase: str, num_sites: int, **setup: Any) -> FedAvg:
    """The configured Flower strategy with fedmae's checks. Pre-training uses cfg.federated.strategy;
    fine-tuning averages with FedAvg (its classification heads start identical at every site)."""
    fed = cfg.federated
    name = fed.strategy if phase == "pretrain" else "fedavg"
    base = STRATEGIES[name]
    kwargs: dict[str, Any] = dict(
        fraction_train=fed.fraction_train,
        fraction_evaluate=1.0,
        min_train_nodes=min(fed.min_sites, num_sites),
        min_evaluate_nodes=min(fed.min_sites, num_sites),
        min_available_nodes=min(fed.min_sites, num_sites),
    )
    if name == "fedprox":
        kwargs["proximal_mu"] = fed.proximal_mu
    elif name == "fedavgm":
        kwargs.update(server_learning_rate=fed.server_lr, server_momentum=fed.server_momentum)
    elif name == "fedadam":
        kwargs["eta"] = fed.server_lr
    strategy_class = type(f"Guarded{base.__name__}", (GuardedRounds, base), {})
    strategy = strategy_class(**kwargs)
    strategy.setup_rounds(phase=phase, transport=fed.transport, min_usable=fed.min_sites, **setup)
    return strategy


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
