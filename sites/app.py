"""The fedmae site: a Flower ClientApp over :class:`fedmae.federated.site_run.SiteRun`.

Train messages (config ``phase`` ``pretrain`` or ``finetune``): the global weights in, the
site's new weights and scalar metrics out; with secure aggregation the train messages are Flower's
SecAgg+ stages, answered through its mod, and the weights leave only masked. Evaluate messages:
``describe`` (name, task outputs, sizes; no weights), ``pretrain`` / ``finetune`` (metrics of the
global model), ``finetune-local`` (fine-tune on this site alone, its test metrics). What each
request means is in :mod:`fedmae.federated.site_run`; this file only converts messages.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from fedmae.federated.flower_logging import log_through_flower
from fedmae.federated.site import SiteStateError
from fedmae.federated.site_run import SiteRun, site_run
from fedmae.federated.updates import TENSOR_NAMES, received_model
from fedmae.process_exit import skip_final_collection

app = ClientApp()
log = logging.getLogger("fedmae.site")
# Flower starts a ClientApp process for every message a deployed site gets: exit it quickly.
skip_final_collection()


def _site(context: Context, request: dict[str, Any]) -> SiteRun:
    log_through_flower()
    return site_run(context.run_id, request, context.node_config)


@app.train()
def train(msg: Message, context: Context) -> Message:
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        # One of the four SecAgg+ stages (federated.privacy.secure_aggregation): Flower's mod runs
        # the protocol and calls _train_securely at the stage that needs this site's weights.
        return secaggplus_mod(msg, context, _train_securely)
    request = dict(msg.content["config"])
    run = _site(context, request)
    try:
        wire, metrics = run.train(request, received_model(msg.content["arrays"].to_torch_state_dict(),
                                                          run.cfg.federated.transport))
    except SiteStateError as err:
        return _refuse(msg, err)
    return _reply(msg, run, metrics, ArrayRecord(wire))


def _train_securely(msg: Message, context: Context) -> Message:
    """A SecAgg+ round's training step, in Flower's legacy fit format (the only one its mod
    speaks): the weights go back to the mod, which masks them before anything leaves."""
    fit = compat.recorddict_to_fitins(msg.content, keep_input=True)
    request = dict(fit.config)
    run = _site(context, request)
    names = str(request.pop(TENSOR_NAMES)).split("\t")
    arrays = parameters_to_ndarrays(fit.parameters)
    received = received_model({k: torch.from_numpy(a.copy()) for k, a in zip(names, arrays)}, "fp32")
    state, metrics = run.train(request, received)
    examples = int(metrics.pop("num-examples"))
    result = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([state[k].detach().cpu().numpy() for k in names]),
                    examples, {**{k: float(v) for k, v in metrics.items()}, "site": run.name})
    return Message(compat.fitres_to_recorddict(result, keep_input=False), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    request = dict(msg.content["config"])
    run = _site(context, request)
    if request["phase"] == "describe":
        metrics, details = run.describe()
        return _reply(msg, run, metrics, details=details)
    try:
        metrics = run.evaluate(request, received_model(msg.content["arrays"].to_torch_state_dict(),
                                                       run.cfg.federated.transport))
    except SiteStateError as err:
        return _refuse(msg, err)
    return _reply(msg, run, metrics)


def _refuse(msg: Message, err: SiteStateError) -> Message:
    """A round this site does not take part in, said in one line here and (as the reply's error,
    which the server logs as this site's failure) at the server; no traceback."""
    log.error("%s", err)
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(err)), reply_to=msg)


def _reply(msg: Message, run: SiteRun, metrics: dict[str, Any], arrays: ArrayRecord | None = None,
           details: dict[str, str] | None = None) -> Message:
    content = RecordDict({"metrics": MetricRecord({k: float(v) for k, v in metrics.items()}),
                          "site": ConfigRecord({"name": run.name, **(details or {})})})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content, reply_to=msg)
