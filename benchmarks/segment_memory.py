"""Peak memory of ``segment`` with and without ``--probabilities``, scaled to a 512x512x600 CT (issue 24).

Each call runs in its own process (``clipseg-bench segment --model tiny --strategy zeroshot``, all 13
organs) on a synthetic 512x512xZ CT, and reports that process's peak RSS (VmHWM). What
``--probabilities`` adds is the difference of the two calls at the same Z; two values of Z give its
slope per slice, and the peak for 600 slices follows from the line through them (the model and the
batch are the same at every Z, so only the per-slice terms grow). Usage::

    python benchmarks/segment_memory.py --slices 40,80 --json segment_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

PROBE = """
import sys
from clipseg_bench import cli
rc = cli.main(sys.argv[1:])
hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]
print('VMHWM', int(hwm) / 1024, rc)
"""


def make_ct(path: Path, slices: int, side: int = 512) -> None:
    """A synthetic CT: smooth random HU blobs, 0.8 x 0.8 x 2.5 mm."""
    import nibabel as nib
    from scipy import ndimage

    rng = np.random.default_rng(0)
    vol = ndimage.gaussian_filter(rng.normal(0, 1, (side // 8, side // 8, slices)), 2)
    vol = ndimage.zoom(vol, (8, 8, 1), order=1)
    hu = (vol / (np.abs(vol).max() + 1e-9) * 300).astype(np.int16)
    nib.save(nib.Nifti1Image(hu, np.diag([0.8, 0.8, 2.5, 1.0])), path)


def peak_mb(ct: Path, out: Path, probabilities: bool) -> float:
    """Peak RSS (MiB) of one ``segment`` process."""
    args = [
        "segment",
        "--model",
        "tiny",
        "--strategy",
        "zeroshot",
        "--ct",
        str(ct),
        "--out",
        str(out),
        "--overwrite",
    ]
    if probabilities:
        args.append("--probabilities")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    r = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env)
    line = next((x for x in r.stdout.splitlines() if x.startswith("VMHWM")), None)
    if line is None:
        raise RuntimeError(r.stderr[-2000:])
    return float(line.split()[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slices", default="40,80", help="two slice counts to measure at (512 x 512 each)")
    p.add_argument("--target", type=int, default=600, help="slices of the CT to scale to")
    p.add_argument("--json", type=Path, help="write the result here")
    a = p.parse_args(argv)
    zs = [int(z) for z in a.slices.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for z in zs:
            ct = Path(tmp) / f"ct{z}.nii.gz"
            make_ct(ct, z)
            plain = peak_mb(ct, Path(tmp) / f"a{z}.nii.gz", False)
            probs = peak_mb(ct, Path(tmp) / f"b{z}.nii.gz", True)
            rows.append(
                {"slices": z, "labels_only_mb": plain, "probabilities_mb": probs, "added_mb": probs - plain}
            )
            print(
                f"512x512x{z}: labels only {plain:.0f} MiB, with --probabilities {probs:.0f} MiB", flush=True
            )
    (z0, r0), (z1, r1) = ((r["slices"], r) for r in rows[:2])
    per_slice = {k: (r1[k] - r0[k]) / (z1 - z0) for k in ("labels_only_mb", "probabilities_mb", "added_mb")}
    scaled = {k: r1[k] + per_slice[k] * (a.target - z1) for k in per_slice}
    print(
        f"scaled to 512x512x{a.target}: labels only {scaled['labels_only_mb']:.0f} MiB, with --probabilities "
        f"{scaled['probabilities_mb']:.0f} MiB (the probabilities add {scaled['added_mb']:.0f} MiB; "
        f"{per_slice['added_mb']:.2f} MiB per slice)"
    )
    if a.json:
        a.json.write_text(
            json.dumps(
                {"rows": rows, "per_slice_mb": per_slice, "scaled": scaled, "target": a.target}, indent=1
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
