"""From a Flower run's settings (``[tool.flwr.app.config]`` plus ``--run-config``) and a node's
settings (``node_config``) to fedmae objects. No Flower import: plain dicts in, objects out.

Run settings: ``experiment`` (the YAML file; relative paths are relative to the app, whose
``configs/`` travel with it), ``overrides`` (``key=value`` pairs separated by ``;``, as
``--set`` takes them), ``output-dir`` (relative paths are relative to the SuperLink's working
directory; empty: ``runs/<name>/federated``) and ``resume``.

Node settings: in simulation Flower gives ``partition-id`` / ``num-partitions`` and the site is
that partition of the configured data; in a deployment ``site`` names the site and ``data-dir``
holds its data (read with the experiment's data source), ``state-dir`` where it keeps its
decoder and optimiser between rounds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedmae.config import ExperimentConfig, load_config, sites_needed

APP_DIR = Path(__file__).resolve().parents[2]
# A pre-training request's ``validate-round``: validate the weights received (the global model
# of that round) before training; the training reply then also carries ``val_loss`` and
# ``val-examples``.
VALIDATE_ROUND = "validate-round"


def experiment_config(run_config: Mapping[str, Any]) -> ExperimentConfig:
    path = Path(str(run_config.get("experiment", "configs/demo.yaml")))
    if not path.is_absolute():
        path = APP_DIR / path
    overrides = [item.strip() for item in str(run_config.get("overrides", "")).split(";") if item.strip()]
    return load_config(path, overrides)


def output_dir(run_config: Mapping[str, Any], cfg: ExperimentConfig) -> Path:
    configured = str(run_config.get("output-dir", "") or "")
    if configured:
        return Path(configured).absolute()
    return (Path(cfg.output_dir) if cfg.output_dir else Path("runs") / cfg.name / "federated").absolute()


def site_config(cfg: ExperimentConfig, node_config: Mapping[str, Any]) -> ExperimentConfig:
    """The experiment as one node sees it.

    In simulation, data that are divided into sites by fedmae (the built-in hospitals, or a
    simulated partition) get as many sites as the simulation has nodes; a deployed site reads its
    own folder (``data-dir``) as one site of the experiment's source.
    """
    if "num-partitions" in node_config and (cfg.data.source == "synthetic" or cfg.data.partition != "natural"):
        data = dataclasses.replace(cfg.data, num_sites=int(node_config["num-partitions"]))
        return dataclasses.replace(cfg, data=data)
    if "data-dir" not in node_config or cfg.data.source == "synthetic":
        return cfg
    data = dataclasses.replace(cfg.data, root=str(Path(str(node_config["data-dir"])).absolute()), partition="natural",
                               num_sites=1, split_file=None)
    return dataclasses.replace(cfg, data=data)


def check_site_count(cfg: ExperimentConfig, num_sites: int) -> None:
    """Refuse, in one line, a federation too small for the experiment's privacy settings (known
    only once the sites are: from the data in simulation, from the sites that answer in a deployment)."""
    if cfg.federated.min_sites > num_sites:
        raise ValueError(f"federated.min_sites: {cfg.federated.min_sites}, but the federation has {num_sites} site(s); "
                         "no round could ever be used: lower federated.min_sites or add sites")
    fed = cfg.federated
    sampled = max(int(num_sites * fed.fraction_train), min(fed.min_sites, num_sites))
    if sampled < sites_needed(fed):
        raise ValueError(f"federated.strategy: {fed.strategy} with byzantine_sites={fed.byzantine_sites} needs "
                         f"{sites_needed(fed)} sites per round, but {sampled} of {num_sites} are sampled; add sites, "
                         "raise fraction_train or lower byzantine_sites")
    shares = cfg.federated.privacy.secagg_shares
    if cfg.federated.privacy.secure_aggregation and num_sites < shares:
        raise ValueError(f"federated.privacy.secure_aggregation: {num_sites} site(s), fewer than "
                         f"federated.privacy.secagg_shares={shares}; secure aggregation needs at least that many")

