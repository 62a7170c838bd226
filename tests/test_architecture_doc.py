"""docs/architecture.md names modules, files and functions; each must exist, so the doc cannot drift
from the code silently (a renamed or removed module fails here)."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import clipseg_bench

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "architecture.md"
PACKAGE = Path(clipseg_bench.__file__).parent
TOP = {m.name for m in pkgutil.iter_modules([str(PACKAGE)])}


def _code_spans(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", text)


def _layout_block(text: str) -> str:
    return text.split("## Package layout", 1)[1].split("```", 2)[1]


def _py_files() -> set[str]:
    """Every .py file name mentioned in the doc (code spans and the layout block)."""
    text = DOC.read_text()
    names = set(re.findall(r"([\w/]+\.py)\b", _layout_block(text)))
    names |= {s for s in _code_spans(text) if re.fullmatch(r"[\w/.]+\.py", s)}
    return names


def _exists(name: str) -> bool:
    roots = [PACKAGE, REPO, REPO / "benchmarks", REPO / "tests"]
    if any((root / name).is_file() for root in roots):
        return True
    # a name relative to a sub-package (``families/clipseg.py``) or a bare module name
    return any(p.as_posix().endswith("/" + name) for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("name", sorted(_py_files()))
def test_every_file_the_doc_names_exists(name):
    assert _exists(name), f"docs/architecture.md names {name}, which is not in the repository"


def _dotted_names() -> set[str]:
    """``module.attr`` references whose first part is one of the package's modules or packages."""
    out = set()
    for span in _code_spans(DOC.read_text()):
        token = re.sub(r"\(.*", "", span.split(" ")[0]).rstrip(".,:")
        if token.endswith(".py") or token.startswith("config.model_type"):  # files; HF's config attribute
            continue
        if re.fullmatch(r"[a-z_]+(\.[A-Za-z_]\w*)+", token) and token.split(".")[0] in TOP:
            out.add(token)
    return out


@pytest.mark.parametrize("name", sorted(_dotted_names()))
def test_every_module_and_function_the_doc_names_exists(name):
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):  # the longest importable module prefix, then attributes
        try:
            obj = importlib.import_module("clipseg_bench." + ".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            assert hasattr(obj, attr), f"docs/architecture.md names {name}: no {attr!r}"
            obj = getattr(obj, attr)
        return
    pytest.fail(f"docs/architecture.md names {name}: no such module")


def test_the_doc_names_enough_to_be_checked():
    assert len(_py_files()) >= 20 and len(_dotted_names()) >= 15
