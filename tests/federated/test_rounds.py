"""The ServerApp and ClientApp code together, in one process: equivalence, faults, resume, strategies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, Message

from fedmae.checkpoint import load_checkpoint
from fedmae.data.cohort import load_cohort
from fedmae.engine.finetune import finetune
from fedmae.engine.pretrain import pretrain
from fedmae.engine.runs import OutputError
from fedmae.federated import site_run
from fedmae.federated.settings import experiment_config
from fedmae.models.state import encoder_state
from sites.app import app as client_app
from server.inprocess import InProcessGrid
from tests.federated.in_process import global_encoder, rounds_log, run, run_until_stopped_after_round_2, setup_run


def test_one_site_federated_pretraining_equals_centralised(tmp_path):
    grid, run_config = setup_run(tmp_path, num_sites=1, pretrain={"epochs": 3, "warmup_epochs": 1})
    run(grid, run_config)
    cfg = experiment_config(run_config)
    central = pretrain(cfg, tmp_path / "central", cohort=load_cohort(cfg))
    expected = encoder_state(load_checkpoint(central.checkpoint)["model"])
    federated = global_encoder(run_config)
    assert expected.keys() == federated.keys()
    for key in expected:
        torch.testing.assert_close(federated[key], expected[key], rtol=1e-6, atol=1e-7, msg=key)


def test_one_site_federated_fine_tuning_equals_centralised(tmp_path):
    # Sites and `fedmae finetune` train with the same epoch function, schedule and seeding.
    _, probe = setup_run(tmp_path / "probe", num_sites=1)
    cfg = experiment_config(probe)
    encoder = pretrain(cfg, tmp_path / "pre", cohort=load_cohort(cfg)).checkpoint
    grid, run_config = setup_run(tmp_path, num_sites=1, finetune={"epochs": 3, "warmup_epochs": 1},
                                 federated={"finetune": "federated", "start_from": str(encoder)})
    run(grid, run_config)
    cfg = experiment_config(run_config)
    finetune(cfg, tmp_path / "central", encoder=encoder, cohort=load_cohort(cfg))
    expected = load_checkpoint(tmp_path / "central" / "checkpoint_last.pt")["model"]
    federated = load_checkpoint(Path(run_config["output-dir"]) / "global" / "finetune_last.pt")["model"]
    assert expected.keys() == federated.keys()
    for key in expected:
        torch.testing.assert_close(federated[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def test_sites_train_on_their_own_data_and_everything_is_logged(tmp_path):
    grid, run_config = setup_run(tmp_path, num_sites=2, federated={"finetune": "federated", "min_sites": 2})
    summary = run(grid, run_config)
    out = Path(run_config["output-dir"])
    assert {p.name for p in (out / "global").iterdir()} >= {
        "pretrain_round_0001.pt", "pretrain_round_0002.pt", "pretrain_last.pt", "finetune_last.pt", "finetune_best.pt"}
    payload = load_checkpoint(out / "global" / "pretrain_round_0002.pt", expect_kind="global")
    assert payload["extra"] == {"phase": "pretrain", "round": 2} and payload["config"]["name"] == "tiny2d"
    assert all(k.startswith("encoder.") for k in payload["model"])  # only the encoder is global
    records = rounds_log(run_config)
    trained = [(r["phase"], r["round"], r["site"]) for r in records if r.get("status") == "ok"]
    assert sorted(trained) == sorted((phase, rnd, site) for phase in ("pretrain", "finetune") for rnd in (1, 2)
                                     for site in ("site-0", "site-1"))
    assert {r["num-examples"] for r in records if r.get("status") == "ok" and r["phase"] == "pretrain"} == {5.0}
    assert set(summary["finetune"]["test"]["sites"]) == {"site-0", "site-1"}
    # The decoder never left the sites: each keeps its own on disk.
    site_state = load_checkpoint(out / "sites" / "site-0" / "pretrain" / "round_00002.pt", expect_kind="site")
    assert any(k.startswith("decoder") for k in site_state["model"]) and site_state["optimizer"]
    # ... and only what the server does not send back: each round starts from the global encoder.
    assert not any(k.startswith("encoder.") for k in site_state["model"])


def test_pretrain_messages_carry_only_the_encoder_and_half_precision_halves_them(tmp_path):
    sizes = {}
    for transport in ("fp32", "fp16", "bf16"):
        grid, run_config = setup_run(tmp_path / transport, federated={"transport": transport})
        run(grid, run_config)
        train = [m for m in grid.sent if m.metadata.message_type == "train"]
        arrays = train[0].content["arrays"].to_torch_state_dict()
        assert all(k.startswith("encoder.") for k in arrays)
        sizes[transport] = sum(t.numel() * t.element_size() for t in arrays.values())
        final = global_encoder(run_config)
        assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in final.values() if t.is_floating_point())
    assert sizes["fp16"] == sizes["bf16"] < 0.51 * sizes["fp32"]


def doctored(edit):
    """A fault that rewrites a site's pre-training update before the server sees it."""

    def fault(request: Message, reply: Message) -> Message:
        if reply.has_error() or request.metadata.message_type != "train":
            return reply
        state = reply.content["arrays"].to_torch_state_dict()
        edit(state)
        reply.content["arrays"] = ArrayRecord(state)
        return reply

    return fault


def first_key(state: dict) -> str:
    return next(k for k in state if k.endswith("weight"))


@pytest.mark.parametrize("edit,reason", [
    (lambda s: s[first_key(s)].fill_(float("nan")), "non-finite values"),
    (lambda s: s.pop(first_key(s)), "wrong keys: missing"),
    (lambda s: s.update({"encoder.extra": torch.zeros(2)}), "wrong keys: unexpected encoder.extra"),
    (lambda s: s.update({first_key(s): torch.zeros(3, 3)}), "wrong shape"),
])
def test_a_bad_update_is_rejected_logged_and_never_averaged(tmp_path, edit, reason):
    grid, run_config = setup_run(tmp_path)
    healthy = {}

    def keep_healthy(request: Message, reply: Message) -> Message:
        if request.metadata.message_type == "train":
            healthy[int(request.content["config"]["round"])] = reply.content["arrays"].to_torch_state_dict()
        return reply

    grid.faults = {100: doctored(edit), 101: keep_healthy}
    run(grid, run_config)
    rejected = [r for r in rounds_log(run_config) if r.get("status") == "rejected"]
    assert [(r["site"], r["round"]) for r in rejected] == [("site-0", 1), ("site-0", 2)]
    assert all(reason in r["reason"] for r in rejected)
    # FedAvg of the one usable update is that update: nothing of the bad one got in.
    final = global_encoder(run_config)
    for key, value in healthy[2].items():
        assert torch.equal(final[key.removeprefix("encoder.")], value), key


def test_a_failing_or_silent_site_does_not_stop_the_round(tmp_path):
    grid, run_config = setup_run(tmp_path, num_sites=3)

    def crash_in_round_2(request: Message) -> str | None:
        is_round_2 = request.metadata.message_type == "train" and int(request.content["config"]["round"]) == 2
        return "out of memory at site-1" if is_round_2 else None

    def silent(request: Message, reply: Message) -> Message | None:
        return None if request.metadata.message_type == "train" else reply

    grid.crashes = {101: crash_in_round_2}
    grid.faults = {102: silent}
    run(grid, run_config)
    log = rounds_log(run_config)
    statuses = {(r["round"], r["site"]): r["status"] for r in log
                if "status" in r and r["phase"] == "pretrain" and r["status"] != "evaluation failed"}
    # Round 1's validation went out with round 2's training: site-1 crashed on that message.
    assert [(r["round"], r["site"]) for r in log if r.get("status") == "evaluation failed"] == [(1, "site-1")]
    assert statuses[(1, "site-0")] == statuses[(2, "site-0")] == statuses[(1, "site-1")] == "ok"
    assert statuses[(2, "site-1")] == "failed" and statuses[(1, "site-2")] == "no reply"
    failure = next(r for r in log if r.get("status") == "failed")
    assert "out of memory at site-1" in failure["reason"]
    summary_lines = [r for r in log if "usable" in r and r["phase"] == "pretrain"]
    assert [r["usable"] for r in summary_lines] == [2, 1]


def test_a_round_without_usable_updates_keeps_the_previous_model(tmp_path):
    grid, run_config = setup_run(tmp_path, pretrain={"epochs": 3, "warmup_epochs": 1})

    def nan_from_round_2(request: Message, reply: Message) -> Message:
        if request.metadata.message_type == "train" and int(request.content["config"]["round"]) >= 2:
            return doctored(lambda s: s[first_key(s)].fill_(float("nan")))(request, reply)
        return reply

    grid.faults = {100: nan_from_round_2, 101: nan_from_round_2}
    summary = run(grid, run_config)
    assert summary["rounds_without_update"]["pretrain"] == [2, 3]
    after_1 = load_checkpoint(Path(run_config["output-dir"]) / "global" / "pretrain_round_0001.pt")["model"]
    after_3 = load_checkpoint(Path(run_config["output-dir"]) / "global" / "pretrain_round_0003.pt")["model"]
    assert all(torch.equal(after_1[k], after_3[k]) for k in after_1)
    kept = [r for r in rounds_log(run_config) if r.get("kept_previous_model")]
    assert [r["round"] for r in kept] == [2, 3]


def test_a_stopped_run_resumes_with_the_right_rounds_and_ends_as_an_uninterrupted_one(tmp_path, monkeypatch):
    sections = {"pretrain": {"epochs": 4, "warmup_epochs": 1}}
    grid, straight = setup_run(tmp_path / "straight", **sections)
    run(grid, straight)

    grid, stopped = setup_run(tmp_path / "stopped", **sections)
    run_until_stopped_after_round_2(grid, stopped, monkeypatch)
    with pytest.raises(OutputError, match="resume=true"):
        run(grid, stopped)
    run(grid, stopped, resume=True)

    trained = [r["round"] for r in rounds_log(stopped) if "usable" in r]
    assert trained == [1, 2, 3, 4]
    a, b = global_encoder(straight), global_encoder(stopped)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("strategy", ["fedprox", "fedavgm", "fedadam"])
def test_each_strategy_runs_and_moves_the_model_its_own_way(tmp_path, strategy):
    grid, fedavg = setup_run(tmp_path / "fedavg")
    run(grid, fedavg)
    grid, other = setup_run(tmp_path / strategy, federated={"strategy": strategy, "server_lr": 0.1})
    run(grid, other)
    a, b = global_encoder(fedavg), global_encoder(other)
    assert all(torch.isfinite(t).all() for t in b.values() if t.is_floating_point())
    assert any(not torch.equal(a[k], b[k]) for k in a)
    if strategy == "fedprox":
        train = next(m for m in grid.sent if m.metadata.message_type == "train")
        assert float(train.content["config"]["proximal-mu"]) == pytest.approx(0.01)


def test_local_finetuning_reports_each_sites_own_test_metrics(tmp_path):
    grid, run_config = setup_run(tmp_path, federated={"finetune": "local"})
    summary = run(grid, run_config)
    test = summary["finetune"]["test"]
    assert summary["finetune"]["mode"] == "local" and set(test["sites"]) == {"site-0", "site-1"}
    assert all("mean_auc" in metrics and metrics["num-examples"] == 2 for metrics in test["sites"].values())
    # Each site fine-tuned alone, from the global encoder, on its own disk.
    for site in ("site-0", "site-1"):
        run_dir = Path(run_config["output-dir"]) / "sites" / site / "finetune-local" / "run"
        assert (run_dir / "checkpoint_best.pt").is_file()
    replies = [kind for direction, kind, _ in grid.traffic if direction == "up"]
    assert replies.count("train") == 4  # two pre-training rounds x two sites; fine-tuning trained no global model


def test_federated_finetuning_selects_the_round_best_on_validation(tmp_path):
    grid, run_config = setup_run(tmp_path, federated={"finetune": "federated"}, finetune={"epochs": 3, "warmup_epochs": 1})
    summary = run(grid, run_config)
    records = [json.loads(line) for line in (Path(run_config["output-dir"]) / "rounds.jsonl").read_text().splitlines()]
    per_round = {}
    for r in records:
        if r["phase"] == "finetune" and "evaluation" in r:
            per_round.setdefault(r["round"], []).append(r["evaluation"])
    selected = summary["finetune"]["selected_round"]
    best = load_checkpoint(Path(run_config["output-dir"]) / "global" / "finetune_best.pt", expect_kind="global")
    assert best["extra"]["round"] == selected and set(per_round) == {1, 2, 3}
    assert set(summary["finetune"]["test"]["sites"]) == {"site-0", "site-1"}


def test_start_from_fine_tunes_a_given_encoder_without_pretraining_rounds(tmp_path):
    finetune_only = {"finetune": "federated", "min_sites": 2}
    grid, run_config = setup_run(tmp_path / "central", num_sites=2)
    cfg = experiment_config(run_config)
    central = pretrain(cfg, tmp_path / "central" / "pretrain", cohort=load_cohort(cfg))
    finals = {}
    for start in (str(central.checkpoint), "random"):
        folder = tmp_path / ("from-central" if start != "random" else "from-random")
        grid, run_config = setup_run(folder, num_sites=2, federated={**finetune_only, "start_from": start})
        summary = run(grid, run_config)
        out = Path(run_config["output-dir"])
        assert not list((out / "global").glob("pretrain_*")) and (out / "global" / "finetune_best.pt").is_file()
        assert {r["phase"] for r in rounds_log(run_config)} == {"finetune"}
        assert set(summary["finetune"]["test"]["sites"]) == {"site-0", "site-1"}
        finals[start] = load_checkpoint(out / "global" / "finetune_last.pt")["model"]
    # Fine-tuning really started from the given encoder: the two runs end differently.
    key = next(k for k in finals["random"] if k.startswith("encoder.") and finals["random"][k].is_floating_point())
    assert not torch.equal(finals["random"][key], finals[str(central.checkpoint)][key])
    grid, run_config = setup_run(tmp_path / "bad", num_sites=2, federated={**finetune_only, "start_from": "missing.pt"})
    with pytest.raises(ValueError, match="federated.start_from: needs 'random' or a pre-training checkpoint"):
        experiment_config(run_config)


def test_a_site_refuses_a_global_model_that_is_not_finite_or_of_another_architecture(tmp_path):
    import dataclasses

    from flwr.app import MessageType, RecordDict

    from fedmae.federated.global_model import initial_encoder
    from server.grid_sites import GridSites
    from server.inprocess import serve_as_server

    grid, run_config = setup_run(tmp_path, num_sites=1)
    cfg = experiment_config(run_config)
    good = initial_encoder(cfg)
    not_finite = {k: v.clone() for k, v in good.items()}
    key = next(k for k, v in not_finite.items() if v.is_floating_point())
    not_finite[key][...] = float("nan")
    narrower = initial_encoder(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, embed_dim=64)))
    serve_as_server(grid.run_id)
    (node,) = grid.get_node_ids()
    for state, reason in ((not_finite, f"non-finite values (NaN/Inf) in {key}"), (narrower, "shape")):
        config = GridSites(grid, cfg, Path(run_config["output-dir"])).request(phase="pretrain", round=1)
        message = Message(RecordDict({"arrays": ArrayRecord(state), "config": config}), message_type=MessageType.TRAIN,
                          dst_node_id=node)
        (reply,) = grid.send_and_receive([message])
        assert reply.has_error() and reason in reply.error.reason, reply.error.reason
    assert not (Path(run_config["output-dir"]) / "sites").exists() or not list(
        (Path(run_config["output-dir"]) / "sites").rglob("round_*.pt"))  # nothing was trained on it


def test_a_deployed_sites_state_folder_keeps_each_runs_state_apart(tmp_path):
    """A hospital's state-dir outlives runs. A second run there must not find (or prune away) the
    first run's round files: its sites continue their own decoder and step from round to round."""
    state = tmp_path / "hospital-state"
    steps = []
    for name in ("first", "second"):
        grid, run_config = setup_run(tmp_path / name, pretrain={"epochs": 3, "warmup_epochs": 1})
        grid = InProcessGrid(client_app, [{"site": f"site-{i}", "state-dir": str(state)} for i in range(2)], run_config)
        run(grid, run_config)
        newest = max(state.rglob("site-0/pretrain/round_00003.pt"), key=lambda p: p.stat().st_mtime)
        steps.append(load_checkpoint(newest)["step"])
    assert steps[0] == steps[1] > 0
    assert len(list(state.rglob("site-0/pretrain/round_00003.pt"))) == 2


def test_a_process_keeps_at_most_live_sites_and_the_rest_rebuild_to_the_same_result(tmp_path, monkeypatch):
    """Three sites in one process with one kept live: every request of another site rebuilds it
    from its state on disk, and the federation ends with the same weights to the bit."""
    sections = {"pretrain": {"epochs": 3, "warmup_epochs": 1}, "federated": {"min_sites": 1, "finetune": "federated"}}
    grid, kept = setup_run(tmp_path / "all-live", num_sites=3, **sections)
    run(grid, kept)
    built, largest = [], [0]
    original = site_run._new_site_run

    def counted(*args, **kwargs):
        built.append(args[-1])
        largest[0] = max(largest[0], len(site_run._RUNS) + 1)
        return original(*args, **kwargs)

    monkeypatch.setattr(site_run, "_new_site_run", counted)
    site_run.forget_site_runs()  # the first run's sites
    grid, bounded = setup_run(tmp_path / "one-live", num_sites=3,
                              **{**sections, "federated": {**sections["federated"], "live_sites": 1}})
    run(grid, bounded)
    assert len(site_run._RUNS) == 1 and largest[0] <= 2  # the new one, briefly beside the one it replaces
    assert len(built) > 3 * 3  # rebuilt for (nearly) every request: three sites, several requests a round
    for name in ("pretrain_last.pt", "finetune_best.pt"):
        a, b = global_encoder(kept, name), global_encoder(bounded, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_eval_every_validates_every_few_rounds_and_the_last_and_selects_among_them(tmp_path):
    grid, run_config = setup_run(tmp_path, pretrain={"epochs": 3, "warmup_epochs": 1},
                                 finetune={"epochs": 3, "warmup_epochs": 1},
                                 federated={"min_sites": 1, "finetune": "federated", "eval_every": 2})
    summary = run(grid, run_config)
    validated = {(r["phase"], r["round"]) for r in rounds_log(run_config) if "evaluation" in r}
    assert validated == {("pretrain", 2), ("pretrain", 3), ("finetune", 2), ("finetune", 3)}
    trained = {(r["phase"], r["round"]) for r in rounds_log(run_config) if "usable" in r}
    assert trained == {(phase, n) for phase in ("pretrain", "finetune") for n in (1, 2, 3)}
    assert summary["finetune"]["selected_round"] in (2, 3)
