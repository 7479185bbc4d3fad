"""One training round under Flower's SecAgg+, called from fedmae's Message-API ServerApp.

SecAgg+ exists only in Flower's legacy workflow API (``SecAggPlusWorkflow`` needs a
``LegacyContext`` with a legacy strategy). Rather than running whole phases under
``DefaultWorkflow``, each secure round runs the workflow once with a one-round legacy FedAvg over
exactly the given sites, and hands back the aggregate; evaluation and checkpointing stay with the
rest of the ServerApp. What the server learns in a secure round: the (weighted, quantised) sum of
the sites' weights, and each site's plaintext scalar metrics (num-examples, loss, name) — never
one site's weights (the sites' replies carry masked integer vectors, no arrays).

How SecAgg+ weighs and quantises (Flower 1.42, ``secaggplus_mod``): each site multiplies its
weights by num-examples / max_weight, clips the product to +-clipping_range (silently), quantises
it to quantization_range levels and masks it; the server divides the unmasked sum by the summed
ratios. ``max_weight`` is the largest site's num-examples, which keeps the rounding error smallest
(about N x 2 x clipping_range / quantization_range x max_weight / total examples).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import SimpleClientManager
from flwr.server.compat import LegacyContext
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from fedmae.config import PrivacyConfig
from fedmae.federated.updates import TENSOR_NAMES


@dataclass
class SecureRound:
    """What one secure round gave: the new global weights (None when the protocol halted), each
    answering site's plaintext metrics by node id, and the failures Flower reported."""

    arrays: dict[str, torch.Tensor] | None
    metrics: dict[int, dict[str, Any]]
    failures: list[str]


class _OneRound(LegacyFedAvg):
    """A legacy FedAvg that asks exactly the given sites once and keeps what the workflow hands it
    (the unmask stage has already put the unmasked average into every result)."""

    def __init__(self, proxies: list[GridClientProxy], config: dict[str, Any]):
        super().__init__(fraction_fit=1.0, min_fit_clients=len(proxies), min_available_clients=len(proxies))
        self.proxies, self.config = proxies, config
        self.results: list | None = None
        self.failures: list = []

    def configure_fit(self, server_round, parameters, client_manager):  # type: ignore[override]
        return [(proxy, FitIns(parameters, dict(self.config))) for proxy in self.proxies]

    def aggregate_fit(self, server_round, results, failures):  # type: ignore[override]
        self.results, self.failures = results, failures
        return (results[0][1].parameters if results else None), {}


def secure_round(grid: Grid, arrays: dict[str, torch.Tensor], config: dict[str, Any], nodes: list[int],
                 privacy: PrivacyConfig, max_weight: float, server_round: int, timeout: float) -> SecureRound:
    names = list(arrays)
    proxies = [GridClientProxy(node_id=node, grid=grid, run_id=grid.run.run_id) for node in nodes]
    manager = SimpleClientManager()
    for proxy in proxies:
        manager.register(proxy)
    strategy = _OneRound(proxies, {**config, TENSOR_NAMES: "\t".join(names)})
    # A fresh state: LegacyContext shares the context's state and the workflow writes into it.
    context = LegacyContext(Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            strategy=strategy, client_manager=manager)
    parameters = ndarrays_to_parameters([arrays[k].detach().cpu().float().numpy() for k in names])
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(parameters, keep_input=True)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: server_round})
    # Integers, not fractions: Flower reads a float share count as a share of the sites.
    SecAggPlusWorkflow(num_shares=int(privacy.secagg_shares), reconstruction_threshold=int(privacy.secagg_threshold),
                       max_weight=float(max_weight), clipping_range=privacy.secagg_clipping_range,
                       quantization_range=privacy.secagg_quantization_range, timeout=timeout)(grid, context)
    failures = sorted({str(f) for f in strategy.failures})  # Flower lists a failed site twice
    if strategy.results is None:
        return SecureRound(None, {}, failures or ["SecAgg+ halted: fewer sites left than secagg_threshold"])
    average = parameters_to_ndarrays(compat.arrayrecord_to_parameters(context.state.array_records[MAIN_PARAMS_RECORD],
                                                                      keep_input=True))
    # Flower dequantises to float64; the global model stays in the sites' dtype.
    new = {k: torch.from_numpy(np.asarray(a)).to(arrays[k].dtype).reshape(arrays[k].shape) for k, a in zip(names, average)}
    metrics = {proxy.node_id: {**fit.metrics, "num-examples": fit.num_examples} for proxy, fit in strategy.results}
    return SecureRound(new, metrics, failures)
