"""fedmae's sites over Flower: :class:`fedmae.federated.federation.Sites` implemented with a
Flower ``Grid`` (the SuperLink's, the simulation's, or the in-process one of the tests) and
Flower's strategies (``server/strategy.py``), DP accountant (``server/privacy.py``) and SecAgg+
workflow (``server/secure_aggregation.py``).

Every message carries the run's resolved experiment (``experiment``, JSON) and output folder
(``output-dir``) in its config: a site takes its settings from there, and from its own node
config (which site it is, where its data are), nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted

from fedmae.config import ExperimentConfig
from fedmae.engine.loop import MetricsLog
from fedmae.federated.federation import BudgetExhausted, PrivacyLedger, SiteReply, Weights
from fedmae.federated.global_model import frozen_keys
from fedmae.federated.settings import VALIDATE_ROUND
from fedmae.federated.updates import to_wire
from server.privacy import Accountant
from server.secure_aggregation import secure_round
from server.strategy import build_strategy


class GridSites:
    def __init__(self, grid: Grid, cfg: ExperimentConfig, out: Path):
        self.grid, self.cfg = grid, cfg
        self.run_settings = {"experiment": json.dumps(cfg.to_dict()), "output-dir": str(Path(out).absolute())}

    def connected(self) -> list[int]:
        return list(self.grid.get_node_ids())

    def request(self, **items: Any) -> ConfigRecord:
        """A message's config: the run's settings and this request's."""
        return ConfigRecord({**self.run_settings, **items})

    def ask(self, nodes: list[int], request: dict[str, Any], weights: Weights | None = None) -> list[SiteReply]:
        """One evaluate-type message per node (a query, not a training round)."""
        config = self.request(**request)
        content = RecordDict({"config": config})
        if weights is not None:
            content["arrays"] = ArrayRecord(to_wire(weights, self.cfg.federated.transport))
        messages = [Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=n) for n in nodes]
        replies = list(self.grid.send_and_receive(messages, timeout=self.cfg.federated.round_timeout))
        # Which node each reply is about: an error the SuperLink writes for a silent node ("Node
        # Unavailable") comes from the SuperLink's own node id. (The Grid set the ids on sending.)
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        return [site_reply(reply, sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id))
                for reply in replies]

    def open_privacy(self, num_sites: int, saved_ledger: str | None) -> PrivacyLedger:
        return Accountant(self.cfg.federated.privacy, num_sites, saved_ledger)

    def rounds(self, phase: str, *, site_names: dict[int, str], site_images: dict[int, int], metrics_log: MetricsLog,
               privacy: PrivacyLedger | None) -> GridRounds:
        return GridRounds(self, phase, site_names, site_images, metrics_log, privacy)


class GridRounds:
    """The rounds of one phase: a Flower strategy's configure / aggregate hooks around the Grid's
    send-and-receive, the same steps as ``Strategy.start`` takes for one round."""

    def __init__(self, sites: GridSites, phase: str, site_names: dict[int, str], site_images: dict[int, int],
                 metrics_log: MetricsLog, privacy: PrivacyLedger | None):
        self.sites, self.phase, self.site_names, self.site_images = sites, phase, site_names, site_images
        cfg = sites.cfg
        fixed = frozen_keys(cfg, phase) if privacy is not None else []
        self.strategy = build_strategy(cfg, phase, len(site_names), privacy_ledger=privacy,
                                       metrics_log=metrics_log, site_names=site_names,
                                       evaluate_extra={"split": "val"} if phase == "finetune" else {}, fixed_keys=fixed)
        self.timeout = cfg.federated.round_timeout
        # SecAgg+ rounds are Flower's protocol stages, and with fraction_train < 1 only some sites train.
        fed = cfg.federated
        self.validates_while_training = (fed.validate_with_training and not fed.privacy.secure_aggregation
                                         and fed.fraction_train == 1.0)

    @property
    def kept_previous(self) -> list[int]:
        return self.strategy.kept_previous

    def train(self, run_round: int, weights: Weights, validate: bool = False) -> tuple[Weights | None, dict[str, float]]:
        if self.sites.cfg.federated.privacy.secure_aggregation:
            return self._train_securely(run_round, weights), {}
        grid = self.sites.grid
        request = self.sites.request(**({VALIDATE_ROUND: run_round - 1} if validate else {}))
        try:
            messages = self.strategy.configure_train(run_round, ArrayRecord(weights), request, grid)
            aggregate, _ = self.strategy.aggregate_train(run_round, grid.send_and_receive(messages, timeout=self.timeout))
        except PrivacyBudgetExhausted as err:
            raise BudgetExhausted(str(err)) from None
        validation = self.strategy.received_validation if validate else {}
        return (None if aggregate is None else aggregate.to_torch_state_dict()), validation

    def evaluate(self, run_round: int, weights: Weights) -> dict[str, float]:
        grid = self.sites.grid
        messages = self.strategy.configure_evaluate(run_round, ArrayRecord(weights), self.sites.request(), grid)
        mean = self.strategy.aggregate_evaluate(run_round, grid.send_and_receive(messages, timeout=self.timeout))
        return dict(mean) if mean is not None else {}

    def _train_securely(self, run_round: int, weights: Weights) -> Weights | None:
        """A round whose sum comes from Flower's SecAgg+ workflow; the strategy's hooks do the
        same bookkeeping as for a plain round."""
        fed = self.sites.cfg.federated
        nodes = list(self.site_names)
        # Each site's weight is num-examples / max_weight: the largest site's count keeps the
        # quantisation error smallest (see server.secure_aggregation).
        max_weight = max(self.site_images.values())
        config = {**self.sites.run_settings, **self.strategy.start_secure_round(run_round, weights, nodes)}
        result = secure_round(self.sites.grid, weights, config, nodes, fed.privacy, max_weight, run_round, self.timeout)
        return self.strategy.accept_secure_aggregate(run_round, result.arrays, result.metrics, result.failures)


def site_reply(reply: Message, node: int) -> SiteReply:
    if reply.has_error():
        return SiteReply(node, error=reply.error.reason)
    details = {k: str(v) for k, v in reply.content["site"].items()}
    name = details.pop("name")
    return SiteReply(node, name, {k: float(v) for k, v in reply.content["metrics"].items()}, details)
