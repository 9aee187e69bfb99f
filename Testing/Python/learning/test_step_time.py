"""`mskdex train` says how long it will take before it starts, and offers a CPU-sized config."""

from __future__ import annotations

import json

import pytest
import torch

from MSKdeXLib.cli import main
from MSKdeXLib.learning.step_time import cpu_advice, duration_text, measure_step_seconds
from MSKdeXLib.learning.training import default_config, merge_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHANNELS = [{"structure": "hip_left", "quantity": "mass_g", "kind": "bone"},
            {"structure": "gluteus_medius_left", "quantity": "mass_g", "kind": "muscle"}]


def test_step_time_is_measured_with_the_configured_model_and_leaves_the_random_state_alone():
    small = merge_config({"model": {"features": [8, 16, 32], "strides": [2, 2], "num_res_units": 1},
                          "discriminator": {"width": 8, "n_layers": 2, "n_scales": 1}, "data": {"batch_size": 2}})
    bigger = merge_config({**{k: small[k] for k in ("model", "discriminator")}, "data": {"batch_size": 8}})
    state = torch.get_rng_state()
    t_small = measure_step_seconds(small, CHANNELS, (32, 32), torch.device("cpu"))
    assert torch.equal(state, torch.get_rng_state())
    t_big = measure_step_seconds(bigger, CHANNELS, (64, 64), torch.device("cpu"))
    assert 0 < t_small < t_big  # 16x the pixels per step cost more


def test_duration_text_and_cpu_advice():
    assert duration_text(45) == "45 s" and duration_text(600) == "10 min" and duration_text(4 * 3600) == "4.0 h"
    assert duration_text(20000 * 17.5) == "4.1 days"
    advice = cpu_advice(17.5, 20000)
    assert "--steps 205" in advice and "--cpu" in advice and "--device cuda" in advice


def test_cpu_config_is_a_valid_smaller_config(tmp_path, capsys):
    assert main(["train", "--write-default-config", str(tmp_path / "cpu.json"), "--cpu"]) == 0
    cpu = merge_config({k: v for k, v in json.loads((tmp_path / "cpu.json").read_text()).items() if k != "_doc"})
    gpu = default_config()
    assert cpu["steps"] < gpu["steps"] and sum(cpu["model"]["features"]) < sum(gpu["model"].get("features", [1e9]))
    assert cpu["amp"] is False and "cpu-sized" in capsys.readouterr().out
