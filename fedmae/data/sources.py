"""From a config (or a path given to `fedmae data inspect`) to a :class:`Catalog`: which reader reads it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fedmae.data.catalog import Catalog, DataError

if TYPE_CHECKING:
    from fedmae.config import ExperimentConfig

SOURCES = ("synthetic", "decathlon", "nifti_folder", "dicom", "chestxray14", "medmnist")


def read_catalog(cfg: ExperimentConfig) -> Catalog:
    """The configured data source's cases; nothing but indexes is read."""
    d = cfg.data
    if d.source == "synthetic":
        from fedmae.data.synthetic import read_synthetic

        return read_synthetic(cfg)
    if d.source == "decathlon":
        from fedmae.data.decathlon import read_decathlon

        return read_decathlon(d.root)
    if d.source == "nifti_folder":
        from fedmae.data.nifti_folder import read_nifti_folder

        if d.modality == "auto":
            raise DataError(f"{d.root}: a nifti_folder does not say what it holds; set data.modality to ct, mri or other")
        return read_nifti_folder(d.root, d.manifest, d.modality)
    if d.source == "dicom":
        from fedmae.data.dicom import read_dicom_folder

        return read_dicom_folder(d.root, d.modality)
    if d.source == "chestxray14":
        from fedmae.data.chestxray14 import read_chestxray14

        return read_chestxray14(d.root)
    if d.source == "medmnist":
        from fedmae.data.medmnist import read_medmnist

        return read_medmnist(d.root)
    raise ValueError(f"unknown data source {d.source!r}")  # the config's Literal rules this out


def detect_source(path: str | Path) -> str:
    """Which reader a data set on disk needs, from its layout (for `fedmae data inspect PATH`)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".npz":
        return "medmnist"
    if path.is_file() and path.suffix == ".json":
        return "decathlon"  # a Decathlon-style index such as MONAI's dataset_0.json
    if not path.is_dir():
        raise DataError(f"{path}: no such folder or .npz file")
    if (path / "dataset.json").is_file():
        return "decathlon"
    if any((path / name).is_file() for name in ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")):
        return "chestxray14"
    if (path / "images").is_dir() or any((p / "images").is_dir() for p in path.iterdir()):
        from fedmae.data.dicom import is_series_layout

        # images/ holding folders (one per series) rather than NIfTI files
        return "dicom" if is_series_layout(path) else "nifti_folder"
    raise DataError(
        f"{path}: not a known layout (expected dataset.json, Data_Entry_2017.csv, images/ or an .npz file); "
        "pass a config file instead"
    )
