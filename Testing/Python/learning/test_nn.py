"""Networks and losses of the decomposition model, on tiny records projected from the real pelvis CT."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from MSKdeXLib.learning.dataset.records import RecordDataset, random_affine, warp
from projection_dataset import parallel_projection_dataset
from MSKdeXLib.learning import losses as L
from MSKdeXLib.learning.networks.discriminator import MultiScaleDiscriminator
from MSKdeXLib.learning.networks.generator import build_generator
from MSKdeXLib.learning.training import channel_groups, discriminator_loss, generator_losses

STRUCTS = ["hip_left", "gluteus_maximus_left", "gluteus_medius_left"]
TINY = {"features": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}


@pytest.fixture(scope="module")
def dataset(pelvis, tmp_path_factory):
    ct, labels = pelvis
    return parallel_projection_dataset(ct, labels, tmp_path_factory.mktemp("nn_ds"), STRUCTS,
                                       ("mass_g", "volume_cm3"), n_records=3, size=32, seed=1)


@pytest.fixture(scope="module")
def batch(dataset):
    ds = RecordDataset(dataset, "train", None)
    items = [ds[i] for i in range(len(ds))]
    return {k: torch.stack([it[k] for it in items]) for k in ("xray", "targets", "paired", "truth")}


def test_records_hold_the_ct_sums(pelvis, dataset, batch):
    """The test data itself: channel sums equal the CT metrics up to the jitter's interpolation."""
    from MSKdeXLib.anatomy.ct_metrics import structure_metrics

    ct, labels = pelvis
    m = {r.structure.name: r for r in structure_metrics(ct, labels, dataset.structures)}
    want = [getattr(m[c["structure"]], c["quantity"]) for c in dataset.channels]
    sums = batch["targets"].double().sum(dim=(2, 3))
    assert torch.allclose(sums, batch["truth"], rtol=1e-5)
    np.testing.assert_allclose(sums.numpy(), np.broadcast_to(want, sums.shape), rtol=0.02)
    assert batch["paired"][0].tolist() == [c["kind"] == "bone" for c in dataset.channels]


@pytest.mark.parametrize("arch", [TINY, {"backbone": "basicunet", "features": [4, 4, 8, 8, 16, 4]}])
def test_generator_non_negative_in_physical_units(arch, batch):
    scales = [0.5, 2.0, 1.0, 3.0, 1.0, 0.25]
    torch.manual_seed(0)
    g = build_generator({**arch, "recon_head": True}, 6, scales)
    y, rec = g(batch["xray"], reconstruct=True)
    assert y.shape == batch["targets"].shape and rec.shape == batch["xray"].shape
    assert (y >= 0).all()
    # output = softplus(raw) * scale: dividing by the scales gives the same raw softplus map
    raw = torch.nn.functional.softplus(g.backbone(batch["xray"]))
    assert torch.allclose(y, raw * torch.tensor(scales).view(1, -1, 1, 1), rtol=1e-5)


def test_owis_zero_exactly_when_sums_equal_truth(batch):
    y = batch["targets"]
    truth = y.double().sum(dim=(2, 3))
    assert float(L.intensity_sum(y, truth)) == 0.0
    for c in range(y.shape[1]):
        z = y.clone()
        z[:, c] *= 1.1
        got = float(L.intensity_sum(z, truth))
        assert got > 0
        # independent: mean over (sample, channel) of |sum - truth| / truth
        s = z.double().numpy().sum(axis=(2, 3))
        assert got == pytest.approx(np.mean(np.abs(s - truth.numpy()) / truth.numpy()), rel=1e-5)
        sq = float(L.intensity_sum(z, truth, squared=True))  # squared form: mean of squared rel. errors
        assert sq == pytest.approx(np.mean((np.abs(s - truth.numpy()) / truth.numpy()) ** 2), rel=1e-5)
        lg = float(L.intensity_sum(z, truth, form="log"))  # log-ratio form: mean |log(sum / truth)|
        assert lg == pytest.approx(np.mean(np.abs(np.log(s / truth.numpy()))), rel=1e-5)
        # restricted to the other channels (e.g. intensity_sum_kinds), the changed one is ignored
        others = torch.ones(y.shape[:2], dtype=torch.bool)
        others[:, c] = False
        assert float(L.intensity_sum(z, truth, others)) == 0.0
    assert float(L.intensity_sum(y, truth, squared=True)) == 0.0
    assert float(L.intensity_sum(y, truth, form="log")) == 0.0


def test_gradient_correlation_and_l1_invariants(batch):
    y = batch["targets"] / batch["targets"].amax(dim=(2, 3), keepdim=True)
    assert float(L.gradient_correlation(y, y)) == pytest.approx(0.0, abs=1e-5)
    assert float(L.gradient_correlation(3 * y + 2, y)) == pytest.approx(0.0, abs=1e-5)  # affine invariant
    assert float(L.gradient_correlation(-y, y)) == pytest.approx(2.0, abs=1e-4)
    mask = torch.zeros(y.shape[:2], dtype=torch.bool)
    assert float(L.paired_l1(y + 1, y, mask)) == 0.0  # empty mask: no contribution
    mask[0, 1] = True
    assert float(L.paired_l1(y + 0.5, y, mask)) == pytest.approx(0.5, rel=1e-6)


def test_warp_translation_and_sum(batch):
    """A pure 2-pixel translation equals an array shift; a scale keeps channel sums."""
    y = batch["targets"][0]
    h, w = y.shape[-2:]
    theta = torch.tensor([[1.0, 0, 2 * 2.0 / w], [0, 1.0, 0]])
    shifted = warp(y, theta, keep_sum=True)
    assert torch.allclose(shifted[..., :-2], y[..., 2:], atol=1e-5)
    rng = np.random.default_rng(3)
    cfg = {"rotation_deg": 4.0, "scale": [0.92, 1.08], "translation": 0.0}
    for _ in range(3):
        warped = warp(y, random_affine(rng, cfg, (h, w)), keep_sum=True)
        np.testing.assert_allclose(warped.sum(dim=(1, 2)).numpy(), y.sum(dim=(1, 2)).numpy(), rtol=0.03)


WEIGHTS0 = {k: 0.0 for k in ("l1", "gradient_correlation", "gan", "feature_matching", "cycle", "intensity_sum",
                             "muscle_l1")}


@pytest.mark.parametrize("name", ["l1", "gradient_correlation", "intensity_sum", "intensity_sum_sq",
                                  "intensity_sum_log", "cycle", "gan",
                                  "feature_matching", "muscle_l1", "discriminator"])
def test_one_step_lowers_each_loss(name, dataset, batch):
    torch.manual_seed(0)
    scales = (batch["targets"].sum(dim=(0, 2, 3)) / (batch["targets"] > 0).sum(dim=(0, 2, 3))).tolist()
    gen = build_generator({**TINY, "recon_head": True}, len(dataset.channels), scales)
    groups = channel_groups(dataset.channels, ["muscle"])
    disc = MultiScaleDiscriminator(int(groups["gan"].sum()), 8, 2, 2)
    b = dict(batch)
    if name == "muscle_l1":
        b["paired"] = torch.ones_like(b["paired"])  # virtual data: muscles paired too
    weights = {**WEIGHTS0, **({} if name == "discriminator" else {name: 1.0})}
    sc = gen.scales

    def value():
        with torch.no_grad():
            pred, rec = gen(b["xray"], reconstruct=True)
            if name == "discriminator":
                return float(discriminator_loss(pred, b, sc, groups, disc))
            return float(generator_losses(pred, rec, b, sc, groups, weights, disc, disc)[name])

    before = value()
    params = disc.parameters() if name == "discriminator" else gen.parameters()
    opt = torch.optim.AdamW(params, lr=1e-3 if name in ("gan", "feature_matching") else 1e-4, betas=(0.5, 0.999))
    pred, rec = gen(b["xray"], reconstruct=True)
    if name == "discriminator":
        loss = discriminator_loss(pred, b, sc, groups, disc)
    else:
        loss = generator_losses(pred, rec, b, sc, groups, weights, disc, disc)["total"]
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = value()
    assert after < before, f"{name}: {before} -> {after}"


def test_upsampling_modes_and_legacy_configs(batch):
    """New models up-sample by resize + conv (no transposed conv: no checkerboard); a config
    without ``upsample`` (written before the key existed) keeps its transposed convolutions."""
    from MSKdeXLib.learning.networks.generator import DEFAULT_ARCH, resolve_arch

    def n_transposed(g):
        return sum(isinstance(m, torch.nn.ConvTranspose2d) for m in g.modules())

    new = build_generator({**TINY, "upsample": "nontrainable"}, 2, [1.0, 1.0])
    old = build_generator(TINY, 2, [1.0, 1.0])
    assert DEFAULT_ARCH["upsample"] == "nontrainable" and resolve_arch(None)["upsample"] == "nontrainable"
    assert n_transposed(new) == 0 and n_transposed(old) == len(TINY["strides"])
    # same parameter shapes otherwise; both keep the input size
    assert sum(p.numel() for p in new.parameters()) == sum(p.numel() for p in old.parameters())
    assert new(batch["xray"]).shape[-2:] == batch["xray"].shape[-2:]
    with pytest.raises(Exception, match="upsample"):
        build_generator({**TINY, "upsample": "bicubic"}, 2, [1.0, 1.0])


def test_lsgan_label_smoothing_and_instance_noise(batch):
    """One-sided label smoothing moves the real target: a discriminator scoring reals at exactly
    ``real_label`` and fakes at 0 has zero loss; instance noise leaves the mean input unchanged."""
    from MSKdeXLib.learning.training import _noisy

    real = [[torch.full((2, 1, 4, 4), 0.9)]]
    fake = [[torch.zeros(2, 1, 4, 4)]]
    assert float(L.lsgan_discriminator(real, fake, real_label=0.9)) == 0.0
    assert float(L.lsgan_discriminator(real, fake)) == pytest.approx(0.5 * 0.01)
    x = batch["targets"]
    assert _noisy(x, 0.0) is x
    torch.manual_seed(0)
    n = _noisy(x, 0.5) - x
    assert float(n.std()) == pytest.approx(0.5, rel=0.05) and abs(float(n.mean())) < 0.02


def test_sum_head_lets_the_sums_follow_the_image(batch):
    """With instance normalisation the plain generator's channel sums hardly depend on the image;
    the sum head's per-channel log-gain (from the pooled radiograph) lets a few intensity-sum
    steps move each image's sums toward its own target (targets differing between images)."""
    x = batch["xray"]
    c = 2
    factors = torch.linspace(0.6, 1.6, x.shape[0], dtype=torch.float64)[:, None]  # per-image targets
    errors, spreads = {}, {}
    for head in (False, True):
        torch.manual_seed(0)
        gen = build_generator({**TINY, "norm": "instance", "sum_head": head, "sum_head_pool": 4}, c, [1.0] * c)
        with torch.no_grad():
            base = gen(x).double().sum(dim=(2, 3)).mean(0, keepdim=True)
        truth = base * factors  # start: right mean, wrong per-image spread
        opt = torch.optim.Adam(gen.parameters(), lr=2e-2)
        for _ in range(30):
            loss = L.intensity_sum(gen(x), truth)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            sums = gen(x).double().sum(dim=(2, 3))
        errors[head] = float(((sums - truth).abs() / truth).mean())
        spreads[head] = float((sums[-1] / sums[0]).mean())  # wanted: 1.6 / 0.6 = 2.67
    assert errors[True] < 0.1 and errors[True] < 0.5 * errors[False], errors
    assert spreads[True] > 2.0, spreads


def test_sum_head_round_trips_and_old_configs_load(batch, tmp_path):
    """A model with the sum head saves and loads (safetensors + JSON) to identical outputs;
    architectures without the key (older model configs) have no sum head."""
    from MSKdeXLib.learning.checkpoint import save_model
    from MSKdeXLib.learning.inference import load_model
    from MSKdeXLib.learning.networks.generator import DEFAULT_ARCH, resolve_arch

    assert resolve_arch(TINY)["sum_head"] is False and build_generator(TINY, 2, [1.0, 1.0]).sum_head is None
    assert resolve_arch(None)["sum_head"] == DEFAULT_ARCH["sum_head"]
    torch.manual_seed(0)
    arch = {**resolve_arch({**TINY, "sum_head": True, "sum_head_pool": 4}), "recon_head": False}
    gen = build_generator(arch, 2, [0.5, 2.0])
    with torch.no_grad():
        assert float(gen.sum_head(batch["xray"]).abs().max()) == 0.0  # starts as the plain model
        gen.sum_head.set_input_stats(batch["xray"])
        gen.sum_head.linear.weight.normal_(0, 1.0)
    gen.eval()
    structures = [{"name": "a", "kind": "muscle"}, {"name": "b", "kind": "muscle"}]
    config = {"architecture": arch, "channels": [{"structure": "a", "quantity": "mass_g", "kind": "muscle"},
                                                 {"structure": "b", "quantity": "mass_g", "kind": "muscle"}],
              "structures": structures, "channel_scales": [0.5, 2.0], "image_size": [32, 32],
              "pixel_spacing_mm": [1.0, 1.0], "normalisation": {"method": "zscore"}}
    save_model(tmp_path / "m", gen, config)
    loaded = load_model(tmp_path / "m").generator
    assert loaded.sum_head is not None and loaded.sum_head.pool == 4
    with torch.no_grad():
        gains = gen.sum_head(batch["xray"])
        assert float(gains.abs().max()) > 0.1  # the head is really used
        assert torch.equal(loaded(batch["xray"]), gen(batch["xray"]))
    # the same weights under a config without the key are refused (one-line UserError), not silently changed
    from MSKdeXLib.errors import UserError

    old = {**config, "architecture": {k: v for k, v in arch.items() if not k.startswith("sum_head")}}
    save_model(tmp_path / "old", gen, old)
    with pytest.raises(UserError, match="do not match"):
        load_model(tmp_path / "old")
