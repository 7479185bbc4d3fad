"""Reader for a plain folder of NIfTI volumes, with optional label maps.

Two ways to say which files belong together:
- a manifest (CSV with a header, or a JSON list of objects) with an ``image`` column and optional
  ``label``, ``site``, ``patient``, ``split`` and ``case_id`` columns; paths relative to the folder;
- no manifest: ``images/`` holds the volumes and ``labels/`` the label maps of the same file name
  (nnU-Net's ``_0000`` channel suffix on image names is understood). When the folder has no
  ``images/`` but sub-folders that do, each sub-folder is one site (a natural partition).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from fedmae.data.catalog import (
    SPLITS,
    UNLABELLED,
    Case,
    Catalog,
    DataError,
    Modality,
    Problem,
    is_nifti,
    listed_case,
    nifti_stem,
    resolve_path,
)

MANIFEST_COLUMNS = {"image", "label", "site", "patient", "split", "case_id"}


def read_nifti_folder(root: str | Path, manifest: str | Path | None = None, modality: Modality = "other") -> Catalog:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (data.root should hold the NIfTI files)")
    problems: list[Problem] = []
    if manifest is not None:
        cases = _from_manifest(root, Path(manifest), problems)
    elif (root / "images").is_dir():
        cases = _from_folders(root, "", problems)
    else:
        site_dirs = sorted(p for p in root.iterdir() if (p / "images").is_dir())
        if not site_dirs:
            raise DataError(f"{root}: no images/ folder (nor site folders with one); add images/ or a manifest")
        cases = [case for d in site_dirs for case in _from_folders(d, d.name, problems)]
    seen: set[str] = set()
    unique = []
    for case in cases:
        if case.case_id in seen:
            problems.append(Problem(case.files[0], f"case id {case.case_id} is used twice", case.case_id))
            continue
        seen.add(case.case_id)
        unique.append(case)
    return Catalog(source="nifti_folder", root=str(root), modality=modality, spatial_dims=3, cases=unique, problems=problems)


def _from_folders(folder: Path, site: str, problems: list[Problem]) -> list[Case]:
    images = sorted(p for p in (folder / "images").iterdir() if _is_volume(p))
    labels_dir = folder / "labels"
    labels = {nifti_stem(p.name): p for p in labels_dir.iterdir() if _is_volume(p)} if labels_dir.is_dir() else {}
    cases, matched = [], set()
    for image in images:
        stem = nifti_stem(image.name)
        case_id = stem[:-5] if stem.endswith("_0000") else stem
        label = labels.get(case_id) or labels.get(stem)
        if label is not None:
            matched.add(label)
        cases.append(Case(case_id=_prefixed(site, case_id), image=str(image), label=str(label) if label else None, site=site))
    for stem, label in labels.items():
        if label not in matched:
            problems.append(Problem(str(label), f"label map has no image of the same name in {folder / 'images'}", _prefixed(site, stem)))
    if not images:
        problems.append(Problem(str(folder / "images"), "holds no .nii or .nii.gz files"))
    return cases


def _is_volume(path: Path) -> bool:
    # Hidden files include the "._name.nii.gz" resource forks macOS leaves in copied archives.
    return is_nifti(path.name) and not path.name.startswith(".")


def _prefixed(site: str, case_id: str) -> str:
    # Site folders may reuse file names; the case id must stay unique across sites.
    return f"{site}/{case_id}" if site else case_id


def _from_manifest(root: Path, manifest: Path, problems: list[Problem]) -> list[Case]:
    rows = _read_manifest(manifest)
    cases = []
    for number, row in enumerate(rows, start=1):
        where = f"{manifest.name} row {number}"
        unknown = set(row) - MANIFEST_COLUMNS
        if unknown:
            raise DataError(f"{manifest}: unknown column(s) {sorted(unknown)}; use {sorted(MANIFEST_COLUMNS)}")
        images = row.get("image")
        if not images:
            problems.append(Problem(str(manifest), f"{where} has no image"))
            continue
        image_paths = [resolve_path(root, p) for p in (images if isinstance(images, list) else [images])]
        label_path = resolve_path(root, row["label"]) if row.get("label") else None
        case_id = str(row.get("case_id") or nifti_stem(str(image_paths[0])))
        split = row.get("split") or None
        if split is not None and split not in (*SPLITS, UNLABELLED):
            problems.append(Problem(str(manifest), f"{where}: split must be one of {', '.join((*SPLITS, UNLABELLED))}, got {split!r}", case_id))
            continue
        case = listed_case(case_id, image_paths, label_path, row, split, where, problems)
        if case is not None:
            cases.append(case)
    return cases


def _read_manifest(manifest: Path) -> list[dict[str, Any]]:
    if not manifest.is_file():
        raise DataError(f"{manifest}: manifest not found")
    if manifest.suffix.lower() == ".json":
        try:
            rows = json.loads(manifest.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{manifest}: not valid JSON ({err})") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise DataError(f"{manifest}: a JSON manifest must be a list of objects with an 'image' key")
        return rows
    with manifest.open(newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "image" not in reader.fieldnames:
            raise DataError(f"{manifest}: a CSV manifest needs a header row with an 'image' column")
        return [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
