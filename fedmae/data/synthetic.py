"""Deterministic synthetic "patients" from several "hospitals": the project's download-free data set.

Why the data look as they do: masked-autoencoder (MAE) self-pre-training only helps a label-scarce
fine-tune when the images have structure that is learnable without labels and that the downstream task
depends on. So every case shares one abdominal layout (body, subcutaneous fat, liver on the patient's
right = image left, spleen on the other side, two posterior kidneys with a medial hilum, a bright midline
spine; aorta, paraspinal muscles and bowel gas as unlabelled distractors) that varies per patient by
~10 %, and each tissue has its own mean intensity *and* texture (smooth random fields with
tissue-specific correlation lengths), so reconstructing a masked patch requires knowing which organ it
lies in. The classification findings are small local structures (liver
lesions, renal cysts, tiny calcifications), a global shape change (enlarged liver) or an organ's
intensity relative to another's (fatty liver: darker than the spleen, whatever the patient's contrast
enhancement): recognising them means knowing the normal anatomy. Hospitals differ only in their scanner (gamma, blur, bias field, noise,
scale/offset), the kind of domain shift federated learning has to cope with.

Axes: 2D images are (AP, LR) = (rows: anterior at the top, cols: patient right on the left), an axial
slice in radiological display. 3D volumes are (AP, LR, SI) so ``volume[..., k]`` is such an axial slice
(the last axis runs inferior -> superior). Coordinates are normalised to [-1, 1] per axis, so non-square
shapes stretch the anatomy to fill the field of view.

:func:`read_synthetic` is the reader for ``data.source: synthetic``: the hospitals as a :class:`Catalog`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from fedmae.data.catalog import Case, Catalog

if TYPE_CHECKING:
    from fedmae.config import ExperimentConfig

FINDINGS: tuple[str, ...] = ("lesion", "cyst", "calcification", "enlarged_liver", "fatty_liver")
ORGANS: tuple[str, ...] = ("background", "liver", "spleen", "kidney_left", "kidney_right", "spine")

_PREVALENCE = np.array([0.4, 0.35, 0.35, 0.3, 0.35])  # per finding, independent
# Contrast enhancement differs per patient (timing, cardiac output): the enhancing organs (liver,
# spleen, kidneys, aorta) are brighter or darker together on CT and T1 with contrast.
_ENHANCING = ("aorta", "liver", "spleen", "cortex", "medulla")
_ENHANCEMENT_STD = 0.07
_ORGAN_STD = 0.02  # each organ's own per-patient intensity variation
# Fatty liver (steatosis) lowers the liver's CT attenuation (and brightens it on T1/T2, where fat is
# bright): read as the liver being darker than the spleen, whatever the enhancement.
_STEATOSIS = np.array([-1.0, 0.5, -0.3, 0.3])  # per channel (CT, T1, T1gd, T2), times the degree
_STEATOSIS_DEGREE = (0.12, 0.18)
_FATTY = FINDINGS.index("fatty_liver")  # the findings before it are drawn from the case's main stream
_REF_NOISE = 0.01
_INNER = 0.9  # organs stay inside this fraction of the body radius, leaving a subcutaneous fat rim

# Tissue mean intensities per channel ("sequence"). Channel 0 is CT-like; 1-3 are MRI-like
# (T1, T1 with contrast, T2), so the same lesion is dark in one channel and bright in another.
_TISSUES = ("fat", "soft", "gas", "aorta", "liver", "lesion", "spleen", "cortex", "medulla", "cyst",
            "bone", "marrow", "disc", "calc", "muscle")
_T = {name: i for i, name in enumerate(_TISSUES)}
_MEANS = np.array([
    # fat  soft  gas  aorta liver lesion spleen cortex medul cyst  bone  marrow disc  calc  muscle
    [0.20, 0.38, 0.04, 0.68, 0.62, 0.38, 0.52, 0.72, 0.62, 0.10, 0.95, 0.82, 0.48, 1.00, 0.50],  # CT
    [0.85, 0.35, 0.04, 0.15, 0.62, 0.34, 0.44, 0.52, 0.36, 0.14, 0.22, 0.72, 0.36, 0.10, 0.40],  # T1
    [0.80, 0.46, 0.04, 0.95, 0.70, 0.92, 0.78, 0.92, 0.62, 0.14, 0.22, 0.74, 0.42, 0.10, 0.45],  # T1gd
    [0.58, 0.30, 0.04, 0.10, 0.30, 0.76, 0.62, 0.54, 0.72, 0.98, 0.12, 0.50, 0.82, 0.10, 0.22],  # T2
])
# Texture amplitude per tissue for the (fine, medium, coarse) random fields: the liver is mottled,
# the spleen grainy, marrow trabecular, fluid (cyst) and fat nearly flat.
_TEXTURE = np.array([
    [0.010, 0.000, 0.020], [0.020, 0.030, 0.040], [0.010, 0.000, 0.000], [0.010, 0.000, 0.000],
    [0.012, 0.050, 0.010], [0.030, 0.030, 0.000], [0.070, 0.000, 0.000], [0.020, 0.000, 0.000],
    [0.015, 0.000, 0.020], [0.004, 0.000, 0.000], [0.010, 0.000, 0.000], [0.070, 0.030, 0.000],
    [0.010, 0.000, 0.000], [0.000, 0.000, 0.000], [0.040, 0.010, 0.000],
], dtype=np.float32)
_FIELD_LENGTHS = (1.0, 2.5, 6.0)  # correlation lengths of the texture fields, in voxels

_BODY_RADII = np.array([0.80, 0.92])  # (AP, LR) in image coordinates; 3D bodies are cylinders along SI
# Organs in the body frame (the body is the unit disc): centre (AP, LR, SI), radii (AP, LR, SI), angle.
_ANATOMY: dict[str, tuple[tuple[float, float, float], tuple[float, float, float], float]] = {
    "liver": ((-0.05, -0.38, 0.25), (0.50, 0.40, 0.60), 0.35),
    "spleen": ((0.12, 0.60, 0.20), (0.30, 0.17, 0.40), -0.6),
    "kidney_left": ((0.42, 0.42, -0.10), (0.21, 0.14, 0.35), -0.45),
    "kidney_right": ((0.42, -0.42, -0.20), (0.21, 0.14, 0.35), 0.45),
    "spine": ((0.60, 0.0, 0.0), (0.16, 0.17, 9.0), 0.0),
    "aorta": ((0.34, 0.10, 0.0), (0.08, 0.08, 9.0), 0.0),
    "muscle_left": ((0.74, 0.22, 0.0), (0.13, 0.14, 9.0), -0.3),  # paraspinal muscles: background label
    "muscle_right": ((0.74, -0.22, 0.0), (0.13, 0.14, 9.0), 0.3),
}


@dataclass(frozen=True)
class Scanner:
    """One hospital's acquisition: how a [0, 1] tissue image becomes the stored intensities."""

    name: str
    intensity_scale: float
    intensity_offset: float
    gamma: float
    noise_std: float
    bias_strength: float
    blur_sigma: float
    spacing: tuple[float, ...]


@dataclass
class SyntheticCase:
    """One patient: image (C, *spatial) float32, label (*spatial) int64 organ indices, findings 0/1."""

    case_id: str
    site: str
    image: np.ndarray
    label: np.ndarray
    findings: np.ndarray


def _check_geometry(spatial_dims: int, shape: Sequence[int], in_channels: int) -> None:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if len(shape) != spatial_dims:
        raise ValueError(f"shape must have spatial_dims={spatial_dims} sides, got {tuple(shape)}")
    if min(shape) < 16:
        raise ValueError(f"shape sides must be >= 16, got {tuple(shape)}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")


def scanner_profiles(num_sites: int, spatial_dims: int, seed: int, heterogeneity: float = 1.0) -> list[Scanner]:
    """Site 0 is a reference scanner (scale 1, offset 0, gamma 1, low noise, no bias, no blur); other sites
    drawn from the seed, heterogeneity scales how far they deviate (0 → all identical to the reference)."""
    if num_sites < 1:
        raise ValueError(f"num_sites must be >= 1, got {num_sites}")
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if heterogeneity < 0:
        raise ValueError(f"heterogeneity must be non-negative, got {heterogeneity}")
    h = float(heterogeneity)
    ref_spacing = (1.5, 1.5, 2.0) if spatial_dims == 3 else (1.0, 1.0)
    sites = [Scanner("site-0", 1.0, 0.0, 1.0, _REF_NOISE, 0.0, 0.0, ref_spacing)]
    for k in range(1, num_sites):
        # Seeded per site so a site's scanner does not depend on how many sites there are.
        u = np.random.default_rng([seed, k, 0x5CA]).random(8)
        logu = lambda lo, hi, x: float(np.exp(h * (np.log(lo) + x * (np.log(hi) - np.log(lo)))))  # noqa: E731
        in_plane = logu(0.7, 1.3, u[6])
        through = (logu(0.6, 2.0, u[7]) * ref_spacing[2],) if spatial_dims == 3 else ()
        spacing = (ref_spacing[0] * in_plane,) * 2 + through
        sites.append(Scanner(
            name=f"site-{k}",
            # Scale avoids [0.85, 1.15] so that every site is visibly off the reference.
            intensity_scale=_r(logu(0.6, 0.85, 2 * u[0]) if u[0] < 0.5 else logu(1.15, 1.6, 2 * u[0] - 1), 4),
            intensity_offset=_r(h * (-0.2 + 0.4 * u[1]), 4),
            gamma=_r(logu(0.7, 1.4, u[2]), 4),
            noise_std=_r(max(0.0, _REF_NOISE + h * (0.01 + 0.07 * u[3] - _REF_NOISE)), 4),
            bias_strength=_r(min(0.9, h * 0.3 * u[4]), 4),
            blur_sigma=_r(h * 1.2 * u[5], 4),
            spacing=tuple(_r(s, 4) for s in spacing),
        ))
    return sites


def _r(x: float, ndigits: int) -> float:
    return round(float(x), ndigits)


@lru_cache(maxsize=32)
def _grid(shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """Per-axis coordinates in [-1, 1], shaped to broadcast (open grid: no full-size arrays)."""
    axes = []
    for i, n in enumerate(shape):
        a = np.linspace(-1.0, 1.0, n, dtype=np.float32).reshape([n if j == i else 1 for j in range(len(shape))])
        a.setflags(write=False)
        axes.append(a)
    return tuple(axes)


@lru_cache(maxsize=64)
def _field_matrix(n: int, length: float) -> np.ndarray:
    """(n, m) matrix mapping a coarse white-noise grid to a smooth unit-variance 1D field."""
    step = max(0.7 * length, 1.0)  # grid spacing below the kernel width: no visible grid artefacts
    pad = 2.5 * length
    p = np.arange(-pad, n - 1 + pad + step, step)
    k = np.exp(-0.5 * ((np.arange(n)[:, None] - p[None, :]) / length) ** 2)
    k /= np.sqrt((k**2).sum(1, keepdims=True))  # unit variance at every voxel, edges included
    k = k.astype(np.float32)
    k.setflags(write=False)
    return k


@lru_cache(maxsize=64)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) Gaussian smoothing with renormalised (edge-preserving mean) borders."""
    x = np.arange(n)
    k = np.exp(-0.5 * ((x[:, None] - x[None, :]) / sigma) ** 2)
    k = (k / k.sum(1, keepdims=True)).astype(np.float32)
    k.setflags(write=False)
    return k


def _along_axes(a: np.ndarray, mats: Sequence[np.ndarray], first_axis: int = 0) -> np.ndarray:
    """Apply one matrix per axis (separable linear filter), axes first_axis, first_axis+1, ..."""
    for i, m in enumerate(mats):
        ax = first_axis + i
        a = np.moveaxis(np.tensordot(m, a, axes=([1], [ax])), 0, ax)
    return a


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], length: float) -> np.ndarray:
    mats = [_field_matrix(n, length) for n in shape]
    z = rng.standard_normal(tuple(m.shape[1] for m in mats), dtype=np.float32)
    return np.ascontiguousarray(_along_axes(z, mats))


def _soft(d: np.ndarray, width: float) -> np.ndarray:
    """Partial-volume mask: 1 inside, 0 outside, linear over `width` (in units of normalised radius)."""
    return np.clip(0.5 + (1.0 - d) / width, 0.0, 1.0)


def _ellipse(v: Sequence[np.ndarray], centre: np.ndarray, radii: np.ndarray, angle: float) -> np.ndarray:
    """Normalised radial distance (1 on the surface) of an ellipse(oid) rotated in the axial plane."""
    (c0, c1, c2), (r0, r1, r2) = (float(x) for x in centre), (float(x) for x in radii)  # python floats keep float32
    a0, a1 = v[0] - c0, v[1] - c1
    c, s = float(np.cos(angle)), float(np.sin(angle))
    q = ((c * a0 + s * a1) / r0) ** 2 + ((-s * a0 + c * a1) / r1) ** 2
    if len(v) == 3:
        q = q + ((v[2] - c2) / r2) ** 2
    return np.sqrt(q)


def _channel_means(in_channels: int) -> np.ndarray:
    """(C, tissues): the fixed table, then deterministic random "sequences" beyond channel 3."""
    extra = [np.random.default_rng([0xC4A, c]).uniform(0.1, 0.95, len(_TISSUES)) for c in range(4, in_channels)]
    return np.concatenate([_MEANS[:in_channels], *([np.stack(extra)] if extra else [])]).astype(np.float32)


def _patient_means(in_channels: int, findings: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(C, tissues) tissue means of one patient: the table, shifted by the patient's contrast
    enhancement and organ variation, and by steatosis when the liver is fatty."""
    means = _channel_means(in_channels).copy()
    enhancement = rng.normal(0, _ENHANCEMENT_STD)
    organ = rng.normal(0, _ORGAN_STD, len(_ENHANCING))
    degree = rng.uniform(*_STEATOSIS_DEGREE)
    contrast = [c for c in (0, 2) if c < in_channels]  # CT and T1 with contrast enhance
    for k, tissue in enumerate(_ENHANCING):
        means[contrast, _T[tissue]] += enhancement
        means[:, _T[tissue]] += organ[k]
    if len(findings) > _FATTY and findings[_FATTY]:
        shift = np.zeros(in_channels, np.float32)
        shift[: min(in_channels, 4)] = _STEATOSIS[: min(in_channels, 4)] * degree
        means[:, _T["liver"]] += shift
    return means


def _render(rng: np.random.Generator, spatial_dims: int, shape: tuple[int, ...], in_channels: int,
            scanner: Scanner, findings: np.ndarray, patient_variation: float = 1.0,
            tissue_rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Draw one patient and acquire it. Every random draw happens whatever the findings, so forcing a
    finding on or off (tests) changes only that finding's pixels. ``patient_variation`` scales how
    much body size, shape, position and rotation differ between patients (1: +-4 % size, +-3 %
    position, +-3.4 degrees). ``tissue_rng`` draws the patient's tissue intensities (enhancement,
    steatosis); a stream of its own, so the anatomy and texture draws do not depend on it."""
    dims, shape = spatial_dims, tuple(int(n) for n in shape)
    u = _grid(shape)
    full = lambda a: np.broadcast_to(a, shape)  # noqa: E731

    # Body pose; everything else lives in the body frame, so organs follow the body.
    pv = float(patient_variation)
    bc, br = rng.normal(0, 0.03 * pv, 3).tolist(), (_BODY_RADII * (1 + rng.normal(0, 0.04 * pv, 2))).tolist()
    bth = rng.normal(0, 0.06 * pv)
    c, s = float(np.cos(bth)), float(np.sin(bth))
    v = [(c * (u[0] - bc[0]) + s * (u[1] - bc[1])) / br[0], (-s * (u[0] - bc[0]) + c * (u[1] - bc[1])) / br[1]]
    if dims == 3:
        v.append(u[2] - bc[2])
    vox = np.array([2 / (shape[0] - 1) / br[0], 2 / (shape[1] - 1) / br[1], 2 / (shape[-1] - 1)])  # voxel in body units
    d_body = np.sqrt(v[0] ** 2 + v[1] ** 2)  # (n0, n1[, 1])
    body_w = float(vox[:2].mean())

    organs = {}
    for name, (oc, orad, oth) in _ANATOMY.items():
        centre = np.array(oc) + rng.normal(0, 0.015 if name in ("spine", "aorta") else 0.04, 3)
        radii = np.array(orad) * np.clip(1 + rng.normal(0, 0.08, 3), 0.8, 1.2)
        organs[name] = [centre, radii, oth + rng.normal(0, 0.12)]
    enlarge = rng.uniform(1.25, 1.35)
    if findings[3]:
        organs["liver"][1] = organs["liver"][1] * enlarge
    lesions = [(rng.normal(size=3), rng.uniform(0, 0.55), rng.uniform(0.07, 0.1) * rng.uniform(0.8, 1.2, 3))
               for _ in range(2)]
    n_lesions = rng.integers(1, 3)
    cyst_side, cyst_off, cyst_r = rng.integers(2), rng.uniform(-0.3, 0.3, 3), rng.uniform(0.055, 0.075)
    calc_in_spleen, n_calc, calc_pos = rng.random() < 0.5, rng.integers(2, 5), rng.random(4)
    gas = [(np.array([rng.uniform(-0.8, -0.35), rng.uniform(-0.2, 0.6), rng.uniform(-0.8, 0.8)]),
            rng.uniform(0.045, 0.09, 3) * np.array([1, 1, 2.5])) for _ in range(3)]
    disc_phase = rng.uniform(0, 0.45)
    fields = np.stack([_smooth_field(rng, shape, ln) for ln in _FIELD_LENGTHS])  # (3, *spatial)

    # Labels: organ index, later organs overwrite; organs never leave the body's inner part.
    inner = full(d_body <= _INNER)
    dist = {k: _ellipse(v, *p) for k, p in organs.items()}
    label = np.zeros(shape, np.int64)
    for k, name in enumerate(ORGANS[1:], start=1):
        label[(dist[name] <= 1) & inner] = k

    means = _patient_means(in_channels, findings, np.random.default_rng(0) if tissue_rng is None else tissue_rng)
    img = np.zeros((in_channels, *shape), np.float32)
    bshape = (in_channels,) + (1,) * dims

    def paint(mask: np.ndarray, tissue: str) -> None:
        t = _T[tissue]
        target = means[:, t].reshape(bshape) + np.tensordot(_TEXTURE[t], fields, 1)
        img[...] += mask * (target - img)

    def width(radii: np.ndarray) -> float:
        return float(np.clip(np.mean(vox[:2] / radii[:2]), 0.02, 1.0))

    inner_soft = _soft(d_body / _INNER, body_w / _INNER)
    paint(full(_soft(d_body, body_w)), "fat")
    paint(full(inner_soft), "soft")
    for gc, gr in gas:
        paint(_soft(_ellipse(v, gc, gr, 0.0), width(gr)) * inner_soft, "gas")
    for name, tissue in (("aorta", "aorta"), ("muscle_left", "muscle"), ("muscle_right", "muscle")):
        paint(_soft(dist[name], width(organs[name][1])) * inner_soft, tissue)

    def organ_mask(name: str) -> np.ndarray:
        return _soft(dist[name], width(organs[name][1])) * inner_soft

    paint(organ_mask("liver"), "liver")
    if findings[0]:
        lc, lr, lth = organs["liver"]
        for direction, frac, rad in lesions[:n_lesions]:
            offset = direction / np.linalg.norm(direction) * frac * lr
            cs, sn = np.cos(lth), np.sin(lth)
            centre = lc + np.array([cs * offset[0] - sn * offset[1], sn * offset[0] + cs * offset[1], offset[2]])
            rad = np.maximum(rad, 1.8 * vox)  # stay visible at 32^3
            paint(_soft(_ellipse(v, centre, rad, 0.0), width(rad)) * (label == 1), "lesion")
    paint(organ_mask("spleen"), "spleen")
    for side in ("kidney_left", "kidney_right"):
        paint(organ_mask(side), "cortex")
        kc, kr, kth = organs[side]
        paint(_soft(dist[side] / 0.65, width(kr) / 0.65) * inner_soft, "medulla")
        # Renal sinus fat at the medial hilum: what tells a kidney from the (also round, bright) spine.
        # The kidney's own LR axis points along (-sin, cos) in the body frame; medial is towards LR = 0.
        medial = -np.sign(kc[1]) * 0.8 * kr[1]
        hilum = kc + np.array([-np.sin(kth) * medial, np.cos(kth) * medial, 0.0])
        paint(_soft(_ellipse(v, hilum, kr * 0.3, kth), width(kr * 0.3)) * (label == ORGANS.index(side)), "fat")
    if findings[1]:
        kname = ("kidney_left", "kidney_right")[cyst_side]
        kc, kr, kth = organs[kname]
        rad = np.maximum(np.array([cyst_r] * 3) * [1, 1, 1.5], 1.6 * vox)
        paint(_soft(_ellipse(v, kc + cyst_off * kr, rad, 0.0), width(rad)) * (label == ORGANS.index(kname)), "cyst")
    bone = organ_mask("spine")
    paint(bone, "bone")
    paint(_soft(dist["spine"] / 0.7, width(organs["spine"][1]) / 0.7), "marrow")
    if dims == 3:  # intervertebral discs: periodic along SI, the strongest 3D-only cue
        zw = np.clip((np.cos(2 * np.pi * (v[2] - disc_phase) / 0.45) - 0.8) * 5, 0, 1)
        paint(bone * zw, "disc")
    if findings[2]:
        cand = np.flatnonzero(label == 2) if calc_in_spleen else np.array([], np.int64)
        if cand.size < 8:
            cand = np.flatnonzero((label == 0) & full(d_body < 0.8))
        for p in calc_pos[:n_calc]:
            idx = np.unravel_index(cand[int(p * cand.size)], shape)
            img[(slice(None), *(slice(i, i + 2) for i in idx))] = means[:, _T["calc"]].reshape(bshape)

    # Acquisition, in the documented order: gamma -> blur -> bias -> noise -> scale/offset.
    if scanner.gamma != 1.0:
        img = np.clip(img, 0.0, 1.0) ** np.float32(scanner.gamma)
    if scanner.blur_sigma > 0:
        img = _along_axes(img, [_blur_matrix(n, float(scanner.blur_sigma)) for n in shape], first_axis=1)
    coef = rng.normal(size=9)
    if scanner.bias_strength > 0:
        terms = [u[i] for i in range(dims)] + [u[i] * u[j] for i in range(dims) for j in range(i, dims)]
        bias = sum(float(a) * full(t) for a, t in zip(coef, terms))
        bias = bias / max(float(np.abs(bias).max()), 1e-6)  # smooth field in [-1, 1]
        img = img * (1 + np.float32(scanner.bias_strength) * bias.astype(np.float32))
    if scanner.noise_std > 0:
        img = img + np.float32(scanner.noise_std) * rng.standard_normal(img.shape, dtype=np.float32)
    img = img * np.float32(scanner.intensity_scale) + np.float32(scanner.intensity_offset)
    return np.ascontiguousarray(img, dtype=np.float32), label


def generate_case(spatial_dims: int, shape: tuple[int, ...], in_channels: int, scanner: Scanner, seed: int,
                  site_index: int, case_index: int, patient_variation: float = 1.0) -> SyntheticCase:
    """One patient seeded by (seed, site_index, case_index), acquired on `scanner`."""
    _check_geometry(spatial_dims, shape, in_channels)
    rng = np.random.default_rng([seed, site_index, case_index])
    findings = rng.random(_FATTY) < _PREVALENCE[:_FATTY]
    # Tissue intensities and steatosis from their own stream: the other draws stay as they were.
    tissue_rng = np.random.default_rng([seed, site_index, case_index, 0x715])
    findings = np.append(findings, tissue_rng.random() < _PREVALENCE[_FATTY])
    image, label = _render(rng, spatial_dims, tuple(shape), in_channels, scanner, findings, patient_variation,
                           tissue_rng)
    return SyntheticCase(f"{scanner.name}-case-{case_index:04d}", scanner.name, image, label,
                         findings.astype(np.float32))


def generate_site(site_index: int, num_cases: int, spatial_dims: int, shape: tuple[int, ...], in_channels: int,
                  scanner: Scanner, seed: int, patient_variation: float = 1.0) -> list[SyntheticCase]:
    """Cases 0..num_cases-1 of one hospital."""
    if num_cases < 1:
        raise ValueError(f"num_cases must be >= 1, got {num_cases}")
    _check_geometry(spatial_dims, shape, in_channels)
    return [generate_case(spatial_dims, shape, in_channels, scanner, seed, site_index, i, patient_variation)
            for i in range(num_cases)]


def generate_hospitals(num_sites: int, cases_per_site: int | Sequence[int], spatial_dims: int,
                       shape: tuple[int, ...], in_channels: int = 1, seed: int = 0,
                       heterogeneity: float = 1.0, patient_variation: float = 1.0) -> dict[str, list[SyntheticCase]]:
    """Keys are scanner names in site order."""
    if num_sites < 1:
        raise ValueError(f"num_sites must be >= 1, got {num_sites}")
    counts = [int(cases_per_site)] * num_sites if np.isscalar(cases_per_site) else [int(n) for n in cases_per_site]
    if len(counts) != num_sites:
        raise ValueError(f"cases_per_site must have num_sites={num_sites} entries, got {len(counts)}")
    if min(counts) < 1:
        raise ValueError(f"cases_per_site must be >= 1 for every site, got {counts}")
    _check_geometry(spatial_dims, shape, in_channels)
    scanners = scanner_profiles(num_sites, spatial_dims, seed, heterogeneity)
    if patient_variation < 0:
        raise ValueError(f"patient_variation must be non-negative, got {patient_variation}")
    return {sc.name: generate_site(k, n, spatial_dims, shape, in_channels, sc, seed, patient_variation)
            for k, (sc, n) in enumerate(zip(scanners, counts))}


def read_synthetic(cfg: ExperimentConfig) -> Catalog:
    """The built-in hospitals as a catalogue: in-memory images with label maps and findings."""
    d = cfg.data
    hospitals = generate_hospitals(
        num_sites=d.num_sites,
        cases_per_site=d.cases_per_site,
        spatial_dims=cfg.spatial_dims,
        shape=tuple(cfg.data_image_size),
        in_channels=cfg.model.in_channels,
        seed=cfg.seed,
        heterogeneity=d.heterogeneity,
        patient_variation=d.patient_variation,
    )
    cases = [
        Case(case_id=c.case_id, image=c.image, label=c.label, findings=c.findings, site=site)
        for site, site_cases in hospitals.items()
        for c in site_cases
    ]
    return Catalog(
        source="synthetic",
        root="<built-in>",
        modality="other",
        spatial_dims=cfg.spatial_dims,
        cases=cases,
        findings=FINDINGS,
        exclusive=False,
        seg_classes=ORGANS,
        channels=cfg.model.in_channels,
    )
