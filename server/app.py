"""The fedmae server: a Flower ServerApp over :class:`fedmae.federated.federation.FederatedRun`.

The run (phases, rounds, census, resume, selection, checkpoints, privacy ledger) is plain Python
in ``fedmae/federated/federation.py``; it reaches the sites through ``server/grid_sites.py``
(Flower's Grid and strategies). This file turns Flower's run settings into that run, and fits
it to Flower's ServerApp process: the Grid's polling for replies, and the end of a ServerApp whose
SuperExec died.

Run settings (``[tool.flwr.app.config]`` plus ``--run-config``): see
:mod:`fedmae.federated.settings`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.exit import add_exit_handler
from flwr.superlink.grid import HttpGrid

from fedmae.config import ExperimentConfig
from fedmae.federated.federation import FederatedRun
from fedmae.federated.flower_logging import log_through_flower
from fedmae.federated.settings import experiment_config, output_dir
from fedmae.process_exit import skip_final_collection
from server.grid_sites import GridSites

app = ServerApp()
REPLY_POLL_SECONDS = 0.25  # how often a deployed ServerApp looks for the sites' replies
ORPHAN_GRACE_SECONDS = 10.0  # after the SuperExec died, for Flower's own exit to end the ServerApp
skip_final_collection()  # the ServerApp's process exits without the last garbage collection


@app.main()
def main(grid: Grid, context: Context) -> None:
    log_through_flower()
    poll_replies_often(grid)
    run_config = dict(context.run_config)
    cfg = experiment_config(run_config)
    run = federated_run(grid, cfg, output_dir(run_config, cfg), resume=bool(run_config.get("resume", False)))
    # Stopped from outside (the SuperLink or its SuperExec went away, a signal), Flower's exit
    # handlers run and then the process is ended within seconds: fedmae's own code may never see
    # an exception, so the record is written from one of those handlers.
    add_exit_handler(run.record_stop, run_before_force_exit=True)
    end_when_orphaned(run)
    run.run()


def poll_replies_often(grid: Grid, every: float = REPLY_POLL_SECONDS) -> None:
    """Look for the sites' replies every ``every`` seconds instead of Flower's 3 s.

    A deployed ServerApp's Grid (Flower 1.42's ``HttpGrid``) sleeps 3 s between looks, hard-coded:
    on average 1.5 s lost at every message exchange, and a round is one to three of them. This is
    its ``send_and_receive``, unchanged but for the pause (a look is one small request to the
    SuperLink). The simulation's in-memory Grid already looks every 0.1 s and is left as it is.
    """
    if not isinstance(grid, HttpGrid):
        return

    def send_and_receive(messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        waiting = set(grid.push_messages(messages))
        end_time = time.time() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        while timeout is None or time.time() < end_time:
            pulled = list(grid.pull_messages(waiting))
            replies.extend(pulled)
            waiting.difference_update(reply.metadata.reply_to_message_id for reply in pulled)
            if not waiting:
                break
            time.sleep(every)
        return replies

    grid.send_and_receive = send_and_receive  # Flower's workflows (SecAgg+) call it on the Grid too


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
