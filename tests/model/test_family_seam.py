"""The model-family seam: only ``model/families/`` knows a Hugging Face model's attribute paths."""

import io
import re
import tokenize
from pathlib import Path

import clipseg_bench

PACKAGE = Path(clipseg_bench.__file__).parent
# Attribute paths into transformers' CLIPSeg (and SAM 3) modules: whoever spells one outside a family
# couples that code to one model.
# (``np.clip(...)`` and the family's own ``Parts.decoder`` are not such paths.)
HF_PATHS = re.compile(
    r"\.(clip(?=\.)|vision_model|text_model|vision_encoder|text_encoder|mask_decoder|detr_\w+)\b"
)


def _code_without_comments_and_strings(path: Path) -> str:
    """Return the file's code tokens only (docstrings and comments may name the paths)."""
    kept = []
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type not in (tokenize.COMMENT, tokenize.STRING):
            kept.append(tok.string)
    return " ".join(kept).replace(" . ", ".").replace(" .", ".").replace(". ", ".")


def test_no_module_outside_the_families_reaches_into_a_models_internals():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "families" in path.relative_to(PACKAGE).parts:
            continue
        found = HF_PATHS.findall(_code_without_comments_and_strings(path))
        if found:
            offenders.append(f"{path.relative_to(PACKAGE)}: {sorted(set(found))}")
    assert not offenders, offenders


def test_the_check_sees_a_planted_path(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text(
        'def f(model):\n    """model.text_model"""\n    return np.clip(model.clip.vision_model, 0, 1)\n'
    )
    assert HF_PATHS.findall(_code_without_comments_and_strings(planted)) == ["clip", "vision_model"]


def test_every_family_keeps_the_base_classs_signatures():
    """Code written against ``ModelFamily`` calls any family the same way (``reference_config(tokenizer=...)``
    once failed on SAM 3, whose method took no tokenizer)."""
    import inspect

    from clipseg_bench.model.families import available_families, family
    from clipseg_bench.model.families.base import ModelFamily

    assert len(available_families()) >= 2
    differ = []
    for name in available_families():
        fam = type(family(name))
        for attr, base in vars(ModelFamily).items():
            if attr.startswith("_") or not inspect.isfunction(base) or attr not in vars(fam):
                continue
            want = [(p.name, p.kind) for p in inspect.signature(base).parameters.values()]
            got = [(p.name, p.kind) for p in inspect.signature(vars(fam)[attr]).parameters.values()]
            if got != want:
                differ.append(f"{name}.{attr}: {got} != {want}")
    assert not differ, differ
