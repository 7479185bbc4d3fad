"""The fedmae server: a Flower ServerApp over :class:`fedmae.federated.federation.FederatedRun`.

The run (phases, rounds, census, resume, selection, checkpoints, privacy ledger) is plain Python
in ``fedmae/federated/federation.py``; it reaches the sites through ``server/grid_sites.py``
(Flower's Grid and strategies). This file only turns Flower's run settings into that run.

Run settings (``[tool.flwr.app.config]`` plus ``--run-config``): see
:mod:`fedmae.federated.settings`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
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
ORPHAN_GRACE_SECONDS = 10.0  # after the SuperExec died, for Flower's own exit to end the ServerApp
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
    end_when_orphaned(run)
    run.run()


def end_when_orphaned(run: FederatedRun, grace: float = ORPHAN_GRACE_SECONDS) -> None:
    """End this ServerApp's process soon after the process that started it (Flower's SuperExec) dies.

    Flower's own parent monitor raises SIGINT from a thread of its own, and Python handles it in
    the main thread only when that thread next runs Python code. With the SuperLink gone, the main
    thread can stay blocked on the lock that Flower's connection retries share with its heartbeat
    and log threads: the ServerApp took 61 s to end in one CI run and over 240 s in another here.
    All that time it holds the run's output-dir, and a resume is refused. So, ``grace`` seconds
    after the parent died (time for Flower's own exit), this records the stop and ends the process.
    Everything the run writes is written atomically: ending it at any point loses nothing written.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:  # re-parented once the parent is gone: no pid to be reused
            time.sleep(0.5)
        time.sleep(grace)
        logging.getLogger("fedmae.server").warning(
            "the process that started this ServerApp (pid %d) is gone and Flower's own exit did not end it "
            "within %.0f s: recording the stop and ending it", parent, grace)
        run.record_stop()
        logging.shutdown()
        os._exit(1)

    threading.Thread(target=watch, name="fedmae-orphan-guard", daemon=True).start()


def federated_run(grid: Grid, cfg: ExperimentConfig, out: Path, resume: bool) -> FederatedRun:
    """The federated run of ``cfg`` in ``out`` over the sites ``grid`` reaches."""
    return FederatedRun(GridSites(grid, cfg, out), cfg, out, resume=resume)
