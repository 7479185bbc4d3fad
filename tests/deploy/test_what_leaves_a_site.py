"""Only weights and scalar metrics, with the site's name, ever leave a site: every message a site
sends in a whole run (describe, pre-training, federated and local fine-tuning, evaluation) is
inspected, on a data set with real files, case ids and patient ids that must not leak."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

from fedmae.data.cohort import load_cohort
from fedmae.federated.settings import experiment_config
from fedmae.models.factory import build_finetune_model, build_mae
from server.app import federated_run
from server.inprocess import InProcessGrid
from sites.app import app as client_app
from tests.data.builders import write_chestxray14
from tests.tiny import tiny_raw


def run_and_watch(tmp_path: Path, num_sites: int, federated: dict) -> tuple[list, set[str], set[str], list[str]]:
    """A whole federated run on ChestX-ray14-layout files; every reply any site sent, the strings
    that must never leave (paths, case and patient ids), the model's keys and the site names."""
    root = write_chestxray14(tmp_path / "cxr", num_patients=6 * num_sites, images_per_patient=2)
    raw = tiny_raw(2, data={"source": "chestxray14", "root": str(root), "num_sites": num_sites, "partition": "iid",
                            "image_size": [32, 32]},
                   pretrain={"epochs": 2, "warmup_epochs": 1}, finetune={"epochs": 2, "warmup_epochs": 1},
                   federated={"min_sites": num_sites, **federated})
    (tmp_path / "experiment.yaml").write_text(yaml.safe_dump(raw))
    run_config = {"experiment": str(tmp_path / "experiment.yaml"), "overrides": "", "output-dir": str(tmp_path / "out"),
                  "resume": False}
    grid = InProcessGrid(client_app, [{"partition-id": i, "num-partitions": num_sites} for i in range(num_sites)],
                         run_config)
    replies = []
    for node in grid.get_node_ids():
        grid.faults[node] = lambda message, reply: replies.append(reply) or reply  # observe, change nothing
    cfg = experiment_config(run_config)
    federated_run(grid, cfg, tmp_path / "out", resume=False).run()

    cohort = load_cohort(cfg)
    secrets = {str(root), root.name, ".png"}
    secrets |= {case.case_id for site in cohort.sites for split in ("train", "val", "test") for case in site.split(split)}
    secrets |= {case.patient for site in cohort.sites for split in ("train", "val", "test") for case in site.split(split)
                if case.patient}
    model_keys = set(build_mae(cfg).state_dict()) | set(build_finetune_model(cfg, cohort.task.num_outputs).state_dict())
    return replies, secrets, model_keys, [site.name for site in cohort.sites]


def assert_no_secret(words: list[str], secrets: set[str]) -> None:
    # A secret leaks if it is a whole word, or (long enough not to occur by chance) part of one.
    leaked = [s for s in secrets for word in words if s and (s in word.split("\t") or (len(s) >= 6 and s in word))]
    assert not leaked, f"{leaked} left a site in {words}"


def assert_weights_and_scalars_only(reply, secrets: set[str], model_keys: set[str], sites: list[str]) -> None:
    content = reply.content
    assert set(content.keys()) <= {"arrays", "metrics", "site"}, set(content.keys())
    if "arrays" in content:
        arrays = content["arrays"]
        assert isinstance(arrays, ArrayRecord) and set(arrays.keys()) <= model_keys
        for key, array in arrays.to_torch_state_dict().items():
            assert tuple(array.shape) != () or array.numel() == 1, key
            assert array.dtype in (torch.float32, torch.float16, torch.int16, torch.int64), (key, array.dtype)
    metrics = content["metrics"]
    assert isinstance(metrics, MetricRecord)
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    site = content["site"]
    assert isinstance(site, ConfigRecord) and set(site.keys()) <= {"name", "class-names"}
    assert site["name"] in sites
    assert_no_secret([*metrics.keys(), *(str(v) for v in site.values())], secrets)


@pytest.mark.parametrize("finetune", ["federated", "local"])
def test_every_message_a_site_sends_holds_only_weights_and_scalar_metrics(tmp_path, finetune):
    replies, secrets, model_keys, sites = run_and_watch(tmp_path, 2, {"finetune": finetune})
    assert len(replies) >= 10  # describe, training (with validation), evaluation, fine-tuning, from each site
    for reply in replies:
        assert not reply.has_error(), reply.error.reason
        assert_weights_and_scalars_only(reply, secrets, model_keys, sites)


SECAGG_STAGE_KEYS = {"pk1", "pk2", "dsts", "ctxts", "masked_params", "nids", "shares"}
LEGACY_FIT_RECORDS = {"fitres.metrics", "fitres.num_examples", "fitres.parameters", "fitres.status"}


def test_under_secure_aggregation_a_site_sends_no_weights_in_the_clear(tmp_path):
    """Training replies are SecAgg+ protocol messages (keys, encrypted shares, the masked integer
    vector) plus scalar metrics; evaluation replies are as without it."""
    replies, secrets, model_keys, sites = run_and_watch(tmp_path, 3, {"finetune": "federated",
                                                                      "privacy": {"secure_aggregation": True}})
    secure = [r for r in replies if r.metadata.message_type == "train"]
    assert len(secure) == 3 * 4 * 4  # 3 sites x 4 rounds x Flower's 4 SecAgg+ stages
    for reply in replies:
        assert not reply.has_error(), reply.error.reason
        if reply.metadata.message_type != "train":
            assert_weights_and_scalars_only(reply, secrets, model_keys, sites)
            continue
        content = reply.content
        assert set(content.keys()) <= LEGACY_FIT_RECORDS | {"secaggplus_configs"}, set(content.keys())
        assert set(content["secaggplus_configs"].keys()) <= SECAGG_STAGE_KEYS
        assert all(len(record) == 0 for record in content.array_records.values())  # no weights in the clear
        if "fitres.metrics" in content:
            metrics = dict(content["fitres.metrics"])
            assert metrics.pop("site") in sites
            assert all(isinstance(v, (int, float)) for v in metrics.values())
            assert_no_secret(list(metrics), secrets)
            assert content["fitres.status"]["message"] == ""
