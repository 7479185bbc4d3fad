"""The fedmae site: a Flower ClientApp. Thin glue over :mod:`fedmae.federated.site`.

Train messages (config ``phase``):
- ``pretrain``: receive the global encoder, run the round's local MAE epochs, reply with the new
  encoder and scalar metrics (loss, num-examples, seconds);
- ``finetune``: the same for the whole fine-tune model (federated fine-tuning).
With client-side differential privacy the update is clipped here before it leaves; with secure
aggregation the train messages are Flower's SecAgg+ stages, answered through its mod, and the
weights leave only masked.
Evaluate messages:
- ``describe``: the site's name, its task outputs and sizes (no weights);
- ``pretrain``: validation reconstruction loss of the global encoder;
- ``finetune``: task metrics of the global model on the site's ``split`` (val or test);
- ``finetune-local``: fine-tune the global encoder on this site's labels alone, select on its
  validation cases, reply with its test metrics.
Nothing but weights and scalar metrics with the site's name leaves the site.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedmae.config import ExperimentConfig
from fedmae.data.cohort import Cohort, SiteData, load_cohort
from fedmae.federated.flower_logging import log_through_flower
from fedmae.federated.settings import experiment_config, output_dir, site_config
from fedmae.federated.site import SiteFinetuning, SitePretraining, SiteStateError, scalar_metrics
from fedmae.federated.updates import TENSOR_NAMES, clip_update, from_wire, to_wire

app = ClientApp()
log = logging.getLogger("fedmae.site")


@dataclasses.dataclass
class SiteRun:
    """What one site knows during a run; built once per process and site (loading data is slow)."""

    name: str
    cfg: ExperimentConfig
    cohort: Cohort  # this site's cohort (one site)
    state_dir: Path
    pretraining: SitePretraining | None = None
    finetuning: SiteFinetuning | None = None

    @property
    def site(self) -> SiteData:
        return self.cohort.sites[0]

    def pretrainer(self) -> SitePretraining:
        if self.pretraining is None:
            self.pretraining = SitePretraining(self.cfg, self.site, self.cohort.prep, self.state_dir)
        return self.pretraining

    def finetuner(self) -> SiteFinetuning:
        if self.finetuning is None:
            self.finetuning = SiteFinetuning(self.cfg, self.site, self.cohort.prep, self.cohort.task, self.state_dir)
        return self.finetuning


_RUNS: dict[tuple, SiteRun] = {}
_COHORTS: dict[tuple, Cohort] = {}


def site_run(context: Context) -> SiteRun:
    node = dict(context.node_config)
    key = (context.run_id, *(tuple(sorted((k, str(v)) for k, v in d.items())) for d in (node, context.run_config)))
    if key in _RUNS:
        return _RUNS[key]
    log_through_flower()
    run_config = dict(context.run_config)
    cfg = site_config(experiment_config(run_config), node)
    out = output_dir(run_config, cfg)
    cohort = _cohort(cfg, context.run_id)
    if "partition-id" in node:
        index, count = int(node["partition-id"]), int(node["num-partitions"])
        if count != len(cohort.sites):
            raise ValueError(f"the simulation has {count} nodes but the data have {len(cohort.sites)} sites; "
                             f"start it with num-supernodes={len(cohort.sites)}")
        site = cohort.sites[index]
    elif "site" in node and ("data-dir" not in node or cfg.data.source == "synthetic"):
        by_name = {s.name: s for s in cohort.sites}
        if str(node["site"]) not in by_name:
            raise ValueError(f"node_config site={node['site']!r} is not one of the data's sites {sorted(by_name)}")
        site = by_name[str(node["site"])]
    else:
        site = dataclasses.replace(cohort.sites[0], name=str(node.get("site", cohort.sites[0].name)))
    name = site.name
    if "state-dir" in node or "data-dir" in node:
        # A deployed site's state folder outlives runs: keep each run's state apart (a resumed run
        # has the same output-dir, so it finds its own state again).
        base = Path(str(node["state-dir"])) if "state-dir" in node else Path(str(node["data-dir"])) / ".fedmae-state"
        state_dir = base / f"{cfg.name}-{hashlib.sha256(str(out).encode()).hexdigest()[:10]}"
    else:
        state_dir = out / "sites"
    own = dataclasses.replace(cohort, sites=[site])
    run = SiteRun(name=name, cfg=cfg, cohort=own, state_dir=state_dir)
    _RUNS[key] = run
    return run


def _cohort(cfg, run_id: int) -> Cohort:
    # In simulation every virtual site of a process shares one loaded data set.
    key = (run_id, repr(cfg.data), cfg.seed, cfg.model.name, tuple(cfg.model.img_size), cfg.model.in_channels)
    if key not in _COHORTS:
        _COHORTS[key] = load_cohort(cfg)
    return _COHORTS[key]


@app.train()
def train(msg: Message, context: Context) -> Message:
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        # One of the four SecAgg+ stages (federated.privacy.secure_aggregation): Flower's mod runs
        # the protocol and calls _train_securely at the stage that needs this site's weights.
        return secaggplus_mod(msg, context, _train_securely)
    run = site_run(context)
    config = msg.content["config"]
    transport = str(config.get("transport", "fp32"))
    received = _global_model(msg.content["arrays"].to_torch_state_dict(), transport)
    try:
        state, metrics = _train_round(run, config, received)
    except SiteStateError as err:
        return _refuse(msg, err)
    return _reply(msg, run, metrics, ArrayRecord(to_wire(state, transport)))


def _train_round(run: SiteRun, config: Mapping[str, Any], received: dict[str, torch.Tensor]
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    phase, server_round = str(config["phase"]), int(config["round"])
    if phase == "pretrain":
        state, metrics = run.pretrainer().train_round(received, server_round,
                                                      proximal_mu=float(config.get("proximal-mu", 0.0)))
    elif phase == "finetune":
        state, metrics = run.finetuner().train_round(received, server_round)
    else:
        raise ValueError(f"unknown training phase {phase!r}")
    if KEY_CLIPPING_NORM in config:
        # Client-side DP (DifferentialPrivacyClientSideFixedClipping sends the norm): the update
        # is clipped here, in fp32, before it leaves. Flower's fixedclipping_mod would clip the
        # reply as sent, i.e. after the cast to the wire precision (bf16 travels as int16 bits).
        state, norm = clip_update(state, received, float(config[KEY_CLIPPING_NORM]))
        metrics = {**metrics, "update_norm_before_clipping": norm}
    return state, metrics


def _train_securely(msg: Message, context: Context) -> Message:
    """A SecAgg+ round's training step, in Flower's legacy fit format (the only one its mod
    speaks): the weights go back to the mod, which masks them before anything leaves."""
    run = site_run(context)
    fit = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = dict(fit.config)
    names = str(config.pop(TENSOR_NAMES)).split("\t")
    arrays = parameters_to_ndarrays(fit.parameters)
    received = _global_model({k: torch.from_numpy(a.copy()) for k, a in zip(names, arrays)}, "fp32")
    state, metrics = _train_round(run, config, received)
    examples = int(metrics.pop("num-examples"))
    result = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([state[k].detach().cpu().numpy() for k in names]),
                    examples, {**{k: float(v) for k, v in metrics.items()}, "site": run.name})
    return Message(compat.fitres_to_recorddict(result, keep_input=False), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    run = site_run(context)
    config = msg.content["config"]
    phase = str(config["phase"])
    transport = str(config.get("transport", "fp32"))
    if phase == "describe":
        task = run.cohort.task_or_problem
        outputs = 0 if isinstance(task, str) else task.num_outputs
        metrics = {"num-outputs": outputs, "num-examples": len(run.site.train) + len(run.site.unlabelled)}
        return _reply(msg, run, metrics, extra={"class-names": "" if isinstance(task, str) else "\t".join(task.class_names)})
    received = _global_model(msg.content["arrays"].to_torch_state_dict(), transport)
    server_round = int(config.get("round", 0))
    if phase == "pretrain":
        trainer = run.pretrainer()
        try:
            metrics = trainer.evaluate(received, server_round)
        except SiteStateError as err:
            return _refuse(msg, err)
    elif phase == "finetune":
        trainer = run.finetuner()
        metrics = trainer.evaluate(received, str(config.get("split", "val")))
    elif phase == "finetune-local":
        metrics = _finetune_locally(run, received)
    else:
        raise ValueError(f"unknown evaluation phase {phase!r}")
    return _reply(msg, run, metrics)


def _finetune_locally(run: SiteRun, encoder: dict[str, torch.Tensor]) -> dict[str, float]:
    """Fine-tune the global encoder on this site's labels alone (model selected on its validation cases)."""
    from fedmae.checkpoint import save_checkpoint
    from fedmae.engine.finetune import finetune

    folder = run.state_dir / run.name.replace("/", "_") / "finetune-local"
    init = save_checkpoint(folder / "global_encoder.pt", kind="global", model_state=encoder, config=run.cfg.to_dict(),
                           epoch=0, step=0, extra={"phase": "pretrain"})
    result = finetune(run.cfg, folder / "run", encoder=init, resume=True, cohort=run.cohort)
    test = result.metrics["pooled"]
    return {**scalar_metrics(test), "num-examples": len(run.site.test)}


def _refuse(msg: Message, err: SiteStateError) -> Message:
    """A round this site does not take part in, said in one line here and (as the reply's error,
    which the server logs as this site's failure) at the server; no traceback."""
    log.error("%s", err)
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(err)), reply_to=msg)


def _global_model(received: dict[str, torch.Tensor], transport: str) -> dict[str, torch.Tensor]:
    """The server's weights in fp32. A model that is not finite is refused here (the reply becomes
    an error the server logs); one of the wrong architecture is refused by the strict load."""
    state = from_wire(received, transport, _float_reference(received))
    bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise ValueError(f"refusing the server's model: non-finite values (NaN/Inf) in {bad}")
    return state


def _float_reference(received: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights arrive in wire precision (bf16 as int16 bits); floating-point ones become fp32."""
    return {k: torch.empty(0, dtype=torch.float32) if (v.is_floating_point() or v.dtype == torch.int16) else v
            for k, v in received.items()}


def _reply(msg: Message, run: SiteRun, metrics: dict[str, Any], arrays: ArrayRecord | None = None,
           extra: dict[str, str] | None = None) -> Message:
    content = RecordDict({"metrics": MetricRecord({k: float(v) for k, v in metrics.items()}),
                          "site": ConfigRecord({"name": run.name, **(extra or {})})})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content, reply_to=msg)
