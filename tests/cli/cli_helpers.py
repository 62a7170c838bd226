"""Helpers of the bad-input tests: run a command in-process, check its one-line error, and prove that
nothing it was given (or wrote before) changed."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from clipseg_bench.cli import main


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """``clipseg-bench ARGS`` in this process: (exit code, stdout, stderr)."""
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_one_line_error(rc: int, err: str, names: str, code: int = 2) -> str:
    """The `prepare` standard: exit ``code``, no traceback, one stderr line naming ``names``."""
    assert rc == code, err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), lines[0]
    assert str(names) in lines[0], lines[0]
    return lines[0]


def digest(*paths: Path) -> dict[str, str]:
    """Every file under ``paths`` (or the file itself) -> sha256 of its bytes; folders list as ``<dir>``.

    Equal digests before and after a command mean it changed nothing there, byte for byte.
    """
    out: dict[str, str] = {}
    for root in map(Path, paths):
        if root.is_file():
            out[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
        elif root.is_dir():
            for p in sorted(root.rglob("*")):
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
        else:
            out[str(root)] = "<absent>"
    return out


def set_status(run: Path, status: str) -> None:
    """Rewrite a run's run.json status (e.g. an interrupted run is ``running``)."""
    info = json.loads((run / "run.json").read_text())
    info["status"] = status
    (run / "run.json").write_text(json.dumps(info))


def edit_json(path: Path, change) -> None:
    """Apply ``change(doc)`` to a JSON file in place."""
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def data_copy(prepared: Path, tmp: Path) -> Path:
    """A copy of a PREPARED folder to break, without its feature cache (``tmp/prepared``)."""
    copy = tmp / "prepared"
    shutil.copytree(prepared, copy, ignore=shutil.ignore_patterns("feature_cache"))
    return copy


def truncate_array(prepared: Path, kind: str = "image") -> Path:
    """Cut the first ``cache/*_<kind>.npy`` of a PREPARED folder short (header kept); returns it."""
    npy = sorted((prepared / "cache").glob(f"*_{kind}.npy"))[0]
    npy.write_bytes(npy.read_bytes()[:200])
    return npy
