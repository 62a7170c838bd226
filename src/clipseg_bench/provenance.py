"""What every result file records so its numbers can be trusted, and how it is written.

Training, evaluation and the benchmark all write their records through this module: the commit and
dirty flag, the hardware, peak memory, and JSON written atomically (a reader never sees half a file).
It sits at the package's top level so no stage imports another stage for it.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
from pathlib import Path


def git_info(path: Path | None = None) -> dict:
    """Commit and dirty flag of the repository this package runs from ("unknown" outside git)."""
    where = path or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        return {"commit": commit, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_info(num_processes: int = 1) -> dict:
    import torch  # here, not at the top: `prepare` writes through this module and needs no torch

    cuda = torch.cuda.is_available()
    return {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "python": platform.python_version(),
        "num_processes": num_processes,
        "threads": torch.get_num_threads(),
    }


def _proc_status_mb(field: str) -> float | None:
    """A ``VmXXX`` line of /proc/self/status in MiB; None where there is no /proc (not Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """This process's resident memory now, MiB (0.0 where there is no /proc)."""
    return _proc_status_mb("VmRSS") or 0.0


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (since exec, or since :func:`reset_peak_rss`).

    Reads VmHWM from /proc: ``ru_maxrss`` survives fork + exec on Linux, so a training subprocess
    started by a big parent (the benchmark) would report the parent's peak instead of its own.
    """
    peak = _proc_status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so a later peak belongs to what ran since."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory_mb(device) -> tuple[float, str]:
    """Peak memory: the GPU's max allocated on CUDA (``device`` a torch.device), else this process's peak RSS."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return peak_rss_mb(), "rss"


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj) -> None:
    """``obj`` as indented JSON, written atomically (see :func:`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))
