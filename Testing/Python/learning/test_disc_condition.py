"""``discriminator.condition``: what the discriminator sees beside the unpaired (muscle) channels.
A PatchGAN on the muscle channels alone cannot tell where they sit; conditioned on the true bone
channels (or the radiograph) it judges the muscles' placement relative to them (issue 16)."""

from __future__ import annotations

import pytest
import torch

from MSKdeXLib.errors import UserError
from MSKdeXLib.learning.dataset.records import RecordDataset
from MSKdeXLib.learning.networks.discriminator import MultiScaleDiscriminator
from MSKdeXLib.learning.training import (channel_groups, discriminator_channels, discriminator_loss,
                                         generator_losses, merge_config)
from projection_dataset import parallel_projection_dataset

STRUCTS = ["hip_left", "sacrum", "gluteus_maximus_left", "gluteus_medius_left"]


@pytest.fixture(scope="module")
def batch_and_channels(pelvis, tmp_path_factory):
    ct, labels = pelvis
    ds_info = parallel_projection_dataset(ct, labels, tmp_path_factory.mktemp("cond_ds"), STRUCTS, ("mass_g",),
                                          n_records=2, size=32, seed=3)
    ds = RecordDataset(ds_info, "train", None)
    items = [ds[i] for i in range(len(ds))]
    return {k: torch.stack([it[k] for it in items]) for k in ("xray", "targets", "paired", "truth")}, ds_info.channels


@pytest.mark.parametrize("condition, extra", [("none", 0), ("bones", 2), ("xray", 1)])
def test_conditioned_discriminator_sees_bones_or_radiograph_and_depends_on_them(batch_and_channels, condition, extra):
    batch, channels = batch_and_channels
    groups = channel_groups(channels, ["muscle"], None, condition)
    n_muscle = sum(c["kind"] == "muscle" for c in channels)
    assert n_muscle == 2 and discriminator_channels(groups) == n_muscle + extra
    torch.manual_seed(0)
    disc = MultiScaleDiscriminator(discriminator_channels(groups), 8, 2, 2)
    scales = batch["targets"].mean(dim=(0, 2, 3)).clamp_min(1e-6).view(1, -1, 1, 1)
    pred = batch["targets"].flip(-1)  # muscles (and bones) mirrored: in the wrong place
    loss = float(discriminator_loss(pred, batch, scales, groups, disc).detach())
    g_loss = generator_losses(pred, None, batch, scales, groups, {"l1": 0, "gradient_correlation": 0, "muscle_l1": 0,
                              "cycle": 0, "intensity_sum": 0, "gan": 1, "feature_matching": 1}, disc, disc)
    assert set(g_loss) == {"gan", "feature_matching", "total"}
    # the condition enters both losses: changing the true bones / radiograph changes them (not with "none")
    moved = dict(batch, targets=batch["targets"].clone(), xray=batch["xray"].roll(5, -1))
    bone = [i for i, c in enumerate(channels) if c["kind"] == "bone"]
    moved["targets"][:, bone] = moved["targets"][:, bone].roll(5, -1)
    loss2 = float(discriminator_loss(pred, moved, scales, groups, disc).detach())
    assert (loss2 != loss) == (condition != "none")


def test_unknown_condition_is_a_one_line_error():
    with pytest.raises(UserError, match="discriminator.condition"):
        channel_groups([{"kind": "muscle"}], ["muscle"], None, "muscles")
    assert merge_config({})["discriminator"]["condition"] == "none"  # default: the unconditioned PatchGAN
