"""Folder throughput of `segment` (issue 15): one call over a folder of N CTs against N calls.

The folder call loads the model once and segments the CTs one after another with the same slice
batching as a single call; N separate calls each pay for starting Python, importing torch and
transformers and loading the model. Both sides run as the user runs them, as `clipseg-bench segment`
processes, on N copies (symbolic links) of the shared real CT (../shared/data/ct), interleaved over
``--repeats`` rounds; each side's time is its minimum over the rounds (other processes only ever
add time). Prints seconds per CT for both and their ratio, and writes JSON with ``--json``.

    python benchmarks/segment_folder.py                       # tiny model, zero-shot, 4 CTs
    python benchmarks/segment_folder.py --run RUN --copies 8  # a trained run

The numbers depend on the machine's load: report the load average (printed) beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_CT = REPO.parent / "shared" / "data" / "ct" / "images" / "TS_0001_0000.nii.gz"


def _segment(model_args: list[str], ct: Path, out: Path) -> float:
    """Seconds one `clipseg-bench segment` process takes, start to exit."""
    cmd = [
        sys.executable,
        "-m",
        "clipseg_bench.cli",
        "segment",
        *model_args,
        "--ct",
        str(ct),
        "--out",
        str(out),
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


def measure(*, ct: Path, copies: int, repeats: int, model_args: list[str]) -> dict:
    """Interleaved rounds of (folder call, N single calls); the minimum time of each side."""
    folder_s, single_s = [], []
    with tempfile.TemporaryDirectory() as tmp:
        cts = Path(tmp) / "cts"
        cts.mkdir()
        for i in range(copies):
            (cts / f"copy{i}_0000.nii.gz").symlink_to(ct)
        for r in range(repeats):
            folder_s.append(_segment(model_args, cts, Path(tmp) / f"folder{r}"))
            single = 0.0
            for i in range(copies):
                single += _segment(
                    model_args, cts / f"copy{i}_0000.nii.gz", Path(tmp) / f"single{r}_{i}.nii.gz"
                )
            single_s.append(single)
    folder, single = min(folder_s), min(single_s)
    return {
        "copies": copies,
        "repeats": repeats,
        "model_args": model_args,
        "ct": str(ct),
        "folder_call_s": folder_s,
        "single_calls_s": single_s,
        "folder_s_per_ct": folder / copies,
        "single_s_per_ct": single / copies,
        "speedup": single / folder,
        "loadavg": os.getloadavg(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ct", type=Path, default=SHARED_CT, help="the CT to copy (default: the shared real CT)")
    p.add_argument("--copies", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--run", help="a run folder (default: --model tiny --strategy zeroshot)")
    p.add_argument("--json", type=Path, help="write the numbers here")
    a = p.parse_args()
    model_args = ["--run", a.run] if a.run else ["--model", "tiny", "--strategy", "zeroshot"]
    r = measure(ct=a.ct, copies=a.copies, repeats=a.repeats, model_args=model_args)
    print(f"{a.copies} copies of {a.ct.name}, {' '.join(model_args)}, minimum of {a.repeats} rounds")
    print(f"  one call over the folder : {r['folder_s_per_ct']:.2f} s per CT")
    print(f"  {a.copies} separate calls      : {r['single_s_per_ct']:.2f} s per CT")
    print(f"  ratio                    : {r['speedup']:.2f}x faster per CT over a folder")
    print(f"  load average             : {' '.join(f'{x:.2f}' for x in r['loadavg'])}")
    if a.json:
        a.json.write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
