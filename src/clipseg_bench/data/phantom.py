"""Synthetic abdominal CT volumes with all 13 FLARE22 organs: the data that ships with the project.

No maintained library draws labelled abdominal phantoms at this level (XCAT and friends are
licensed, large and slow), so this module does, with plain numpy: each organ is a smooth,
randomly perturbed ellipsoid or tube in its rough anatomical place, inside a body of skin fat,
muscle wall, ribs, spine and bowel, with plausible HU values, partial-volume blur and noise.

Two looks:

- **style A**, the look a tiny model is pretrained on (standing in for CLIP pretraining);
- **style B**, a shifted look: another contrast phase (brighter liver and kidneys, dim IVC, gas in
  the stomach), a thicker fat layer, different organ sizes and shapes, stronger shape
  perturbation, and more than twice the noise. Fine-tuning from A to B is a real domain shift.

Volumes are written in RAS+ orientation with anisotropic spacing (in-plane about 300-430 mm / size, the body filling the field of view;
2.5-5 mm between slices), FLARE22 layout: ``images/<case>_0000.nii.gz`` (int16 HU) and
``labels/<case>.nii.gz`` (uint8 FLARE22 ids). Everything is deterministic given (seed, case index,
style).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter

from clipseg_bench.errors import FieldError
from clipseg_bench.provenance import check_output_folder, replacing, write_error

STYLES = ("A", "B")
_STYLE_CODE = {"A": 0, "B": 1}

# HU per tissue. A: portal-venous-like; B: another phase/scanner (the domain shift).
_HU = {
    "A": {
        "air": -1000,
        "lung": -850,
        "fat": -100,
        "visceral_fat": -90,
        "muscle": 50,
        "bone": 400,
        "cortex": 900,
        "bowel": 30,
        "bowel_gas": -700,
        "gas": -700,
        1: 60,
        2: 180,
        3: 110,
        4: 80,
        5: 200,
        6: 160,
        7: 40,
        8: 40,
        9: 10,
        10: 45,
        11: 25,
        12: 35,
        13: 180,
    },
    "B": {
        "air": -1000,
        "lung": -870,
        "fat": -115,
        "visceral_fat": -105,
        "muscle": 62,
        "bone": 480,
        "cortex": 1000,
        "bowel": 15,
        "bowel_gas": -800,
        "gas": -650,
        1: 105,
        2: 235,
        3: 145,
        4: 115,
        5: 250,
        6: 95,
        7: 60,
        8: 60,
        9: -5,
        10: 40,
        11: -10,
        12: 20,
        13: 235,
    },
}
_NOISE_HU = {"A": 12.0, "B": 28.0}
_SHAPE_WOBBLE = {"A": 0.12, "B": 0.22}  # relative boundary perturbation of every organ
_FAT_MM = {"A": (15.0, 25.0), "B": (28.0, 40.0)}


@dataclass(frozen=True)
class _Blob:
    """An ellipsoid organ in a standard body (half-axes 150 x 110 mm); z as a fraction of the FOV."""

    id: int
    center: tuple[float, float, float]  # x mm (+ patient right), y mm (+ anterior), t in [0, 1] (+ superior)
    radii: tuple[float, float, float]  # x mm, y mm, z as a fraction of the z extent
    rot_deg: float  # in-plane rotation


@dataclass(frozen=True)
class _Tube:
    """A tube along a polyline of (x mm, y mm, t) points with a radius (mm) at each point."""

    id: int
    points: tuple[tuple[float, float, float], ...]
    radii: tuple[float, ...]


def _anatomy(style: str) -> list[_Blob | _Tube]:
    """The 13 organs of the standard body, in painting order (later ones win overlaps)."""
    b = style == "B"
    liver_r = (70.0, 60.0, 0.27) if b else (75.0, 70.0, 0.30)
    spleen_r = (34.0, 55.0, 0.19) if b else (28.0, 45.0, 0.16)
    kidney_r = (26.0, 31.0, 0.17) if b else (24.0, 28.0, 0.16)
    kidney_rot = 40.0 if b else 25.0
    stomach = (
        _Blob(11, (-45.0, 30.0, 0.64), (45.0, 36.0, 0.17), -45.0)
        if b
        else _Blob(11, (-50.0, 25.0, 0.66), (38.0, 32.0, 0.15), -30.0)
    )
    duo_c, duo_r, duo_rz = (25.0, -5.0, 0.47), 30.0, 0.12
    phis = np.deg2rad(np.linspace(-110, 110, 9))
    duodenum = tuple(
        (duo_c[0] + duo_r * np.cos(p), duo_c[1], duo_c[2] + duo_rz * np.sin(p)) for p in phis
    )  # a C-loop in the coronal plane around the pancreas head, open towards the midline
    return [
        _Blob(1, (60.0, 10.0, 0.70), liver_r, 20.0),
        _Blob(3, (-80.0, -30.0, 0.72), spleen_r, 35.0),
        stomach,
        _Blob(2, (62.0, -50.0, 0.40), kidney_r, -kidney_rot),
        _Blob(13, (-62.0, -50.0, 0.44), kidney_r, kidney_rot),
        _Tube(
            4,
            ((25.0, -5.0, 0.47), (0.0, 0.0, 0.50), (-35.0, -5.0, 0.53), (-65.0, -20.0, 0.56)),
            (13.0, 11.0, 10.0, 8.0),
        ),
        _Tube(12, duodenum, (9.0,) * len(duodenum)),
        _Blob(9, (50.0, 40.0, 0.48), (14.0, 20.0, 0.08), 30.0),
        _Blob(7, (38.0, -35.0, 0.63), (8.0, 12.0, 0.06), 40.0),
        _Blob(8, (-36.0, -38.0, 0.62), (8.0, 12.0, 0.06), -40.0),
        _Tube(6, ((20.0, -20.0, -0.05), (22.0, -18.0, 0.5), (25.0, -15.0, 0.85)), (10.0, 10.0, 9.0)),
        _Tube(5, ((-12.0, -25.0, -0.05), (-10.0, -22.0, 0.5), (-14.0, -24.0, 1.05)), (11.0, 11.0, 11.0)),
        _Tube(10, ((-20.0, -8.0, 0.80), (-30.0, 0.0, 1.05)), (7.0, 7.0)),
    ]


class _Grid:
    """World coordinates (mm) of every voxel, as broadcastable (N,1,1), (1,N,1), (1,1,Z) arrays."""

    def __init__(self, size: int, n_slices: int, spacing: tuple[float, float, float]):
        sx, sy, sz = spacing
        self.x = ((np.arange(size) - (size - 1) / 2) * sx).astype(np.float32)[:, None, None]
        self.y = ((np.arange(size) - (size - 1) / 2) * sy).astype(np.float32)[None, :, None]
        self.z = ((np.arange(n_slices) - (n_slices - 1) / 2) * sz).astype(np.float32)[None, None, :]
        self.z_extent = n_slices * sz
        self.shape = (size, size, n_slices)

    def z_of(self, t: float) -> float:
        return (t - 0.5) * self.z_extent

    def crop(self, lo: np.ndarray, hi: np.ndarray) -> tuple[_Grid, tuple[slice, slice, slice]]:
        """The sub-grid of voxels inside the world box [lo, hi] (mm), and its index slices.

        Organs are drawn only inside their bounding box: it makes the generator ~5x faster.
        """
        sub = object.__new__(_Grid)
        axes = []
        for coords, a, b in zip((self.x.ravel(), self.y.ravel(), self.z.ravel()), lo, hi):
            idx = np.nonzero((coords >= a) & (coords <= b))[0]
            axes.append(slice(int(idx[0]), int(idx[-1]) + 1) if idx.size else slice(0, 0))
        sub.x, sub.y, sub.z = self.x[axes[0]], self.y[:, axes[1]], self.z[:, :, axes[2]]
        sub.z_extent = self.z_extent
        sub.shape = (sub.x.shape[0], sub.y.shape[1], sub.z.shape[2])
        return sub, tuple(axes)


def _wobble(rng: np.random.Generator, g: _Grid, amp: float, waves: int = 4) -> np.ndarray:
    """A smooth random field of std ~amp: a few random plane waves, wavelengths 50-140 mm."""
    field = np.zeros(g.shape, dtype=np.float32)
    for _ in range(waves):
        direction = rng.normal(size=3)
        k = direction / np.linalg.norm(direction) * (2 * np.pi / rng.uniform(50.0, 140.0))
        field += np.sin(k[0] * g.x + k[1] * g.y + k[2] * g.z + rng.uniform(0, 2 * np.pi))
    return field * (amp / np.sqrt(waves / 2))


def _ellipsoid(g: _Grid, c: np.ndarray, r: np.ndarray, rot_deg: float) -> np.ndarray:
    """Normalised ellipsoid radius (1 on the surface) of every voxel; c and r in mm."""
    th = np.deg2rad(rot_deg)
    dx, dy, dz = g.x - c[0], g.y - c[1], g.z - c[2]
    u = np.cos(th) * dx + np.sin(th) * dy
    v = -np.sin(th) * dx + np.cos(th) * dy
    return np.sqrt((u / r[0]) ** 2 + (v / r[1]) ** 2 + (dz / r[2]) ** 2)


def _tube_depth(g: _Grid, pts: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Distance to a polyline over the local radius (1 on the surface); pts (M, 3) in mm."""
    best = np.full(g.shape, np.inf, dtype=np.float32)
    for a, b, ra, rb in zip(pts[:-1], pts[1:], radii[:-1], radii[1:]):
        ab = b - a
        t = ((g.x - a[0]) * ab[0] + (g.y - a[1]) * ab[1] + (g.z - a[2]) * ab[2]) / float(ab @ ab)
        t = np.clip(t, 0.0, 1.0)
        d = np.sqrt(
            (g.x - a[0] - t * ab[0]) ** 2 + (g.y - a[1] - t * ab[1]) ** 2 + (g.z - a[2] - t * ab[2]) ** 2
        )
        np.minimum(best, d / (ra + t * (rb - ra)), out=best)
    return best


@dataclass(frozen=True)
class _BodySize:
    """Half-axes (mm) of the abdominal cavity, and the muscle wall and skin fat around it."""

    a: float  # left-right
    b: float  # anterior-posterior
    wall: float
    fat: float

    @property
    def outer_a(self) -> float:
        return self.a + self.wall + self.fat


def _draw_body(rng: np.random.Generator, style: str) -> _BodySize:
    return _BodySize(
        a=rng.uniform(118.0, 135.0),
        b=rng.uniform(84.0, 96.0),
        wall=rng.uniform(8.0, 13.0),
        fat=rng.uniform(*_FAT_MM[style]),
    )


def _body(rng: np.random.Generator, g: _Grid, body: _BodySize, hu: dict) -> tuple[np.ndarray, np.ndarray]:
    """Paint air, skin fat, muscle wall, ribs, spine, lungs and bowel; return (HU, organ cavity)."""
    taper = 1.0 + 0.04 * np.sin(g.z / g.z_extent * np.pi)  # the trunk narrows slightly at the ends
    bump = _wobble(rng, g, 3.0)  # mm: an outline that is not a perfect ellipse

    def inside(grow: float) -> np.ndarray:  # the cavity ellipse grown by `grow` mm
        return ((g.x / (taper * (body.a + grow))) ** 2 + (g.y / (taper * (body.b + grow))) ** 2) < 1.0

    img = np.full(g.shape, hu["air"], dtype=np.float32)
    img[inside(body.wall + body.fat + bump)] = hu["fat"]
    img[inside(body.wall + bump)] = hu["muscle"]
    cavity = inside(0.0)
    img[cavity] = hu["visceral_fat"]
    # Ribs: a banded ring just inside the muscle wall, in the upper abdomen, sparing the front.
    rib_zone = cavity & ~inside(-7.0)
    ribs = (
        rib_zone & (np.sin(2 * np.pi * g.z / 24.0) > 0.3) & (g.z > g.z_of(0.4)) & (np.abs(g.x) > 0.4 * body.a)
    )
    img[ribs] = hu["cortex"] * 0.8
    cavity &= ~rib_zone
    # Spine at the back of the cavity: vertebral body (cancellous core, cortical rim), spinous
    # process and paraspinal muscles behind it.
    back = -body.b
    for side in (-1, 1):
        muscle = _ellipsoid(g, np.array([side * 30.0, back - 2.0, 0.0]), np.array([21.0, 17.0, 1e6]), 0.0)
        img[muscle < 1.0] = hu["muscle"]
        cavity &= muscle >= 1.0
    vb = _ellipsoid(g, np.array([0.0, back + 25.0, 0.0]), np.array([19.0, 17.0, 1e6]), 0.0)
    img[vb < 1.0] = hu["cortex"]
    img[vb < 0.8] = hu["bone"]
    sp = _ellipsoid(g, np.array([0.0, back - 8.0, 0.0]), np.array([6.0, 14.0, 1e6]), 0.0)
    img[sp < 1.0] = hu["cortex"]
    cavity &= (vb >= 1.1) & (sp >= 1.0)
    # Lung bases at the top, posterior; bowel loops (some with gas) in the lower half.
    for side in (-1, 1):
        lung = _ellipsoid(
            g, np.array([side * 70.0, -30.0, g.z_of(1.12)]), np.array([55.0, 55.0, 0.25 * g.z_extent]), 0.0
        )
        img[(lung < 1.0) & cavity] = hu["lung"]
    for _ in range(int(rng.integers(6, 11))):
        c = np.array(
            [rng.uniform(-0.6, 0.6) * body.a, rng.uniform(-0.1, 0.6) * body.b, g.z_of(rng.uniform(0.0, 0.5))]
        )
        r = np.array([rng.uniform(12, 22), rng.uniform(12, 22), rng.uniform(0.05, 0.12) * g.z_extent])
        loop = _ellipsoid(g, c, r, 0.0)
        img[(loop < 1.0) & cavity] = hu["bowel"]
        if rng.random() < 0.4:
            img[(loop < 0.5) & cavity] = hu["bowel_gas"]
    return img, cavity


def _paint_organs(
    rng: np.random.Generator, g: _Grid, style: str, img: np.ndarray, cavity: np.ndarray, body: _BodySize
) -> np.ndarray:
    """Paint the 13 organs into ``img`` (in place) and return the uint8 label volume."""
    hu = _HU[style]
    sx, sy = body.a / 126.0, body.b / 90.0  # organs scale with the body (the table's is 126 x 90 mm)
    labels = np.zeros(g.shape, dtype=np.uint8)
    wobble = _SHAPE_WOBBLE[style]
    for organ in _anatomy(style):
        jitter = np.array([rng.normal(0, 4.0), rng.normal(0, 4.0), rng.normal(0, 0.015)])
        reach = 1.0 + 3.0 * wobble  # the wobble never pushes a boundary further than this
        if isinstance(organ, _Blob):
            cx, cy, ct = np.array(organ.center) + jitter
            c = np.array([cx * sx, cy * sy, g.z_of(ct)])
            r = np.array(organ.radii) * rng.uniform(0.87, 1.13, size=3)
            r = np.array([r[0] * sx, r[1] * sy, r[2] * g.z_extent])
            sub, sl = g.crop(c - r.max() * reach, c + r.max() * reach)
            depth = _ellipsoid(sub, c, r, organ.rot_deg + rng.normal(0, 8.0))
        else:
            pts = np.array(
                [
                    [(x + jitter[0]) * sx, (y + jitter[1]) * sy, g.z_of(t + jitter[2])]
                    for x, y, t in organ.points
                ]
            )
            radii = np.array(organ.radii) * rng.uniform(0.85, 1.15)
            sub, sl = g.crop(pts.min(0) - radii.max() * reach, pts.max(0) + radii.max() * reach)
            depth = _tube_depth(sub, pts, radii)
        mask = (depth < 1.0 + _wobble(rng, sub, wobble)) & cavity[sl]
        labels[sl][mask] = organ.id
        img[sl][mask] = hu[organ.id] + rng.normal(0, 6.0)
    if style == "B":  # a gas cap in the anterior stomach: a look style A never shows
        stomach = labels == 11
        front = g.y > np.percentile(np.broadcast_to(g.y, g.shape)[stomach], 80) if stomach.any() else False
        img[stomach & front] = hu["gas"]
    return labels


def make_phantom(*, seed: int = 0, index: int = 0, style: str = "A", size: int = 96):
    """One synthetic abdominal CT and its labels.

    Args:
        seed: dataset seed; together with ``index`` and ``style`` it fixes everything.
        index: case number within the dataset.
        style: "A" (pretraining look) or "B" (shifted look).
        size: in-plane voxels (square), 32-256.

    Returns:
        image: int16 (size, size, Z) HU, RAS+ voxel order; Z is 32-48.
        labels: uint8 (size, size, Z) FLARE22 ids; all 13 organs present.
        affine: (4, 4) RAS+ affine, anisotropic spacing (in-plane ~(300-430 mm) / size, 2.5-5 mm in z).
    """
    _check_options(seed=seed, style=style, size=size)
    for attempt in range(20):  # organs are sized never to vanish; the retry only guards the rare draw
        rng = np.random.default_rng([seed, index, _STYLE_CODE[style], attempt])
        n_slices = int(rng.integers(32, 49))
        body = _draw_body(rng, style)
        s_xy = 2 * body.outer_a * rng.uniform(1.06, 1.15) / size  # the field of view fits the body
        spacing = (s_xy, s_xy, float(rng.choice([2.5, 3.0, 4.0, 5.0])))
        g = _Grid(size, n_slices, spacing)
        img, cavity = _body(rng, g, body, _HU[style])
        labels = _paint_organs(rng, g, style, img, cavity, body)
        if len(np.unique(labels)) == 14:
            break
    else:  # pragma: no cover - would mean the anatomy table is broken
        raise RuntimeError(f"phantom {style}{index} lost an organ in every attempt")
    # Partial-volume blur, then scanner noise (in voxels: the blur is anisotropic like the grid).
    img = gaussian_filter(img, sigma=(0.5, 0.5, 0.3))
    img += rng.normal(0.0, _NOISE_HU[style], size=img.shape).astype(np.float32)
    image = np.clip(np.rint(img), -1024, 3071).astype(np.int16)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(np.array(image.shape) - 1) / 2 * np.array(spacing)  # the body centred at the origin
    return image, labels, affine


def _is_phantom_folder(folder: Path) -> bool:
    """Whether ``folder`` holds nothing but phantoms (images/, labels/ of phantom*.nii.gz files)."""
    subs = list(folder.iterdir())
    if not all(sub.name in ("images", "labels") and sub.is_dir() for sub in subs):
        return False
    return all(f.name.startswith("phantom") for sub in subs for f in sub.iterdir())


def write_phantoms(
    out: Path, *, cases: int, seed: int = 0, style: str = "A", size: int = 96, overwrite: bool = False
) -> list[str]:
    """Write phantom cases in FLARE22 layout: ``out/images/<case>_0000.nii.gz``, ``out/labels/<case>.nii.gz``.

    Args:
        out: folder to write into (created).
        cases: number of cases (>= 1).
        seed: dataset seed.
        style: "A" or "B".
        size: in-plane voxels.
        overwrite: write into a non-empty folder that holds more than phantoms.

    Returns:
        The case ids written, e.g. ``["phantomA_0000", "phantomA_0001"]``.
    """
    if cases < 1:
        raise FieldError("cases", f"need at least 1 case, got {cases}")
    _check_options(seed=seed, style=style, size=size)
    out = check_output_folder(out, command="phantom", ours=_is_phantom_folder, overwrite=overwrite)
    try:
        (out / "images").mkdir(parents=True, exist_ok=True)
        (out / "labels").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(out, exc) from None
    ids = []
    for i in range(cases):
        case = f"phantom{style}_{i:04d}"
        image, labels, affine = make_phantom(seed=seed, index=i, style=style, size=size)
        for arr, path in (
            (image, out / "images" / f"{case}_0000.nii.gz"),
            (labels, out / "labels" / f"{case}.nii.gz"),
        ):
            img = nib.Nifti1Image(arr, affine)
            img.header.set_xyzt_units("mm")
            img.header.set_qform(affine, code=1)
            img.header.set_sform(affine, code=1)
            with replacing(path) as tmp:  # a full disk leaves the earlier cases whole, this one absent
                nib.save(img, str(tmp))
        ids.append(case)
    return ids


def _check_options(*, seed: int, style: str, size: int) -> None:
    """The phantom options, checked before anything is drawn or written."""
    if seed < 0:  # numpy's generators take no negative seed
        raise FieldError("seed", f"must be a whole number >= 0, got {seed!r}")
    if style not in STYLES:
        raise FieldError("style", f"unknown phantom style {style!r}; choose from {', '.join(STYLES)}")
    if not 32 <= size <= 256:
        raise FieldError("size", f"phantom size must be 32..256 voxels, got {size}")
