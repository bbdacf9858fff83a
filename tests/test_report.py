"""The HTML report: self-contained, shows the right numbers, and renders in headless Chromium.

Also the report's extra figures (``plot_groups``, ``plot_training``) on hand-built inputs.  Chromium is
required: CI installs Debian's ``chromium`` (``.ci/run``); without it the rendering tests fail.
"""

import base64
import re
import shutil
import subprocess
from html.parser import HTMLParser

import matplotlib

matplotlib.use("Agg")

import jax  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import xarray as xr  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

import numpyro_mpe as mpe  # noqa: E402
from numpyro_mpe.io.datasets import STACKLOSS_PREDICTORS, load_stackloss, stackloss_model  # noqa: E402
from numpyro_mpe.io.plots import plot_groups, plot_training  # noqa: E402
from numpyro_mpe.io.report import posterior_summary, write_report  # noqa: E402

pytestmark = pytest.mark.arviz  # compare_psis runs the installed arviz's PSIS-LOO

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TITLE = "Stack loss test report"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# appended to a copy of the report only: counts the images Chromium decoded (the report has no script)
IMAGE_PROBE = ("<script>window.addEventListener('load', function () { var ok = 0, n = document.images.length;"
               " for (var i = 0; i < n; i++) { var im = document.images[i];"
               " if (im.complete && im.naturalWidth > 0) ok++; }"
               " document.body.setAttribute('data-images', ok + '/' + n); });</script>")


# ---------------------------------------------------------------- helpers
class _Tables(HTMLParser):
    """Every <table> as a list of rows of cell texts, plus the text of each <section id=...>."""

    def __init__(self):
        super().__init__()
        self.tables, self._row, self._cell, self._in_table = [], None, None, 0

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
            self._in_table += 1
        elif tag == "tr" and self._in_table:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[-1].append(self._row)
            self._row = None
        elif tag == "table":
            self._in_table -= 1

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _tables(text):
    parser = _Tables()
    parser.feed(text)
    return parser.tables


def _section(text, sid):
    m = re.search(rf'<section id="{sid}"[^>]*>(.*?)</section>', text, flags=re.S)
    assert m, sid
    return m.group(1)


def _minus(s: str) -> str:
    return s.replace("-", "−")


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("Chromium is not installed, and the HTML report must be checked in a real browser: install "
                "Debian's package (apt-get install -y chromium), as .ci/run does")


def _chromium_run(args, tmp_path, url):
    profile = tmp_path / "chromium-profile"
    profile.mkdir(exist_ok=True)
    cmd = [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def _render(path, tmp_path, name="shot"):
    """Screenshot (as an array) and the DOM (with the image probe) of the report at ``path``."""
    from PIL import Image

    png = tmp_path / f"{name}.png"
    res = _chromium_run([f"--screenshot={png}", "--window-size=1200,2000", "--hide-scrollbars"], tmp_path,
                        path.as_uri())
    assert png.is_file(), f"no screenshot (exit {res.returncode}): {res.stderr[-2000:]}"
    pixels = np.asarray(Image.open(png).convert("RGB"), dtype=float) / 255.0
    probe = tmp_path / f"{name}_probe.html"
    probe.write_text(path.read_text(encoding="utf-8").replace("</body>", IMAGE_PROBE + "</body>"),
                     encoding="utf-8")
    res = _chromium_run(["--virtual-time-budget=10000", "--dump-dom"], tmp_path, probe.as_uri())
    assert res.returncode == 0, res.stderr[-2000:]
    return pixels, res.stdout


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def fit():
    df = load_stackloss()
    X, y = df[list(STACKLOSS_PREDICTORS)].to_numpy(float), df["stack.loss"].to_numpy(float)
    return mpe.Laplace(stackloss_model, progress=False).run(jax.random.PRNGKey(0), X, y=y)


@pytest.fixture(scope="module")
def report(fit, tmp_path_factory):
    """The default report: PSIS-LOO on draws from q, computed inside write_report."""
    path = tmp_path_factory.mktemp("report") / "sub" / "report.html"
    out = write_report(fit, path, title=TITLE, num_samples=1000, rng_key=jax.random.PRNGKey(1))
    assert out == path
    return path, path.read_text(encoding="utf-8")


def _group_ds():
    lpd = np.array([-40.2, -61.5, -35.0, -52.3])
    p = np.array([3.1, 12.4, 1.2, np.nan])
    return xr.Dataset(
        {"lpd": ("day_block", lpd), "elpd_loo": ("day_block", lpd - p), "p_loo": ("day_block", p),
         "sensitivity": ("day_block", [1.1, 4.2, 0.3, np.nan]),
         "leverage": ("day_block", [0.41, 0.83, 0.12, 1.7]),
         "valid": ("day_block", [True, True, True, False]), "size": ("day_block", [6, 5, 5, 5])},
        coords={"day_block": ["A", "B", "C", "D"]})


def _history():
    steps = np.arange(0, 1000, 50)
    heldout = 0.6 * np.exp(-steps / 200) + 0.3 + 1e-4 * steps
    loo = heldout - 0.02 + 0.003 * np.sin(steps)
    loo[1::3] = np.nan  # the LOO estimate is computed every few steps only
    return pd.DataFrame({"step": steps, "train_nll": 0.7 * np.exp(-steps / 200) + 0.15,
                         "heldout_nll": heldout, "loo_nll": loo})


@pytest.fixture(scope="module")
def full_report(fit, tmp_path_factory):
    """With labels, a leave-group-out section, training curves, meta and a title needing escapes."""
    table = mpe.compare_psis(fit, num_samples=500, rng_key=jax.random.PRNGKey(2))
    labels = pd.Series([f"day {i + 1}" for i in range(21)], name="day")
    path = tmp_path_factory.mktemp("full") / "full.html"
    write_report(fit, path, title="<Stack & loss>", top=3, comparison=table, labels=labels,
                 groups=_group_ds(), history=_history(), meta={"data": "stackloss.csv <bundled>"})
    return path, path.read_text(encoding="utf-8"), table


# ---------------------------------------------------------------- the report
def test_report_is_self_contained(report):
    _, text = report
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    # nothing fetched from anywhere: no URLs, scripts, style sheets, frames, fonts or CSS url()
    for bad in ["http://", "https://", "<script", "<link", "<iframe", "<object", "<embed", "@import", "url(",
                "@font-face", "file://"]:
        assert bad not in text, bad
    srcs = re.findall(r'\ssrc="([^"]*)"', text)
    assert len(srcs) == 3  # sensitivity, MPE vs PSIS, leverage vs k-hat
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data[:8] == PNG_MAGIC and len(data) > 10_000
    assert all(h.startswith("#") for h in re.findall(r'href="([^"]*)"', text))  # in-page anchors only
    assert '<meta charset="utf-8">' in text


def test_report_shows_the_numbers(report, fit):
    _, text = report
    ds = fit.sensitivities()
    sens, lev = ds.sensitivity.values, ds.leverage.values
    top = int(np.argmax(sens))
    assert top == 20  # observation 21 of the stack loss data
    assert f"<title>{TITLE}</title>" in text and f"<h1>{TITLE}</h1>" in text

    # the influential table: ranked by sensitivity, the top observation first with its values formatted
    influential = _tables(_section(text, "influential"))[0]
    header, rows = influential[0], influential[1:]
    assert header[:3] == ["#", "observation", "y"] and "sensitivity" in header and "leverage" in header
    assert len(rows) == 10
    first = dict(zip(header, rows[0]))
    assert first["#"] == "1" and first["observation"] == "20" and first["y"] == "15"
    assert first["sensitivity"] == f"{sens[20]:.3f}"
    assert first["leverage"] == f"{lev[20]:.3f}"
    ranked = [int(r[1]) for r in rows]
    assert ranked == list(np.argsort(-sens)[:10])

    # totals: MPE elpd_loo +- SE and p_loo, in the cards
    cards = _section(text, "totals")
    assert _minus(f"{ds.elpd_loo.values.sum():.2f}") in cards
    assert f"p_loo {ds.p_loo.values.sum():.2f}" in cards
    assert f"{sens[20]:.2f} <small>sd</small>" in cards and "observation 20" in cards

    # the MPE vs PSIS table and the model table
    comparison = _tables(_section(text, "comparison"))
    assert comparison[0][1][:2] == ["elpd_loo", _minus(f"{ds.elpd_loo.values.sum():.2f}")]
    assert comparison[1][0] == ["correlation", "Pearson", "Spearman"]
    assert "independent draws from q" in text  # PSIS ran on q, and the report says so
    params = _tables(_section(text, "model"))[0]
    assert [r[0] for r in params[1:]] == ["alpha", "beta[0]", "beta[1]", "beta[2]", "sigma"]
    post = posterior_summary(fit)
    assert abs(float(_minus(params[1][1]).replace("−", "-")) - post.loc["alpha", "mean"]) < 0.05

    # the explanations
    how = _section(text, "how")
    for word in ["sensitivity", "leverage", "elpd_loo", "p_loo", "0.7", "Pareto", "k̂"]:
        assert word in how, word
    # all observations, folded
    rows_all = _tables(_section(text, "all"))[0]
    assert len(rows_all) == 22 and "<details>" in _section(text, "all")


@pytest.mark.slow  # a subprocess (Chromium)
def test_report_renders_in_chromium(report, tmp_path):
    path, _ = report
    pixels, dom = _render(path, tmp_path)
    assert pixels.shape == (2000, 1200, 3)
    assert pixels.std() > 0.05  # not a blank page
    assert (pixels.mean(axis=-1) < 0.95).mean() > 0.05  # text, tables and figures, not a few specks
    assert f"<title>{TITLE}</title>" in dom and "Most influential observations" in dom
    assert 'data-images="3/3"' in dom  # every embedded figure decoded


@pytest.mark.slow  # a subprocess (Chromium)
def test_report_optional_sections(full_report, tmp_path):
    path, text, table = full_report
    # the title is escaped, the labels head their column and name the observations
    assert "&lt;Stack &amp; loss&gt;" in text and "<Stack" not in text
    assert "stackloss.csv &lt;bundled&gt;" in text
    influential = _tables(_section(text, "influential"))[0]
    assert influential[0][:3] == ["#", "observation", "day"]
    assert influential[1][:3] == ["1", "20", "day 21"] and len(influential) == 4  # top=3
    assert "day 21" in _section(text, "totals")
    # groups: figure and table, the invalid group reported, not as a number
    groups = _section(text, "groups")
    gtable = _tables(groups)[0]
    assert gtable[0][:2] == ["day_block", "size"]
    assert [r[0] for r in gtable[1:]] == ["A", "B", "C", "D"]
    assert gtable[4][gtable[0].index("sensitivity")] == "no cavity"
    assert "data:image/png;base64," in groups and "data:image/png;base64," in _section(text, "training")
    assert len(re.findall(r'\ssrc="data:image/png;base64,', text)) == 5
    # the comparison passed in is the one shown
    s = table.attrs["summary"]
    assert _minus(f"{s['elpd_loo_psis']:.2f}") in _section(text, "totals")
    pixels, dom = _render(path, tmp_path, "full")
    assert pixels.std() > 0.05 and 'data-images="5/5"' in dom


def test_report_with_a_reference_posterior(fit, tmp_path):
    # any posterior sample with a log_likelihood group (here draws from q, standing in for NUTS) is used
    # for PSIS and adds the reference columns; InferenceData on arviz 0.x, DataTree on arviz >= 1
    idata = fit.to_inference_data(num_samples=400, rng_key=jax.random.PRNGKey(3))
    path = write_report(fit, tmp_path / "ref.html", idata=idata, top=2)
    text = path.read_text(encoding="utf-8")
    assert "user-supplied posterior sample (1 chain(s) x 400 draws)" in text
    assert "independent draws from q, the fit" not in text  # no caveat callout
    params = _tables(_section(text, "model"))[0]
    assert params[0] == ["parameter", "mean (q)", "sd (q)", "mean (reference)", "sd (reference)"]
    assert "MPE sensitivity report: stackloss_model" in text  # the default title names the model


@pytest.mark.filterwarnings("ignore:.*leverage >= 1")
def test_report_with_real_groups(fit, full_report, tmp_path):
    # groups= goes through fit.sensitivities(groups=...): three weeks of seven days
    _, _, table = full_report
    weeks = np.repeat(["week 1", "week 2", "week 3"], 7)
    path = write_report(fit, tmp_path / "groups.html", groups=weeks, comparison=table, top=1)
    gtable = _tables(_section(path.read_text(encoding="utf-8"), "groups"))[0]
    assert gtable[0][:2] == ["group", "size"] and [r[0] for r in gtable[1:]] == ["week 1", "week 2", "week 3"]
    ds = fit.sensitivities(groups=weeks)
    col = gtable[0].index("sensitivity")
    for row, s, ok in zip(gtable[1:], ds.sensitivity.values, ds.valid.values):
        assert row[col] == (f"{s:.3f}" if ok else "no cavity")


def test_report_bad_input(fit, tmp_path):
    with pytest.raises(ValueError, match="labels has 3 entries"):
        write_report(fit, tmp_path / "x.html", labels=["a", "b", "c"], num_samples=200)


# ---------------------------------------------------------------- plot_groups
@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _scatter_points(ax, gid):
    cols = [c for c in ax.collections if c.get_gid() == gid]
    return np.concatenate([c.get_offsets() for c in cols]) if cols else np.empty((0, 2))


def test_plot_groups():
    ds = _group_ds()
    axes = plot_groups(ds)
    assert len(axes) == 3 and all(isinstance(a, Axes) for a in axes)
    ax_e, ax_s, ax_l = axes
    # first group at the top: rows A, B, C, D at y = 3, 2, 1, 0, labelled with their sizes
    ticks = [t.get_text() for t in ax_e.get_yticklabels()]
    assert ticks == ["A  (n=6)", "B  (n=5)", "C  (n=5)", "D  (n=5)"]
    np.testing.assert_allclose(ax_e.get_yticks(), [3, 2, 1, 0])
    # elpd: lpd for every group, elpd_loo for the valid ones, a cross for the invalid one
    np.testing.assert_allclose(_scatter_points(ax_e, "lpd"), np.c_[ds.lpd.values, [3, 2, 1, 0]])
    np.testing.assert_allclose(_scatter_points(ax_e, "elpd_loo"), np.c_[ds.elpd_loo.values[:3], [3, 2, 1]])
    invalid = [ln for ln in ax_e.get_lines() if ln.get_gid() == "invalid"]
    assert len(invalid) == 1 and list(invalid[0].get_ydata()) == [0]
    # sensitivity of the valid groups, the invalid one crossed at zero
    np.testing.assert_allclose(_scatter_points(ax_s, "sensitivity"), [[1.1, 3], [4.2, 2], [0.3, 1]])
    assert [list(ln.get_xdata()) for ln in ax_s.get_lines() if ln.get_gid() == "invalid"] == [[0.0]]
    # leverage: threshold at 0.7, the two groups above it flagged
    thr = [ln for ln in ax_l.get_lines() if ln.get_gid() == "threshold"]
    assert len(thr) == 1 and np.allclose(thr[0].get_xdata(), 0.7)
    np.testing.assert_allclose(_scatter_points(ax_l, "flagged"), [[0.83, 2], [1.7, 0]])
    np.testing.assert_allclose(_scatter_points(ax_l, "leverage"), [[0.41, 3], [0.12, 1]])
    assert ax_l.get_xlim()[1] >= 1.7
    assert [a.get_xlabel() for a in axes] == ["group elpd (log density)", "sensitivity (posterior sd)",
                                              "leverage"]


def test_plot_groups_sorted_and_on_given_axes():
    fig, given = plt.subplots(1, 3)
    axes = plot_groups(_group_ds(), ax=given, sort=True)
    assert all(a is b for a, b in zip(axes, given))
    # the invalid group (D) first, then by sensitivity: B, A, C
    labels = [t.get_text() for t in axes[0].get_yticklabels()]
    pos = axes[0].get_yticks()
    assert [lab.split()[0] for _, lab in sorted(zip(pos, labels), reverse=True)] == ["D", "B", "A", "C"]
    assert axes[0].get_legend() is not None


def test_plot_groups_minimal_and_bad_input():
    ds = _group_ds()[["lpd", "elpd_loo", "sensitivity", "leverage"]]  # no valid / size / p_loo
    ax_e, _, _ = plot_groups(ds)
    assert [t.get_text() for t in ax_e.get_yticklabels()] == ["A", "B", "C", "D"]
    with pytest.raises(ValueError, match="leverage"):
        plot_groups(ds.drop_vars("leverage"))
    with pytest.raises(TypeError, match="xarray.Dataset"):
        plot_groups(ds.to_dataframe())
    two = xr.Dataset({v: (("g", "h"), np.ones((2, 2)))
                      for v in ["lpd", "elpd_loo", "sensitivity", "leverage"]})
    with pytest.raises(ValueError, match="one group dimension"):
        plot_groups(two)
    with pytest.raises(ValueError, match="three Axes"):
        plot_groups(ds, ax=plt.subplots()[1])


# ---------------------------------------------------------------- plot_training
def _line(ax, gid):
    lines = [ln for ln in ax.get_lines() if ln.get_gid() == gid]
    assert len(lines) == 1, gid
    return lines[0]


def test_plot_training():
    hist = _history()
    ax = plot_training(hist)
    assert isinstance(ax, Axes)
    for col in ["train_nll", "heldout_nll"]:
        np.testing.assert_allclose(_line(ax, col).get_ydata(), hist[col])
    ok = hist.loo_nll.notna()
    np.testing.assert_allclose(_line(ax, "loo_nll").get_xdata(), hist.step[ok])  # NaN checkpoints skipped
    np.testing.assert_allclose(_line(ax, "loo_nll").get_ydata(), hist.loo_nll[ok])
    best = _line(ax, "best_loo_nll")
    assert best.get_ydata()[0] == hist.loo_nll.min()
    assert _line(ax, "best_heldout_nll").get_xdata()[0] == hist.step[hist.heldout_nll.idxmin()]
    rho = hist.loo_nll[ok].corr(hist.heldout_nll[ok], method="spearman")
    text = [t.get_text() for t in ax.texts if t.get_gid() == "spearman"]
    assert text == [f"Spearman ρ(LOO, held-out) = {rho:.2f}  ({int(ok.sum())} checkpoints)"]
    assert ax.get_ylabel() == "negative log-likelihood per observation" and ax.get_xlabel() == "step"


def test_plot_training_from_elpd():
    steps = np.arange(5)
    elpd = -np.array([90.0, 70.0, 60.0, 58.0, 59.0])
    # a dict with the total elpd: scaled by num_obs onto the NLL scale of the held-out curve
    ax = plot_training({"step": steps, "elpd_loo_mpe": elpd, "heldout_nll": [0.9, 0.7, 0.62, 0.6, 0.61]},
                       num_obs=100)
    np.testing.assert_allclose(_line(ax, "loo_nll").get_ydata(), -elpd / 100)
    # records (as a callback collects them), num_obs from attrs of a DataFrame
    frame = pd.DataFrame([{"step": s, "elpd_loo_mpe": e} for s, e in zip(steps, elpd)])
    frame["train_nll"] = 0.5
    frame.attrs["num_obs"] = 50
    np.testing.assert_allclose(_line(plot_training(frame), "loo_nll").get_ydata(), -elpd / 50)
    # alone, without num_obs: drawn as -elpd_loo on its own scale
    ax = plot_training([{"step": s, "elpd_loo_mpe": e} for s, e in zip(steps, elpd)])
    np.testing.assert_allclose(_line(ax, "loo_nll").get_ydata(), -elpd)
    assert "elpd_loo" in ax.get_ylabel()
    fig, given = plt.subplots()
    assert plot_training({"loo_nll": [1.0, 0.5]}, ax=given) is given  # no step column: the row number


def test_plot_training_bad_input():
    with pytest.raises(ValueError, match="num_obs"):
        plot_training({"step": [0, 1], "elpd_loo_mpe": [-9.0, -8.0], "heldout_nll": [0.9, 0.8]})
    with pytest.raises(ValueError, match="loo_nll or elpd_loo_mpe"):
        plot_training({"step": [0, 1], "train_nll": [0.9, 0.8]})
    with pytest.raises(TypeError):
        plot_training(np.ones(3))
