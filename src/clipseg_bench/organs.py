"""The FLARE22 organ table and maps from other datasets' label ids onto it.

FLARE22 scores 13 organs in a fixed label order. Each organ carries the prompt we give CLIPSeg,
the NSD tolerance (mm) the official FLARE22 evaluation uses, and the gray value the original study
wrote into exported label PNGs (label k -> 20*k, except 13 -> 255).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import yaml

from clipseg_bench.errors import InputError


@dataclass(frozen=True)
class Organ:
    id: int  # FLARE22 label id, 1..13
    name: str  # human name, also the default prompt
    key: str  # snake_case name used in files and columns
    nsd_tolerance_mm: float
    gray: int  # gray value of this label in exported label PNGs

    def prompt(self, template: str = "{organ}") -> str:
        """The text prompt for this organ, e.g. template "a computerized tomography of a {organ}"."""
        return template.format(organ=self.name)

    def to_dict(self) -> dict:
        return asdict(self)


_NAMES = [
    "liver",
    "right kidney",
    "spleen",
    "pancreas",
    "aorta",
    "inferior vena cava",
    "right adrenal gland",
    "left adrenal gland",
    "gallbladder",
    "esophagus",
    "stomach",
    "duodenum",
    "left kidney",
]
_TOLERANCES = [5, 3, 3, 5, 2, 2, 2, 2, 2, 3, 5, 7, 3]

ORGANS: tuple[Organ, ...] = tuple(
    Organ(
        id=i + 1,
        name=n,
        key=n.replace(" ", "_"),
        nsd_tolerance_mm=float(t),
        gray=255 if i + 1 == 13 else 20 * (i + 1),
    )
    for i, (n, t) in enumerate(zip(_NAMES, _TOLERANCES, strict=True))
)
NUM_ORGANS = len(ORGANS)
BY_ID = {o.id: o for o in ORGANS}
BY_KEY = {o.key: o for o in ORGANS}

# Aorta, IVC and esophagus are long tubes cut off by the field of view; the official FLARE22
# evaluation scores them only on the z-range the ground truth labels (see evaluation.metrics).
Z_CROPPED_IDS = (5, 6, 10)

PROMPT_TEMPLATES = {
    "name": "{organ}",
    "photo": "a photo of a {organ}",
    "ct": "a computerized tomography of a {organ}",
}


def organ(ref: str | int) -> Organ:
    """Look an organ up by id, key ("right_kidney") or name ("right kidney")."""
    if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
        if int(ref) in BY_ID:
            return BY_ID[int(ref)]
    else:
        key = ref.strip().lower().replace(" ", "_").replace("-", "_")
        if key in BY_KEY:
            return BY_KEY[key]
    raise InputError(None, f"unknown organ {ref!r}; known: {', '.join(o.key for o in ORGANS)}")


def parse_organs(spec: str | None) -> list[Organ]:
    """Parse "liver,spleen" (or None for all 13) into organs in label order."""
    if not spec:
        return list(ORGANS)
    chosen = {organ(s).id for s in spec.split(",") if s.strip()}
    return [o for o in ORGANS if o.id in chosen]


def _template(template: str) -> str:
    """A PROMPT_TEMPLATES name or a text with ``{organ}`` -> the template text (checked)."""
    template = PROMPT_TEMPLATES.get(template, template)
    if "{organ}" not in template:
        raise InputError(None, f"prompt template {template!r} has no {{organ}} placeholder")
    return template


def prompts(template: str = "{organ}", organs: list[Organ] | None = None) -> list[str]:
    template = _template(template)
    return [o.prompt(template) for o in (organs or ORGANS)]


# --- prompt synonyms: another wording of each organ, to test how brittle a model is to it ---------

# One synonym per organ, keyed by organ key: a radiologist's or an anatomy atlas's wording, never
# the organ's own name. `evaluate` prompts with them (through the run's template) to see whether a
# tuned model still understands the organ or only the exact words it was trained on.
PROMPT_SYNONYMS = {
    "liver": "hepatic parenchyma",
    "right_kidney": "kidney, right",
    "spleen": "splenic parenchyma",
    "pancreas": "pancreatic gland",
    "aorta": "abdominal aorta",
    "inferior_vena_cava": "IVC",
    "right_adrenal_gland": "suprarenal gland, right",
    "left_adrenal_gland": "suprarenal gland, left",
    "gallbladder": "gall bladder",
    "esophagus": "oesophagus",
    "stomach": "gaster",
    "duodenum": "proximal small intestine",
    "left_kidney": "kidney, left",
}


def synonym_prompts(template: str = "{organ}", organs: list[Organ] | None = None) -> list[str]:
    """Like :func:`prompts`, with each organ's :data:`PROMPT_SYNONYMS` entry in place of its name."""
    template = _template(template)
    return [template.format(organ=PROMPT_SYNONYMS[o.key]) for o in (organs or ORGANS)]


# --- gray encoding of label images (the original study's PNG export) -----------------------

_GRAY_LUT = np.zeros(256, dtype=np.uint8)
_LABEL_LUT = np.full(256, 255, dtype=np.uint8)  # 255 marks "not a label gray value"
_LABEL_LUT[0] = 0
for _o in ORGANS:
    _GRAY_LUT[_o.id] = _o.gray
    _LABEL_LUT[_o.gray] = _o.id


def labels_to_gray(labels: np.ndarray) -> np.ndarray:
    """FLARE22 ids (uint8, any shape) -> gray values 20*k (13 -> 255)."""
    return _GRAY_LUT[np.asarray(labels, dtype=np.uint8)]


def gray_to_labels(gray: np.ndarray) -> np.ndarray:
    """Inverse of :func:`labels_to_gray`. Raises ValueError on a gray value no label maps to."""
    out = _LABEL_LUT[np.asarray(gray, dtype=np.uint8)]
    if (out == 255).any():
        bad = sorted(set(np.unique(np.asarray(gray)[out == 255]).tolist()))
        raise ValueError(f"gray values {bad[:5]} encode no label")
    return out


# --- label maps: other datasets' ids -> FLARE22 ids ------------------------------------------

BUILTIN_LABEL_MAPS = ("flare22", "totalsegmentator", "btcv", "amos", "abdomenatlas")


@dataclass(frozen=True)
class LabelMap:
    """Source label id -> FLARE22 id (0 = background), and optionally structure name -> FLARE22 id.

    ``default`` is what an id (or a name) missing from the map becomes; ``None`` means such an id is
    unknown and ``prepare`` rejects the volume (the safe choice for a dataset you have not looked
    at). ``names`` maps the names of per-organ mask files (``--layout per-organ``) ahead of the
    built-in name table (:func:`organ_id_for_name`).
    """

    mapping: dict[int, int]
    default: int | None = None
    source: str = ""
    names: dict[str, int] = field(default_factory=dict)

    def lut(self, max_id: int) -> np.ndarray:
        """A lookup table over 0..max_id; unknown ids map to -1."""
        lut = np.full(max_id + 1, -1 if self.default is None else self.default, dtype=np.int16)
        for k, v in self.mapping.items():
            if k <= max_id:
                lut[k] = v
        return lut

    def to_dict(self) -> dict:
        doc = {
            "source": self.source,
            "default": self.default,
            "map": {str(k): v for k, v in self.mapping.items()},
        }
        return {**doc, "names": dict(self.names)} if self.names else doc


def load_label_map(spec: str | Path = "flare22") -> LabelMap:
    """Load a label map from a built-in name or a YAML/JSON file.

    ``spec`` is a built-in name (``flare22``, ``totalsegmentator``, ``btcv``, ``amos``,
    ``abdomenatlas``) or a file with ``map: {source_id: flare22_id}``, optionally ``default: 0`` and
    ``names: {file_name: flare22_id}`` (per-organ mask files). Without ``default``, source ids (and
    names) not in the map are unknown and rejected by ``prepare``; map a structure to 0 to drop it
    on purpose.
    """
    spec = str(spec)
    if spec in BUILTIN_LABEL_MAPS:
        text = resources.files("clipseg_bench.label_maps").joinpath(f"{spec}.yaml").read_text()
        src = f"<built-in {spec}>"
    else:
        path = Path(spec)
        if not path.is_file():
            raise InputError(path, f"label map not found (built-in maps: {', '.join(BUILTIN_LABEL_MAPS)})")
        text, src = path.read_text(), str(path)
    try:
        doc = yaml.safe_load(text)
        structured = isinstance(doc, dict) and ("map" in doc or "names" in doc)
        raw = (doc.get("map") or {}) if structured else doc
        mapping = {int(k): int(v) for k, v in raw.items()}
        default = doc.get("default") if structured else None
        default = None if default is None else int(default)
        names = (
            {_normalized_name(k): int(v) for k, v in (doc.get("names") or {}).items()} if structured else {}
        )
    except Exception as exc:  # yaml errors, missing key, non-integers
        raise InputError(src, f"not a valid label map ({exc.__class__.__name__}: {exc})") from None
    bad = {v for v in [*mapping.values(), *names.values()] if v != 0 and v not in BY_ID}
    if bad:
        raise InputError(src, f"maps onto unknown FLARE22 ids {sorted(bad)}")
    mapping.setdefault(0, 0)
    return LabelMap(mapping=mapping, default=default, source=spec, names=names)


def organ_table() -> list[dict]:
    """The organ table as plain dicts, for dataset.json and reports."""
    return [o.to_dict() for o in ORGANS]


# --- dataset label names -> FLARE22 ids (dataset.json labels, per-organ mask file names) ----------
# Kept as its own block: the names datasets give their structures, not the prompts we give CLIPSeg.

# Every spelling below is normalised by _normalized_name (lower case; "_" and "-" become spaces).
_NAME_SYNONYMS: dict[str, tuple[str, ...]] = {
    "liver": ("liver",),
    "right_kidney": ("right kidney", "kidney right", "kidney r", "r kidney"),
    "spleen": ("spleen",),
    "pancreas": ("pancreas",),
    "aorta": ("aorta", "abdominal aorta", "arota"),  # "arota": AMOS22's dataset.json spells it so
    "inferior_vena_cava": ("inferior vena cava", "ivc", "postcava", "vena cava inferior"),
    "right_adrenal_gland": ("right adrenal gland", "adrenal gland right", "right adrenal", "adrenal right"),
    "left_adrenal_gland": ("left adrenal gland", "adrenal gland left", "left adrenal", "adrenal left"),
    "gallbladder": ("gallbladder", "gall bladder"),
    "esophagus": ("esophagus", "oesophagus"),
    "stomach": ("stomach",),
    "duodenum": ("duodenum",),
    "left_kidney": ("left kidney", "kidney left", "kidney l", "l kidney"),
}
# Structures public abdominal datasets label that are not FLARE22 organs and lie outside them (or,
# for the portal/splenic vein, are dropped as the btcv and amos maps drop them): background.
# Lesions inside an organ ("liver tumour") are not here on purpose: whether they belong to the organ
# or to the background is the user's call, made with --label-map.
_NOT_FLARE22_NAMES = (
    "background",
    "bladder",
    "urinary bladder",
    "prostate",
    "uterus",
    "prostate/uterus",
    "portal vein and splenic vein",
)
LABEL_NAME_IDS: dict[str, int] = {
    **{n: 0 for n in _NOT_FLARE22_NAMES},
    **{n: BY_KEY[key].id for key, spellings in _NAME_SYNONYMS.items() for n in spellings},
}


def _normalized_name(name: str) -> str:
    return " ".join(str(name).strip().lower().replace("_", " ").replace("-", " ").split())


def organ_id_for_name(name: str, label_map: LabelMap | None = None) -> int | None:
    """The FLARE22 id a dataset's structure name stands for.

    Args:
        name: e.g. ``"kidney_right"``, ``"Right Kidney"``, ``"postcava"`` (case, ``_`` and ``-``
            do not matter).
        label_map: its ``names`` decide first; its ``default`` answers for names nothing knows.

    Returns:
        1..13 for a FLARE22 organ, 0 for background or a known structure FLARE22 does not score
        (bladder, prostate/uterus...), None for a name nothing maps.
    """
    key = _normalized_name(name)
    if label_map is not None and key in label_map.names:
        return label_map.names[key]
    if key in LABEL_NAME_IDS:
        return LABEL_NAME_IDS[key]
    return None if label_map is None else label_map.default


def label_map_from_names(names: dict[int, str], source: str) -> LabelMap:
    """A label map from the names a dataset declares for its ids (``dataset.json`` ``labels``).

    Args:
        names: source id -> structure name, e.g. ``{0: "background", 1: "spleen", 3: "liver"}``.
        source: where the names come from, for messages and dataset.json.

    Raises:
        InputError: naming ``source`` when a name maps to nothing (a tumour, an unknown structure):
            the user decides with ``--label-map`` whether it is background or part of an organ.
    """
    mapping = {0: 0}
    for sid, name in sorted(names.items()):
        target = 0 if sid == 0 else organ_id_for_name(name)
        if target is None:
            raise InputError(
                source,
                f"label {sid} {name!r} is not a FLARE22 organ this tool knows by name; "
                f"give --label-map FILE with map: {{{sid}: 0}} to drop it, or the FLARE22 id it belongs to",
            )
        mapping[sid] = target
    taken: dict[int, int] = {}
    for sid, target in mapping.items():
        if target and target in taken:
            raise InputError(
                source,
                f"labels {taken[target]} {names[taken[target]]!r} and {sid} {names[sid]!r} both name "
                f"{BY_ID[target].name}; give --label-map FILE to say which ids it is",
            )
        taken[target] = sid
    return LabelMap(mapping=mapping, default=None, source=source)
