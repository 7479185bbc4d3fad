"""Experiment configuration: fedmae's schema as typed dataclasses, its derived values and its checks.

The dataclass defaults below are the one source of defaults. Loading is strict: an empty file, a key
given twice, an unknown key, a wrong type or an impossible value raises :class:`ConfigError` with one
line that names the file (or the ``--set`` override that set the value) and the key, before anything
is written. Values that follow from others (the learning rate scaled by the
batch size, the UNETR skip blocks for a given depth) are computed here and nowhere else. Reading
YAML into the dataclasses (types, unknown keys, overrides) is :mod:`fedmae.typed_yaml`'s; the checks
of values that type-check but cannot work are here, one function per section.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedmae.models.sizes import ModelSize, parse_model_name
from fedmae.typed_yaml import ConfigError, Source, build, load_yaml, to_plain


@dataclass
class ModelConfig:
    name: str = "vit_tiny_patch16_2d"  # vit_{tiny,small,base}_patch{P}_{2d,3d}: size, patch, dimensions
    in_channels: int = 1  # 1 for CT/X-ray, 4 for BraTS (FLAIR, T1, T1gd, T2)
    img_size: tuple[int, ...] = (64, 64)  # network input (crop) size; each side divisible by the patch
    embed_dim: int | None = None  # None: take it from the named size
    depth: int | None = None
    num_heads: int | None = None
    decoder_dim: int | None = None  # MAE decoder; None: from the named size
    decoder_depth: int | None = None
    decoder_heads: int | None = None
    mlp_ratio: float = 4.0
    mask_ratio: float = 0.75  # fraction of patches hidden from the encoder in pre-training
    norm_pix_loss: bool = True  # reconstruct per-patch standardised pixels (MAE's norm_pix_loss)
    skip_blocks: tuple[int, ...] | None = None  # UNETR skips (1-based blocks); None: the paper's 4, 7, 10 of 12, scaled
    feature_size: int = 16  # UNETR decoder width


@dataclass
class DataConfig:
    # Where the images come from: the built-in generator (no download), a Decathlon-style NIfTI
    # folder, a folder of NIfTI files, a folder of DICOM series (one folder per series, under
    # images/), the NIH ChestX-ray14 layout, or a MedMNIST .npz file.
    source: Literal["synthetic", "decathlon", "nifti_folder", "dicom", "chestxray14", "medmnist"] = "synthetic"
    root: str | None = None  # the data set's folder (MedMNIST: the .npz file); relative to the working directory
    manifest: str | None = None  # nifti_folder: CSV/JSON of image[, label, site, patient, split]; null: match images/ with labels/
    modality: Literal["auto", "ct", "mri", "xray", "other"] = "auto"  # picks the preprocessing; auto: from the source (dicom: the Modality tag)
    num_sites: int = 3  # built-in hospitals, or simulated sites when partition is not natural
    cases_per_site: int = 60  # built-in data only
    image_size: tuple[int, ...] | None = None  # built-in images / radiographs resized to this; null: model.img_size
    heterogeneity: float = 1.0  # built-in data: how much the hospitals' scanners differ (0: identical)
    patient_variation: float = 1.0  # built-in data: how much patients' body size, shape, position and rotation differ
    partition: Literal["natural", "iid", "dirichlet", "quantity"] = "natural"  # how cases become sites
    partition_beta: float = 0.5  # Dirichlet concentration for dirichlet (label skew) and quantity skew
    val_fraction: float = 0.15  # per site; for model selection (when the source has no official validation)
    test_fraction: float = 0.25  # per site; for reporting only (when the source has no official test)
    split_file: str | None = None  # JSON of each site's train/val/test case ids: written if missing, else reused
    use_unlabelled: bool = True  # pre-train also on images without labels (e.g. Decathlon imagesTs)
    normalize: Literal["auto", "zscore", "zscore_nonzero", "window", "none"] = "auto"  # auto: CT window, MRI non-zero z-score, else z-score
    spacing: tuple[float, ...] | None = None  # resample CT/MRI to this voxel size in mm; null: CT 1.5x1.5x2.0, MRI 1x1x1
    resample: bool = True  # false: keep the voxel grid as stored
    window: tuple[float, float] = (-175.0, 250.0)  # CT intensity window (HU) mapped to [0, 1]
    crop_foreground: bool = True  # CT/MRI: crop each volume to its foreground (the body) first
    flip_prob: float = 0.2  # random flip per axis, pre-training and fine-tuning (the paper: 0.2)
    rotate_prob: float = 0.0  # fine-tuning: random 90-degree rotation in the first two axes (the paper, CT: 0.2)
    intensity_prob: float = 0.0  # fine-tuning: random intensity scale and shift by 0.1 (the paper, CT: 0.1)
    # Training crops drawn from each image per step, pre-training and fine-tuning (the paper, BTCV: 4):
    # a step's batch is batch_size images x samples_per_volume crops, and lr = base_lr x crops / 256.
    samples_per_volume: int = 1
    # Segmentation fine-tuning's crops: random, or pos_neg: centred on a labelled voxel with
    # probability pos_fraction, else on background (MONAI's RandCropByPosNegLabeld; the paper's code: 1:1).
    # Pre-training never reads labels: its crops are always random.
    finetune_crop: Literal["random", "pos_neg"] = "random"
    pos_fraction: float = 0.5
    # 2-D classification fine-tuning: RandAugment (torchvision's), this many operations per image at
    # this magnitude on timm's 0-10 scale; 0 operations: off (the paper's ChestX-ray14 code: 2 at 9).
    randaugment_ops: int = 0
    randaugment_magnitude: int = 9
    cache: Literal["memory", "disk", "none"] = "memory"  # keep preprocessed files in memory, on disk (cache_dir) or neither
    cache_dir: str | None = None  # for cache: disk; shared by runs and simulated sites
    check: Literal["full", "quick"] = "full"  # before training, read every file (full) or only headers (quick)
    skip_bad_cases: bool = False  # leave out cases with problems (listed in bad_cases.csv) instead of stopping
    # Loader processes per dataset; auto: none on the CPU or when a batch is a stack of cached
    # tensors (nothing random per sample), up to 4 per GPU otherwise. Results do not depend on it.
    num_workers: int | Literal["auto"] = "auto"


@dataclass
class TaskConfig:
    type: Literal["classification", "segmentation"] = "classification"
    # Sigmoid outputs, one per finding/region (else softmax over exclusive classes). null: the
    # usual choice for the task type: multi-label findings, exclusive organ classes.
    multi_label: bool | None = None
    hd95: bool = False  # segmentation: also compute the 95th-percentile Hausdorff distance (slow)
    class_names: tuple[str, ...] | None = None  # name the outputs when the source does not (segmentation: background first)
    # Classification: predict only these of the data's findings (e.g. [Effusion, Cardiomegaly]);
    # null: all of them.
    findings: tuple[str, ...] | None = None
    # Sigmoid segmentation of overlapping regions, each a set of label values, e.g. BraTS (MSD labels
    # 1 edema, 2 non-enhancing, 3 enhancing): {TC: [2, 3], WT: [1, 2, 3], ET: [3]}. null: one channel per class.
    regions: dict[str, tuple[int, ...]] | None = None


@dataclass
class OptimiserConfig:
    """What pre-training and fine-tuning share: the epochs, AdamW and its schedule. Each phase
    sets the defaults of the fields that have none here."""

    epochs: int
    warmup_epochs: int
    batch_size: int  # images per step, each giving data.samples_per_volume crops
    base_lr: float  # lr = base_lr * crops per step / 256, crops per step = batch_size * data.samples_per_volume
    min_lr: float
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float | None = 3.0  # max gradient norm; null: no clipping


# The optimiser's fields come first in each phase (a redefined field keeps its base's place), so
# to_dict() and resolved YAML list them as before.
@dataclass
class PretrainConfig(OptimiserConfig):
    epochs: int = 100
    warmup_epochs: int = 10
    batch_size: int = 32
    base_lr: float = 1.5e-4
    min_lr: float = 0.0
    eval_every: int = 1  # validation reconstruction loss every N epochs (and after the last)
    checkpoint_every: int = 1  # write checkpoint_last.pt every N epochs (and after the last); resume starts there


@dataclass
class FinetuneConfig(OptimiserConfig):
    epochs: int = 50
    warmup_epochs: int = 5
    batch_size: int = 16
    base_lr: float = 1e-3
    min_lr: float = 1e-6
    layer_decay: float = 0.75  # lr multiplier per block towards the input (1: no decay)
    drop_path: float = 0.1
    label_fraction: float = 1.0  # share of each site's labelled training cases used (label-scarce studies)
    sw_overlap: float = 0.5  # sliding-window overlap for segmentation inference
    eval_every: int = 1  # validate (and so select the model) every N epochs, and after the last
    checkpoint_every: int = 1  # write the last and best checkpoints every N epochs (and after the last)


@dataclass
class PrivacyConfig:
    # Differential privacy of every federated training round (Flower's DP strategy wrappers,
    # fixed clipping): "server" clips each site's update at the server, "client" makes each site
    # clip its own update before it leaves; either way Gaussian noise of std
    # noise_multiplier * clipping_norm / sites is added to the average. The guarantee is per
    # site (a whole hospital's data), not per patient: see docs/privacy.md.
    dp: Literal["none", "server", "client"] = "none"
    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0  # L2 bound on one site's update per round (rounds.jsonl logs update_norm)
    # "adaptive": the bound starts at clipping_norm and follows the target_clipped_quantile of the
    # sites' update norms (Andrew et al. 2021; Flower's adaptive-clipping wrappers): each round it
    # is multiplied by exp(clip_norm_lr * (noisy clipped fraction - target)). The count of
    # clipped sites gets Gaussian noise of std clipped_count_stddev (default: sites / 20), paid
    # for out of the same noise_multiplier, which must stay below 2 * clipped_count_stddev.
    clipping: Literal["fixed", "adaptive"] = "fixed"
    target_clipped_quantile: float = 0.5
    clip_norm_lr: float = 0.2
    clipped_count_stddev: float | None = None
    delta: float = 1e-5  # reported epsilon is at this delta
    max_epsilon: float | None = None  # stop training rounds before the next one would spend more
    # Secure aggregation with Flower's SecAgg+: the server only learns the sum of the sites'
    # (quantised) weights, not any one site's. Needs at least 3 sites.
    secure_aggregation: bool = False
    secagg_shares: int = 3  # each site's secret is split among this many sites (itself included)
    secagg_threshold: int = 2  # shares needed to reconstruct (< shares); a round survives shares - threshold dropouts
    secagg_clipping_range: float = 8.0  # weights are clipped to +-this before quantisation
    secagg_quantization_range: int = 4194304  # levels across the clipping range


@dataclass
class FederatedConfig:
    # Flower strategy that combines the sites' encoders: fedavg, fedprox (proximal term at the
    # sites), fedavgm (server momentum), fedadam / fedyogi / fedadagrad (server-side adaptive
    # optimisers, learning rate server_lr); robust to a few bad or hostile sites: fedmedian
    # (coordinate-wise median), fedtrimmedavg (mean without the trim_fraction largest and smallest
    # values per coordinate), krum / multikrum (the update(s) closest to the others), bulyan.
    strategy: Literal["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad",
                      "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"] = "fedavg"
    local_epochs: int = 1  # per round; rounds = pretrain.epochs / local_epochs, the centralised budget
    fraction_train: float = 1.0  # share of the sites asked to train each round
    min_sites: int = 1  # usable updates a round needs; fewer and the global model stays as it was
    eval_every: int = 1  # validate the global model at the sites every this many rounds (and after the last)
    # Pre-training: the sites validate a round's model with the next round's training message
    # (one message exchange a round instead of two; the last round separately). false: a separate
    # evaluate exchange per validated round, as fine-tuning always has (it selects on the result).
    validate_with_training: bool = True
    # Write the global checkpoint, and in a simulation each site's state (decoder, optimiser), every
    # this many rounds (and after the last): a stopped run resumes from the last one, exactly. A
    # deployed site writes its state every round: Flower starts its ClientApp afresh per message.
    checkpoint_every: int = 1
    round_timeout: float = 3600.0  # seconds a round waits for sites; later replies are dropped
    proximal_mu: float = 0.01  # fedprox: weight of the proximal term mu/2 ||w - w_global||^2
    server_lr: float = 1.0  # fedavgm / fedadam: server learning rate (fedadam usually 0.01-0.1)
    server_momentum: float = 0.9  # fedavgm
    trim_fraction: float = 0.2  # fedtrimmedavg: share cut off at each end, in [0, 0.5)
    # krum / multikrum / bulyan: sites that may be byzantine. A round needs 2f+3 sampled sites
    # (krum, multikrum) or 4f+3 (bulyan); fewer and the run is refused at the start.
    byzantine_sites: int = 1
    krum_select: int = 2  # multikrum: updates averaged (krum averages one)
    # Simulation: Flower's client resources per virtual site. cpus_per_site (default: the cores
    # shared so that every site can run at once) and sites_per_gpu (default: the sites spread
    # evenly over the GPUs; 4 lets four virtual sites share each GPU, Ray running as many
    # at once as the GPUs hold). Deployments ignore both: each site has its own machine.
    cpus_per_site: int | None = None
    sites_per_gpu: int | None = None
    # Simulation on a running Ray cluster (its head's address, e.g. "10.0.0.5:6379", as `ray start
    # --head` prints it) instead of a Ray started on this machine: docs/ray-cluster.md. Sites then
    # ask for cpus_per_site (default 1) and 1/sites_per_gpu GPUs (default none) of the cluster.
    ray_address: str | None = None
    # Sites a process keeps live (model, optimiser, loaders) between rounds; the others are
    # rebuilt from their state on disk when asked again, with the same result. Bounds a
    # simulation's memory however many sites it has.
    live_sites: int = 8
    # Precision of the weights on the wire; averaging is always in fp32. int8: blockwise 8-bit
    # codes, the sites sending their updates with error feedback (fedmae/federated/updates.py).
    transport: Literal["fp32", "fp16", "bf16", "int8"] = "fp32"
    finetune: Literal["federated", "local", "none"] = "federated"  # after pre-training: FedAvg of the whole model, each site alone, or stop
    finetune_local_epochs: int = 1  # federated fine-tuning: epochs per round; rounds = finetune.epochs / this
    # Skip federated pre-training and fine-tune from this pre-training checkpoint's encoder
    # (fedmae pretrain's or a global one), or from a random initialisation ("random"). A foreign
    # encoder too (timm, facebookresearch/mae, MONAI, SelfMedMAE, fedmae safetensors), its format
    # detected or named as FORMAT:FILE (docs/interop.md).
    start_from: str | None = None
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)


ARMS = ("centralised", "federated", "local", "none")
# Strategies whose new global model is the average of the sites' weights, which differential
# privacy's noise and accounting and secure aggregation's sum assume (FedProx only adds a
# proximal term to the sites' training).
AVERAGING_STRATEGIES = ("fedavg", "fedprox")


def sites_needed(fed: FederatedConfig) -> int:
    """Sampled sites a round of the strategy needs: Krum's choice means something only with
    n >= 2f+3 (each update scored on its n-f-2 nearest), Bulyan's trimmed Krum with n >= 4f+3."""
    f = fed.byzantine_sites
    return {"krum": 2 * f + 3, "multikrum": max(2 * f + 3, fed.krum_select), "bulyan": 4 * f + 3}.get(fed.strategy, 1)


@dataclass
class CompareConfig:
    # `fedmae compare`: pre-training arms run on the same data, splits and budget, then fine-tuned
    # by one protocol. centralised: all sites' training images pooled; federated: FedAvg of the
    # encoder on Flower's simulation engine (the federated section); local: each site alone;
    # none: random initialisation.
    arms: tuple[str, ...] = ARMS
    seeds: tuple[int, ...] = (0,)  # every arm runs once per seed; the report gives mean and std
    # local: each site fine-tunes its arm's encoder on its own labels and is tested on its own
    # test cases; federated: FedAvg of the whole fine-tune model across the sites (Flower).
    finetune: Literal["local", "federated"] = "local"
    reconstructions: int = 4  # validation cases shown through the federated encoder (0: no figure)
    # Independent runs at once (arms of a seed, sites of the local arm, local fine-tunes), each in
    # its own process with an equal share of the cores (or its own GPU); 1: one after another, in
    # this process; auto: as many as there are GPUs, else up to one per core (at most 8).
    parallel: int | Literal["auto"] = "auto"
    # Print the paper's published centralised figures on this data set (SelfMedMAE: no pre-training
    # and MAE self pre-training; fedmae/comparison/published.py) beside the run's, in report.md and
    # the printed table; none: no such table.
    paper: Literal["none", "btcv", "brats", "chestxray14"] = "none"


@dataclass
class TrackingConfig:
    # Experiment tracking, offline unless uri names a server: pre-training and fine-tuning curves,
    # federated rounds (at the server only: sites never track), a comparison's table and figures.
    # tensorboard: event files in the run's folder (tensorboard/); mlflow: a local store in the
    # run's folder (mlruns/). Either needs `pip install fedmae[tracking]`.
    backend: Literal["none", "tensorboard", "mlflow"] = "none"
    run_name: str | None = None  # null: "<name>/<command>"; a comparison's runs: "<run name>/seed-S/<arm>/..."
    # mlflow only: a tracking URI (sqlite:///abs/mlflow.db, http://host:5000) or a folder for a
    # local store shared by runs (relative to the working directory); null: <run folder>/mlruns
    uri: str | None = None


def is_uri(text: str) -> bool:
    """Whether ``text`` starts with a URI scheme (``sqlite:``, ``http:``), as opposed to a folder
    (a one-letter scheme is a Windows drive)."""
    scheme, colon, _ = text.partition(":")
    return bool(colon) and len(scheme) > 1 and scheme[0].isalpha() and all(c.isalnum() or c in "+.-" for c in scheme)


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    device: str = "auto"  # auto (cuda if available), cpu, cuda, cuda:N
    # torch.compile the model in fedmae pretrain / finetune (and a comparison's centralised, local and
    # fine-tuning runs; Flower sites train eagerly): CUDA: faster steps after a slow start; CPU: rarely worth it
    compile: bool = False
    output_dir: str | None = None  # None: runs/<name>
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    # ---- derived values: computed here only ----
    @property
    def spatial_dims(self) -> int:
        return parse_model_name(self.model.name)[2]

    @property
    def patch_size(self) -> int:
        return parse_model_name(self.model.name)[1]

    @property
    def size(self) -> ModelSize:
        """The named size with any explicit overrides from the model section applied."""
        base = parse_model_name(self.model.name)[0]
        overrides = {
            f.name: getattr(self.model, f.name)
            for f in dataclasses.fields(ModelSize)
            if getattr(self.model, f.name, None) is not None
        }
        return dataclasses.replace(base, **overrides)

    @property
    def data_image_size(self) -> tuple[int, ...]:
        return self.data.image_size or self.model.img_size

    @property
    def skip_blocks(self) -> tuple[int, ...]:
        """UNETR skip taps: the configured ones, or the paper's (4, 7, 10 of 12) scaled to the depth."""
        if self.model.skip_blocks is not None:
            return self.model.skip_blocks
        return default_skip_blocks(self.size.depth, self.patch_size)

    @property
    def multi_label(self) -> bool:
        if self.task.regions is not None:
            return True  # overlapping regions are one sigmoid channel each
        if self.task.multi_label is not None:
            return self.task.multi_label
        return self.task.type == "classification"

    @property
    def pretrain_crops_per_step(self) -> int:
        """What a pre-training step averages its loss over: batch_size images x
        data.samples_per_volume crops of each. An epoch is ceil(images / batch_size) steps."""
        return self.pretrain.batch_size * self.data.samples_per_volume

    @property
    def finetune_crops_per_step(self) -> int:
        return self.finetune.batch_size * self.data.samples_per_volume

    @property
    def pretrain_lr(self) -> float:
        """MAE's rule, lr = base_lr x batch / 256, with the batch counted in crops."""
        return self.pretrain.base_lr * self.pretrain_crops_per_step / 256

    @property
    def finetune_lr(self) -> float:
        return self.finetune.base_lr * self.finetune_crops_per_step / 256

    @property
    def pretrain_rounds(self) -> int:
        """Federated pre-training rounds: the centralised epochs, ``local_epochs`` per round."""
        return self.pretrain.epochs // self.federated.local_epochs

    @property
    def finetune_rounds(self) -> int:
        return self.finetune.epochs // self.federated.finetune_local_epochs

    def to_dict(self) -> dict[str, Any]:
        """Plain (YAML/JSON-safe) dict of the resolved configuration; tuples become lists."""
        return to_plain(self)


def default_skip_blocks(depth: int, patch_size: int) -> tuple[int, ...]:
    """Blocks whose outputs feed the UNETR decoder: log2(patch) - 1 taps spread over the depth.

    For patch 16 and depth 12 this is the paper's (4, 7, 10); other depths scale those fractions.
    """
    taps = int(math.log2(patch_size)) - 1
    fractions = [4 / 12, 7 / 12, 10 / 12] if taps == 3 else [(i + 1) / (taps + 1) for i in range(taps)]
    return tuple(min(depth - 1, max(1, int(f * depth + 0.5))) for f in fractions)


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """Read a YAML experiment file, apply ``key.sub=value`` overrides, type-check and validate.

    Refused in one line: a file with nothing in it (empty, or only comments: YAML reads it as no
    value at all), since running 100 epochs on defaults is never what an empty file meant; write
    ``{}`` for "all defaults". A key given twice in one mapping (PyYAML would keep the last one
    silently). An error in a value an override set names the override (``--set key=value``), not
    the file; an error about a value the user did not set names the key that was set (e.g.
    ``model.depth``, not the ``model.skip_blocks`` derived from it). Settings that only a federated
    run uses (rounds from ``federated.local_epochs``) are checked by :func:`validate_federated`.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    raw = load_yaml(path.read_text(), str(path))
    if raw is None:
        raise ConfigError(f"{path}: the file is empty (no settings, only blank lines or comments); write the "
                          f"settings to use, or {{}} for all defaults; see configs/ for examples (configs/demo.yaml)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return _absolute_paths(config_from_dict(raw, str(path), overrides))



PATH_KEYS = ("root", "manifest", "split_file", "cache_dir")


def _absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """Data paths (and an MLflow store's folder) relative to the working directory become absolute,
    so runs started elsewhere (simulated sites, the ServerApp, a resumed run) use the same files."""
    paths = {k: str(Path(v).expanduser().absolute()) for k in PATH_KEYS if (v := getattr(cfg.data, k)) is not None}
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **paths))
    uri = cfg.tracking.uri
    if uri is not None and not is_uri(uri):  # a folder for a local MLflow store; the ServerApp runs elsewhere
        folder = str(Path(uri).expanduser().absolute())
        cfg = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, uri=folder))
    return cfg



def config_from_dict(raw: Mapping[str, Any], source: str = "<dict>", overrides: Iterable[str] = ()) -> ExperimentConfig:
    """Build and validate a config from a plain dict (e.g. the one stored in a checkpoint), with
    ``key.sub=value`` overrides applied (their errors name the override, see :func:`load_config`)."""
    cfg, named = build(ExperimentConfig, raw, source, overrides)
    validate(cfg, source=named)
    return cfg


# ---------------------------------------------------------------------------------------------
# Validation of values that type-check but cannot work


def validate(cfg: ExperimentConfig, source: Source | str) -> None:
    """Raise ConfigError for the first impossible value, naming its key.

    A problem with a value the user did not set (a default, or one derived from another key) names
    the key the user did set. ``source`` is the file's name (every key counts as set), or the
    record of a load with the keys set and the overrides that set them. The sections are checked
    in this order, so a config with several problems is refused for the same one every time.
    """
    src = source if isinstance(source, Source) else Source(str(source))
    _check_model(cfg, src)
    _check_data(cfg, src)
    _check_task(cfg.task, src)
    _check_phase("pretrain", cfg.pretrain, src)
    _check_finetune(cfg.finetune, src)
    _check_federated(cfg.federated, src)
    _check_privacy(cfg.federated, src)
    _check_compare(cfg.compare, src)
    _check_device(cfg.device, src)
    _check_tracking(cfg.tracking, src)


def _check_model(cfg: ExperimentConfig, src: Source) -> None:
    fail = src.fail
    m = cfg.model
    try:
        _, patch, dims = parse_model_name(m.name)
    except ValueError as err:
        fail("model.name", str(err))
    if len(m.img_size) != dims:
        fail("model.img_size", f"{m.name} is {dims}D, so img_size needs {dims} sides, got {list(m.img_size)}")
    for side in m.img_size:
        if side <= 0 or side % patch:
            fail("model.img_size", f"every side must be a positive multiple of the patch size {patch}, got {list(m.img_size)}")
    if m.in_channels < 1:
        fail("model.in_channels", f"must be at least 1, got {m.in_channels}")
    if not 0.0 < m.mask_ratio < 1.0:
        fail("model.mask_ratio", f"must be strictly between 0 and 1, got {m.mask_ratio}")
    num_patches = math.prod(s // patch for s in m.img_size)
    if int(num_patches * (1 - m.mask_ratio)) < 1:
        if src.set_by_user("model.mask_ratio"):
            fail("model.mask_ratio", f"leaves no visible patch out of {num_patches}", "model.img_size")
        fail("model.img_size", f"{list(m.img_size)} makes only {num_patches} patch(es) of {patch}, and the default "
             f"model.mask_ratio {m.mask_ratio} hides all of them; use a larger img_size or set model.mask_ratio")
    size = cfg.size
    for key in ("embed_dim", "depth", "num_heads", "decoder_dim", "decoder_depth", "decoder_heads"):
        if getattr(size, key) < 1:
            fail(f"model.{key}", f"must be at least 1, got {getattr(size, key)}")
    for dim_key, heads_key in (("embed_dim", "num_heads"), ("decoder_dim", "decoder_heads")):
        dim, heads = getattr(size, dim_key), getattr(size, heads_key)
        if dim % heads:
            if getattr(m, heads_key) is None:  # the heads come from the named size: blame the width that was set
                fail(f"model.{dim_key}", f"{dim} is not divisible by {m.name}'s {heads} heads; choose a multiple of "
                     f"{heads} or set model.{heads_key} too")
            fail(f"model.{heads_key}", f"{dim_key} {dim} is not divisible by {heads_key} {heads}", f"model.{dim_key}")
    for dim_key in ("embed_dim", "decoder_dim"):
        if getattr(size, dim_key) < 2 * dims * 2:
            fail(f"model.{dim_key}", f"{getattr(size, dim_key)} is too small for a {dims}D sin-cos position embedding "
                 f"(needs at least {2 * dims * 2})")
    if m.mlp_ratio <= 0:
        fail("model.mlp_ratio", f"must be positive, got {m.mlp_ratio}")
    if cfg.task.type == "segmentation":
        if patch & (patch - 1) or patch < 4:
            fail("model.name", f"the UNETR decoder needs a power-of-two patch size of at least 4, got {patch}")
        taps = int(math.log2(patch)) - 1
        if m.skip_blocks is None and size.depth < taps + 1:  # the skips are derived from the depth
            depth_key = "model.depth" if m.depth is not None else "model.name"
            fail(depth_key, f"{size.depth} is too shallow for UNETR's skip connections: patch {patch} taps {taps} "
                 f"blocks before the last (needs depth >= {taps + 1}, or set model.skip_blocks)")
        skips = cfg.skip_blocks
        if len(skips) != taps:
            fail("model.skip_blocks", f"patch {patch} needs {taps} skip blocks, got {list(skips)}")
        if any(not 1 <= b < size.depth for b in skips) or list(skips) != sorted(set(skips)):
            fail("model.skip_blocks", f"need increasing block numbers in 1..{size.depth - 1}, got {list(skips)}",
                 "model.depth")
        if m.feature_size < 1:
            fail("model.feature_size", f"must be at least 1, got {m.feature_size}")


def _check_data(cfg: ExperimentConfig, src: Source) -> None:
    fail, given = src.fail, src.set_by_user
    m, d = cfg.model, cfg.data
    dims = cfg.spatial_dims
    image_size = cfg.data_image_size
    if len(image_size) != dims:
        fail("data.image_size", f"needs {dims} sides for a {dims}D model, got {list(image_size)}")
    if any(s < c for s, c in zip(image_size, m.img_size)):
        fail("data.image_size", f"must be at least model.img_size {list(m.img_size)} on every side, got {list(image_size)}")
    if d.source == "synthetic":
        if any(s < 16 for s in image_size):
            if d.image_size is None:  # the images are made at the model's input size
                fail("model.img_size", f"the built-in generator makes images of model.img_size (data.image_size is "
                     f"null) and needs sides of at least 16, got {list(image_size)}; set data.image_size")
            fail("data.image_size", f"the built-in generator needs sides of at least 16, got {list(image_size)}")
        if d.cases_per_site < 4:
            fail("data.cases_per_site", f"must be at least 4 (train, validation and test need cases), got {d.cases_per_site}")
        if d.partition != "natural":
            fail("data.partition", "the built-in data come from data.num_sites hospitals already; use natural")
    elif d.root is None:
        fail("data.root", f"the {d.source} source needs the data set's location")
    if d.manifest is not None and d.source != "nifti_folder":
        fail("data.manifest", "only the nifti_folder source reads a manifest")
    if d.num_sites < 1:
        fail("data.num_sites", f"must be at least 1, got {d.num_sites}")
    if d.heterogeneity < 0:
        fail("data.heterogeneity", f"must be non-negative, got {d.heterogeneity}")
    if d.patient_variation < 0:
        fail("data.patient_variation", f"must be non-negative, got {d.patient_variation}")
    if d.partition_beta <= 0:
        fail("data.partition_beta", f"must be positive, got {d.partition_beta}")
    for key in ("val_fraction", "test_fraction"):
        if not 0.0 < getattr(d, key) < 1.0:
            fail(f"data.{key}", f"must be strictly between 0 and 1, got {getattr(d, key)}")
    if d.val_fraction + d.test_fraction >= 0.9:
        fraction_key = "data.val_fraction" if given("data.val_fraction") and not given("data.test_fraction") else \
            "data.test_fraction"
        fail(fraction_key, f"val_fraction {d.val_fraction} + test_fraction {d.test_fraction} leave under 10% of cases "
             "for training", "data.val_fraction", "data.test_fraction")
    if d.spacing is not None and (len(d.spacing) != dims or any(s <= 0 for s in d.spacing)):
        fail("data.spacing", f"needs {dims} positive voxel sizes in mm, got {list(d.spacing)}")
    if not d.window[0] < d.window[1]:
        fail("data.window", f"needs [low, high] with low < high, got {list(d.window)}")
    for key in ("flip_prob", "rotate_prob", "intensity_prob", "pos_fraction"):
        if not 0.0 <= getattr(d, key) <= 1.0:
            fail(f"data.{key}", f"must be in [0, 1], got {getattr(d, key)}")
    if d.samples_per_volume < 1:
        fail("data.samples_per_volume", f"must be at least 1, got {d.samples_per_volume}")
    if d.finetune_crop == "pos_neg" and cfg.task.type != "segmentation":
        fail("data.finetune_crop", f"pos_neg centres crops on segmentation labels; task.type is {cfg.task.type}, "
             "so use random", "task.type")
    if d.randaugment_ops < 0:
        fail("data.randaugment_ops", f"must be 0 (off) or more, got {d.randaugment_ops}")
    if not 0 <= d.randaugment_magnitude <= 10:
        fail("data.randaugment_magnitude", f"must be in 0..10 (timm's scale), got {d.randaugment_magnitude}")
    if d.randaugment_ops and (dims != 2 or cfg.task.type != "classification"):
        fail("data.randaugment_ops", f"RandAugment is for 2-D classification (its geometric operations would not move "
             f"a segmentation label); this is {dims}D {cfg.task.type}, so set it to 0", "task.type")
    if d.randaugment_ops and m.in_channels not in (1, 3):
        fail("data.randaugment_ops", f"RandAugment needs grey or RGB images (model.in_channels 1 or 3), got "
             f"{m.in_channels} channels", "model.in_channels")
    if d.cache == "disk" and d.cache_dir is None:
        fail("data.cache_dir", "cache: disk needs a folder for the preprocessed files")
    if d.num_workers != "auto" and d.num_workers < 0:
        fail("data.num_workers", f"must be auto or non-negative, got {d.num_workers}")


def _check_task(t: TaskConfig, src: Source) -> None:
    fail = src.fail
    if t.class_names is not None and (not t.class_names or len(set(t.class_names)) != len(t.class_names)):
        fail("task.class_names", f"needs distinct names, got {list(t.class_names)}")
    if t.findings is not None:
        if t.type != "classification":
            fail("task.findings", "selects classification findings; segmentation uses class_names / regions")
        if not t.findings or len(set(t.findings)) != len(t.findings):
            fail("task.findings", f"needs one or more distinct finding names, got {list(t.findings)}")
    if t.regions is not None:
        if t.type != "segmentation":
            fail("task.regions", "regions are for segmentation")
        if t.multi_label is False:
            fail("task.multi_label", "regions overlap, so they need sigmoid outputs (multi_label true)")
        if not t.regions or any(not values or min(values) < 1 for values in t.regions.values()):
            fail("task.regions", "each region needs one or more foreground label values (>= 1)")


def _check_phase(section: str, s: PretrainConfig | FinetuneConfig, src: Source) -> None:
    """The optimiser and the epochs' cadence, as pre-training and fine-tuning share them."""
    fail = src.fail
    if s.epochs < 1:
        fail(f"{section}.epochs", f"must be at least 1, got {s.epochs}")
    if not 0 <= s.warmup_epochs <= s.epochs:
        if not src.set_by_user(f"{section}.warmup_epochs"):
            fail(f"{section}.epochs", f"{s.epochs} is fewer than the default {section}.warmup_epochs "
                 f"({s.warmup_epochs}); set {section}.warmup_epochs too (0 to {s.epochs})")
        fail(f"{section}.warmup_epochs", f"must be between 0 and epochs ({s.epochs}), got {s.warmup_epochs}",
             f"{section}.epochs")
    if s.batch_size < 1:
        fail(f"{section}.batch_size", f"must be at least 1, got {s.batch_size}")
    if s.base_lr <= 0 or s.min_lr < 0:
        fail(f"{section}.base_lr", "learning rates must be positive (min_lr non-negative)")
    if s.weight_decay < 0:
        fail(f"{section}.weight_decay", f"must be non-negative, got {s.weight_decay}")
    if not all(0.0 <= b < 1.0 for b in s.betas):
        fail(f"{section}.betas", f"each beta must be in [0, 1), got {list(s.betas)}")
    if s.clip_grad is not None and s.clip_grad <= 0:
        fail(f"{section}.clip_grad", f"must be positive or null, got {s.clip_grad}")
    for key in ("eval_every", "checkpoint_every"):
        if getattr(s, key) < 1:
            fail(f"{section}.{key}", f"must be at least 1 (epochs), got {getattr(s, key)}")


def _check_finetune(f: FinetuneConfig, src: Source) -> None:
    fail = src.fail
    _check_phase("finetune", f, src)
    if not 0.0 < f.layer_decay <= 1.0:
        fail("finetune.layer_decay", f"must be in (0, 1], got {f.layer_decay}")
    if not 0.0 <= f.drop_path < 1.0:
        fail("finetune.drop_path", f"must be in [0, 1), got {f.drop_path}")
    if not 0.0 < f.label_fraction <= 1.0:
        fail("finetune.label_fraction", f"must be in (0, 1], got {f.label_fraction}")
    if not 0.0 <= f.sw_overlap < 1.0:
        fail("finetune.sw_overlap", f"must be in [0, 1), got {f.sw_overlap}")


def _check_federated(fed: FederatedConfig, src: Source) -> None:
    """What every run can check of the federated section; what only a federated run can check
    is :func:`validate_federated`'s."""
    fail = src.fail
    for key in ("local_epochs", "finetune_local_epochs"):
        if getattr(fed, key) < 1:  # whether it divides the epochs matters to federated runs only: validate_federated
            fail(f"federated.{key}", f"must be at least 1, got {getattr(fed, key)}")
    if not 0.0 < fed.fraction_train <= 1.0:
        fail("federated.fraction_train", f"must be in (0, 1], got {fed.fraction_train}")
    if fed.min_sites < 1:
        fail("federated.min_sites", f"must be at least 1, got {fed.min_sites}")
    for key in ("round_timeout", "server_lr"):
        if getattr(fed, key) <= 0:
            fail(f"federated.{key}", f"must be positive, got {getattr(fed, key)}")
    for key in ("eval_every", "checkpoint_every"):
        if getattr(fed, key) < 1:
            fail(f"federated.{key}", f"must be at least 1, got {getattr(fed, key)}")
    if fed.live_sites < 1:
        fail("federated.live_sites", f"must be at least 1, got {fed.live_sites}")
    for key in ("cpus_per_site", "sites_per_gpu"):
        if getattr(fed, key) is not None and getattr(fed, key) < 1:
            fail(f"federated.{key}", f"must be at least 1 (or unset), got {getattr(fed, key)}")
    if not 0.0 <= fed.trim_fraction < 0.5:
        fail("federated.trim_fraction", f"must be in [0, 0.5), got {fed.trim_fraction}")
    if fed.byzantine_sites < 0:
        fail("federated.byzantine_sites", f"must be at least 0, got {fed.byzantine_sites}")
    if fed.krum_select < 1:
        fail("federated.krum_select", f"must be at least 1, got {fed.krum_select}")
    if fed.proximal_mu < 0 or not 0.0 <= fed.server_momentum < 1.0:
        fail("federated.proximal_mu", "proximal_mu must be non-negative and server_momentum in [0, 1)")
    if fed.start_from not in (None, "random"):
        from fedmae.interop.formats import split_encoder_spec  # no torch: a config error stays quick

        if not split_encoder_spec(fed.start_from)[1].is_file():
            fail("federated.start_from", f"needs 'random' or a pre-training checkpoint (fedmae's, or a foreign encoder "
                 f"as [FORMAT:]FILE, docs/interop.md); {fed.start_from} is not a file")
    if fed.start_from is not None and fed.finetune == "none":
        fail("federated.start_from", "skips pre-training, so federated.finetune must be federated or local")


def _check_privacy(fed: FederatedConfig, src: Source) -> None:
    fail, given = src.fail, src.set_by_user
    p = fed.privacy
    if p.dp != "none":
        if p.noise_multiplier <= 0:
            fail("federated.privacy.noise_multiplier", f"must be positive with dp on, got {p.noise_multiplier}")
        if p.clipping_norm <= 0:
            fail("federated.privacy.clipping_norm", f"must be positive, got {p.clipping_norm}")
        if not 0.0 < p.delta < 1.0:
            fail("federated.privacy.delta", f"must be strictly between 0 and 1, got {p.delta}")
        if p.max_epsilon is not None and p.max_epsilon <= 0:
            fail("federated.privacy.max_epsilon", f"must be positive, got {p.max_epsilon}")
        if not 0.0 <= p.target_clipped_quantile <= 1.0:
            fail("federated.privacy.target_clipped_quantile", f"must be in [0, 1], got {p.target_clipped_quantile}")
        if p.clip_norm_lr <= 0:
            fail("federated.privacy.clip_norm_lr", f"must be positive, got {p.clip_norm_lr}")
        if p.clipped_count_stddev is not None and p.clipped_count_stddev <= 0:
            fail("federated.privacy.clipped_count_stddev", f"must be positive (or unset), got {p.clipped_count_stddev}")
        if fed.fraction_train != 1.0:
            fail("federated.fraction_train", "must be 1 with differential privacy (the accounting assumes every site "
                 "takes part in every round)")
        if fed.strategy not in AVERAGING_STRATEGIES:
            fail("federated.strategy", f"differential privacy needs fedavg or fedprox (its noise and accounting assume a plain "
                 f"average), got {fed.strategy}")
        if fed.checkpoint_every != 1:
            fail("federated.checkpoint_every", f"must be 1 with differential privacy, got {fed.checkpoint_every}: every "
                 "released round is checkpointed with the privacy ledger, else a resumed run would release rounds again "
                 "without counting them")
        if p.dp == "client" and fed.transport == "int8":
            fail("federated.transport", "int8 carries what quantisation drops of a site's update into its next round, "
                 "outside the clipping client-side DP accounts for; use fp32, fp16 or bf16 (or dp: server)")
    if p.secure_aggregation:
        if p.dp != "none":
            fail("federated.privacy.dp", "differential privacy together with secure aggregation is not supported; "
                 "choose one (server-side clipping would need the updates that secure aggregation hides)")
        if fed.fraction_train != 1.0:
            fail("federated.fraction_train", "must be 1 with secure aggregation (every site takes part in the sum)")
        if fed.strategy not in AVERAGING_STRATEGIES:
            fail("federated.strategy", f"secure aggregation sums the sites' weights, so it works with fedavg or "
                 f"fedprox, not {fed.strategy}")
        if fed.transport != "fp32":
            fail("federated.transport", "secure aggregation quantises the weights itself; use fp32")
        if not 2 <= p.secagg_threshold < p.secagg_shares:
            pair = ("secagg_shares", "secagg_threshold")
            if not given("federated.privacy.secagg_shares") or given("federated.privacy.secagg_threshold"):
                pair = pair[::-1]  # blame the one the user set
            fail(f"federated.privacy.{pair[0]}", f"need 2 <= secagg_threshold < secagg_shares (Flower's SecAgg+), "
                 f"got {p.secagg_threshold} and {p.secagg_shares}", f"federated.privacy.{pair[1]}")
        if p.secagg_clipping_range <= 0 or p.secagg_quantization_range < 2:
            fail("federated.privacy.secagg_clipping_range", "clipping range must be positive and quantization range "
                 "at least 2")


def _check_compare(c: CompareConfig, src: Source) -> None:
    fail = src.fail
    unknown = [a for a in c.arms if a not in ARMS]
    if unknown or not c.arms or len(set(c.arms)) != len(c.arms):
        fail("compare.arms", f"needs distinct arms from {', '.join(ARMS)}, got {list(c.arms)}")
    if not c.seeds or len(set(c.seeds)) != len(c.seeds):
        fail("compare.seeds", f"needs one or more distinct seeds, got {list(c.seeds)}")
    if c.finetune == "federated" and "local" in c.arms:
        fail("compare.finetune", "federated fine-tuning starts every site from one encoder, but the local arm has "
             "one per site; use finetune: local or drop local from compare.arms")
    if c.reconstructions < 0:
        fail("compare.reconstructions", f"must be non-negative, got {c.reconstructions}")
    if c.parallel != "auto" and c.parallel < 1:
        fail("compare.parallel", f"must be auto or at least 1, got {c.parallel}")


def _check_device(device: str, src: Source) -> None:
    if device != "auto" and device != "cpu" and not device.startswith("cuda"):
        src.fail("device", f"must be auto, cpu, cuda or cuda:N, got {device!r}")


def _check_tracking(t: TrackingConfig, src: Source) -> None:
    """The settings only; whether the backend's package is installed is checked where a run
    starts tracking (fedmae.tracking), since sites never track and need not have it."""
    if t.run_name is not None and not t.run_name.strip():
        src.fail("tracking.run_name", "must not be empty; null names the run <name>/<command>")
    if t.uri is not None:
        if not t.uri.strip():
            src.fail("tracking.uri", "must not be empty; null keeps the store in the run's folder (mlruns/)")
        if t.backend == "tensorboard":
            src.fail("tracking.uri", "is read by the mlflow backend only; tensorboard writes into each run's folder "
                     "(tensorboard/): remove tracking.uri", "tracking.backend")


def validate_federated(cfg: ExperimentConfig, source: str | Path | None = None, *, pretrain: bool | None = None,
                       finetune: bool | None = None) -> None:
    """Refuse, in one line, settings a federated run cannot use: rounds of
    ``federated.local_epochs`` that do not add up to ``pretrain.epochs`` (and the same for
    fine-tuning). Centralised ``fedmae pretrain`` / ``finetune`` never read these, so
    :func:`load_config` does not check them; call this where a federated run starts.

    ``pretrain`` / ``finetune``: whether the run pre-trains / fine-tunes federatedly; default:
    as the federated section says (pre-training unless ``start_from``, fine-tuning when
    ``federated.finetune`` is federated). ``source``: the file, named in the message.
    """
    fed = cfg.federated
    pretrain = fed.start_from is None if pretrain is None else pretrain
    finetune = fed.finetune == "federated" if finetune is None else finetune
    where = f"{source}: " if source is not None else ""
    for key, total, used in (("local_epochs", "pretrain", pretrain), ("finetune_local_epochs", "finetune", finetune)):
        per_round, epochs = getattr(fed, key), getattr(cfg, total).epochs
        if used and (per_round < 1 or epochs % per_round):
            raise ConfigError(f"{where}federated.{key}: must be at least 1 and divide {total}.epochs ({epochs}), "
                              f"got {per_round}")
