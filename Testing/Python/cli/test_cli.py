"""The command line: --help everywhere, --version, one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from MSKdeXLib.cli import SUBCOMMANDS, build_parser, main


def _run(*args):
    return subprocess.run([sys.executable, "-m", "MSKdeXLib", *args], capture_output=True, text=True)


def _available():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sorted(sub.choices)


def test_every_subcommand_is_available_and_has_help(capsys):
    names = _available()
    assert "metrics" in names
    assert set(names) <= set(SUBCOMMANDS)
    for name in names:
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0
        assert "usage: mskdex " + name in capsys.readouterr().out


def test_version():
    r = _run("--version")
    assert r.returncode == 0 and r.stdout.startswith("mskdex ")


@pytest.mark.parametrize("extra, message", [
    (["--structures", "gluteus giganticus"], "unknown structure name 'gluteus giganticus'"),
    (["--table", "nonsense_table"], "unknown structure table 'nonsense_table'"),
    (["--lean-window", "100", "-20"], "--lean-window must be (low, high) with low < high"),
])
def test_user_errors_are_one_line_exit_2(pelvis_case, extra, message):
    r = _run("metrics", "--ct", str(pelvis_case.ct), "--labels", str(pelvis_case.labels), *extra)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_missing_and_mismatched_files(pelvis_case, chest_case):
    r = _run("metrics", "--ct", "no_such_ct.nii.gz", "--labels", str(pelvis_case.labels))
    assert r.returncode == 2 and "no_such_ct.nii.gz: CT not found" in r.stderr
    r = _run("metrics", "--ct", str(pelvis_case.ct), "--labels", str(chest_case.labels))
    assert r.returncode == 2 and "differs from the CT's" in r.stderr and "mask.nii.gz" in r.stderr
    r = _run("metrics", "--ct", str(pelvis_case.ct))
    assert r.returncode == 2 and "--labels" in r.stderr
