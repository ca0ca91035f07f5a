"""Integrated gradients and explanation layers: completeness, summaries, COG and STAC asset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pivotmap.models.explain import (
    Windows,
    baseline_like,
    dominant_layers,
    heatmap,
    integrated_gradients,
    method_text,
    variable_channels,
)
from pivotmap.models.network import ModelSpec, build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model_and_input(n: int = 12, steps: int = 20):
    torch.manual_seed(0)
    spec = ModelSpec(classes=(1, 2, 3), n_steps=steps, hidden=16, tokens=4)
    model = build_model(spec).eval()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, steps, len(spec.channels))).astype(np.float32)
    ages = [i for i, c in enumerate(spec.channels) if c.startswith("age_")]
    x[..., ages] = rng.uniform(0, 1, size=(n, steps, len(ages)))
    x[: n // 2, :, ages[1]] = 1.0  # half the pixels have no S1 at all: the mask must hold
    return model, spec, x


def test_integrated_gradients_are_complete():
    model, spec, x = _model_and_input()
    attr, target, gap = integrated_gradients(model, x, steps=64)
    with torch.no_grad():
        xt = torch.from_numpy(x)
        logits = model(xt)
        base = model(baseline_like(xt, spec))
    assert (target == logits.argmax(1).numpy()).all()
    delta = (logits - base).numpy()[np.arange(len(x)), target]
    # Completeness: the attributions add up to f(x) - f(baseline), up to the Riemann error.
    np.testing.assert_allclose(attr.sum((1, 2)), delta, atol=0.02 * np.abs(delta).max() + 1e-3)
    np.testing.assert_allclose(gap, attr.sum((1, 2)) - delta, atol=1e-5)
    assert np.abs(delta).max() > 0.01  # a real difference was explained, not 0 == 0
    index, names = variable_channels(spec)
    assert "age_s2" not in names and "VV" in names and len(names) == 12
    untouched = [i for i in range(len(spec.channels)) if i not in index]
    assert not attr[..., untouched].any()  # ages and day of year are kept in the baseline


def test_explicit_targets_and_fewer_steps_stay_close():
    model, _, x = _model_and_input(4)
    target = np.array([0, 1, 2, 0])
    attr, got, gap = integrated_gradients(model, x, target, steps=8, batch_size=16)
    assert (got == target).all() and attr.shape == x.shape
    assert np.isfinite(gap).all()


def test_windows_and_dominant_layers():
    model, spec, x = _model_and_input(6, steps=20)
    dates = np.arange("2023-01-01", "2023-04-11", 5, dtype="datetime64[D]")[:20]
    windows = Windows.monthly(dates)
    assert windows.labels == ("2023-01", "2023-02", "2023-03", "2023-04")
    assert windows.index[0] == 0 and windows.index[-1] == 3
    attr = np.zeros_like(x)
    index, _ = variable_channels(spec)
    attr[:, 12, index[3]] = -5.0  # a strong negative attribution counts by its magnitude
    attr[:, 0, index[0]] = 1.0
    var, win = dominant_layers(attr, spec, windows)
    assert var.dtype == np.uint8 and (var == 3).all()
    assert (win == windows.index[12]).all()
    heat = heatmap(attr, spec, windows)
    assert heat.shape == (12, 4) and heat[3, windows.index[12]] == pytest.approx(30.0)
    assert "integrated-gradients, 32 steps" in method_text(32)


def test_explanation_layer_is_a_valid_cog_with_lookups(tmp_path):
    import rasterio
    from odc.geo.geobox import GeoBox
    from rio_cogeo.cogeo import cog_validate

    from pivotmap.tasks.concept_products import explanation_layer, layer_asset, write_layer_cog

    geobox = GeoBox.from_bbox((500000, 5630000, 500640, 5630640), "EPSG:32631", resolution=10)
    coarse = geobox.zoom_out(8)
    layer = np.full((2, coarse.height, coarse.width), 255, dtype=np.uint8)
    layer[0, :4], layer[1, :4] = 7, 2
    path = write_layer_cog(
        tmp_path / "t_explanation.tif", layer, coarse,
        descriptions=["dominant variable", "dominant month"], tags={"method": "ig"},
    )  # fmt: skip
    valid, errors, _ = cog_validate(str(path))
    assert valid, errors
    with rasterio.open(path) as src:
        assert src.count == 2 and src.nodata == 255 and src.crs.to_epsg() == 32631
        assert src.res == (80.0, 80.0) and src.descriptions == (
            "dominant variable",
            "dominant month",
        )
        assert src.overviews(1) and src.tags()["method"] == "ig"
        np.testing.assert_array_equal(src.read(), layer)
    model = {"name": "m", "version": "3"}
    info = explanation_layer(path, method_text(16), ["B02", "VV"], ["2023-01"], 8, model)
    asset = layer_asset(info, path, "./t_explanation.tif")
    assert asset.extra_fields["pivotmap:method"].startswith("integrated-gradients, 16 steps")
    assert asset.extra_fields["pivotmap:variables"] == ["B02", "VV"]
    assert asset.extra_fields["pivotmap:model_version"] == "3"
    assert asset.extra_fields["file:checksum"].startswith("1220")


def test_explanations_of_a_shifted_classification_credit_the_region_s_own_dates(tmp_path):
    """Where predict moved the region's calendar, IG explains the network on the series as
    predict fed it, and what it credits lands on the dates the values came from."""
    from pivotmap.models.calendar import unshift
    from pivotmap.models.explain import Explainer
    from pivotmap.models.features import window_inputs
    from pivotmap.tasks.cube import PivotReader
    from pivotmap.tasks.pivot import build_pivot
    from tests.pivot_data import run_folder

    ws = run_folder(str(tmp_path / "run"))
    build_pivot(ws)
    torch.manual_seed(0)
    spec = ModelSpec(classes=(1, 2, 3), n_steps=12, step_days=5, hidden=16)
    model = build_model(spec).eval()
    reader = PivotReader(ws.pivot_url)
    windows = Windows.monthly(reader.times[:: spec.step_days])
    still, moved = (Explainer(model, spec, reader, windows, 16, s) for s in (0, 3))
    extent = ws.extent(ws.tiles())
    x0, y0 = extent.affine * (20.5, 20.5)
    a, b = still.pixel(extent, x0, y0), moved.pixel(extent, x0, y0)
    assert a["dates"] == b["dates"] and len(b["dates"]) == 12
    assert not np.allclose(a["attributions"], b["attributions"])
    ds = reader.window(slice(20, 21), slice(20, 21), spec.step_days)
    x, _ = window_inputs(ds, spec, 3)
    attr, _, _ = integrated_gradients(model, x, steps=16)
    index, _ = variable_channels(spec)
    want = unshift(attr[..., :-2], 3)[0][:, index]
    np.testing.assert_allclose(b["attributions"], np.round(want, 5), atol=1e-5)
    assert np.sum(b["attributions"]) == pytest.approx(attr[0][:, index].sum(), abs=1e-3)
