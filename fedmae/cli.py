"""The ``fedmae`` command: pretrain, finetune, evaluate, simulate, compare, demo, data inspect, pki, export.

Every command reads one YAML experiment file (``--config``) with ``--set key.sub=value``
overrides. Mistakes the user can fix (config, files, checkpoints) end with one line on stderr and
exit status 2; nothing is written before the config has been validated.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from fedmae import __version__
from fedmae.config import ExperimentConfig, load_config, validate_federated
from fedmae.metrics import Metrics, main_metric, metrics_table
from fedmae.process_exit import skip_final_collection
from fedmae.typed_yaml import ConfigError

log = logging.getLogger("fedmae")
REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DEMO_CONFIG = REPO_CONFIGS / "demo.yaml"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    skip_final_collection()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        if args.command in ("data", "pki", "export"):
            return args.run(args)
        cfg = load_config(args.config, args.set)
        return args.run(cfg, args)
    except (ConfigError, FileExistsError, ValueError) as err:
        # ValueError also covers unusable checkpoints, weight mismatches and bad data: things the
        # user must fix, not crashes.
        print(f"fedmae: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        how = ("rerun the same command to continue (a rerun resumes)" if args.command in ("compare", "demo")
               else "rerun the same command with --resume to continue")
        print(f"fedmae: interrupted; {how}", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedmae", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"fedmae {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, run, help: str, config_required: bool = True, output: str = "runs/<name>/<command>",
                writes_run: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("--config", required=config_required, default=None if config_required else DEMO_CONFIG,
                         type=Path, help="YAML experiment file" + ("" if config_required else " (default: configs/demo.yaml)"))
        sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config value, e.g. --set pretrain.epochs=10 (repeatable)")
        sub.add_argument("--output", type=Path, help=f"output folder (default: {output})")
        if writes_run:
            sub.add_argument("--force", action="store_true",
                             help="start over in an --output folder that holds another run or other files "
                                  "(the previous run's outputs there are removed; default: refuse)")
        sub.set_defaults(run=run)
        return sub

    sub = command("pretrain", _pretrain, "MAE self pre-training on the training images (no labels)")
    sub.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    sub = command("finetune", _finetune, "fine-tune an encoder for the configured task and report test metrics")
    sub.add_argument("--encoder", type=Path, help="checkpoint whose encoder to start from (default: random init): "
                     "fedmae's, or a foreign one (timm, facebookresearch/mae, MONAI ViT / MaskedAutoEncoderViT, "
                     "SelfMedMAE, fedmae safetensors), its format detected or named as FORMAT:FILE")
    sub.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    sub = command("evaluate", _evaluate, "evaluate a fine-tuned checkpoint on a split, pooled and per site",
                  output="the checkpoint's folder", writes_run=False)
    sub.add_argument("--checkpoint", type=Path, required=True, help="fine-tuned checkpoint (checkpoint_best.pt)")
    sub.add_argument("--split", choices=("test", "val"), default="test", help="which split to score (default: test)")
    sub = command("simulate", _simulate, "federated pre-training + fine-tuning on Flower's simulation engine, "
                  "one virtual site per site of the data")
    sub.add_argument("--resume", action="store_true", help="continue the run in --output from its last global checkpoint")
    command("compare", _compare, "centralised vs federated vs local-only vs no pre-training on the same data and "
            "budget, one fine-tuning protocol, several seeds; writes report.md, results and plots (rerun to resume)")
    command("demo", _compare, "the comparison on the built-in multi-hospital data (a few minutes on a CPU)",
            config_required=False)

    pki = commands.add_parser("pki", help="TLS certificates and site keys for a deployment (private keys 0600)")
    pki_commands = pki.add_subparsers(dest="pki_command", required=True)
    ca = pki_commands.add_parser("ca", help="create the federation's certificate authority (ca.key, ca.crt)")
    ca.add_argument("--out", type=Path, required=True, help="folder for ca.key and ca.crt (keep ca.key offline)")
    ca.add_argument("--name", default="fedmae federation CA", help="the CA's common name")
    ca.add_argument("--days", type=int, default=3650, help="validity in days (default 3650)")
    server = pki_commands.add_parser("server", help="the SuperLink's TLS certificate, signed by the CA")
    server.add_argument("--ca", type=Path, required=True, help="folder holding ca.key and ca.crt")
    server.add_argument("--out", type=Path, required=True, help="folder for server.key and server.pem")
    server.add_argument("--san", action="append", default=[], required=True, metavar="NAME_OR_IP",
                        help="a host name or IP address the sites dial (repeatable)")
    server.add_argument("--days", type=int, default=825, help="validity in days (default 825)")
    site = pki_commands.add_parser("site", help="a site's authentication key pair (OpenSSH, EC P-384)")
    site.add_argument("name", help="the site's name, e.g. hospital-a")
    site.add_argument("--out", type=Path, required=True, help="folder for NAME.key and NAME.pub")
    for sub in (ca, server, site):
        sub.add_argument("--force", action="store_true", help="replace existing files (default: refuse)")
        sub.set_defaults(run=_pki)

    data = commands.add_parser("data", help="look at a data set before training on it")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    inspect = data_commands.add_parser(
        "inspect", help="counts, shapes, spacings, intensities, labels, sites and every problem found",
        description="Check every file of a data set (a folder, an .npz file, or the data of an experiment YAML) "
                    "and list what is in it and what is wrong. Exit status 1 when problems are found.")
    inspect.add_argument("path", type=Path, help="data set folder / MedMNIST .npz, or an experiment YAML file")
    inspect.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value, e.g. --set data.modality=ct (repeatable)")
    inspect.add_argument("--modality", choices=("ct", "mri", "xray", "other"), help="what a plain NIfTI folder holds")
    inspect.add_argument("--quick", action="store_true", help="read file headers only, not every voxel")
    inspect.add_argument("--problems", type=Path, metavar="CSV", help="also write the problems to this CSV file")
    inspect.set_defaults(run=_inspect)

    export = commands.add_parser(
        "export", help="write a checkpoint's encoder for timm or MONAI, or as safetensors, with a model card beside it",
        description="Write the encoder of a fedmae checkpoint (pre-training or fine-tuned) as a timm VisionTransformer "
                    "state dict (2-D), a MONAI ViT state dict (UNETR's vit), or fedmae safetensors, and a JSON model "
                    "card beside it (<output name>.json): architecture, expected input, training data (sites and "
                    "image counts), rounds, strategy, privacy and epsilon. See docs/interop.md.")
    export.add_argument("checkpoint", type=Path, help="fedmae checkpoint, e.g. global/pretrain_last.pt")
    export.add_argument("--to", required=True, choices=("timm", "monai", "safetensors"), help="the format to write")
    export.add_argument("--output", type=Path, required=True,
                        help="weights file: .safetensors, or .pt / .pth for a plain state dict (not for --to safetensors)")
    export.add_argument("--force", action="store_true", help="replace an existing output and model card")
    export.set_defaults(run=_export)
    return parser


def _output(cfg: ExperimentConfig, args: argparse.Namespace, default_leaf: str) -> Path:
    if args.output is not None:
        return args.output
    return Path(cfg.output_dir or Path("runs") / cfg.name) / default_leaf


def _pretrain(cfg: ExperimentConfig, args: argparse.Namespace) -> int:
    from fedmae.engine.pretrain import pretrain

    result = pretrain(cfg, _output(cfg, args, "pretrain"), resume=args.resume, force=args.force, track=True)
    print(f"pre-training done in {result.seconds:.0f} s: val reconstruction loss {result.metrics.get('val_loss', float('nan')):.4f}")
    print(f"encoder checkpoint: {result.checkpoint}")
    return 0


def _finetune(cfg: ExperimentConfig, args: argparse.Namespace) -> int:
    from fedmae.engine.finetune import finetune
    from fedmae.interop import import_encoder_for

    if args.encoder is not None:
        import_encoder_for(args.encoder, cfg, announce=False)  # fail before any output is written
    leaf = "finetune" if args.encoder else "finetune-scratch"
    result = finetune(cfg, _output(cfg, args, leaf), encoder=args.encoder, resume=args.resume, force=args.force,
                      track=True)
    _print_report(result.metrics)
    print(f"best checkpoint (selected on validation): {result.checkpoint}")
    print(f"metrics: {result.output_dir / 'test_metrics.json'}, log: {result.output_dir / 'metrics.jsonl'}")
    return 0


def _evaluate(cfg: ExperimentConfig, args: argparse.Namespace) -> int:
    from fedmae.checkpoint import load_checkpoint
    from fedmae.data.cohort import load_cohort
    from fedmae.engine.finetune import evaluate_sites
    from fedmae.engine.device import resolve_device
    from fedmae.engine.runs import check_output_dir
    from fedmae.files import atomic_write_json
    from fedmae.models.factory import build_finetune_model
    from fedmae.models.state import load_model_state

    payload = load_checkpoint(args.checkpoint, expect_kind="finetune")
    out = args.output or args.checkpoint.parent
    check_output_dir(out, "evaluate", cfg, holds_run=False, resume=False, force=True)  # writable, before the data checks
    cohort = load_cohort(cfg)
    device = resolve_device(cfg.device)
    model = build_finetune_model(cfg, cohort.task.num_outputs)
    load_model_state(model, payload["model"], str(args.checkpoint))
    report = evaluate_sites(model.to(device), cohort, cfg, device, split=args.split)
    path = atomic_write_json(out / f"evaluation_{args.split}.json", {"checkpoint": str(args.checkpoint), **report})
    _print_report(report)
    print(f"metrics: {path}")
    return 0


def _simulate(cfg: ExperimentConfig, args: argparse.Namespace) -> int:
    from fedmae.data.cohort import load_cohort
    from fedmae.engine.device import resolve_device
    from fedmae.engine.runs import claim_output_dir, hold_output_dir
    from fedmae.federated.run_record import RUN_OUTPUTS, check_federated_run, failure, finished_summary
    from fedmae.federated.settings import check_site_count
    from fedmae.federated.simulate import simulate
    from fedmae.tracking import check_tracking

    validate_federated(cfg, args.config)
    check_tracking(cfg)  # the ServerApp tracks, in Flower's process: a missing package is said here, first
    out = _output(cfg, args, "federated").absolute()
    resolve_device(cfg.device)
    check_federated_run(out, cfg, resume=args.resume, force=args.force)
    cohort = load_cohort(cfg)  # check the data (and count the sites) before Flower starts
    check_site_count(cfg, len(cohort.sites))
    with hold_output_dir(out):  # --force clears the folder: never under a run still writing into it
        claim_output_dir(out, "federated", cfg, force=args.force, previous_outputs=RUN_OUTPUTS)
    status = simulate(cfg, len(cohort.sites), out, resume=args.resume)
    result = finished_summary(out)
    if result is None:  # flwr run exits 0 even when the ServerApp raised: fedmae's record decides
        reason = failure(out) or f"flwr run exit status {status}"
        print(f"fedmae: error: the federated run failed ({reason}); see the log above and {out / 'superlink.log'}; "
              "rerun with --resume to continue from the last global round", file=sys.stderr)
        return 1
    summary = out / "summary.json"
    test = result.get("finetune", {}).get("test")
    if test:
        main = main_metric(cohort.task)  # the flat metrics in summary.json do not name it
        rows = {"pooled (weighted)": test["pooled (example-weighted mean)"], **dict(sorted(test["sites"].items()))}
        print(metrics_table({name: Metrics.from_flat(flat, main) for name, flat in rows.items()}))
    print(f"global checkpoints: {out / 'global'}; per-site metrics: {out / 'rounds.jsonl'}; summary: {summary}")
    return 0


def _compare(cfg: ExperimentConfig, args: argparse.Namespace) -> int:
    from fedmae.comparison.run import run_comparison

    run_comparison(cfg, args.config, _output(cfg, args, "compare"), force=args.force)
    return 0


def _pki(args: argparse.Namespace) -> int:
    from fedmae.deploy import pki

    if args.pki_command == "ca":
        key, cert = pki.create_ca(args.out, args.name, args.days, overwrite=args.force)
        print(f"CA private key: {key} (0600) - keep it offline; it signs the SuperLink's certificate")
        print(f"CA certificate: {cert} - copy to every site (flower-supernode --root-certificates) and to "
              "the machine that runs `flwr run` (root-certificates in its connection)")
    elif args.pki_command == "server":
        key, cert = pki.issue_server_certificate(args.ca, args.out, args.san, args.days, overwrite=args.force)
        print(f"SuperLink TLS key: {key} (0600) and certificate: {cert}, valid for {', '.join(args.san)}")
        print(f"start the SuperLink with --ssl-ca-certfile {Path(args.ca) / pki.CA_CERT} --ssl-certfile {cert} "
              f"--ssl-keyfile {key}")
    else:
        key, public = pki.create_site_keys(args.out, args.name, overwrite=args.force)
        print(f"site {args.name}: private key {key} (0600) stays at the site "
              f"(flower-supernode --auth-supernode-private-key {key})")
        print(f"public key {public}: give it to the coordinator, who registers it "
              f"(flwr supernode register {public} <connection>)")
    return 0


def _export(args: argparse.Namespace) -> int:
    from fedmae.interop import export_encoder

    exported = export_encoder(args.checkpoint, args.to, args.output, force=args.force)
    print(f"encoder: {exported.weights}")
    print(f"model card: {exported.card}")
    print(f"load it with: {exported.load_with}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from fedmae.data.inspect import inspect_config, inspect_path

    if args.path.suffix in (".yaml", ".yml"):
        cfg = load_config(args.path, args.set)
        report, problems = inspect_config(cfg, quick=args.quick)
    else:
        report, problems = inspect_path(args.path, modality=args.modality, quick=args.quick, overrides=args.set)
    print(report)
    if args.problems is not None:
        from fedmae.data.badfiles import write_problems

        write_problems(args.problems, problems)
        print(f"problems written to {args.problems}")
    return 1 if problems else 0


def _print_report(report: dict[str, Any]) -> None:
    """A test_metrics.json / evaluation_<split>.json report as a table: pooled, then each site."""
    rows = {"pooled": report["pooled"], **report["sites"]}
    print(metrics_table({name: Metrics.from_json(m) for name, m in rows.items()}, split=report["split"]))


if __name__ == "__main__":
    sys.exit(main())
