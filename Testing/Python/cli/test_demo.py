"""`mskdex demo --quick`: the whole pipeline on the real sample CT, with its report."""

from __future__ import annotations

import json
import math
from pathlib import Path

from MSKdeXLib.cli import main


def test_demo_quick_writes_report_with_estimates_vs_truth(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--progress", "none"]) == 0
    assert "report:" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert "virtual" in report and "Estimates vs truth" in report and "Mean PCC" in report
    assert summary["mean_pcc"] and all(math.isfinite(v) and -1 <= v <= 1 for v in summary["mean_pcc"].values())
    for f in ("overlay.png", "report.html", "evaluation/scatter_mass_g.png", "evaluation/evaluation.csv",
              "model/model.safetensors", "model/config.json", "dataset/dataset.json"):
        assert (out / f).exists(), f
    # the demo trains the paper's configuration: bones paired, muscles unpaired (GAN + OWIS), and says so
    trained = json.loads((out / "model" / "config.json").read_text())["training"]["losses"]
    assert trained == summary["losses"] and trained["muscle_l1"] == 0 and trained["gan"] > 0
    assert trained["intensity_sum"] > 0 and trained["l1"] > 0
    assert "as in the paper, the muscles were unpaired" in report and "paired L1 loss was used" not in report
    # ... with a discriminator that sees the true bones (placement; see DEMO_TRAINING), and says so
    assert summary["discriminator"]["condition"] == "bones" and "bone-conditioned GAN" in report
    # the channel images are compared with the held-out subjects' true projections
    agree = json.loads((out / "evaluation" / "channel_agreement.json").read_text())
    assert agree["n_subjects"] == 3 and agree["kind_mean"] == summary["channel_agreement"]
    assert {"muscle", "bone"} <= set(agree["kind_mean"])
    assert all(-1 <= p["mean_r"] <= 1 and p["n"] == 3 for p in agree["per_channel"])
    assert "true projections" in report and f"{agree['kind_mean']['muscle']['mass_g']:.2f}" in report
    held = summary["heldout"]
    assert len(held) == 3 and len(list((out / "predictions").glob("*.json"))) == 3
    # every held-out subject has a table row whose truth values are its metrics.json
    from MSKdeXLib.demo import _fmt

    muscles = [c["structure"] for c in summary["channels"] if c["kind"] == "muscle" and c["quantity"] == "mass_g"]
    for name in held:
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")][1:]
        truth = {r["name"]: r for r in json.loads((out / "cohort" / name / "metrics.json").read_text())["structures"]}
        assert len(cells) == len(muscles)
        for cell, m in zip(cells, muscles):
            assert cell.split(" / ")[1].split(" (")[0] == _fmt(truth[m]["mass_g"])
    # held-out subjects were not trained on, nor calibrated on; the calibration subjects are the val split
    records = json.loads((out / "dataset" / "dataset.json").read_text())["records"]
    assert not {r["source"].split("/")[-1] for r in records} & set(held)
    val = [r for r in records if r["split"] == "val"]
    assert len(val) == 3 and len(records) == 7
    # the interval is calibrated on them, and its held-out coverage is reported
    assert summary["interval"]["calibrated"] and summary["interval"]["calibration_records"] == 3
    cov = summary["interval_coverage"]["overall"]
    assert cov["n"] == 3 * len(summary["channels"]) and 0 <= cov["coverage"] <= 1
    assert f"covers the truth for **{cov['coverage']:.0%}**" in report
    # built in a staging folder beside --out and renamed into place: no staging folder is left, and
    # the paths the JSON files record name the final folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
    assert not [f for f in out.rglob("*.json") if ".partial-" in f.read_text()]
    ckpt = json.loads((out / "model" / "checkpoint.json").read_text())
    assert Path(ckpt["config"]["data"]["dir"]) == (out / "dataset").resolve()
    # an existing output folder is refused without --force (one-line error, exit code 2)
    assert main(["demo", "--quick", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err


def test_paired_muscles_option_swaps_the_gan_for_muscle_l1_and_the_report_says_so():
    from MSKdeXLib.demo import DemoSettings, losses_text, training_config

    paper, paired = training_config(DemoSettings()), training_config(DemoSettings(paired_muscles=True))
    assert paper["losses"]["muscle_l1"] == 0 and paper["losses"]["gan"] > 0 and paper["losses"]["feature_matching"] > 0
    assert paired["losses"]["muscle_l1"] > 0 and paired["losses"]["gan"] == 0 and paired["losses"]["feature_matching"] == 0
    assert {k: v for k, v in paper.items() if k != "losses"} == {k: v for k, v in paired.items() if k != "losses"}
    assert "as in the paper, the muscles were unpaired" in losses_text(paper["losses"])
    assert "paired L1 loss was used" in losses_text(paired["losses"])
    assert "bone-conditioned GAN" in losses_text(paper["losses"], paper["discriminator"]["condition"])
    assert "conditional GAN" in losses_text(paper["losses"], "xray")
    assert "conditional" not in losses_text(paper["losses"]) and "radiograph" not in losses_text(paired["losses"], "xray")
    assert "GAN, feature-matching, cycle losses were off" in losses_text(paired["losses"])


def test_report_says_plainly_whether_the_muscles_are_placed():
    from MSKdeXLib.demo import agreement_text

    per = [{"structure": "autochthon_right", "quantity": "mass_g", "kind": "muscle", "mean_r": -0.02},
           {"structure": "gluteus_medius_left", "quantity": "mass_g", "kind": "muscle", "mean_r": 0.84},
           {"structure": "hip_left", "quantity": "mass_g", "kind": "bone", "mean_r": 0.98}]
    partly = agreement_text({"muscle": {"mass_g": 0.53, "volume_cm3": 0.55}, "bone": {"mass_g": 0.98}}, 30, per)
    assert "placed only in part" in partly and "autochthon right -0.02" in partly and "hip left" not in partly
    assert "r = **0.53**" in partly
    assert "are not placed" in agreement_text({"muscle": {"mass_g": -0.03}}, 30, per)
    assert "in their places" in agreement_text({"muscle": {"mass_g": 0.93, "volume_cm3": 0.9}}, 30)
    assert "in their places" not in agreement_text({"muscle": {"mass_g": 0.93, "volume_cm3": 0.5}}, 30)
