"""The fedmae server: a Flower ServerApp over :class:`fedmae.federated.federation.FederatedRun`.

The run (phases, rounds, census, resume, selection, checkpoints, privacy ledger) is plain Python
in ``fedmae/federated/federation.py``; it reaches the sites through ``server/grid_sites.py``
(Flower's Grid and strategies). This file only turns Flower's run settings into that run.

Run settings (``[tool.flwr.app.config]`` plus ``--run-config``): see
:mod:`fedmae.federated.settings`.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.exit import add_exit_handler

from fedmae.config import ExperimentConfig
from fedmae.federated.federation import FederatedRun
from fedmae.federated.flower_logging import log_through_flower
from fedmae.federated.settings import experiment_config, output_dir
from fedmae.process_exit import skip_final_collection
from server.grid_sites import GridSites

app = ServerApp()
skip_final_collection()  # the ServerApp's process exits without the last garbage collection


@app.main()
def main(grid: Grid, context: Context) -> None:
    log_through_flower()
    run_config = dict(context.run_config)
    cfg = experiment_config(run_config)
    run = federated_run(grid, cfg, output_dir(run_config, cfg), resume=bool(run_config.get("resume", False)))
    # Stopped from outside (the SuperLink or its SuperExec went away, a signal), Flower's exit
    # handlers run and then the process is ended within seconds: fedmae's own code may never see
    # an exception, so the record is written from one of those handlers.
    add_exit_handler(run.record_stop, run_before_force_exit=True)
    run.run()


def federated_run(grid: Grid, cfg: ExperimentConfig, out: Path, resume: bool) -> FederatedRun:
    """The federated run of ``cfg`` in ``out`` over the sites ``grid`` reaches."""
    return FederatedRun(GridSites(grid, cfg, out), cfg, out, resume=resume)
