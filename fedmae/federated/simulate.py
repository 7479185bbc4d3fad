"""`fedmae simulate`: the fedmae Flower app on Flower's simulation engine, one virtual site per
site of the configured data, offline, leaving nothing running.

It does what `flwr run .` does, with the parts a researcher should not have to manage: a private
FLWR_HOME, a SuperLink in simulation mode on free local ports that this process starts and stops
(its whole process tree, whatever happens), client resources sized for the machine, runtime dependency
installation off, and the resolved experiment (the run's config.yaml) and output folder passed
as run settings.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from fedmae.config import ExperimentConfig, FederatedConfig
from fedmae.engine.runs import check_output_dir, claim_output_dir, hold_output_dir, read_marker
from fedmae.federated.run_record import SUMMARY, recorded_status
from fedmae.federated.settings import APP_DIR, check_site_count
from fedmae.federated.watchdog import descendants, parent_death_signal, stop_pids

log = logging.getLogger(__name__)

STARTUP_TIMEOUT = 60.0
POLL_SECONDS = 0.2  # how often the run's record is looked at while Flower runs it
LAST_LINES_SECONDS = 1.0  # after the run ended, for Flower's log stream to deliver its last lines
STOP_GRACE_SECONDS = 15.0  # SIGTERM to SIGKILL, for Flower's processes to shut down cleanly
ENDED_GRACE_SECONDS = 1.0  # the same, once the run recorded its end (the sites' actors exit in ~0.2 s)


def client_resources(num_sites: int, cpus: int | None = None, fed: FederatedConfig | None = None,
                     gpus: int | None = None) -> dict[str, float]:
    """Flower's client resources per virtual site. CPUs: ``federated.cpus_per_site``, else an
    equal share of ``cpus`` (default: the machine's) so that all sites run at once if they fit.
    GPU share: 1 / ``federated.sites_per_gpu``, else the ``gpus`` (default: those torch sees)
    shared evenly, at most one per site; none without a GPU. Ray runs as many sites at once as
    these shares fit in the machine. On a Ray cluster (``federated.ray_address``) this machine's
    cores and GPUs say nothing of the cluster's: a site asks for ``cpus_per_site`` (default 1) and
    1 / ``sites_per_gpu`` GPUs (default none)."""
    fed = fed or FederatedConfig()
    if fed.ray_address:
        return {"num-cpus": fed.cpus_per_site or 1, "num-gpus": round(1.0 / fed.sites_per_gpu, 4) if fed.sites_per_gpu else 0.0}
    cpus = cpus or os.cpu_count() or 1
    gpus = torch.cuda.device_count() if gpus is None else gpus
    if fed.cpus_per_site and fed.cpus_per_site > cpus:  # Ray would never find room for one site: a hang
        raise ValueError(f"federated.cpus_per_site: {fed.cpus_per_site}, but the simulation has {cpus} core(s); "
                         f"lower it to at most {cpus}")
    num_cpus = fed.cpus_per_site or max(1, cpus // max(1, min(num_sites, cpus)))
    if not gpus:
        num_gpus = 0.0
    elif fed.sites_per_gpu:
        num_gpus = 1.0 / fed.sites_per_gpu
    else:
        num_gpus = min(1.0, gpus / num_sites)
    return {"num-cpus": num_cpus, "num-gpus": round(num_gpus, 4)}


def _ray_init(fed: FederatedConfig, cpus: int | None) -> tuple[str, dict[str, str]]:
    """How the simulation backend starts Ray: its ``init-args`` lines in Flower's config.toml, and
    environment for the SuperLink (whose simulation process calls ``ray.init``)."""
    if fed.ray_address:
        # Join the running cluster. Flower 1.42's config.toml passes only num-cpus / num-gpus /
        # logging-level / log-to-driver to ray.init, no address; ray.init takes it from
        # RAY_ADDRESS, and refuses a core count for a cluster it did not start.
        return "", {"RAY_ADDRESS": fed.ray_address}
    # Ray schedules actors within this many cores, so a simulation given a share of the machine
    # (a comparison running other arms beside it) keeps to it.
    return (f"options.backend.init-args.num-cpus = {cpus}\n" if cpus else ""), {}


def simulate(cfg: ExperimentConfig, num_sites: int, output_dir: Path, resume: bool = False, stream=None,
             cpus: int | None = None) -> int:
    """Run ``cfg`` on ``num_sites`` virtual sites; returns the exit status of ``flwr run``.
    ``cpus``: the cores the simulation may use (default: all of the machine's)."""
    check_site_count(cfg, num_sites)  # before Flower starts, not as a traceback inside it
    if read_marker(output_dir) is None:  # claimed before the SuperLink's log goes in; the ServerApp checks the rest
        check_output_dir(output_dir, "federated", cfg, holds_run=False, resume=True, force=False)
    # Claiming records the resolved experiment as config.yaml: the ServerApp runs that file, and
    # sends it on to every site with its requests, so every process runs exactly ``cfg``.
    with hold_output_dir(output_dir):  # refused while another run writes into the folder
        claim_output_dir(output_dir, "federated", cfg)
    experiment = output_dir.absolute() / "config.yaml"
    if not (APP_DIR / "pyproject.toml").is_file():
        raise FileNotFoundError(f"{APP_DIR}: the fedmae app (pyproject.toml) is not here; run from a source checkout")
    started = time.time_ns()
    home = Path(tempfile.mkdtemp(prefix="fedmae-flwr-"))
    http_port, control_port = free_port(), free_port()
    resources = client_resources(num_sites, cpus, cfg.federated)
    ray_options, ray_env = _ray_init(cfg.federated, cpus)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "fedmae-simulation"\n\n[superlink.fedmae-simulation]\n'
        f'address = "127.0.0.1:{http_port}"\ninsecure = true\n'
        f"options.num-supernodes = {num_sites}\n"
        f"options.backend.client-resources.num-cpus = {resources['num-cpus']}\n"
        f"options.backend.client-resources.num-gpus = {resources['num-gpus']}\n"
        + ray_options
    )
    env = {**os.environ, **ray_env, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_DISABLE_UPDATE_CHECK": "1"}
    output_dir.mkdir(parents=True, exist_ok=True)
    # A terminated `fedmae simulate` must still stop what it started: SIGTERM unwinds like Ctrl-C.
    previous_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
    superlink_log = (output_dir / "superlink.log").open("ab")
    superlink = subprocess.Popen(
        [flower_tool("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
         "--control-api-address", f"127.0.0.1:{control_port}", "--host", "127.0.0.1", "--port", str(http_port),
         "--database", ":flwr-in-memory:"],
        env=env, stdout=superlink_log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    watchdog, ended = None, False
    try:
        # The finally below does not run if this process is killed (SIGKILL, the OOM killer), and
        # the SuperLink's tree lives in other sessions: the watchdog stops it then (watchdog.py).
        watchdog = subprocess.Popen(
            [sys.executable, "-m", "fedmae.federated.watchdog", "--parent", str(os.getpid()),
             "--root", str(superlink.pid), "--home", str(home)],
            stdin=subprocess.DEVNULL, stdout=superlink_log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        _wait_until_healthy(superlink, http_port, output_dir / "superlink.log")
        run_config = " ".join([
            f"experiment={json.dumps(str(experiment))}",
            'overrides=""',
            f"output-dir={json.dumps(str(output_dir.absolute()))}",
            f"resume={'true' if resume else 'false'}",
        ])
        log.info("simulating %d sites (%s CPU, %s GPU each) with Flower%s; SuperLink log: %s",
                 num_sites, resources["num-cpus"], resources["num-gpus"],
                 f" on the Ray cluster at {cfg.federated.ray_address}" if cfg.federated.ray_address else "",
                 output_dir / "superlink.log")
        command = [flower_tool("flwr"), "run", str(APP_DIR), "fedmae-simulation", "--stream", "--run-config", run_config]
        # `flwr run` is this process's own child (same session): the kernel ends it with this process.
        flwr_run = subprocess.Popen(command, env=env, stdout=stream, stderr=subprocess.STDOUT if stream else None,
                                    preexec_fn=parent_death_signal())
        status = _wait_for_run(flwr_run, output_dir, started)
        ended = _recorded_end(output_dir, started)
        return status
    finally:
        # A run that recorded its end left nothing in Flower's tree that it needs: Ray's own
        # graceful shut-down (its GCS takes ~2 s on SIGTERM here) is not waited for. Otherwise
        # (interrupted, failed before its record) each process gets the full grace to clean up.
        stop_process_tree(superlink, grace=ENDED_GRACE_SECONDS if ended else STOP_GRACE_SECONDS)
        superlink_log.close()
        shutil.rmtree(home, ignore_errors=True)
        if watchdog is not None:  # last: a kill during the cleanup above is still covered
            watchdog.kill()  # it holds nothing to clean up, and must not keep this process waiting
            watchdog.wait()
        signal.signal(signal.SIGTERM, previous_handler)


def _wait_for_run(flwr_run: subprocess.Popen, output_dir: Path, started_ns: int) -> int:
    """Wait for ``flwr run`` to exit, or for the run to end: once the ServerApp has recorded the
    run as done or failed (``summary.json``, written after every output), Flower's own shut-down
    (the simulation engine, Ray, the log stream; ~4 s here) produces nothing the run needs, so it
    is cut short after a moment for the last log lines, and the caller stops what is left."""
    ended = None
    while True:
        try:
            return flwr_run.wait(timeout=POLL_SECONDS)
        except subprocess.TimeoutExpired:
            pass
        if ended is None and _recorded_end(output_dir, started_ns):
            ended = time.monotonic()
        if ended is not None and time.monotonic() - ended >= LAST_LINES_SECONDS:
            log.info("the run has ended; stopping Flower's simulation without waiting for its own shut-down")
            flwr_run.terminate()
            try:
                flwr_run.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                flwr_run.kill()
                flwr_run.wait()
            return 0  # what the run did is in summary.json, which the caller reads


def _recorded_end(output_dir: Path, started_ns: int) -> bool:
    """Whether this run's ServerApp recorded it as done or failed (a summary from before this
    simulation started, e.g. of the run being resumed, does not count)."""
    try:
        if (output_dir / SUMMARY).stat().st_mtime_ns < started_ns:
            return False
    except OSError:  # not written yet
        return False
    return recorded_status(output_dir) in ("done", "failed")


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def flower_tool(name: str) -> str:
    """Flower's console scripts next to this Python (the same environment), else on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_healthy(process: subprocess.Popen, port: int, log_file: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the Flower SuperLink exited with status {process.returncode}; see {log_file}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"the Flower SuperLink did not start within {STARTUP_TIMEOUT:.0f} s; see {log_file}")


def stop_process_tree(process: subprocess.Popen, also: set[int] | frozenset[int] = frozenset(),
                      grace: float = STOP_GRACE_SECONDS) -> None:
    """Stop a Flower process and everything it started: SuperExec, the simulation process, Ray.

    The simulation process is started in a session of its own, so signalling the SuperLink's
    process group does not reach it: the whole process tree is collected first (after the
    SuperLink dies its children are re-parented and can no longer be found), then terminated,
    then killed if still alive. ``also``: pids seen in the tree earlier (children of a process
    that has already exited are no longer in its tree). ``grace``: seconds between SIGTERM and SIGKILL.
    """
    stop_pids([process.pid, *descendants(process.pid), *also], grace=grace)
    try:
        process.wait(timeout=5.0)
    except subprocess.TimeoutExpired:
        pass
