"""The fedmae server: a Flower ServerApp. Thin glue over :mod:`fedmae.federated`.

A run: ask every connected site to describe itself (name, task outputs), pre-train the encoder
for ``pretrain.epochs / federated.local_epochs`` rounds with the configured strategy, then
fine-tune (FedAvg of the whole model, or each site alone) and collect per-site test metrics.
Every round's global model is checkpointed; ``resume = true`` continues from the last one.
Outputs (``output-dir``): ``global/`` checkpoints, ``rounds.jsonl`` (one line per site and round),
``summary.json``, ``config.yaml``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.supercore.exit import add_exit_handler

from fedmae.config import ExperimentConfig, validate_federated
from fedmae.engine.loop import MetricsLog
from fedmae.evaluation import weighted_mean
from fedmae.federated.flower_logging import log_through_flower
from fedmae.federated.global_model import GlobalCheckpoints, frozen_keys, initial_encoder, initial_finetune_model
from fedmae.federated.run_record import SUMMARY, open_federated_run, write_summary
from fedmae.federated.settings import check_site_count, experiment_config, output_dir
from fedmae.federated.updates import to_wire
from fedmae.models.state import ENCODER_PREFIX
from server.privacy import ledger, new_accountant, spent
from server.secure_aggregation import secure_round
from server.strategy import build_strategy

log = logging.getLogger("fedmae.server")
WAIT_REPORT_EVERY = 30.0  # seconds between "waiting for sites" lines
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    log_through_flower()
    run_config = dict(context.run_config)
    cfg = experiment_config(run_config)
    federated = FederatedRun(grid, cfg, output_dir(run_config, cfg), resume=bool(run_config.get("resume", False)))
    # Stopped from outside (the SuperLink or its SuperExec went away, a signal), Flower's exit
    # handlers run and then the process is ended within seconds: fedmae's own code may never see
    # an exception, so the record is written from one of those handlers.
    add_exit_handler(federated.record_stop, run_before_force_exit=True)
    federated.run()


class FederatedRun:
    def __init__(self, grid: Grid, cfg: ExperimentConfig, out: Path, resume: bool):
        self.grid, self.cfg, self.out, self.resume = grid, cfg, Path(out), resume
        self.checkpoints = GlobalCheckpoints(self.out / "global", cfg)
        open_federated_run(self.out, cfg, resume=resume, option="output-dir")
        self.log = MetricsLog(self.out / "rounds.jsonl")
        self.site_names: dict[int, str] = {}
        self.asked: dict[str, int] = {}  # message id -> the node it went to, of the last ask()
        self.site_images: dict[int, int] = {}
        self.summary: dict[str, Any] = {"output_dir": str(self.out), "config": cfg.to_dict()}
        self.accountant = None

    def run(self) -> dict[str, Any]:
        """Every phase; ``summary.json`` records the run as running, then done or failed (with why)."""
        write_summary(self.out, self.summary, "running")
        try:
            self._run()
        except BaseException as err:
            write_summary(self.out, self.summary, "failed", error=f"{type(err).__name__}: {err}")
            raise
        return self.summary

    def record_stop(self) -> None:
        """The ServerApp process is being ended from outside: a run still recorded as running is
        recorded as failed (one that ended, done or failed, is left as it is)."""
        try:
            running = json.loads((self.out / SUMMARY).read_text()).get("status") == "running"
        except (OSError, ValueError):
            return
        if running:
            write_summary(self.out, self.summary, "failed",
                          error="stopped from outside while running (the SuperLink or its SuperExec stopped, or the "
                                "ServerApp process was signalled); resume=true continues from the last global checkpoint")

    def _run(self) -> None:
        started = time.monotonic()
        sites = self.describe_sites()
        check_site_count(self.cfg, len(sites))
        validate_federated(self.cfg)
        if self.cfg.federated.privacy.dp != "none":
            self.accountant = new_accountant(self.cfg.federated.privacy, len(sites), self._saved_ledger())
        start = self.cfg.federated.start_from
        encoder = self.pretrain(len(sites)) if start is None else self.starting_encoder(start)
        mode = self.cfg.federated.finetune
        if mode == "federated":
            self.finetune_federated(sites, encoder)
        elif mode == "local":
            self.finetune_local(encoder)
        if self.accountant is not None:
            self.summary["privacy"] = spent(self.accountant, self.cfg.federated.privacy)
        self.summary["seconds"] = round(time.monotonic() - started, 1)
        write_summary(self.out, self.summary, "done")
        log.info("federated run done in %.0f s; outputs in %s", self.summary["seconds"], self.out)

    # ---- sites -------------------------------------------------------------------------------

    def describe_sites(self) -> dict[int, dict[str, Any]]:
        """Wait for at least ``min_sites`` sites (up to ``round_timeout``, saying every
        ``WAIT_REPORT_EVERY`` s how many are connected), then ask each for its name and task outputs."""
        fed = self.cfg.federated
        started = time.monotonic()
        reported = started
        nodes = list(self.grid.get_node_ids())
        while len(nodes) < fed.min_sites:
            waited = time.monotonic() - started
            if waited >= fed.round_timeout:
                raise RuntimeError(f"{len(nodes)} site(s) connected within federated.round_timeout={fed.round_timeout:g} s; "
                                   f"federated.min_sites is {fed.min_sites}: start the missing sites' SuperNodes "
                                   "or lower federated.min_sites")
            if time.monotonic() - reported >= WAIT_REPORT_EVERY:
                reported = time.monotonic()
                log.info("waiting for sites: %d of federated.min_sites=%d connected (nodes %s) after %.0f s; "
                         "giving up after federated.round_timeout=%g s", len(nodes), fed.min_sites,
                         ", ".join(map(str, nodes)) or "none", waited, fed.round_timeout)
            time.sleep(1.0)
            nodes = list(self.grid.get_node_ids())
        replies = self.ask(nodes, ConfigRecord({"phase": "describe"}))
        sites = {}
        for reply in replies:
            node = self.asked.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if reply.has_error():
                log.warning("site on node %d could not describe itself: %s", node, reply.error.reason)
                continue
            info = reply.content["site"]
            metrics = reply.content["metrics"]
            sites[node] = {"name": str(info["name"]), "outputs": int(metrics["num-outputs"]),
                           "class_names": [c for c in str(info.get("class-names", "")).split("\t") if c],
                           "images": int(metrics["num-examples"])}
            self.site_names[node] = sites[node]["name"]
            self.site_images[node] = sites[node]["images"]
        if len(sites) < fed.min_sites:
            raise RuntimeError(f"only {len(sites)} site(s) answered; federated.min_sites is {fed.min_sites}")
        self.summary["sites"] = {s["name"]: {"images": s["images"]} for s in sites.values()}
        log.info("sites: %s", ", ".join(f"{s['name']} ({s['images']} images)" for s in sites.values()))
        return sites

    def ask(self, nodes: list[int], config: ConfigRecord, arrays: dict[str, torch.Tensor] | None = None) -> list[Message]:
        """One evaluate-type message per node (a query, not a training round)."""
        content = RecordDict({"config": config})
        if arrays is not None:
            content["arrays"] = ArrayRecord(to_wire(arrays, self.cfg.federated.transport))
            config["transport"] = self.cfg.federated.transport
        messages = [Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=n) for n in nodes]
        replies = list(self.grid.send_and_receive(messages, timeout=self.cfg.federated.round_timeout))
        # Which node each reply is about: an error the SuperLink writes for a silent node ("Node
        # Unavailable") comes from the SuperLink's own node id. (The Grid set the ids on sending.)
        self.asked = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        return replies

    # ---- phases ------------------------------------------------------------------------------

    def pretrain(self, num_sites: int) -> dict[str, torch.Tensor]:
        total = self.cfg.pretrain_rounds
        point = self.checkpoints.resume_point("pretrain") if self.resume else None
        done, state = (point[0], point[1]) if point else (0, initial_encoder(self.cfg))
        if point:
            log.info("resuming pre-training after round %d of %d", done, total)
        if done < total:
            state = self._rounds("pretrain", num_sites, state, done, total)
        self.summary["pretrain"] = {"rounds": total, "checkpoint": str(self.checkpoints.last("pretrain"))}
        return state

    def starting_encoder(self, start: str) -> dict[str, torch.Tensor]:
        """federated.start_from: fine-tune a given encoder (or a random one) without pre-training here."""
        self.summary["pretrain"] = {"start_from": start}
        if start == "random":
            return initial_encoder(self.cfg)
        from fedmae.checkpoint import load_checkpoint

        payload = load_checkpoint(start)
        if payload["kind"] not in ("mae", "global"):
            raise ValueError(f"federated.start_from: {start} is a {payload['kind']} checkpoint, not a pre-training one")
        return {k: v for k, v in payload["model"].items() if k.startswith(ENCODER_PREFIX)}

    def finetune_federated(self, sites: dict[int, dict[str, Any]], encoder: dict[str, torch.Tensor]) -> None:
        outputs = {s["outputs"] for s in sites.values()}
        names = {tuple(s["class_names"]) for s in sites.values()}
        if len(outputs) != 1 or len(names) != 1 or 0 in outputs:
            raise RuntimeError(f"sites disagree on the task (or have none): outputs {sorted(outputs)}, classes {sorted(names)}")
        total = self.cfg.finetune_rounds
        point = self.checkpoints.resume_point("finetune") if self.resume else None
        done, state = (point[0], point[1]) if point else (0, initial_finetune_model(self.cfg, outputs.pop(), encoder))
        if done < total:
            state = self._rounds("finetune", len(sites), state, done, total)
        best = self.checkpoints.best("finetune")
        if not best.exists():  # only when the privacy budget ran out before the first round
            log.warning("no federated fine-tuning round was released; no fine-tuned model to test")
            self.summary["finetune"] = {"mode": "federated", "rounds": 0, "test": {}}
            return
        from fedmae.checkpoint import load_checkpoint

        selected = load_checkpoint(best, expect_kind="global")
        replies = self.ask(list(self.site_names), ConfigRecord({"phase": "finetune", "split": "test"}), selected["model"])
        per_site = self._site_metrics(replies)
        self.summary["finetune"] = {"mode": "federated", "selected_round": selected["extra"]["round"],
                                    "val": selected["metrics"].get("val", {}), "test": {"sites": per_site,
                                    "pooled (example-weighted mean)": weighted_mean(per_site.values())},
                                    "checkpoint": str(best)}

    def finetune_local(self, encoder: dict[str, torch.Tensor]) -> None:
        replies = self.ask(list(self.site_names), ConfigRecord({"phase": "finetune-local"}), encoder)
        per_site = self._site_metrics(replies)
        self.summary["finetune"] = {"mode": "local", "test": {"sites": per_site,
                                    "pooled (example-weighted mean)": weighted_mean(per_site.values())}}

    def _site_metrics(self, replies: list[Message]) -> dict[str, dict[str, float]]:
        per_site = {}
        for reply in replies:
            node = self.asked.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            site = self.site_names.get(node, f"node {node}")
            if reply.has_error():
                log.warning("site %s failed: %s", site, reply.error.reason)
                continue
            per_site[str(reply.content["site"]["name"])] = {k: float(v) for k, v in reply.content["metrics"].items()}
        return per_site

    def _rounds(self, phase: str, num_sites: int, state: dict[str, torch.Tensor], done: int, total: int) -> dict[str, torch.Tensor]:
        """Rounds done+1 .. total of ``phase``, checkpointing the global model after each."""
        if self.resume:
            self._mark_resume(phase, done)
        evaluate_extra = {"split": "val"} if phase == "finetune" else {}
        fixed = frozen_keys(self.cfg, phase) if self.accountant is not None else []
        strategy = build_strategy(self.cfg, phase, num_sites, accountant=self.accountant, round_offset=done,
                                  metrics_log=self.log, site_names=self.site_names, evaluate_extra=evaluate_extra,
                                  fixed_keys=fixed)
        best_score = self._best_score(phase)
        latest = state

        def after_round(server_round: int, arrays: ArrayRecord) -> None:
            nonlocal best_score, latest
            if server_round == 0:
                return None
            run_round = server_round + done
            latest = arrays.to_torch_state_dict()
            evaluation = dict(strategy.last_evaluation)
            score = evaluation.get("main", float("nan")) if phase == "finetune" else -evaluation.get("val_loss", float("nan"))
            # Ties go to the later round (see fedmae.engine.finetune).
            better = phase == "finetune" and (score >= best_score or not self.checkpoints.best(phase).exists())
            if better and score == score:
                best_score = score
            metrics: dict[str, Any] = {"val": evaluation, "best_score": best_score}
            if self.accountant is not None:
                # Saved with every round so that a resumed run keeps counting from here.
                metrics["privacy"] = ledger(self.accountant)
                used = spent(self.accountant, self.cfg.federated.privacy)
                self.log.write({"phase": phase, "round": run_round, "epsilon": used["epsilon"], "delta": used["delta"]})
                log.info("%s round %d: privacy spent epsilon=%.3f at delta=%g", phase, run_round, used["epsilon"], used["delta"])
            self.checkpoints.save(phase, run_round, latest, metrics, best=better)
            log.info("%s round %d/%d: validation %s", phase, run_round, total, evaluation)
            return None

        try:
            if self.cfg.federated.privacy.secure_aggregation:
                self._secure_rounds(strategy, state, total - done, after_round)
            else:
                strategy.start(grid=self.grid, initial_arrays=ArrayRecord(state), num_rounds=total - done,
                               timeout=self.cfg.federated.round_timeout, evaluate_fn=after_round)
        except PrivacyBudgetExhausted as err:
            # The last released model stands; no further round of any phase may be trained.
            log.warning("%s: %s; stopping training rounds here", phase, err)
            self.summary.setdefault("privacy_budget_reached", {})[phase] = str(err)
        if strategy.kept_previous:
            self.summary.setdefault("rounds_without_update", {})[phase] = strategy.kept_previous
        return latest

    def _secure_rounds(self, strategy: Any, state: dict[str, torch.Tensor], rounds: int,
                       after_round: Callable[[int, ArrayRecord], None]) -> None:
        """Rounds whose sum comes from Flower's SecAgg+ workflow; evaluation, logging and
        checkpoints go through the same strategy hooks and callback as plain rounds."""
        fed = self.cfg.federated
        nodes = list(self.site_names)
        # Each site's weight is num-examples / max_weight: the largest site's count keeps the
        # quantisation error smallest (see server.secure_aggregation).
        max_weight = max(self.site_images.values())
        for server_round in range(1, rounds + 1):
            config = strategy.start_secure_round(server_round, state, nodes)
            result = secure_round(self.grid, state, config, nodes, fed.privacy, max_weight, config["round"], fed.round_timeout)
            accepted = strategy.accept_secure_aggregate(server_round, result.arrays, result.metrics, result.failures)
            state = accepted if accepted is not None else state
            messages = strategy.configure_evaluate(server_round, ArrayRecord(state), ConfigRecord(), self.grid)
            strategy.aggregate_evaluate(server_round, self.grid.send_and_receive(messages, timeout=fed.round_timeout))
            after_round(server_round, ArrayRecord(state))

    def _mark_resume(self, phase: str, done: int) -> None:
        """On resume, one line in rounds.jsonl: ``phase``'s records of rounds after ``done`` written
        before it are superseded, since those rounds are trained again (a round averaged before the
        stop but not checkpointed is listed twice otherwise, as if averaged twice). The log stays
        append-only: a reader may be following it."""
        redone = sorted({int(r["round"]) for r in self.log.read() if r.get("phase") == phase and int(r.get("round") or 0) > done})
        self.log.write({"phase": phase, "resumed_after_round": done, "superseded_rounds": redone})
        if redone:
            log.info("%s: round(s) %s were under way when the run stopped; they are trained again (their earlier "
                     "records in rounds.jsonl are superseded)", phase, ", ".join(map(str, redone)))

    def _saved_ledger(self) -> str | None:
        """The privacy ledger of the newest global checkpoint when resuming (fine-tuning's if any)."""
        if not self.resume:
            return None
        for phase in ("finetune", "pretrain"):
            point = self.checkpoints.resume_point(phase)
            if point and point[2].get("privacy"):
                return str(point[2]["privacy"])
        return None

    def _best_score(self, phase: str) -> float:
        point = self.checkpoints.resume_point(phase) if self.resume else None
        return float(point[2].get("best_score", float("-inf"))) if point else float("-inf")
