"""What every result file records so its numbers can be trusted, and how it is written.

Training, evaluation and the benchmark all write their records through this module: the commit and
dirty flag, the hardware, peak memory, the process that writes a run, and files written atomically
(a reader never sees half a file). The output guards live here too: every command that writes checks
its output with :func:`check_output_file` or :func:`check_output_folder` before it writes anything,
so no command replaces one of its inputs or a file it did not write; :func:`output_lock` keeps a
second writer out of a folder while the first one runs. And the resources a write or a step needs:
free space (:func:`check_free_space`, :func:`write_error`) and memory (:func:`available_memory`).
It sits at the package's top level so no stage imports another stage for it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import platform
import re
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from clipseg_bench.errors import InputError, ReportedError, RunFailed


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
        RunFailed: naming ``path`` when the disk (or the quota, or ``ulimit -f``) has no room for it.
        InputError: naming ``path`` when the file system refuses the write otherwise (read-only).
    """
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    except Exception as exc:  # a full disk, a read-only or special file system; or a bug
        _remove(tmp)
        error = write_error(path, exc)
        if error is None:
            raise
        raise error from None
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


# --- resources: room on disk and in memory -----------------------------------------------------

# The errors that mean "no room for this write": a full disk, a full quota, and a file over the
# process's size limit (``ulimit -f``: EFBIG, once SIGXFSZ is ignored, as Python does at start-up).
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def size_text(n_bytes: float) -> str:
    """A byte count for people: ``"51.2 GB"`` (powers of 1000, as `df -H` and disk vendors count)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n_bytes) < 1000 or unit == "TB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1000
    return f"{n_bytes:.1f} TB"  # pragma: no cover - the loop returns


def free_bytes(folder: str | Path) -> int | None:
    """Bytes an unprivileged writer may still write on the file system of ``folder`` (or of its
    nearest existing ancestor); None where the file system cannot say."""
    path = Path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def file_size_limit() -> int | None:
    """The largest file this process may write (``ulimit -f``, RLIMIT_FSIZE), None when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def _errno_of(exc: BaseException) -> int | None:
    """The OS error number behind a failed write: an OSError's, or the one a library wrapped in its
    own error's message (safetensors: ``File too large (os error 27)``)."""
    code = getattr(exc, "errno", None)
    if code is None:
        found = re.search(r"os error (\d+)", str(exc))
        code = int(found.group(1)) if found else None
    return code


def _fits(folder: Path, need: int) -> bool:
    free, limit = free_bytes(folder), file_size_limit()
    return (free is None or need <= free) and (limit is None or need <= limit)


def write_error(path: str | Path, exc: BaseException, *, need: int | None = None) -> ReportedError | None:
    """The one-line error for a write that failed, or None when it was not the file system's doing.

    Args:
        path: the file (or folder) being written.
        exc: what the writer raised: an OSError, or a library's own error around one (torch.save's
            ``unexpected pos`` and ``file write failed``, safetensors' ``os error 27``).
        need: bytes the write needed, when known: a writer that hides the OS error then counts as
            out of room when they do not fit.

    Returns:
        A :class:`RunFailed` (exit 1) when there is no room (a full disk or quota, ``ulimit -f``),
        saying how much is free; an :class:`InputError` for any other OSError (a read-only or special
        file system); None for another error (a bug: keep its traceback).
    """
    path = Path(path)
    code = _errno_of(exc)
    if code in NO_ROOM or (code is None and need is not None and not _fits(path.parent, need)):
        free, limit = free_bytes(path.parent), file_size_limit()
        room = f"{size_text(free)} free on its file system" if free is not None else "free space unknown"
        if limit is not None:
            room += f", files limited to {size_text(limit)} (ulimit -f)"
        why = os.strerror(code) if code is not None else "no room"
        return RunFailed(path, f"cannot write it: {why} ({room}); free some space and run the command again")
    if isinstance(exc, OSError):
        return InputError(path, f"cannot write it ({exc.strerror or exc})")
    return None


def check_free_space(folder: str | Path, need: int, *, what: str, largest: int | None = None) -> None:
    """Refuse a write of ``need`` bytes into ``folder`` before it starts, when it cannot fit.

    Args:
        folder: where the files go.
        need: bytes the write adds (all its files).
        what: what is written, for the message ("the feature cache", "a checkpoint").
        largest: the largest single file, checked against ``ulimit -f`` (default ``need``).

    Raises:
        RunFailed: naming ``folder``, the bytes needed and the bytes free (or the file size limit).
    """
    free, limit = free_bytes(folder), file_size_limit()
    if free is not None and need > free:
        raise RunFailed(
            folder,
            f"{what} needs {size_text(need)} and its file system has {size_text(free)} free; "
            "free some space (or write elsewhere) and run the command again",
        )
    biggest = need if largest is None else largest
    if limit is not None and biggest > limit:
        raise RunFailed(
            folder,
            f"{what} writes a {size_text(biggest)} file; files are limited to {size_text(limit)} (ulimit -f)",
        )


def reserve_file(path: str | Path) -> None:
    """Allocate a file's blocks now (``posix_fallocate``) where the file system can, so that writing
    it through a memory map later cannot run out of room (SIGBUS) once the reservation succeeded.

    Raises:
        OSError: ENOSPC and the like (callers turn it into :func:`write_error`'s line).
    """
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    finally:
        os.close(fd)


def _cgroup_memory_left() -> int | None:
    """Bytes this container may still allocate (cgroup v2 memory.max - memory.current), if limited."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((root / "memory.current").read_text())
    except (OSError, ValueError):
        return None


def available_memory(device=None) -> tuple[int | None, str]:
    """Memory a new allocation can get now, and what it is.

    Args:
        device: a torch.device; on CUDA the GPU's free memory, else the machine's.

    Returns:
        (bytes or None when unknown, ``"free GPU memory"`` or ``"available memory"``). On the CPU:
        /proc/meminfo's MemAvailable, or the container's cgroup limit left when that is smaller.
    """
    if device is not None and getattr(device, "type", None) == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device)[0]), "free GPU memory"
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    left = _cgroup_memory_left()
    if left is not None:
        available = left if available is None else min(available, left)
    return available, "available memory"


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


def has_entries(folder: Path) -> bool:
    """Whether ``folder`` holds anything besides our lock files (:func:`output_lock`)."""
    return any(not is_lock_file(p) for p in Path(folder).iterdir())


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
        if not overwrite and has_entries(path) and not ours(path):
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


def _started(ticks: int | None) -> str:
    """A process's start as local time (``2025-01-31 14:02:05``) from its start ticks; now if unknown."""
    when = time.time()
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime ") and ticks is not None:
                when = int(line.split()[1]) + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        pass
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))


def process_record() -> dict:
    """Who writes a run: pid, host, boot id and the process's start time (``start_ticks``, to recognise
    pid reuse; ``started``, the same as local time, for people)."""
    pid = os.getpid()
    ticks = _start_ticks(pid)
    return {
        "pid": pid,
        "host": socket.gethostname(),
        "boot_id": _boot_id(),
        "start_ticks": ticks,
        "started": _started(ticks),
    }


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


# --- one writer per output folder -------------------------------------------------------------

LOCK_PREFIX, LOCK_SUFFIX = ".clipseg-bench-", ".lock"


def lock_path(folder: str | Path, command: str, scope: str | None = None) -> Path:
    """The lock file of ``command`` (and ``scope``, e.g. a benchmark shard) in ``folder``."""
    name = command if scope is None else f"{command}-{scope}"
    return Path(folder) / f"{LOCK_PREFIX}{name}{LOCK_SUFFIX}"


def is_lock_file(path: Path) -> bool:
    """Whether ``path`` is one of our lock files (output guards look past them)."""
    return path.name.startswith(LOCK_PREFIX) and path.name.endswith(LOCK_SUFFIX)


def try_flock(fd: int, kind: int = fcntl.LOCK_EX) -> bool | None:
    """True: ``fd`` now holds the lock; False: another open file holds it; None: no flock here."""
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:  # some network and cluster file systems have no flock
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise


def write_holder(fd: int, command: str) -> None:
    """Record this process (:func:`process_record`) and ``command`` in a lock file it holds."""
    record = json.dumps({**process_record(), "command": command}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, record, 0)


def read_holder(fd: int) -> dict | None:
    """The record a lock's holder wrote (:func:`write_holder`), None when there is none."""
    try:
        doc = json.loads(os.pread(fd, 65536, 0).decode() or "null")
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def _is_me(holder: dict) -> bool:
    me = process_record()
    return (
        holder.get("pid") == me["pid"]
        and holder.get("host") == me["host"]
        and (holder.get("start_ticks") in (None, me["start_ticks"]))
    )


def holder_text(holder: dict | None) -> str:
    """Who holds a lock, for a message: its command, pid, host and start time (from its record)."""
    if not holder:
        return "another process"
    return (
        f"`{holder.get('command', '?')}` process {holder.get('pid')} on {holder.get('host')} "
        f"(started {holder.get('started', '?')})"
    )


def _verdict(path: Path, got: bool | None, holder: dict | None) -> str:
    """What a lock file means: ``free`` (take it), ``stale`` (its process is gone: take it over), or
    raise the refusal. ``got``: whether flock was ours (None: no flock on this file system)."""
    folder = path.parent
    if got is False:  # the kernel says a process holds it
        who = holder_text(holder)
        raise InputError(
            folder, f"{who} is writing into it right now; wait for it to end, or choose another --out"
        )
    if not holder or _is_me(holder):
        return "free"
    alive = process_alive(holder)
    if alive is None:  # another host: flock over a network file system cannot be trusted either
        raise InputError(
            folder,
            f"is locked by {holder_text(holder)}, which cannot be checked from {socket.gethostname()}; "
            f"if it no longer runs, remove {path} and run the command again",
        )
    if alive and got is None:  # without flock the record is all there is to go by
        raise InputError(
            folder,
            f"{holder_text(holder)} is writing into it right now; wait for it to end, or choose another --out",
        )
    return "stale"


def check_unlocked(folder: str | Path, command: str, scope: str | None = None) -> None:
    """Refuse, writing nothing, a folder whose ``command`` lock another live process holds.

    Raises:
        InputError: as :func:`output_lock` would, naming the process (pid, host, start time).
    """
    path = lock_path(folder, command, scope)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # no lock file: nobody writes here
    try:
        holder = read_holder(fd)
        if holder and _is_me(holder):  # this process holds it (a check repeated inside the lock)
            return
        _verdict(path, try_flock(fd, fcntl.LOCK_SH), holder)
    finally:
        os.close(fd)  # also releases the probe's shared lock


def _holds_path(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _acquire(path: Path, command: str) -> int:
    """Open and lock ``path``; returns the descriptor that holds the lock (see :func:`output_lock`)."""
    for _ in range(100):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise write_error(path, exc) from None
        try:
            got = try_flock(fd)
            if got and not _holds_path(fd, path):  # its holder removed it while we opened it: again
                os.close(fd)
                continue
            holder = read_holder(fd)
            if _verdict(path, got, holder) == "stale":
                print(
                    f"note: {path.parent}: taking over the lock of {holder_text(holder)}, which no longer runs",
                    file=sys.stderr,
                )
            write_holder(fd, command)
            return fd
        except BaseException:
            os.close(fd)
            raise
    raise InputError(path.parent, f"cannot take its lock {path.name}: it keeps changing")  # pragma: no cover


@contextlib.contextmanager
def output_lock(folder: str | Path, command: str, *, scope: str | None = None) -> Iterator[Path]:
    """Hold ``folder`` for ``command``: a second writer of the same kind is refused up front.

    The lock is a file in the folder (``.clipseg-bench-<command>[-<scope>].lock``) holding the
    writer's :func:`process_record` and command, locked with ``fcntl.flock`` on its open descriptor.
    flock rather than an O_EXCL file alone: the kernel drops it when the process ends however it
    ends (SIGKILL, the OOM killer), so a lock is never held by a dead process, and two processes
    that find the same stale file cannot both take it over (one gets the flock). The record only
    serves the refusal message (pid, host, start time) and the cases flock cannot decide: a record
    from another host is refused (a network file system's flock may be local to each machine), a
    file system without flock falls back to checking the recorded process (:func:`process_alive`).
    A lock left by a process that is gone is taken over with a note on stderr. Locks are per
    machine: benchmark shards on several machines write different folders.

    A folder the lock had to create is removed again when the command wrote nothing else into it
    (a refused command leaves no folder).

    Args:
        folder: the output folder (created when missing).
        command: the command that writes it (part of the lock file's name and the record).
        scope: a part of a shared folder the command writes alone (a benchmark's shard).

    Raises:
        InputError: another live process holds the lock (naming its pid, host and start time), or
            a process on another host does (saying which file to remove once it is gone), or the
            folder cannot be created.
    """
    folder = Path(folder)
    created = _first_missing(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(folder, exc) from None
    path = lock_path(folder, command, scope)
    try:
        fd = _acquire(path, command)
    except BaseException:
        _remove_if_empty(folder, created)
        raise
    try:
        yield path
    finally:
        if _holds_path(fd, path):
            _remove(path)  # before closing: a waiter on this file then sees it was replaced
        os.close(fd)
        _remove_if_empty(folder, created)


def _first_missing(folder: Path) -> Path | None:
    """The outermost folder of ``folder``'s path that does not exist yet (None: it exists)."""
    missing = None
    for path in [folder, *folder.parents]:
        if path.exists():
            break
        missing = path
    return missing


def _remove_if_empty(folder: Path, created: Path | None) -> None:
    """Remove the folders the lock created (``folder`` up to ``created``) that are still empty."""
    if created is None:
        return
    for path in [folder, *folder.parents]:
        try:
            path.rmdir()  # only when empty
        except OSError:
            return
        if path == created:
            return
