"""Structure tables: which label value is which bone or muscle.

Built in: TotalSegmentator v1 (104 classes), TotalSegmentator v2 (117 classes) and the
22-class hip/thigh set of the MSKdeX paper. Custom tables load from CSV or JSON with columns
``label,name[,kind][,side][,color]``. Lookup by label value and by name; names are matched
loosely, so Slicer segment names ("Gluteus Medius Left", "left gluteus medius muscle") resolve.
"""

from __future__ import annotations

import colorsys
import csv
import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Mapping

from ..errors import UserError, listing

KINDS = ("muscle", "bone", "other")


@dataclass(frozen=True)
class Structure:
    """One labelled structure. ``color`` is RGB in 0..255."""

    label: int
    name: str
    kind: str = "other"
    side: str = "none"  # "left", "right" or "none"
    color: tuple[int, int, int] = (128, 128, 128)

    @property
    def display_name(self) -> str:
        """Human-readable name, e.g. 'gluteus medius left'."""
        return self.name.replace("_", " ")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["color"] = list(self.color)
        return d


def normalize_name(name: str) -> str:
    """Canonical key of a structure name.

    Lower case, words joined by '_', side words moved to the end, filler words ('muscle',
    'the', 'of') dropped: 'Left Gluteus Medius Muscle' -> 'gluteus_medius_left'.
    """
    words = [w for w in re.split(r"[^a-z0-9]+", str(name).lower()) if w]
    side = [w for w in words if w in ("left", "right")]
    words = [w for w in words if w not in ("left", "right", "muscle", "muscles", "the", "of", "m")]
    return "_".join(words + side[-1:])


class StructureTable:
    """An ordered set of structures, looked up by label value or by (loosely matched) name."""

    def __init__(self, name: str, structures: Iterable[Structure]):
        self.name = name
        self.structures: list[Structure] = sorted(structures, key=lambda s: s.label)
        self._by_label = {s.label: s for s in self.structures}
        self._by_key = {normalize_name(s.name): s for s in self.structures}
        if len(self._by_label) != len(self.structures):
            raise UserError(f"structure table '{name}' has duplicate label values")

    def __len__(self) -> int:
        return len(self.structures)

    def __iter__(self):
        return iter(self.structures)

    def __contains__(self, label: object) -> bool:
        return label in self._by_label

    def by_label(self, label: int) -> Structure:
        try:
            return self._by_label[int(label)]
        except KeyError:
            raise UserError(f"label {label} is not in structure table '{self.name}'") from None

    def find(self, name: str) -> Structure | None:
        """The structure whose name matches ``name`` loosely, or None."""
        key = normalize_name(name)
        if key in self._by_key:
            return self._by_key[key]
        alias = _ALIASES.get(key)
        return self._by_key.get(alias) if alias else None

    def by_name(self, name: str) -> Structure:
        s = self.find(name)
        if s is None:
            raise UserError(f"unknown structure name '{name}' (table '{self.name}')")
        return s

    def select(self, names: Iterable[str] | None = None, kinds: Iterable[str] | None = None,
               labels_present: Iterable[int] | None = None) -> list[Structure]:
        """Structures by name and/or kind, restricted to labels present when given."""
        chosen = list(self.structures)
        if names:
            chosen = [self.by_name(n) for n in names]
        if kinds:
            kinds = set(kinds)
            bad = kinds - set(KINDS)
            if bad:
                raise UserError(f"unknown structure kind(s) {sorted(bad)}; use one of {KINDS}")
            chosen = [s for s in chosen if s.kind in kinds]
        if labels_present is not None:
            present = set(int(v) for v in labels_present)
            chosen = [s for s in chosen if s.label in present]
        return chosen

    def to_dict(self) -> dict:
        return {"name": self.name, "structures": [s.to_dict() for s in self.structures]}


# ---------------------------------------------------------------------------------------------
# Built-in tables
# ---------------------------------------------------------------------------------------------
_ALIASES = {
    "hip_bone_left": "hip_left",
    "hip_bone_right": "hip_right",
    "iliopsoas_muscle_left": "iliopsoas_left",
    "erector_spinae_left": "autochthon_left",
    "erector_spinae_right": "autochthon_right",
    "adductors": "adductor_muscles",
    "vastus_lateralis": "vastus_lateralis_intermedius",
    "tfl": "tensor_fasciae_latae",
}

_BONE_COLOR = (241, 214, 145)

# A perceptually spread palette for muscles (RGB 0..255), used in table order.
_MUSCLE_PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
    (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195),
    (128, 128, 0), (255, 215, 180), (0, 0, 128),
]



def colour_of(name: str, kind: str) -> tuple[int, int, int]:
    """A stable, distinct display colour for a structure name."""
    if kind == "bone":
        return _BONE_COLOR
    h = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    sat, val = (0.75, 0.95) if kind == "muscle" else (0.35, 0.75)
    r, g, b = colorsys.hsv_to_rgb(h, sat, val)
    return (round(r * 255), round(g * 255), round(b * 255))


_MUSCLE_WORDS = ("gluteus", "autochthon", "iliopsoas")
_BONE_WORDS = ("vertebrae", "rib_", "humerus", "scapula", "clavicula", "femur", "hip_", "sacrum",
               "skull", "sternum")


def kind_of(name: str) -> str:
    """Kind of a structure from its (normalised) name: muscle, bone or other."""
    if name.startswith(_MUSCLE_WORDS):
        return "muscle"
    if name.startswith(_BONE_WORDS):
        return "bone"
    return "other"


def side_of(name: str) -> str:
    """Side of a structure from its (normalised) name: left, right or none."""
    for side in ("left", "right"):
        if name.endswith("_" + side):
            return side
    return "none"


def _table(name: str, names: list[str], kinds: Mapping[str, str] | None = None) -> StructureTable:
    """A built-in table; muscles take distinct colours from the curated palette, in order."""
    kinds = kinds or {}
    out, m = [], 0
    for label, n in enumerate(names, start=1):
        kind = kinds.get(n, kind_of(n))
        color = colour_of(n, kind)
        if kind == "muscle":
            color, m = _MUSCLE_PALETTE[m % len(_MUSCLE_PALETTE)], m + 1
        out.append(Structure(label, n, kind, side_of(n), color))
    return StructureTable(name, out)


def _vertebrae(first: str, last: str) -> list[str]:
    order = ["S1"] + [f"L{i}" for i in range(5, 0, -1)] + [f"T{i}" for i in range(12, 0, -1)] + \
        [f"C{i}" for i in range(7, 0, -1)]
    a, b = order.index(first), order.index(last)
    return [f"vertebrae_{v}" for v in order[a:b + 1]]


def _ribs(side: str) -> list[str]:
    return [f"rib_{side}_{i}" for i in range(1, 13)]


_TOTALSEG_V1 = (
    ["spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "aorta",
     "inferior_vena_cava", "portal_vein_and_splenic_vein", "pancreas", "adrenal_gland_right",
     "adrenal_gland_left", "lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right",
     "lung_middle_lobe_right", "lung_lower_lobe_right"]
    + _vertebrae("L5", "C1")
    + ["esophagus", "trachea", "heart_myocardium", "heart_atrium_left", "heart_ventricle_left",
       "heart_atrium_right", "heart_ventricle_right", "pulmonary_artery", "brain",
       "iliac_artery_left", "iliac_artery_right", "iliac_vena_left", "iliac_vena_right",
       "small_bowel", "duodenum", "colon"]
    + _ribs("left") + _ribs("right")
    + ["humerus_left", "humerus_right", "scapula_left", "scapula_right", "clavicula_left",
       "clavicula_right", "femur_left", "femur_right", "hip_left", "hip_right", "sacrum", "face",
       "gluteus_maximus_left", "gluteus_maximus_right", "gluteus_medius_left",
       "gluteus_medius_right", "gluteus_minimus_left", "gluteus_minimus_right",
       "autochthon_left", "autochthon_right", "iliopsoas_left", "iliopsoas_right",
       "urinary_bladder"]
)

_TOTALSEG_V2 = (
    ["spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas",
     "adrenal_gland_right", "adrenal_gland_left", "lung_upper_lobe_left", "lung_lower_lobe_left",
     "lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right", "esophagus",
     "trachea", "thyroid_gland", "small_bowel", "duodenum", "colon", "urinary_bladder",
     "prostate", "kidney_cyst_left", "kidney_cyst_right", "sacrum"]
    + _vertebrae("S1", "C1")
    + ["heart", "aorta", "pulmonary_vein", "brachiocephalic_trunk", "subclavian_artery_right",
       "subclavian_artery_left", "common_carotid_artery_right", "common_carotid_artery_left",
       "brachiocephalic_vein_left", "brachiocephalic_vein_right", "atrial_appendage_left",
       "superior_vena_cava", "inferior_vena_cava", "portal_vein_and_splenic_vein",
       "iliac_artery_left", "iliac_artery_right", "iliac_vena_left", "iliac_vena_right",
       "humerus_left", "humerus_right", "scapula_left", "scapula_right", "clavicula_left",
       "clavicula_right", "femur_left", "femur_right", "hip_left", "hip_right", "spinal_cord",
       "gluteus_maximus_left", "gluteus_maximus_right", "gluteus_medius_left",
       "gluteus_medius_right", "gluteus_minimus_left", "gluteus_minimus_right",
       "autochthon_left", "autochthon_right", "iliopsoas_left", "iliopsoas_right", "brain",
       "skull"]
    + _ribs("left") + _ribs("right")
    + ["sternum", "costal_cartilages"]
)

_HIP22 = [
    "pelvis", "femur", "adductor_muscles", "biceps_femoris", "gluteus_maximus", "gluteus_medius",
    "gluteus_minimus", "gracilis", "iliacus", "obturator_externus", "obturator_internus",
    "pectineus", "piriformis", "psoas_major", "rectus_femoris", "sartorius", "semimembranosus",
    "semitendinosus", "tensor_fasciae_latae", "vastus_lateralis_intermedius", "vastus_medialis",
    "sacrum",
]
_HIP22_KINDS = {n: ("bone" if n in ("pelvis", "femur", "sacrum") else "muscle") for n in _HIP22}



def _hip22_table() -> StructureTable:
    out, m = [], 0
    for label, n in enumerate(_HIP22, start=1):
        kind = _HIP22_KINDS[n]
        if kind == "muscle":
            color, m = _MUSCLE_PALETTE[m], m + 1
        else:
            color = _BONE_COLOR
        out.append(Structure(label, n, kind, "none", color))
    return StructureTable("hip22", out)


BUILTIN_TABLES: dict[str, StructureTable] = {
    "totalseg_v1": _table("totalseg_v1", _TOTALSEG_V1),
    "totalseg_v2": _table("totalseg_v2", _TOTALSEG_V2, {"costal_cartilages": "other"}),
    "hip22": _hip22_table(),
}
assert len(BUILTIN_TABLES["totalseg_v1"]) == 104 and len(BUILTIN_TABLES["totalseg_v2"]) == 117


def get_table(name_or_path: str | Path) -> StructureTable:
    """A built-in table by name ('totalseg_v1', 'totalseg_v2', 'hip22') or a CSV/JSON file."""
    key = str(name_or_path)
    if key in BUILTIN_TABLES:
        return BUILTIN_TABLES[key]
    path = Path(key)
    if path.suffix.lower() in (".csv", ".json", ".tsv") or path.exists():
        return load_table(path)
    raise UserError(f"unknown structure table '{key}'; use one of {sorted(BUILTIN_TABLES)} "
                    "or a .csv/.json file")


def _parse_color(value, name: str, path: Path) -> tuple[int, int, int] | None:
    if value in (None, ""):
        return None
    if isinstance(value, str):
        v = value.strip()
        if v.startswith("#") and len(v) == 7:
            return tuple(int(v[i:i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]
        value = [p for p in re.split(r"[ ,;]+", v) if p]
    try:
        rgb = [float(c) for c in value]
    except (TypeError, ValueError):
        raise UserError(f"bad colour {value!r} for structure '{name}'", path) from None
    if len(rgb) != 3:
        raise UserError(f"colour of '{name}' needs 3 components", path)
    if max(rgb) <= 1.0:
        rgb = [c * 255 for c in rgb]
    return tuple(int(round(c)) for c in rgb)  # type: ignore[return-value]


def load_table(path: str | Path) -> StructureTable:
    """A custom table from CSV/TSV (header ``label,name[,kind][,side][,color]``) or JSON.

    JSON: ``{"name": ..., "structures": [{"label": 1, "name": "...", "kind": ...}, ...]}`` or a
    plain list of such objects. Missing kinds are guessed from the name; colours may be
    ``#rrggbb``, ``"r g b"`` (0..255) or three floats in 0..1.
    """
    path = Path(path)
    if not path.exists():
        raise UserError("structure table file not found", path)
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text())
            rows = data["structures"] if isinstance(data, dict) else data
            title = data.get("name", path.stem) if isinstance(data, dict) else path.stem
        else:
            text = path.read_text()
            dialect = csv.Sniffer().sniff(text.splitlines()[0], delimiters=",;\t")
            rows = list(csv.DictReader(text.splitlines(), dialect=dialect))
            title = path.stem
    except (OSError, ValueError, KeyError, csv.Error) as exc:
        raise UserError(f"cannot read structure table ({exc})", path) from None
    out = []
    for row in rows:
        row = {str(k).strip().lower(): v for k, v in row.items()}
        try:
            label = int(str(row.get("label", row.get("id", ""))).strip())
            name = str(row["name"]).strip()
        except (KeyError, ValueError):
            raise UserError(f"each row needs an integer 'label' and a 'name' (got {row})", path) from None
        if label <= 0 or not name:
            raise UserError(f"bad row {row}: label must be > 0 and name non-empty", path)
        kind = (row.get("kind") or kind_of(normalize_name(name))).strip().lower()
        if kind not in KINDS:
            raise UserError(f"structure '{name}' has unknown kind '{kind}' (use {KINDS})", path)
        side = (row.get("side") or side_of(normalize_name(name))).strip().lower()
        color = _parse_color(row.get("color", row.get("colour")), name, path) or colour_of(name, kind)
        out.append(Structure(label, name, kind, side, color))
    if not out:
        raise UserError("structure table has no rows", path)
    return StructureTable(title, out)


# ---------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------
@dataclass
class TableMatch:
    """Which table a label map or segment list matches, and how sure that is (0..1)."""

    table: StructureTable
    confidence: float
    unknown: list  # label values or names the table does not know
    scores: dict[str, float]

    def describe(self) -> str:
        text = f"{self.table.name} (confidence {self.confidence:.2f})"
        if self.unknown:
            text += f"; not in the table: {listing(self.unknown, 10)}"
        return text


_AIR = ("lung", "trachea")


def _expected_hu_ok(structure: Structure, mean_hu: float) -> float:
    """Plausibility in [0, 1] that a label with this mean HU is this structure."""
    n = structure.name
    if n.startswith(_AIR):
        return 1.0 if mean_hu < -300 else 0.0
    if structure.kind == "bone" and not n.startswith("costal"):
        return 1.0 if mean_hu > 120 else 0.0
    return 1.0 if -250 < mean_hu < 200 else 0.0


def detect_table(label_counts: Mapping[int, int], mean_hu: Mapping[int, float] | None = None,
                 candidates: Iterable[str] = ("totalseg_v1", "totalseg_v2", "hip22")) -> TableMatch:
    """Guess the built-in table of a label map.

    ``label_counts`` maps label value -> voxel count (background 0 ignored). With
    ``mean_hu`` (label -> mean CT number) each label is also checked for the tissue it should
    be (air, bone or soft tissue), which tells the TotalSegmentator versions apart. The score
    is the voxel-weighted fraction of labels that the table knows and whose HU fits.
    """
    counts = {int(k): int(v) for k, v in label_counts.items() if int(k) != 0 and v > 0}
    if not counts:
        raise UserError("the label map is empty (no non-zero label)")
    total = float(sum(counts.values()))
    scores, unknowns = {}, {}
    for name in candidates:
        table = BUILTIN_TABLES[name]
        score = 0.0
        unknowns[name] = sorted(k for k in counts if k not in table)
        for label, n in counts.items():
            if label in table:
                fit = 1.0 if mean_hu is None else _expected_hu_ok(table.by_label(label), mean_hu[label])
                score += fit * n
        scores[name] = score / total
    best = max(scores, key=lambda k: (scores[k], -len(unknowns[k])))
    ranked = sorted(scores.values(), reverse=True)
    margin = ranked[0] - (ranked[1] if len(ranked) > 1 else 0.0)
    # Confident when the best table explains the labels and clearly beats the runner-up.
    confidence = scores[best] * min(1.0, 0.5 + 5 * margin)
    return TableMatch(BUILTIN_TABLES[best], round(confidence, 4), unknowns[best], scores)


def detect_table_from_names(names: Iterable[str],
                            candidates: Iterable[str] = ("totalseg_v1", "totalseg_v2", "hip22")
                            ) -> TableMatch:
    """Guess the built-in table of a list of segment names (e.g. a Slicer segmentation)."""
    names = [n for n in names if str(n).strip()]
    if not names:
        raise UserError("the segmentation has no named segments")
    scores, unknowns = {}, {}
    for cand in candidates:
        table = BUILTIN_TABLES[cand]
        unknowns[cand] = [n for n in names if table.find(n) is None]
        scores[cand] = 1.0 - len(unknowns[cand]) / len(names)
    best = max(scores, key=scores.get)
    ranked = sorted(scores.values(), reverse=True)
    margin = ranked[0] - (ranked[1] if len(ranked) > 1 else 0.0)
    confidence = scores[best] * min(1.0, 0.5 + 5 * margin)
    return TableMatch(BUILTIN_TABLES[best], round(confidence, 4), unknowns[best], scores)
