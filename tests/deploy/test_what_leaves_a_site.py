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
from server.app import FederatedRun
from server.inprocess import InProcessGrid
from sites.app import app as client_app
from tests.data.builders import write_chestxray14
from tests.tiny import tiny_raw


@pytest.mark.parametrize("finetune", ["federated", "local"])
def test_every_message_a_site_sends_holds_only_weights_and_scalar_metrics(tmp_path, finetune):
    root = write_chestxray14(tmp_path / "cxr", num_patients=12, images_per_patient=2)
    raw = tiny_raw(2, data={"source": "chestxray14", "root": str(root), "num_sites": 2, "partition": "iid",
                            "image_size": [32, 32]},
                   pretrain={"epochs": 2, "warmup_epochs": 1}, finetune={"epochs": 2, "warmup_epochs": 1},
                   federated={"min_sites": 2, "finetune": finetune})
    (tmp_path / "experiment.yaml").write_text(yaml.safe_dump(raw))
    run_config = {"experiment": str(tmp_path / "experiment.yaml"), "overrides": "", "output-dir": str(tmp_path / "out"),
                  "resume": False}
    grid = InProcessGrid(client_app, [{"partition-id": i, "num-partitions": 2} for i in range(2)], run_config)
    replies = []
    for node in grid.get_node_ids():
        grid.faults[node] = lambda message, reply: replies.append(reply) or reply  # observe, change nothing
    cfg = experiment_config(run_config)
    FederatedRun(grid, cfg, tmp_path / "out", resume=False).run()

    cohort = load_cohort(cfg)
    secrets = {str(root), root.name, ".png"}
    secrets |= {case.case_id for site in cohort.sites for split in ("train", "val", "test") for case in site.split(split)}
    secrets |= {case.patient for site in cohort.sites for split in ("train", "val", "test") for case in site.split(split)
                if case.patient}
    model_keys = set(build_mae(cfg).state_dict()) | set(build_finetune_model(cfg, cohort.task.num_outputs).state_dict())
    assert len(replies) > 10
    for reply in replies:
        assert not reply.has_error(), reply.error.reason
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
        assert site["name"] in {"site-0", "site-1"}
        words = [*metrics.keys(), *(str(v) for v in site.values())]
        # A secret leaks if it is a whole word, or (long enough not to occur by chance) part of one.
        leaked = [s for s in secrets for word in words if s and (s in word.split("\t") or (len(s) >= 6 and s in word))]
        assert not leaked, f"{leaked} left a site in {words}"
