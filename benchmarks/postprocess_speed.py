"""Which library labels the 3D components of ``--postprocess lcc`` faster: cc3d or scipy.ndimage?

Times the whole clean-up (13 organs, 26-connectivity) on the shared real CT's label volume
(122 x 101 x 112, 3 mm) and on the same labels at FLARE22's in-plane size (512 x 512 x 112, nearest
upsampling), with stray blobs (and, in a harsher variant, 1% speckle) added so there is something
to remove:

- ``cc3d``: :func:`clipseg_bench.evaluation.postprocess.keep_largest_components`, which labels
  every organ in one pass of the multi-label volume with connected-components-3d;
- ``scipy``: ``scipy.ndimage.label`` per organ inside the organ's bounding box (below), the
  alternative it was chosen over.

Both keep the same voxels (checked; the paired organs' side rule is off in both, so only
labelling is compared). Prints ratios and writes JSON; a benchmark, not a test.

    python benchmarks/postprocess_speed.py [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from clipseg_bench.evaluation.postprocess import keep_largest_components

SHARED_LABELS = (
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ct" / "labels" / "TS_0001.nii.gz"
)
_FULL = ndimage.generate_binary_structure(3, 3)  # 26-connectivity


def noisy(labels: np.ndarray, *, speckle: float, seed: int = 0) -> np.ndarray:
    """The labels with 20 stray blobs of random organ ids and a share ``speckle`` of random voxels."""
    rng = np.random.default_rng(seed)
    out = labels.copy()
    for _ in range(20):
        c = [rng.integers(0, s) for s in out.shape]
        r = max(1, out.shape[0] // 60)
        out[tuple(slice(max(0, x - r), x + r) for x in c)] = rng.integers(1, 14)
    noise = rng.random(out.shape) < speckle
    out[noise] = rng.integers(1, 14, noise.sum())
    return out


def lcc_scipy(labels: np.ndarray) -> np.ndarray:
    """Largest 26-connected component per label, labelling each organ's bounding box with scipy."""
    out = labels.copy()
    for organ in np.unique(labels):
        if organ == 0:
            continue
        box = ndimage.find_objects((labels == organ).astype(np.uint8))[0]
        comp, n = ndimage.label(labels[box] == organ, structure=_FULL)
        sizes = np.bincount(comp.ravel(), minlength=n + 1)[1:]
        region = out[box]
        region[(comp > 0) & (comp != int(np.argmax(sizes)) + 1)] = 0
    return out


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    base = np.asarray(nib.load(str(SHARED_LABELS)).dataobj).astype(np.uint8)
    big = ndimage.zoom(base, (512 / base.shape[0], 512 / base.shape[1], 1), order=0)
    volumes = {
        "shared CT 122x101x112, blobs": noisy(base, speckle=0.0),
        "shared CT 122x101x112, blobs + 1% speckle": noisy(base, speckle=0.01),
        "FLARE22 size 512x512x112, blobs": noisy(big, speckle=0.0),
        "FLARE22 size 512x512x112, blobs + 1% speckle": noisy(big, speckle=0.01),
    }
    lcc_cc3d = functools.partial(keep_largest_components, affine=np.eye(4), sides={})
    results = []
    for name, vol in volumes.items():
        row = {
            "volume": name,
            "cc3d_s": best_of(lambda v=vol: lcc_cc3d(v), a.repeats),
            "scipy_s": best_of(lambda v=vol: lcc_scipy(v), a.repeats),
        }
        row["scipy_over_cc3d"] = row["scipy_s"] / row["cc3d_s"]
        row["same_voxels"] = bool(np.array_equal(lcc_scipy(vol), lcc_cc3d(vol)))
        results.append(row)
        print("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    print(f"best of {a.repeats}; load average {' '.join(load)}; {os.cpu_count()} CPUs")
    if a.json:
        Path(a.json).write_text(
            json.dumps({"results": results, "loadavg": load, "repeats": a.repeats}, indent=1)
        )


if __name__ == "__main__":
    main()
