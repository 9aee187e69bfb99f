"""The validation layer: numbers from users (options, config fields) and computed quantities."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

from MSKdeXLib.errors import UserError
from MSKdeXLib.io.outputs import json_text, write_json
from MSKdeXLib.learning.dataset.builder import DatasetSettings
from MSKdeXLib.projection.geometry import Camera
from MSKdeXLib.projection.simulate import SimulationSettings
from MSKdeXLib.validation import (NonFiniteError, bounded_int, check_int, check_number, check_positive,
                                  check_window, finite_float, finite_or_none, nonfinite_summary,
                                  require_finite)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), "nan", None, "abc", True])
def test_check_number_refuses_non_numbers_naming_the_option(value):
    with pytest.raises(UserError, match=r"^--sid must be"):
        check_number("--sid", value)


def test_check_number_ranges():
    assert check_number("x", "2.5", low=0) == 2.5
    assert check_positive("lr", 1e-4) == 1e-4
    with pytest.raises(UserError, match=r"lr must be > 0, got -1"):
        check_positive("lr", -1)
    with pytest.raises(UserError, match=r"lr must be > 0"):
        check_positive("lr", 0)
    with pytest.raises(UserError, match=r"steps must be >= 0"):
        check_int("steps", -1, low=0)
    with pytest.raises(UserError, match=r"whole number"):
        check_int("steps", 1.5)
    with pytest.raises(UserError, match=r"low < high"):
        check_window("--lean-window", (150, -29))
    assert check_window("--lean-window", (-29, 150)) == (-29.0, 150.0)


def test_argparse_types_give_one_line_naming_the_option(capsys):
    p = argparse.ArgumentParser(prog="t")
    p.add_argument("--sid", type=finite_float(min=1.0))
    p.add_argument("--steps", type=bounded_int(min=0))
    for argv in (["--sid", "nan"], ["--sid", "inf"], ["--sid", "0.5"], ["--steps", "-1"]):
        with pytest.raises(SystemExit) as exc:
            p.parse_args(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert argv[0] in err and ("finite" in err or ">=" in err), err
    assert p.parse_args(["--sid", "1000"]).sid == 1000.0


def test_require_finite_counts_and_names():
    require_finite("pose", np.eye(4))
    a = np.eye(4)
    a[0, 0] = np.nan
    a[1, 1] = np.inf
    with pytest.raises(NonFiniteError, match=r"pose is not finite at step 3 \(2 of 16 values"):
        require_finite("pose", a, "step 3")
    with pytest.raises(NonFiniteError):
        require_finite("loss", float("nan"))


def test_nonfinite_summary_reports_count_and_box():
    a = np.zeros((10, 10, 10), np.float32)
    a[2:4, 5:6, 7:10] = np.nan
    text = nonfinite_summary(a)
    assert text.startswith("6 non-finite voxels (NaN 6, inf 0)") and "[2:4, 5:6, 7:10]" in text


def test_json_is_strict(tmp_path):
    doc = {"a": float("nan"), "b": [1.0, np.float32("inf")], "c": np.array([np.nan, 2.0]), "d": np.int64(3)}
    assert finite_or_none(doc)["a"] is None
    text = json_text(doc)
    parsed = json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    assert parsed == {"a": None, "b": [1.0, None], "c": [None, 2.0], "d": 3}
    write_json(tmp_path / "x.json", {"nan": math.nan})
    assert json.loads((tmp_path / "x.json").read_text()) == {"nan": None}


def test_listing_never_cuts_silently():
    from MSKdeXLib.errors import listing

    assert listing(["a", "b"]) == "a, b"
    assert listing([f"c{i}" for i in range(11)]) == "c0, c1, c2, c3, c4 and 6 more"


def test_diverged_loss_message_and_resumable_folder(tmp_path):
    import torch

    from MSKdeXLib.io.outputs import resumable_folder
    from MSKdeXLib.learning.training import _require_finite_loss

    _require_finite_loss({"total": torch.tensor(1.0)}, 7, None)
    with pytest.raises(NonFiniteError, match=r"loss l1 is not finite at step 8; no model written; the checkpoint "
                                             r"of step 5 is kept"):
        _require_finite_loss({"l1": torch.tensor(float("nan")), "total": torch.tensor(1.0)}, 7, 5)
    for keep in (False, True):
        out = tmp_path / f"run{keep}"
        with pytest.raises(KeyboardInterrupt):
            with resumable_folder(out, lambda p: (p / "checkpoint.json").exists()):
                out.mkdir()
                if keep:
                    (out / "checkpoint.json").write_text("{}")
                raise KeyboardInterrupt
        assert out.exists() == keep


def test_check_finite_fields_names_the_field():
    from dataclasses import dataclass

    from MSKdeXLib.validation import check_finite_fields

    @dataclass
    class Geometry:
        sid_mm: float = 1000.0
        spacing_mm: tuple = (1.0, 1.0)
        name: str = "ap"
        window: tuple | None = None

    check_finite_fields(Geometry())
    with pytest.raises(UserError, match=r"Geometry\.sid_mm must be finite, got nan"):
        check_finite_fields(Geometry(sid_mm=float("nan")))
    with pytest.raises(UserError, match=r"Geometry\.spacing_mm must be finite"):
        check_finite_fields(Geometry(spacing_mm=(1.0, float("inf"))))
    check_finite_fields(Geometry(sid_mm=float("nan")), skip=("sid_mm",))



@pytest.mark.parametrize("make, field", [
    (lambda: Camera(rows=8, cols=8, spacing_row_mm=1.0, spacing_col_mm=1.0, sid_mm=float("nan")), "Camera.sid_mm"),
    (lambda: SimulationSettings(filtration_mm_al=float("inf")), "SimulationSettings.filtration_mm_al"),
    (lambda: DatasetSettings(pixel_spacing_mm=(1.0, float("nan"))), "DatasetSettings.pixel_spacing_mm"),
])
def test_settings_objects_refuse_non_finite_fields_from_python(make, field):
    """Called from Python (not only through the CLI), the settings refuse NaN/inf naming the field."""
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        make()
