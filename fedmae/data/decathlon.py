"""Reader for data sets in the Medical Segmentation Decathlon layout.

``dataset.json`` lists the cases (``training`` with labels, optional ``validation``, ``test`` with or
without labels) as paths relative to the folder, names the image channels (``modality``) and the
label values (``labels``). This is how MSD tasks ship, and how MONAI's tutorials describe BTCV and
other data sets, so a hospital that arranges its volumes this way needs no code to use fedmae.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedmae.data.catalog import (
    UNLABELLED,
    Case,
    Catalog,
    DataError,
    Modality,
    Problem,
    listed_case,
    nifti_stem,
    resolve_path,
)

# Channel names seen in MSD and BraTS data sets; anything else is neither CT nor MRI.
MRI_CHANNELS = {"mri", "flair", "t1", "t1w", "t1gd", "t1ce", "t2", "t2w", "adc", "dwi", "pd", "t2-flair"}
LIST_SPLITS = {"training": None, "validation": "val", "test": "test"}


def read_decathlon(root: str | Path) -> Catalog:
    """``root``: the data set's folder (with dataset.json), or its index file itself (e.g. MONAI's
    BTCV ``dataset_0.json``); paths in the index are relative to the index's folder."""
    root = Path(root)
    index = root / "dataset.json"
    if root.suffix == ".json" and root.is_file():
        root, index = root.parent, root
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (data.root should be the Decathlon data set's folder)")
    if not index.is_file():
        raise DataError(f"{index}: missing; a Decathlon data set needs its dataset.json")
    try:
        meta = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{index}: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("training"), list):
        raise DataError(f"{index}: needs a 'training' list of cases")

    channel_names = _channel_names(meta, index)
    seg_classes = _label_names(meta, index)
    cases: list[Case] = []
    problems: list[Problem] = []
    seen: set[str] = set()
    for list_name, split in LIST_SPLITS.items():
        for position, entry in enumerate(meta.get(list_name) or []):
            case = _case(root, index, list_name, position, entry, split, problems)
            if case is None:
                continue
            if case.case_id in seen:
                problems.append(Problem(str(index), f"case {case.case_id} is listed twice", case.case_id))
                continue
            seen.add(case.case_id)
            cases.append(case)
    return Catalog(
        source="decathlon",
        root=str(root),
        modality=_modality(channel_names),
        spatial_dims=3,
        cases=cases,
        seg_classes=seg_classes,
        channels=len(channel_names) or None,
        channel_names=channel_names,
        problems=problems,
    )


def _case(root: Path, index: Path, list_name: str, position: int, entry: Any, split: str | None,
          problems: list[Problem]) -> Case | None:
    where = f"{list_name}[{position}]"
    if isinstance(entry, str):
        entry = {"image": entry}
    images = entry.get("image") if isinstance(entry, dict) else None
    images = images if isinstance(images, list) else [images]
    if not images or not all(isinstance(p, str) and p for p in images):
        problems.append(Problem(str(index), f"{where} needs an 'image' path (or a list of paths)"))
        return None
    image_paths = [resolve_path(root, p) for p in images]
    label = entry.get("label")
    if label is not None and not isinstance(label, str):
        problems.append(Problem(str(index), f"{where}: 'label' must be one path, got {label!r}"))
        return None
    label_path = resolve_path(root, label) if label else None
    case_id = str(entry.get("case_id") or nifti_stem(images[0]))
    # No annotation (e.g. imagesTs): pre-training can still use the image.
    split = UNLABELLED if label_path is None else split
    return listed_case(case_id, image_paths, label_path, entry, split, f"dataset.json ({where})", problems)


def _channel_names(meta: dict[str, Any], index: Path) -> tuple[str, ...]:
    modality = meta.get("modality") or meta.get("channel_names") or {}
    if not isinstance(modality, dict):
        raise DataError(f"{index}: 'modality' should map channel numbers to names, e.g. {{\"0\": \"CT\"}}")
    try:
        return tuple(str(modality[k]) for k in sorted(modality, key=int))
    except ValueError:
        raise DataError(f"{index}: 'modality' keys should be channel numbers, got {sorted(modality)}") from None


def _label_names(meta: dict[str, Any], index: Path) -> tuple[str, ...]:
    labels = meta.get("labels") or {}
    if not isinstance(labels, dict):
        raise DataError(f"{index}: 'labels' should map label values to names, e.g. {{\"0\": \"background\"}}")
    try:
        values = sorted(int(k) for k in labels)
    except ValueError:
        raise DataError(f"{index}: 'labels' keys should be label values, got {sorted(labels)}") from None
    if values and values != list(range(len(values))):
        raise DataError(f"{index}: 'labels' values should be 0, 1, ..., {len(values) - 1} with 0 = background, got {values}")
    return tuple(str(labels[str(v)]) for v in values)


def _modality(channel_names: tuple[str, ...]) -> Modality:
    names = {n.lower() for n in channel_names}
    if names and names <= {"ct"}:
        return "ct"
    if names and names <= MRI_CHANNELS:
        return "mri"
    return "other"
