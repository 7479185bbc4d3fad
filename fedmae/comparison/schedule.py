"""Independent runs of a comparison, one after another in this process or at once in workers.

A :class:`Task` is one run (an arm's pre-training, one site's pre-training or fine-tuning, a
Flower simulation) that may wait for others. :func:`run_tasks` runs them in list order when
``workers`` is 1, in this process, exactly as a plain loop would; otherwise in that many worker
processes, each with ``threads`` PyTorch threads (and its own GPU, or a share of one), starting
every task as soon as what it waits for is done: first the tasks that others wait for (the long
pre-training runs), then the rest, each group earliest in the list first, so that the short runs
fill the end and the workers finish together. Each run writes its
checkpoints itself, so the results do not depend on which process ran it: with the same number
of threads per run they are the same to the bit (tests/test_compare.py checks it).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import torch

from fedmae.process_exit import skip_final_collection

log = logging.getLogger(__name__)

MAX_AUTO_WORKERS = 8


@dataclass
class Task:
    key: Hashable  # names the task, e.g. (seed, arm, "pretrain", site)
    run: Callable[..., Any]  # a module-level function (it is sent to a worker process by name)
    args: tuple = ()
    after: tuple[Hashable, ...] = ()  # keys of the tasks that must finish first


def resolve_parallel(parallel: int | str, tasks: int) -> tuple[int, int]:
    """(workers, threads per worker) for ``compare.parallel``: ``auto`` is one worker per GPU when
    there are GPUs, else one per core (at most 8), never more than there are tasks; the cores are
    shared evenly."""
    cores = _cores()
    if parallel == "auto":
        gpus = torch.cuda.device_count()
        workers = gpus if gpus else min(cores, MAX_AUTO_WORKERS)
    else:
        workers = int(parallel)
    workers = max(1, min(workers, tasks))
    return workers, max(1, cores // workers)


def run_tasks(tasks: Sequence[Task], workers: int, threads: int,
              on_done: Callable[[Task, Any], None] | None = None) -> dict[Hashable, Any]:
    """Run every task after the ones it waits for; returns each task's result by key.
    ``on_done(task, result)`` runs in this process as each task finishes."""
    known = {task.key for task in tasks}
    for task in tasks:
        missing = [k for k in task.after if k not in known]
        if missing:
            raise ValueError(f"task {task.key} waits for unknown tasks {missing}")
    if workers <= 1:
        results: dict[Hashable, Any] = {}
        for task in _in_order(tasks):
            results[task.key] = task.run(*task.args)
            if on_done is not None:
                on_done(task, results[task.key])
        return results
    return _run_in_workers(list(tasks), workers, threads, on_done)


def _in_order(tasks: Sequence[Task]) -> list[Task]:
    """List order, except that a task never runs before what it waits for."""
    done: set[Hashable] = set()
    ordered, pending = [], list(tasks)
    while pending:
        task = next(t for t in pending if all(k in done for k in t.after))
        pending.remove(task)
        ordered.append(task)
        done.add(task.key)
    return ordered


def _run_in_workers(tasks: list[Task], workers: int, threads: int,
                    on_done: Callable[[Task, Any], None] | None) -> dict[Hashable, Any]:
    context = multiprocessing.get_context("spawn")  # a clean process: no OpenMP state forked from this one
    gpus = context.Queue()
    visible = _visible_gpus()
    for i in range(workers):  # round-robin: more workers than GPUs share them
        gpus.put(visible[i % len(visible)] if visible else None)
    results: dict[Hashable, Any] = {}
    running: dict[Future, Task] = {}
    awaited = {key for task in tasks for key in task.after}
    pending = sorted(tasks, key=lambda task: task.key not in awaited)  # stable: list order within each group
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                               initargs=(threads, gpus, logging.getLogger("fedmae").getEffectiveLevel()))
    try:
        while pending or running:
            for task in [t for t in pending if all(k in results for k in t.after)][: workers - len(running)]:
                pending.remove(task)
                running[pool.submit(task.run, *task.args)] = task
            if not running:
                raise ValueError(f"tasks {[t.key for t in pending]} wait for each other")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                task = running.pop(future)
                results[task.key] = future.result()  # a task's error stops the comparison here
                if on_done is not None:
                    on_done(task, results[task.key])
    except BaseException:
        # Stop what still runs: each run's checkpoints are written atomically, so a rerun resumes
        # it exactly (a Flower simulation stops its own processes on SIGTERM).
        _stop_workers(pool)
        raise
    pool.shutdown(wait=True)
    return results


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    pool.shutdown(wait=False, cancel_futures=True)
    processes = list(getattr(pool, "_processes", {}).values())  # no public handle before Python 3.14
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=30)


def _start_worker(threads: int, gpu_queue, log_level: int) -> None:
    """A worker's share of the machine: ``threads`` PyTorch threads (its Flower sites inherit
    the same through OMP_NUM_THREADS) and one GPU (or a share of one)."""
    skip_final_collection()
    gpu = gpu_queue.get()
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # before anything touches CUDA in this process
    torch.set_num_threads(threads)
    # The progress lines say what runs; the workers' own log keeps to warnings, as readable as
    # one run's when several print at once.
    logging.basicConfig(level=max(log_level, logging.WARNING), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def worker_cores() -> int | None:
    """The cores this process may use: its worker's share (set by :func:`_start_worker`), or None
    outside a worker (all of them, unless the user limited OMP_NUM_THREADS)."""
    threads = os.environ.get("OMP_NUM_THREADS", "")
    return int(threads) if threads.isdigit() and int(threads) > 0 else None


def _visible_gpus() -> list[str]:
    if not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return [g for g in visible.split(",") if g.strip()] if visible else [str(i) for i in range(torch.cuda.device_count())]


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
