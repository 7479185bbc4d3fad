"""One federated run, in plain Python: its phases and rounds, the census of the sites, resume,
model selection, the global checkpoints and the privacy ledger.

The run talks to its sites only through :class:`Sites`: ask some sites a question (describe
yourself, test this model, fine-tune this encoder alone), and the rounds of a phase (train a
round from these weights and hand back the aggregate; evaluate these weights). ``server/``
implements it over Flower's Grid and strategies (``server/grid_sites.py``); nothing here imports
Flower. A round's global model is checkpointed right where the round's aggregate comes back.

Outputs (the run's folder): ``global/`` checkpoints, ``rounds.jsonl`` (one line per site and
round, written by the rounds' checks), ``summary.json`` (status running / failed / done),
``config.yaml``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from fedmae.checkpoint import load_checkpoint
from fedmae.config import ExperimentConfig, validate_federated
from fedmae.engine.loop import MetricsLog, due
from fedmae.federated.global_model import GlobalCheckpoints, initial_encoder, initial_finetune_model
from fedmae.federated.run_record import SUMMARY, open_federated_run, write_summary
from fedmae.federated.settings import check_site_count
from fedmae.metrics import weighted_mean
from fedmae.tracking import TrackedRounds, open_tracker, report_metrics

log = logging.getLogger("fedmae.server")
WAIT_REPORT_EVERY = 30.0  # seconds between "waiting for sites" lines
Weights = dict[str, torch.Tensor]


class BudgetExhausted(RuntimeError):
    """The privacy budget allows no further release: the last released model stands."""


@dataclass
class SiteReply:
    """One site's answer to a question: scalar metrics and, for ``describe``, its details; or why it failed."""

    node: int
    site: str | None = None  # the name the site gave itself (None when it failed)
    metrics: dict[str, float] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)
    error: str | None = None


class PrivacyLedger(Protocol):
    """The run's differential-privacy accountant, as the run sees it."""

    def ledger(self) -> str: ...  # saved in every global checkpoint, so a resumed run keeps counting

    def spent(self) -> dict[str, Any]: ...  # epsilon, delta, releases, the guarantee


class PhaseRounds(Protocol):
    """The rounds of one phase (``pretrain`` or ``finetune``) with its strategy."""

    kept_previous: list[int]  # rounds whose updates were unusable, so the previous model was kept
    # Whether a training round's messages can also carry the validation of the weights they send
    # (every site takes part in every round): one message exchange a round instead of two.
    validates_while_training: bool

    def train(self, run_round: int, weights: Weights, validate: bool = False) -> tuple[Weights | None, dict[str, float]]:
        """Train one round from ``weights``: the aggregate, or None when the previous model is kept;
        and, with ``validate``, the sites' validation metrics of ``weights`` themselves (the model
        of round ``run_round - 1``), taken before they train (example-weighted mean).
        Raises :class:`BudgetExhausted` when the privacy budget allows no further round."""

    def evaluate(self, run_round: int, weights: Weights) -> dict[str, float]:
        """The sites' validation metrics of ``weights``, example-weighted mean."""


class Sites(Protocol):
    def connected(self) -> list[int]: ...

    def ask(self, nodes: list[int], request: dict[str, Any], weights: Weights | None = None) -> list[SiteReply]: ...

    def open_privacy(self, num_sites: int, saved_ledger: str | None) -> PrivacyLedger: ...

    def rounds(self, phase: str, *, site_names: dict[int, str], site_images: dict[int, int], metrics_log: MetricsLog,
               privacy: PrivacyLedger | None) -> PhaseRounds:
        """``site_names`` / ``site_images``: the census (node -> name, training images)."""


class FederatedRun:
    """Every phase of a federated run: pre-train (or start from a given encoder), then fine-tune
    (federated, or each site alone) and collect each site's test metrics."""

    def __init__(self, sites: Sites, cfg: ExperimentConfig, out: Path, resume: bool):
        self.sites, self.cfg, self.out, self.resume = sites, cfg, Path(out), resume
        # First: nothing is written into a folder another run is writing into. Held until run() ends.
        self.folder = open_federated_run(self.out, cfg, resume=resume, option="output-dir")
        self.checkpoints = GlobalCheckpoints(self.out / "global", cfg)
        try:
            self.tracker = open_tracker(cfg, self.out, "federated", resume=resume)  # the server's: sites never track
        except BaseException:
            self.folder.release()
            raise
        self.log = TrackedRounds(self.out / "rounds.jsonl", self.tracker, cfg)  # every line also goes to the tracker
        self.site_names: dict[int, str] = {}
        self.site_images: dict[int, int] = {}
        self.summary: dict[str, Any] = {"output_dir": str(self.out), "config": cfg.to_dict()}
        self.privacy: PrivacyLedger | None = None

    def run(self) -> dict[str, Any]:
        """Every phase; ``summary.json`` records the run as running, then done or failed (with why)."""
        write_summary(self.out, self.summary, "running")
        try:
            with self.tracker:
                self._run()
        except BaseException as err:
            write_summary(self.out, self.summary, "failed", error=f"{type(err).__name__}: {err}")
            raise
        finally:
            self.folder.release()
        return self.summary

    def record_stop(self) -> None:
        """The process is being ended from outside: a run still recorded as running is recorded as
        failed (one that ended, done or failed, is left as it is)."""
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
            self.privacy = self.sites.open_privacy(len(sites), self._saved_ledger())
        start = self.cfg.federated.start_from
        encoder = self.pretrain() if start is None else self.starting_encoder(start)
        mode = self.cfg.federated.finetune
        if mode == "federated":
            self.finetune_federated(sites, encoder)
        elif mode == "local":
            self.finetune_local(encoder)
        test = self.summary.get("finetune", {}).get("test")
        if test:
            self.tracker.log_metrics(self.cfg.finetune.epochs, report_metrics(test), "test")
        if self.privacy is not None:
            self.summary["privacy"] = self.privacy.spent()
        self.summary["seconds"] = round(time.monotonic() - started, 1)
        write_summary(self.out, self.summary, "done")
        log.info("federated run done in %.0f s; outputs in %s", self.summary["seconds"], self.out)

    # ---- sites -------------------------------------------------------------------------------

    def describe_sites(self) -> dict[int, dict[str, Any]]:
        """Wait for at least ``min_sites`` sites (up to ``round_timeout``, saying every
        ``WAIT_REPORT_EVERY`` s how many are connected), then ask each for its name and task outputs."""
        fed = self.cfg.federated
        started = reported = time.monotonic()
        nodes = self.sites.connected()
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
            nodes = self.sites.connected()
        sites = {}
        for reply in self.sites.ask(nodes, {"phase": "describe"}):
            if reply.error is not None:
                log.warning("site on node %d could not describe itself: %s", reply.node, reply.error)
                continue
            sites[reply.node] = {"name": reply.site, "outputs": int(reply.metrics["num-outputs"]),
                                 "class_names": [c for c in reply.details.get("class-names", "").split("\t") if c],
                                 "images": int(reply.metrics["num-examples"])}
            self.site_names[reply.node] = reply.site
            self.site_images[reply.node] = sites[reply.node]["images"]
        if len(sites) < fed.min_sites:
            raise RuntimeError(f"only {len(sites)} site(s) answered; federated.min_sites is {fed.min_sites}")
        self.summary["sites"] = {s["name"]: {"images": s["images"]} for s in sites.values()}
        log.info("sites: %s", ", ".join(f"{s['name']} ({s['images']} images)" for s in sites.values()))
        return sites

    def _test_metrics(self, request: dict[str, Any], weights: Weights) -> dict[str, Any]:
        """Each site's answer to ``request`` (its test metrics) and their example-weighted mean."""
        per_site = {}
        for reply in self.sites.ask(list(self.site_names), request, weights):
            if reply.error is not None:
                log.warning("site %s failed: %s", self.site_names.get(reply.node, f"node {reply.node}"), reply.error)
                continue
            per_site[reply.site] = reply.metrics
        return {"sites": per_site, "pooled (example-weighted mean)": weighted_mean(per_site.values())}

    # ---- phases ------------------------------------------------------------------------------

    def pretrain(self) -> Weights:
        total = self.cfg.pretrain_rounds
        point = self.checkpoints.resume_point("pretrain") if self.resume else None
        done, state = (point[0], point[1]) if point else (0, initial_encoder(self.cfg))
        if point:
            log.info("resuming pre-training after round %d of %d", done, total)
        if done < total:
            state = self._rounds("pretrain", state, done, total)
        self.summary["pretrain"] = {"rounds": total, "checkpoint": str(self.checkpoints.last("pretrain"))}
        return state

    def starting_encoder(self, start: str) -> Weights:
        """federated.start_from: fine-tune a given encoder (or a random one) without pre-training here:
        a fedmae pre-training checkpoint, or a foreign encoder fitted to the model (fedmae.interop)."""
        self.summary["pretrain"] = {"start_from": start}
        if start == "random":
            return initial_encoder(self.cfg)
        from fedmae.data.preprocess import check_encoder_input
        from fedmae.interop import import_encoder_for

        imported = import_encoder_for(start, self.cfg)
        if imported.kind not in (None, "mae", "global"):
            raise ValueError(f"federated.start_from: {start} is a {imported.kind} checkpoint, not a pre-training one")
        # A fedmae encoder pre-trained on another input size is refused, as `fedmae finetune --encoder` does.
        check_encoder_input(((imported.config or {}).get("model") or {}).get("img_size"), self.cfg,
                            f"federated.start_from {start}")
        self.summary["pretrain"]["format"] = imported.format
        return imported.entries()

    def finetune_federated(self, sites: dict[int, dict[str, Any]], encoder: Weights) -> None:
        outputs = {s["outputs"] for s in sites.values()}
        names = {tuple(s["class_names"]) for s in sites.values()}
        if len(outputs) != 1 or len(names) != 1 or 0 in outputs:
            raise RuntimeError(f"sites disagree on the task (or have none): outputs {sorted(outputs)}, classes {sorted(names)}")
        total = self.cfg.finetune_rounds
        point = self.checkpoints.resume_point("finetune") if self.resume else None
        done, state = (point[0], point[1]) if point else (0, initial_finetune_model(self.cfg, outputs.pop(), encoder))
        if done < total:
            self._rounds("finetune", state, done, total)
        best = self.checkpoints.best("finetune")
        if not best.exists():  # only when the privacy budget ran out before the first round
            log.warning("no federated fine-tuning round was released; no fine-tuned model to test")
            self.summary["finetune"] = {"mode": "federated", "rounds": 0, "test": {}}
            return
        selected = load_checkpoint(best, expect_kind="global")
        test = self._test_metrics({"phase": "finetune", "split": "test"}, selected["model"])
        self.summary["finetune"] = {"mode": "federated", "selected_round": selected["extra"]["round"],
                                    "val": selected["metrics"].get("val", {}), "test": test, "checkpoint": str(best)}

    def finetune_local(self, encoder: Weights) -> None:
        self.summary["finetune"] = {"mode": "local", "test": self._test_metrics({"phase": "finetune-local"}, encoder)}

    def _rounds(self, phase: str, state: Weights, done: int, total: int) -> Weights:
        """Rounds done+1 .. total of ``phase``, checkpointing the global model after each; the last
        released global model."""
        if self.resume:
            self._mark_resume(phase, done)
        rounds = self.sites.rounds(phase, site_names=self.site_names, site_images=self.site_images, metrics_log=self.log,
                                   privacy=self.privacy)
        self.log.start_phase(phase, state)  # the size of what its messages carry, for the tracker
        selection = _Selection(phase, self._best_score(phase), lambda: self.checkpoints.best(phase).exists())
        fed = self.cfg.federated
        released = done  # the round of ``state``
        # Pre-training selects nothing on its validation: a round's validation can ride on the next
        # round's training messages (the sites validate the weights they receive, with their
        # decoders of that round, before training), which saves a message exchange per validated
        # round. Fine-tuning validates at once, since it selects its model on the result.
        riding = phase == "pretrain" and rounds.validates_while_training
        pending = done if riding and done and due(done, fed.eval_every, total) and not self._validated(phase, done) else None
        try:
            for run_round in range(done + 1, total + 1):
                aggregate, validation = rounds.train(run_round, state, validate=pending is not None)
                if pending is not None:
                    self._log_validation(phase, pending, total, validation, riding=True)
                    pending = None
                state, released = (aggregate if aggregate is not None else state), run_round
                evaluation: dict[str, float] = {}
                # Validation at every site costs a pass over its data: every eval_every-th round
                # and the last (only validated rounds can be selected, as in fedmae.engine).
                if due(run_round, fed.eval_every, total):
                    if riding and run_round < total:
                        pending = run_round
                    else:
                        evaluation = rounds.evaluate(run_round, state)
                        self._log_validation(phase, run_round, total, evaluation)
                self._checkpoint(phase, run_round, total, state, evaluation, selection)
                if not evaluation:
                    log.info("%s round %d/%d: done; %s", phase, run_round, total,
                             "validated with the next round's training" if pending == run_round
                             else "not validated this round (federated.eval_every)")
        except BudgetExhausted as err:
            # The last released model stands; no further round of any phase may be trained.
            log.warning("%s: %s; stopping training rounds here", phase, err)
            self.summary.setdefault("privacy_budget_reached", {})[phase] = str(err)
            if pending is not None:  # its validation was to go out with the round that is not trained
                self._log_validation(phase, pending, total, rounds.evaluate(pending, state))
            if released > done and not due(released, fed.checkpoint_every, total):
                # Checkpointed although not a checkpoint round, since it is this phase's result.
                self.checkpoints.save(phase, released, state, self._round_metrics(selection))
        if rounds.kept_previous:
            self.summary.setdefault("rounds_without_update", {})[phase] = rounds.kept_previous
        return state

    def _log_validation(self, phase: str, run_round: int, total: int, evaluation: dict[str, float],
                        riding: bool = False) -> None:
        log.info("%s round %d/%d: validation %s%s", phase, run_round, total, evaluation,
                 f" (taken with round {run_round + 1}'s training)" if riding else "")
        self.log.validation(phase, run_round, evaluation)

    def _validated(self, phase: str, run_round: int) -> bool:
        """Whether the sites' validation of ``run_round`` is in the log (a resumed run validates the
        checkpointed round with its first training round if it was not)."""
        return any(r.get("phase") == phase and r.get("round") == run_round and "evaluation" in r for r in self.log.read())

    def _checkpoint(self, phase: str, run_round: int, total: int, state: Weights, evaluation: dict[str, float],
                    selection: _Selection) -> None:
        """The round's global checkpoint every ``federated.checkpoint_every`` rounds and after the
        last (the sites keep their state at the same rounds, so a resumed run continues exactly);
        the best model of fine-tuning whenever a round beats it."""
        better = selection.consider(evaluation)
        metrics = self._round_metrics(selection, evaluation)
        if self.privacy is not None:
            used = self.privacy.spent()
            self.log.write({"phase": phase, "round": run_round, "epsilon": used["epsilon"], "delta": used["delta"]})
            log.info("%s round %d: privacy spent epsilon=%.3f at delta=%g", phase, run_round, used["epsilon"], used["delta"])
        if due(run_round, self.cfg.federated.checkpoint_every, total):
            self.checkpoints.save(phase, run_round, state, metrics, best=better)
        elif better:
            self.checkpoints.save_best(phase, run_round, state, metrics)

    def _round_metrics(self, selection: _Selection, evaluation: dict[str, float] | None = None) -> dict[str, Any]:
        metrics: dict[str, Any] = {"val": evaluation or {}, "best_score": selection.best_score}
        if self.privacy is not None:
            # Saved with every checkpoint so that a resumed run keeps counting from there.
            metrics["privacy"] = self.privacy.ledger()
        return metrics

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


class _Selection:
    """Federated fine-tuning keeps the round whose global model scores best on the sites'
    validation data (main metric, example-weighted mean); ties go to the later round, as in
    :mod:`fedmae.engine.finetune`. Pre-training selects nothing: its last round is the result."""

    def __init__(self, phase: str, best_score: float, best_exists: Callable[[], bool]):
        self.phase, self.best_score, self.best_exists = phase, best_score, best_exists

    def consider(self, evaluation: dict[str, float]) -> bool:
        """Whether this round's model is the best so far (and updates the best score)."""
        if self.phase != "finetune" or not evaluation:  # a round not validated is never selected
            return False
        score = evaluation.get("main", float("nan"))
        better = score >= self.best_score or not self.best_exists()
        if better and score == score:
            self.best_score = score
        return better
