"""Flower strategies for fedmae: Flower's own FedAvg / FedProx / FedAvgM / FedAdam / FedYogi /
FedAdagrad and its robust FedMedian / FedTrimmedAvg / Krum / MultiKrum / Bulyan, extended
through their hooks (``configure_train``, ``aggregate_train``), never by copying ``start``.

What the hooks add:
- the phase and the run's round number (a resumed run continues its numbering: the round
  numbers given to the hooks are the run's) go out with every message, and the weights go out
  in the configured wire precision;
- every reply is checked before averaging: a failed site, a malformed reply, an update with
  missing / extra keys, wrong shapes or NaN/Inf is left out and logged with the site's name;
- with fewer usable updates than ``min_sites`` the round keeps the previous global model;
- one JSON line per site and per round goes to the metrics log, with the L2 norm of the site's
  update (what a differential-privacy clipping norm has to be compared with).

With ``federated.privacy.dp`` the same mixin sits on top of Flower's DP wrapper
(``DifferentialPrivacyServerSideFixedClipping`` / ``...ClientSideFixedClipping``) around a plain
FedAvg, so replies are checked before Flower clips them and the noise is added to the average
of checked updates only. The DP rules on top: every sampled site must deliver a usable update
(the noise is calibrated for that many sites), sites are averaged with equal weights (the
sensitivity bound assumes it), and frozen tensors (the sin-cos position embedding) are put back
after the noise, since they carry no data and noise would only accumulate in them.
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
from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
)
from flwr.serverapp.strategy.dp_adaptive_clipping import DifferentialPrivacyAdaptiveBase
from flwr.serverapp.strategy.dp_fixed_clipping import DifferentialPrivacyFixedClippingBase

from fedmae.config import ExperimentConfig, sites_needed
from fedmae.engine.loop import MetricsLog
from fedmae.federated.settings import VALIDATE_ROUND
from fedmae.federated.updates import to_wire, update_from_wire, update_norm, update_problem
from fedmae.metrics import weighted_mean
from server.adaptive_clipping import ADAPTIVE_WRAPPERS, AccountedAdaptiveClipping, adaptive_wrapper_args

log = logging.getLogger("fedmae.server")

STRATEGIES = {"fedavg": FedAvg, "fedprox": FedProx, "fedavgm": FedAvgM, "fedadam": FedAdam, "fedyogi": FedYogi,
              "fedadagrad": FedAdagrad, "fedmedian": FedMedian, "fedtrimmedavg": FedTrimmedAvg, "krum": Krum,
              "multikrum": MultiKrum, "bulyan": Bulyan}
DP_WRAPPERS = {"server": DifferentialPrivacyServerSideFixedClipping, "client": DifferentialPrivacyClientSideFixedClipping}
# Under DP every site counts once: FedAvg weights by this key, which the server sets to 1.
EQUAL_WEIGHT = "dp-equal-weight"
# In a training reply: the round whose weights the site validated before training (pre-training).


class GuardedRounds:
    """Mixin placed before a Flower strategy class: checked replies, logging, wire precision."""

    def setup_rounds(self, *, phase: str, transport: str, min_usable: int, metrics_log: MetricsLog,
                     site_names: dict[int, str], evaluate_extra: dict[str, Any] | None = None,
                     fixed_keys: Iterable[str] = ()) -> None:
        self.phase, self.transport = phase, transport
        self.fixed_keys = tuple(fixed_keys)
        self.min_usable, self.metrics_log, self.site_names = min_usable, metrics_log, site_names
        self.evaluate_extra = evaluate_extra or {}
        self.reference: dict[str, torch.Tensor] = {}
        self.sampled: list[int] = []
        self.requests: list[Message] = []  # this round's messages; the Grid sets their ids when it sends them
        self.round_started = 0.0
        self.kept_previous: list[int] = []
        self.validating: int | None = None  # the round whose weights this training round's sites validate
        self.received_validation: dict[str, float] = {}  # their validation

    @property
    def private(self) -> bool:
        return isinstance(self, (DifferentialPrivacyFixedClippingBase, DifferentialPrivacyAdaptiveBase))

    @property
    def averaging(self) -> FedAvg:
        """The strategy that averages: this one, or the one a DP wrapper holds."""
        return self.strategy if self.private else self  # type: ignore[attr-defined, return-value]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        config["round"] = server_round
        config["phase"] = self.phase
        self.validating = int(config[VALIDATE_ROUND]) if VALIDATE_ROUND in config else None
        self.reference = arrays.to_torch_state_dict()
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.sampled = [m.metadata.dst_node_id for m in messages]
        self.requests = messages
        self.round_started = time.monotonic()
        if self.transport != "fp32":
            # The strategy keeps the fp32 arrays it was given (FedAvgM / FedAdam need them); only
            # the messages carry the cast copy. All messages share one payload.
            wire = ArrayRecord(to_wire(self.reference, self.transport))
            for message in messages:
                message.content[self.averaging.arrayrecord_key] = wire
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        config["round"] = server_round
        config["phase"] = self.phase
        for key, value in self.evaluate_extra.items():
            config[key] = value
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self.requests = messages
        if self.transport != "fp32" and messages:
            wire = ArrayRecord(to_wire(arrays.to_torch_state_dict(), self.transport))
            for message in messages:
                message.content[self.averaging.arrayrecord_key] = wire
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Per-site validation metrics to the log; their example-weighted mean (NaNs skipped), on
        which federated fine-tuning selects its model."""
        per_site = {}
        for message in replies:
            if message.has_error():
                self._record(server_round, self.site_names.get(self._node_of(message), "?"), "evaluation failed",
                             reason=message.error.reason)
                continue
            site = str(message.content["site"]["name"])
            per_site[site] = _numbers(dict(message.content["metrics"]))
            self.metrics_log.write({"phase": self.phase, "round": server_round, "site": site, "evaluation": per_site[site]})
        return MetricRecord(weighted_mean(per_site.values()))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        key, weight_key = self.averaging.arrayrecord_key, self.averaging.weighted_by_key
        self.received_validation = self._validation_of_sent_weights(replies)
        usable: list[Message] = []
        answered = set()
        for message in replies:
            node = self._node_of(message)
            answered.add(node)
            site = self.site_names.get(node, f"node {node}")
            if message.has_error():
                self._record(server_round, site, "failed", reason=message.error.reason)
                continue
            try:
                site = str(message.content["site"]["name"])
                metrics = dict(message.content["metrics"])
                update = update_from_wire(message.content[key].to_torch_state_dict(), self.transport, self.reference)
                problem = update_problem(update, self.reference)
            except (KeyError, TypeError, ValueError) as err:
                self._record(server_round, site, "rejected", reason=f"malformed reply ({type(err).__name__}: {err})")
                continue
            self.site_names[node] = site
            if self.private:
                message.content["metrics"][weight_key] = 1.0
            if problem is None and not math.isfinite(float(metrics.get("num-examples", math.nan))):
                problem = "num-examples is not a number"
            if problem is not None:
                self._record(server_round, site, "rejected", reason=problem, **_numbers(metrics))
                continue
            # fp32 for averaging, keys in the global model's order (Flower's DP clipping pairs
            # update and global arrays by position).
            update = {name: update[name] for name in self.reference}
            message.content[key] = ArrayRecord(update)
            usable.append(message)
            self._record(server_round, site, "ok", update_norm=update_norm(update, self.reference), **_numbers(metrics))
        for node in self.sampled:
            if node not in answered:
                self._record(server_round, self.site_names.get(node, f"node {node}"), "no reply",
                             reason="no answer within federated.round_timeout")
        summary = {"phase": self.phase, "round": server_round, "sampled": len(self.sampled), "usable": len(usable),
                   "seconds": round(time.monotonic() - self.round_started, 3)}
        if self.private:
            summary["clipping_norm"] = self.clipping_norm  # this round's (adaptive clipping changes it after)
        needed = len(self.sampled) if self.private else self.min_usable
        if len(usable) < needed:
            why = ("differential privacy: the noise is calibrated for every sampled site" if self.private
                   else "fewer than federated.min_sites")
            log.warning("%s round %d: %d usable update(s) of %d (%s); keeping the previous global model",
                        self.phase, server_round, len(usable), len(self.sampled), why)
            self.kept_previous.append(server_round)
            self.metrics_log.write({**summary, "kept_previous_model": True, "reason": why})
            return None, None
        # The average is summed in a fixed order (by site), not in the order replies arrived, so a
        # run gives the same weights to the bit however its sites were scheduled.
        usable.sort(key=lambda message: str(message.content["site"]["name"]))
        arrays, metrics = super().aggregate_train(server_round, usable)
        if arrays is not None and self.private and self.fixed_keys:
            noisy = arrays.to_torch_state_dict()
            noisy.update({name: self.reference[name] for name in self.fixed_keys if name in noisy})
            arrays = ArrayRecord(noisy)
        # The sites' mean metrics, then the round's own figures ("seconds": the round's wall time at
        # the server; each site's own training time is in its line).
        self.metrics_log.write({**_numbers(dict(metrics or {})), **summary, "kept_previous_model": arrays is None})
        return arrays, metrics

    def _validation_of_sent_weights(self, replies: list[Message]) -> dict[str, float]:
        """Sites asked to validate the weights of a training round (config ``validate-round``)
        reply with ``val_loss`` and ``val-examples`` beside their training metrics: taken out
        here (so the strategy does not average them as training metrics), logged per site under
        the round they validate (a site that failed, as a failed evaluation), and averaged by
        validation examples."""
        if self.validating is None:
            return {}
        per_site = {}
        for message in replies:
            if message.has_error():
                self._record(self.validating, self.site_names.get(self._node_of(message), "?"), "evaluation failed",
                             reason=message.error.reason)
                continue
            metrics = message.content["metrics"]
            if "val-examples" in metrics:
                per_site[str(message.content["site"]["name"])] = {
                    "val_loss": float(metrics.pop("val_loss")), "num-examples": float(metrics.pop("val-examples"))}
        for site, evaluation in sorted(per_site.items()):
            self.metrics_log.write({"phase": self.phase, "round": self.validating, "site": site, "evaluation": evaluation})
        return weighted_mean(per_site.values()) if per_site else {}

    def accept_secure_aggregate(self, server_round: int, aggregate: dict[str, torch.Tensor] | None,
                                per_site: dict[int, dict[str, Any]], failures: list[str]) -> dict[str, torch.Tensor] | None:
        """The bookkeeping of aggregate_train for a SecAgg+ round, where the server sees each
        site's metrics but only the sum of the weights: per-site lines, then the aggregate is used
        only if enough sites contributed and it is finite and of the right shape (one bad site
        cannot be singled out and left out: the sum is all there is)."""
        for node, metrics in per_site.items():
            site = str(metrics.get("site", self.site_names.get(node, f"node {node}")))
            self._record(server_round, site, "ok", **_numbers(metrics))
        for node in self.sampled:
            if node not in per_site:
                self._record(server_round, self.site_names.get(node, f"node {node}"), "failed",
                             reason="; ".join(failures) or "no answer within federated.round_timeout")
        problem = None if aggregate is None else update_problem(aggregate, self.reference)
        summary = {"phase": self.phase, "round": server_round, "sampled": len(self.sampled), "usable": len(per_site),
                   "seconds": round(time.monotonic() - self.round_started, 3), "secure_aggregation": True}
        if aggregate is None or problem is not None or len(per_site) < self.min_usable:
            why = ("SecAgg+ halted" if aggregate is None else f"the secure sum is unusable: {problem}" if problem
                   else "fewer than federated.min_sites")
            log.warning("%s round %d: %s; keeping the previous global model", self.phase, server_round, why)
            self.kept_previous.append(server_round)
            self.metrics_log.write({**summary, "kept_previous_model": True, "reason": why})
            return None
        means = weighted_mean(_numbers(m) for m in per_site.values())
        self.metrics_log.write({**summary, "kept_previous_model": False, **means})
        return aggregate

    def start_secure_round(self, server_round: int, arrays: dict[str, torch.Tensor], nodes: list[int]) -> dict[str, Any]:
        """What configure_train does for a plain round, for a SecAgg+ round: the fit config."""
        self.reference, self.sampled, self.round_started = arrays, list(nodes), time.monotonic()
        return {"round": server_round, "phase": self.phase}

    def _node_of(self, reply: Message) -> int:
        """The site a reply is about: the node its request went to. (An error the SuperLink writes in
        place of a silent site's reply, "Node Unavailable", comes from the SuperLink's own node id.)"""
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in self.requests}
        return sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def _record(self, server_round: int, site: str, status: str, **fields: Any) -> None:
        if status != "ok":
            log.warning("%s round %d: site %s %s: %s", self.phase, server_round, site, status, fields.get("reason", ""))
        self.metrics_log.write({"phase": self.phase, "round": server_round, "site": site, "status": status, **fields})


def build_strategy(cfg: ExperimentConfig, phase: str, num_sites: int, privacy_ledger: Any = None,
                   **setup: Any) -> Any:
    """The configured Flower strategy with fedmae's checks. Pre-training uses cfg.federated.strategy;
    fine-tuning averages with FedAvg (its classification heads start identical at every site).
    With differential privacy: fedmae's checks on top of Flower's DP wrapper around the strategy,
    which spends the budget of ``privacy_ledger`` (``server.privacy.Accountant``)."""
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
    elif name in ("fedadam", "fedyogi", "fedadagrad"):
        kwargs["eta"] = fed.server_lr
    elif name == "fedtrimmedavg":
        kwargs["beta"] = fed.trim_fraction
    elif name in ("krum", "multikrum", "bulyan"):
        kwargs["num_malicious_nodes"] = fed.byzantine_sites
        if name == "multikrum":
            kwargs["num_nodes_to_select"] = fed.krum_select
    privacy = fed.privacy
    if privacy.dp == "none":
        strategy = type(f"Guarded{base.__name__}", (GuardedRounds, base), {})(**kwargs)
    elif privacy.clipping == "fixed":
        wrapper = DP_WRAPPERS[privacy.dp]
        sampled = max(int(num_sites * fed.fraction_train), kwargs["min_train_nodes"])
        strategy = type(f"Guarded{wrapper.__name__}", (GuardedRounds, wrapper), {})(
            base(**kwargs, weighted_by_key=EQUAL_WEIGHT), privacy.noise_multiplier, privacy.clipping_norm, sampled,
            accountant=privacy_ledger.accountant)
    else:
        wrapper = ADAPTIVE_WRAPPERS[privacy.dp]
        sampled = max(int(num_sites * fed.fraction_train), kwargs["min_train_nodes"])
        strategy = type(f"Guarded{wrapper.__name__}", (GuardedRounds, AccountedAdaptiveClipping, wrapper), {})(
            base(**kwargs, weighted_by_key=EQUAL_WEIGHT), privacy.noise_multiplier, sampled,
            **adaptive_wrapper_args(privacy, sampled))
        strategy.setup_accounting(privacy, privacy_ledger, phase)
    # A robust strategy's round means something only with enough usable updates (sites_needed).
    min_usable = max(fed.min_sites, sites_needed(fed)) if name == fed.strategy else fed.min_sites
    strategy.setup_rounds(phase=phase, transport=fed.transport, min_usable=min_usable, **setup)
    return strategy


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
