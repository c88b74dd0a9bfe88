"""``sslrun report``: a real run (pretext task with prediction grids, online kNN) and a real ``sslrun eval``, the
page rendered in real headless Chromium, which must load it with no console error and every plot decoded."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from sslrun.cli import app
from sslrun.cli.report_browser import find_browser, render_page
from sslrun.cli.report_data import read_run
from sslrun.core.errors import ConfigError

needs_chromium = pytest.mark.skipif(
    find_browser() is None, reason="chromium is not installed (apt-get install -y chromium; `make` installs it)"
)
PLOTS = [
    "Loss and its terms",
    "Learning rate",
    "Online kNN top-1",
    "Images/s (all workers)",
    "Workers (elastic runs resize)",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch (8 steps) of the rotation pretext task on 256 synthetic images, online kNN, prediction grids, then
    `sslrun eval knn` of its checkpoint (which writes its JSON next to the checkpoint)."""
    out = tmp_path_factory.mktemp("report") / "rotation-run"
    settings = ["data.dataset_kwargs.num_samples=256", "data.dataset_kwargs.test_samples=64"]
    settings += ["data.dataset_kwargs.size=16", "log.knn_every=1", "log.visuals_every=4", "log.log_every=2"]
    settings += ["log.progress=plain"]
    args = ["train", "--method", "rotation", "--encoder", "small_cnn", "--dataset", "synthetic", "--epochs", "1"]
    args += ["--batch-size", "32", "--device", "cpu", "--output", str(out)]
    trained = CliRunner().invoke(app, [*args, *[x for s in settings for x in ("--set", s)]])
    assert trained.exit_code == 0, trained.output
    assert f"report:         {out / 'report.html'}" in trained.output  # the run's own summary points at it
    checkpoint = out / "checkpoints" / "last.pt"
    evaluated = CliRunner().invoke(app, ["eval", "knn", "--checkpoint", str(checkpoint), "--device", "cpu"])
    assert evaluated.exit_code == 0, evaluated.output
    grid = ["eval", "knn", "--checkpoint", str(checkpoint), "--device", "cpu", "--features", "grid2"]
    evaluated = CliRunner().invoke(app, grid)
    assert evaluated.exit_code == 0, evaluated.output
    return out


@pytest.mark.slow
@needs_chromium
def test_report_of_a_real_run_renders_in_chromium_with_every_plot(run_dir: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    result = CliRunner().invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    page = run_dir / "report.html"
    assert f"report: {page}" in result.output
    text = page.read_text()
    assert "<script" not in text and not re.search(r'src="(?!data:image/png;base64,)', text)  # self-contained
    assert "Evaluation (sslrun eval)" in text and "Config: rotation-run" in text

    seen = render_page(page, shot)  # what the browser saw, image by image
    assert seen.errors == []
    alts = {alt for alt, ok in seen.images if ok}
    assert len(alts) == len(seen.images)  # every <img> decoded
    assert {f"plot: {p}" for p in PLOTS} <= alts
    assert "augmented views (one row per view)" in alts
    assert any(alt.startswith("pretext: visuals/") for alt in alts)  # the rotation task's prediction grid
    with Image.open(shot) as png:
        assert png.width == 1280 and png.height == seen.height > 1500
        assert len(set(png.convert("L").resize((64, 64)).getdata())) > 20  # rendered content, not a blank page
    run = read_run(run_dir)
    assert run.evals and run.evals[0]["kind"] == "knn" and run.last("knn/top1") is not None
    assert f"{100 * run.evals[0]['top1']:.2f}%" in text
    assert "<td>knn</td>" in text and "<td>knn (grid2)</td>" in text  # which features each kNN read


@pytest.mark.slow
@needs_chromium
def test_comparing_two_runs_draws_both_on_the_same_plots(run_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "rotation-copy"
    shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns("*.pt", "eval_cache"))
    out = tmp_path / "both.html"
    shot = tmp_path / "both.png"
    args = ["report", str(run_dir), str(other), "--out", str(out), "--screenshot", str(shot), "--screenshot-height"]
    result = CliRunner().invoke(app, [*args, "900"])  # fails (exit 2) on any console error or undecoded image
    assert result.exit_code == 0, result.output
    assert f"screenshot: {shot} (" in result.output
    text = out.read_text()
    assert "2 runs compared" in text and "rotation-run" in text and "rotation-copy" in text
    with Image.open(shot) as png:
        assert png.size == (1280, 900)


@needs_chromium
def test_the_browser_check_catches_console_errors_and_broken_images(tmp_path: Path) -> None:
    """The check the report test relies on can fail: a page with a console error, an exception and a broken
    image is reported as such."""
    page = tmp_path / "bad.html"
    page.write_text(
        '<html><body><img alt="broken" src="data:image/png;base64,AAAA">'
        "<script>console.error('boom'); null.x;</script></body></html>"
    )
    seen = render_page(page, tmp_path / "bad.png")
    assert any("boom" in e for e in seen.errors) and any(e.startswith("exception:") for e in seen.errors)
    assert seen.images == [("broken", False)]


def test_a_directory_that_is_not_a_run_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a run directory .* pass the --output of"):
        read_run(tmp_path)
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "error:" in result.output
