"""The figures of numpyro_mpe.io.plots draw what they claim: data points, y = x, thresholds, labels."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import xarray as xr  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

from numpyro_mpe.io.plots import plot_elpd_comparison, plot_leverage_vs_k, plot_sensitivity  # noqa: E402

N = 12


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture
def sens_ds():
    """Shaped like Fit.sensitivities(): obs dim, a predictor dim on other variables, one invalid cavity."""
    rng = np.random.default_rng(0)
    sens = rng.uniform(0.1, 1.0, N)
    sens[7] = 4.0  # the most sensitive
    sens[2] = 2.5
    lev = rng.uniform(0.05, 0.5, N)
    lev[7] = 0.9  # above the threshold
    lev[4] = 1.3  # no cavity: sensitivity NaN
    sens[4] = np.nan
    return xr.Dataset(
        {
            "sensitivity": ("obs", sens),
            "leverage": ("obs", lev),
            "elpd_loo": ("obs", -rng.uniform(1, 3, N)),
            "prediction_shift": (("obs", "predictor"), rng.normal(size=(N, 2))),
        },
        coords={"obs": np.arange(N), "predictor": ["loc", "scale"]},
    )


@pytest.fixture
def table():
    """Shaped like compare_psis(): coordinate column ``obs``, value columns, a ``valid`` flag."""
    rng = np.random.default_rng(1)
    psis = -rng.uniform(1.5, 3.0, N)
    mpe = psis + rng.normal(0, 0.05, N)
    k = rng.uniform(-0.1, 0.5, N)
    lev = np.clip(k + rng.normal(0, 0.05, N), 0.01, None)
    k[3], lev[3], psis[3], mpe[3] = 0.85, 0.6, -6.0, -8.5  # PSIS flags it, MPE does not
    k[5], lev[5] = 0.4, 0.75  # MPE flags it, PSIS does not
    mpe[9] = np.nan  # invalid cavity
    return pd.DataFrame(
        {"obs": np.arange(N), "elpd_loo_mpe": mpe, "elpd_loo_psis": psis, "p_loo_mpe": 0.1,
         "p_loo_psis": 0.1, "pareto_k": k, "leverage": lev, "sensitivity": 0.5, "valid": ~np.isnan(mpe)},
        index=pd.RangeIndex(N, name="observation"),
    )


def _line(ax, gid):
    lines = [ln for ln in ax.get_lines() if ln.get_gid() == gid]
    assert len(lines) == 1, [ln.get_gid() for ln in ax.get_lines()]
    return lines[0]


def _collection(ax, gid=None):
    cols = [c for c in ax.collections if c.get_gid() == gid and len(c.get_offsets())]
    return cols


def _labels(ax):
    return {t.get_text() for t in ax.texts if t.get_gid() == "obs_label"}


def _is_horizontal_at(line, y):
    ydata = np.asarray(line.get_ydata(), float)
    return np.allclose(ydata, y)


def _is_vertical_at(line, x):
    return np.allclose(np.asarray(line.get_xdata(), float), x)


# ---------------------------------------------------------------- plot_sensitivity
def test_sensitivity_two_panels(sens_ds):
    axes = plot_sensitivity(sens_ds, top=2)
    assert len(axes) == 2 and all(isinstance(a, Axes) for a in axes)
    ax_s, ax_l = axes
    assert ax_s.figure is ax_l.figure
    # stems: one marker per observation with a finite sensitivity, at its index and height
    markers = [ln for ln in ax_s.get_lines() if ln.get_marker() == "o"]
    assert len(markers) == 1
    ok = np.isfinite(sens_ds.sensitivity.values)
    np.testing.assert_array_equal(markers[0].get_xdata(), np.arange(N)[ok])
    np.testing.assert_allclose(markers[0].get_ydata(), sens_ds.sensitivity.values[ok])
    # the invalid observation is marked on the axis, not dropped silently
    invalid = _line(ax_s, "invalid")
    np.testing.assert_array_equal(invalid.get_xdata(), [4])
    np.testing.assert_array_equal(invalid.get_ydata(), [0.0])
    # the two largest sensitivities are labelled with their coordinate
    assert _labels(ax_s) == {"7", "2"}
    # leverage: threshold at 0.7, every observation plotted, the one above flagged and labelled
    thr = _line(ax_l, "threshold")
    assert _is_horizontal_at(thr, 0.7)
    offsets = np.concatenate([c.get_offsets() for c in ax_l.collections])
    np.testing.assert_allclose(np.sort(offsets[:, 1]), np.sort(sens_ds.leverage.values))
    flagged = [c for c in ax_l.collections if np.all(np.asarray(c.get_offsets())[:, 1] > 0.7)]
    assert len(flagged) == 1 and {tuple(o) for o in flagged[0].get_offsets()} == {(7.0, 0.9), (4.0, 1.3)}
    assert {"7", "4"} <= _labels(ax_l)
    assert ax_l.get_ylim()[1] >= 1.3
    assert ax_s.get_ylabel().startswith("sensitivity") and ax_l.get_ylabel() == "leverage"


def test_sensitivity_on_given_axes(sens_ds):
    fig, pair = plt.subplots(1, 2)
    axes = plot_sensitivity(sens_ds, ax=pair)
    assert axes[0] is pair[0] and axes[1] is pair[1]
    assert _is_horizontal_at(_line(pair[1], "threshold"), 0.7)


def test_sensitivity_twin_on_one_axes(sens_ds):
    fig, ax = plt.subplots()
    ax_s, ax_l = plot_sensitivity(sens_ds, ax=ax)
    assert ax_s is ax and ax_l is not ax
    assert ax_l.get_shared_x_axes().joined(ax, ax_l)  # a twin: same x, own y scale
    assert _is_horizontal_at(_line(ax_l, "threshold"), 0.7)
    assert ax.get_legend() is not None


def test_sensitivity_from_table(table):
    ax_s, ax_l = plot_sensitivity(table)
    assert _is_horizontal_at(_line(ax_l, "threshold"), 0.7)
    assert "5" in _labels(ax_l)  # leverage 0.75 > 0.7


def test_sensitivity_multidim_labels():
    ds = xr.Dataset({"sensitivity": (("g", "m"), np.arange(6.0).reshape(2, 3)),
                     "leverage": (("g", "m"), np.full((2, 3), 0.2))},
                    coords={"g": [0, 1], "m": [0, 1, 2]})
    ax_s, ax_l = plot_sensitivity(ds, top=1)
    assert _labels(ax_s) == {"1,2"}  # the largest, flattened in C order: g=1, m=2
    ticks = [t.get_text() for t in ax_l.get_xticklabels()]
    assert ticks == ["0,0", "0,1", "0,2", "1,0", "1,1", "1,2"]


def test_sensitivity_bad_input():
    with pytest.raises(ValueError, match="leverage"):
        plot_sensitivity(xr.Dataset({"sensitivity": ("obs", np.ones(3))}))
    with pytest.raises(TypeError):
        plot_sensitivity(np.ones(3))


# ---------------------------------------------------------------- plot_elpd_comparison
def test_elpd_comparison(table):
    ax = plot_elpd_comparison(table)
    assert isinstance(ax, Axes)
    ident = _line(ax, "identity")
    np.testing.assert_allclose(ident.get_xdata(), ident.get_ydata())  # y = x
    ok = np.isfinite(table.elpd_loo_mpe)
    lo = min(table.elpd_loo_mpe[ok].min(), table.elpd_loo_psis[ok].min())
    hi = max(table.elpd_loo_mpe[ok].max(), table.elpd_loo_psis[ok].max())
    assert ident.get_xdata()[0] <= lo and ident.get_xdata()[1] >= hi  # spans the data
    # every comparable observation is a point at (psis, mpe); the invalid one is not drawn
    pts = np.concatenate([c.get_offsets() for c in ax.collections])
    assert len(pts) == ok.sum()
    expected = np.c_[table.elpd_loo_psis[ok], table.elpd_loo_mpe[ok]]
    np.testing.assert_allclose(np.sort(pts, axis=0), np.sort(expected, axis=0))
    # points are coloured by k-hat; the one above 0.7 is highlighted and labelled
    calm = [c for c in ax.collections if c.get_gid() != "flagged"][0]
    calm_k = table.pareto_k[ok & (table.pareto_k <= 0.7)]
    np.testing.assert_allclose(np.sort(calm.get_array()), np.sort(calm_k))
    flagged = _collection(ax, "flagged")
    assert len(flagged) == 1
    np.testing.assert_allclose(flagged[0].get_offsets(), [[-6.0, -8.5]])
    assert "3" in _labels(ax)
    # a colour bar for k-hat with the threshold marked
    cbar_ax = [a for a in ax.figure.axes if a is not ax]
    assert len(cbar_ax) == 1 and "k" in cbar_ax[0].get_ylabel()
    assert any(_is_horizontal_at(ln, 0.7) for ln in cbar_ax[0].get_lines())
    assert any("without an MPE cavity" in t.get_text() for t in ax.texts)


def test_elpd_comparison_given_axes(table):
    fig, ax = plt.subplots()
    assert plot_elpd_comparison(table, ax=ax) is ax


def test_elpd_comparison_missing_column(table):
    with pytest.raises(ValueError, match="pareto_k"):
        plot_elpd_comparison(table.drop(columns="pareto_k"))


# ---------------------------------------------------------------- plot_leverage_vs_k
def test_leverage_vs_k(table):
    ax = plot_leverage_vs_k(table)
    assert isinstance(ax, Axes)
    ident = _line(ax, "identity")
    np.testing.assert_allclose(ident.get_xdata(), ident.get_ydata())
    assert _is_vertical_at(_line(ax, "threshold_x"), 0.7)
    assert _is_horizontal_at(_line(ax, "threshold_y"), 0.7)
    pts = np.concatenate([c.get_offsets() for c in ax.collections])
    np.testing.assert_allclose(np.sort(pts, axis=0), np.sort(np.c_[table.leverage, table.pareto_k], axis=0))
    flagged = _collection(ax, "flagged")
    assert len(flagged) == 1
    got = {tuple(np.round(o, 6)) for o in flagged[0].get_offsets()}
    assert got == {(0.6, 0.85), (0.75, 0.4)}  # one flagged by k-hat, one by leverage
    assert {"3", "5"} <= _labels(ax)
    assert ax.get_xlabel() == "MPE leverage" and "k" in ax.get_ylabel()
    x0, x1 = ax.get_xlim()
    assert x0 < 0.7 < x1 and x1 >= 0.85


def test_leverage_vs_k_given_axes(table):
    fig, ax = plt.subplots()
    assert plot_leverage_vs_k(table, ax=ax) is ax
