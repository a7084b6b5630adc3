"""Plots write real images from real pruning results; the report carries method extras."""

import json

import pytest
import torch

import hwprune as hp
from hwprune.errors import HwpruneError
from hwprune.report import weights_of
from hwprune.report.plots import (
    alpha_histograms,
    block_size_histograms,
    kept_fraction_bars,
    mask_images,
    mask_metric_curves,
    write_plots,
)

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def psp_run(tiny, x8):
    pruner = hp.PSP(tiny, "channel", threshold=0.05, targets=["conv2", "conv3"])
    with torch.no_grad():
        for a in pruner.alphas(live=True).values():
            a[: a.numel() // 4] = 0.01  # a quarter of each layer's channels below threshold
    pruner.step()
    return tiny, pruner, x8


def test_report_carries_psp_extras(psp_run):
    model, pruner, x = psp_run
    rep = hp.report(model, x, pruner=pruner)
    rows = {r.name: r for r in rep.rows}
    assert rows["conv2.weight"].structure == "channel"
    assert rows["conv1.weight"].structure == "-" and rows["conv1.weight"].extras == {}
    extras = rows["conv3.weight"].extras
    assert extras["pruned_fraction"] == 0.25 and extras["threshold"] == 0.05
    assert len(extras["alpha"]) == 16 and extras["alpha_abs_min"] == pytest.approx(0.01)
    assert rows["conv3.weight"].kept_channels == 0.75
    md = rep.to_markdown()
    assert "Method extras" in md and "pruned_fraction" in md
    assert json.loads(rep.to_json())["rows"][2]["extras"]["pruned_fraction"] == 0.25
    pruner.finalize()  # extras survive finalize
    assert hp.report(model, x, pruner=pruner).rows[2].extras["pruned_fraction"] == 0.25


def test_plots_write_pngs(psp_run, tmp_path):
    model, pruner, x = psp_run
    hist = alpha_histograms(pruner.layer_extras(), tmp_path / "alphas.png")
    bars = kept_fraction_bars(hp.report(model, x), tmp_path / "sub" / "kept.png")
    for path in (hist, bars):
        data = path.read_bytes()
        assert data.startswith(PNG) and len(data) > 5_000


def test_alpha_histograms_need_alphas(tmp_path):
    with pytest.raises(HwpruneError, match="PSP"):
        alpha_histograms({"fc.weight": {"pruned_fraction": 0.5}}, tmp_path / "x.png")


def test_dpp_mask_metric_curves(tiny, x8, tmp_path):
    pruner = hp.DPP(tiny, "2:4", anneal_epochs=3, logit_lr=50.0)
    opt = torch.optim.SGD(pruner.param_groups(lr=0.05))
    for _ in range(3):
        loss = tiny(x8).square().mean() + pruner.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.epoch_end()
    assert [h["epoch"] for h in pruner.history] == [1, 2, 3]
    path = mask_metric_curves(pruner.history, tmp_path / "dpp.png")
    assert path.read_bytes().startswith(PNG) and path.stat().st_size > 5_000
    with pytest.raises(HwpruneError, match="not in the history"):
        mask_metric_curves(pruner.history, tmp_path / "x.png", metrics=("alpha",))
    with pytest.raises(HwpruneError, match="no records"):
        mask_metric_curves([], tmp_path / "x.png")


def test_mask_images_draw_the_kept_weights(tmp_path):
    from matplotlib import image

    w = torch.randn(8, 16)
    w[:4] = 0  # the top half of the output units pruned: white above, black below
    path = mask_images({"fc.weight": w, "fc.bias": torch.ones(8)}, tmp_path / "m.png")
    img = image.imread(path)
    h, width = img.shape[:2]
    assert (img[int(0.35 * h), width // 2, :3] == 1).all()
    assert (img[int(0.65 * h), width // 2, :3] == 0).all()
    with pytest.raises(HwpruneError, match="2 or more dimensions"):
        mask_images({"b": torch.ones(3)}, tmp_path / "x.png")


def test_darb_block_size_histograms_and_write_plots(tiny, x8, tmp_path):
    pruner = hp.DARB(tiny, ratio=4.0, targets=["conv2", "conv3", "fc1"])
    extras = pruner.layer_extras()
    assert len(extras["conv3.weight"]["block_sizes"]) == 16  # one per row (filter)
    path = block_size_histograms(extras, tmp_path / "b.png")
    assert path.read_bytes().startswith(PNG) and path.stat().st_size > 5_000
    with pytest.raises(HwpruneError, match="DARB"):
        block_size_histograms({"fc.weight": {"alpha": [1.0]}}, tmp_path / "x.png")
    rep = hp.report(tiny, x8, pruner=pruner)
    paths = write_plots(rep, weights_of(tiny), tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["block_sizes.png", "kept_fractions.png",
                                             "masks.png"]
    assert all(p.read_bytes().startswith(PNG) for p in paths)


def test_write_plots_for_psp_and_dpp(psp_run, tmp_path):
    model, pruner, x = psp_run
    rep = hp.report(model, x, pruner=pruner)
    names = {p.name for p in write_plots(rep, weights_of(model), tmp_path / "psp")}
    assert names == {"kept_fractions.png", "masks.png", "alphas.png"}
    history = [{"epoch": e, "layers": {"conv2.weight": {"confidence": 0.1 * e,
                                                        "diversity": 0.5}}} for e in (1, 2)]
    names = {p.name for p in write_plots(rep, weights_of(model), tmp_path / "dpp", history)}
    assert "mask_metrics.png" in names
    # a run's per-epoch records give its training curves; extras may come from the pruner
    training = [{"epoch": e, "phase": p, "test_accuracy": 0.5, "sparsity": 0.1 * e}
                for e, p in ((1, "dense"), (2, "prune"))]
    paths = write_plots(rep, weights_of(model), tmp_path / "run", training=training,
                        extras={"conv3.weight": {"block_sizes": [1, 2, 2, 4]}})
    assert {p.name for p in paths} == {"kept_fractions.png", "masks.png", "block_sizes.png",
                                       "training.png"}
