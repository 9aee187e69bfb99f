"""The pelvis registered on processed follow-up radiographs (issue 17, round 10): the specificity
preset's acquisitions (strong S-shaped LUT, grid-less scatter, collimation) as
``benchmarks/bench_followup.py`` draws them. On these a bone-only global search is blind (the bones
are faint beside the soft tissue), and round 9's code left good starts for poses 48-78 mm away."""

from __future__ import annotations

import pytest

from benchmarks.bench_registration_followup import followups, make_config, register_row
from MSKdeXLib.registration.settings import RegistrationSettings


@pytest.fixture(scope="module")
def subject_30000(pelvis_case, one_torch_thread):
    """Specificity subject 30000 (seed 14) and its first 6 follow-ups."""
    return followups(make_config(), 30000, 6)


def test_start_and_tissue_candidates_register_what_the_bone_only_search_lost(subject_30000):
    """Follow-up 5 (LUT strength 0.92, scatter 0.50 without grid, start 7.6 mm / 2.6 px away): round
    9's code ended 47.7 mm away (14.3 px). Now a candidate other than the bone-only search's wins,
    and the pose is within 5 mm and 1 px, not doubtful."""
    subject, fus = subject_30000
    codes, pose, acq, proc = fus[5]
    assert acq["grid"] == 0 and acq["scatter"] > 0.5 and proc["lut_strength"] > 0.5   # the processed kind
    row = register_row(subject, codes, pose, [])
    assert row["mtre_mm"] < 5.0 and row["mpd_px"] < 1.0, row["mtre_mm"]
    assert not row["doubtful"]
    kept = [s["from"] for s in row["stages"] if s["stage"] == "candidate-kept"]
    assert kept and kept[0] != "search", row["stages"]
    search = next(s["similarity"] for s in row["stages"] if s["stage"] == "candidate" and s["from"] == "search")
    assert search < RegistrationSettings().first.tissue_candidate_below   # so the tissue candidate ran:
    assert any(s["stage"] == "cma-es" and s.get("tissue") for s in row["stages"]), row["stages"]


def test_the_tissue_candidate_is_skipped_when_the_search_scores_high(subject_30000):
    """Follow-up 1 (start 4-18 mm away like the others): the bone-only search's result, refined,
    scores about 0.85 on the scoring view, above ``first.tissue_candidate_below`` (round 11): no
    tissue CMA-ES runs, and the pose is the one the full set of candidates kept in round 10
    (0.5 mm): the same similarity as with the tissue candidate forced on."""
    subject, fus = subject_30000
    codes, pose, _, _ = fus[1]
    row = register_row(subject, codes, pose, [])
    stages = row["stages"]
    search = next(s["similarity"] for s in stages if s["stage"] == "candidate" and s["from"] == "search")
    assert search >= RegistrationSettings().first.tissue_candidate_below, search
    assert not any(s["stage"] == "cma-es" and s.get("tissue") for s in stages), stages
    assert row["mtre_mm"] < 2.0 and not row["doubtful"], row["mtre_mm"]
    forced = register_row(subject, codes, pose, ["first.tissue_candidate_below=2"])
    assert any(s["stage"] == "cma-es" and s.get("tissue") for s in forced["stages"])
    assert forced["final_similarity"] == pytest.approx(row["final_similarity"], abs=2e-3)


def test_a_pelvis_lost_at_similarity_033_is_flagged(pelvis_case, one_torch_thread):
    """Subject 30002's follow-up 2 registered the old way (bone-only global search, no other
    candidate): the pelvis is lost (77.8 mm, 9.2 px) at a final similarity of about 0.33, which the
    first-body threshold of 0.3 let through; 0.4 (round 10) flags it."""
    subject, fus = followups(make_config(), 30002, 3)
    codes, pose, _, _ = fus[2]
    row = register_row(subject, codes, pose, ["first.start_candidate=false", "first.tissue_candidate=false"])
    assert row["mpd_px"] > 5.0, row["mpd_px"]
    assert 0.3 < row["final_similarity"] < 0.4 and row["doubtful"], row["final_similarity"]
