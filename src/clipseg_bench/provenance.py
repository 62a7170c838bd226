"""What every result file records so its numbers can be trusted, and how it is written.

Training, evaluation and the benchmark all write their records through this module: the commit and
dirty flag, the hardware, peak memory, the process that writes a run, and files written atomically
(a reader never sees half a file). The output guards live here too: every command that writes checks
its output with :func:`check_output_file` or :func:`check_output_folder` before it writes anything,
so no command replaces one of its inputs or a file it did not write. It sits at the package's top
level so no stage imports another stage for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import socket
import subprocess
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from clipseg_bench.errors import InputError


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


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Write ``path`` atomically: yield a temporary name beside it, rename it over ``path`` on success.

    The temporary name is hidden and keeps the file's extension (``.tmp-<pid>-mask.nii.gz``), so
    writers that pick the format from the name (nibabel) work, and folder listings skip it. On an
    error the temporary file is removed and ``path`` keeps what it held before.

    Raises:
        InputError: naming ``path`` when the file system refuses the write (full, read-only).
    """
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:  # a full disk, a read-only or special file system: the user's to fix
        _remove(tmp)
        raise InputError(path, f"cannot write it ({exc.strerror or exc})") from None
    except BaseException:
        _remove(tmp)
        raise


def _remove(tmp: Path) -> None:
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file in the same folder and a rename."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, obj) -> None:
    """``obj`` as indented JSON, written atomically (see :func:`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))


def read_json_object(path: Path) -> dict:
    """A JSON file holding an object (run.json, metrics.json, a benchmark record), checked.

    Raises:
        InputError: naming ``path`` when it cannot be read, is not valid JSON, or is not an object.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read it ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(doc, dict):
        raise InputError(path, "expected a JSON object")
    return doc


# --- output guards ----------------------------------------------------------------------------


def marker_name(fmt: str) -> str:
    """The marker file of a folder kind: ``"clipseg-bench-prepared/1"`` -> ``.clipseg-bench-prepared``."""
    return "." + fmt.split("/")[0]


def mark_folder(folder: Path, fmt: str) -> None:
    """Say "this folder was written by us, in format ``fmt``" (written before anything else)."""
    (Path(folder) / marker_name(fmt)).write_text(fmt + "\n")


def folder_format(folder: Path, fmt: str) -> str | None:
    """The format the folder's marker of ``fmt``'s kind names (any version), or None without one."""
    try:
        return (Path(folder) / marker_name(fmt)).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name the same file or folder (links and relative parts resolved)."""
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def _refuse_inputs(path: Path, inputs: Iterable[Path], flag: str) -> None:
    for inp in inputs:
        if _same_file(path, Path(inp)):
            also = f" ({inp})" if str(inp) != str(path) else ""
            raise InputError(path, f"is an input of this command{also}; choose another {flag}")


def _check_creatable(path: Path, what: str) -> None:
    """The nearest existing ancestor of a path that does not exist yet must be a writable folder."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(path, f"cannot create the output {what}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(path, f"cannot create the output {what}: {parent} is not writable")


def check_output_file(
    path: str | Path,
    *,
    command: str,
    ours: Callable[[Path], bool],
    inputs: Iterable[Path] = (),
    overwrite: bool = False,
    flag: str = "--out",
) -> Path:
    """Refuse an output file that would destroy something, before anything is written.

    Args:
        path: the file the command will write.
        command: the command's name, for the message.
        ours: whether an existing file at ``path`` was written by this command (then it may be replaced).
        inputs: the files and folders the command reads; ``path`` may be none of them.
        overwrite: replace an existing file even when it is not ours.
        flag: the option that gave ``path``.

    Returns:
        ``path`` as a Path.

    Raises:
        InputError: ``path`` is an input, a folder, a file this command did not write (without
            ``overwrite``), or cannot be created.
    """
    path = Path(path)
    _refuse_inputs(path, inputs, flag)
    if path.is_dir():
        raise InputError(path, f"is a folder; {flag} takes a file name")
    if path.exists():
        if not overwrite and not ours(path):
            raise InputError(
                path, f"exists and was not written by `{command}`; pass --overwrite to replace it"
            )
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise InputError(path, f"cannot replace it: {path.parent} is not writable")
        return path
    _check_creatable(path, "file")
    return path


def check_output_folder(
    path: str | Path,
    *,
    command: str,
    ours: Callable[[Path], bool],
    inputs: Iterable[Path] = (),
    overwrite: bool = False,
    flag: str = "--out",
) -> Path:
    """Refuse an output folder that would mix our files into someone else's, before anything is written.

    An empty or new folder is fine; a non-empty one must be ours (``ours(path)``, e.g. a marker file
    or the command's own record) unless ``overwrite``.

    Raises:
        InputError: ``path`` is an input, a file, a non-empty folder that is not ours (without
            ``overwrite``), not writable, or cannot be created.
    """
    path = Path(path)
    _refuse_inputs(path, inputs, flag)
    if path.exists() and not path.is_dir():
        raise InputError(path, f"output path exists and is not a folder; {flag} takes a folder")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise InputError(path, "output folder is not writable")
        if not overwrite and any(path.iterdir()) and not ours(path):
            raise InputError(
                path,
                f"output folder is not empty and was not written by {command} "
                f"(use --overwrite, or choose another {flag})",
            )
        return path
    _check_creatable(path, "folder")
    return path


# --- the process that writes a run ------------------------------------------------------------


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, /proc/<pid>/stat field 22); None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # fields after "(comm)" start at field 3


def process_record() -> dict:
    """Who writes a run: pid, host, boot id and the process's start time (to recognise pid reuse)."""
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "boot_id": _boot_id(), "start_ticks": _start_ticks(pid)}


def process_alive(record: dict | None) -> bool | None:
    """Whether the process of a :func:`process_record` still runs.

    Returns:
        True or False when this machine can tell; None when it cannot (no record, or the run was
        written on another host: a cluster node's processes are not visible here).
    """
    if not isinstance(record, dict) or record.get("host") != socket.gethostname():
        return None
    pid = record.get("pid")
    if not isinstance(pid, int):
        return None
    if record.get("boot_id") and _boot_id() and record["boot_id"] != _boot_id():
        return False  # the machine rebooted since
    if Path("/proc/self/stat").exists():
        ticks = _start_ticks(pid)
        return ticks is not None and (record.get("start_ticks") in (None, ticks))
    try:  # no /proc (macOS): signal 0 only asks whether the pid exists
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
