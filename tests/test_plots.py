"""`dvc plots show` and `dvc plots diff`: every training curve drawn, and a page that needs no
network (the vendored template in vendor/vega/, set as plots.html_template in .dvc/config)."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import BIN, ROOT, run

from mnist_gan.training import EpochStats

CURVES = "plots/train/curves.json"
# Every column the train stage writes into curves.json, but the x axis.
CURVE_NAMES = [f.name for f in dataclasses.fields(EpochStats) if f.name != "epoch"]


def write_curves(repo: Path, epochs: int, offset: float) -> None:
    rows = [{name: offset + epoch + i / 10 for i, name in enumerate(CURVE_NAMES)} | {"epoch": epoch}
            for epoch in range(1, epochs + 1)]  # fmt: skip
    (repo / CURVES).write_text(json.dumps(rows), encoding="utf-8")


@pytest.fixture
def plots_repo(tmp_path: Path) -> Path:
    """A git + DVC repository with the project's top-level plots, the train stage's outputs
    (so that a plot it declares is drawn too), its DVC config (the page template) and
    vendor/vega/, and a small curves.json committed twice (two revisions)."""
    repo = tmp_path / "repo"
    (repo / "plots" / "train").mkdir(parents=True)
    top = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))
    train = {k: v for k, v in top["stages"]["train"].items() if k in ("cmd", "outs", "plots")}
    dvc_yaml = {"stages": {"train": train}, "plots": top["plots"]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml), encoding="utf-8")
    shutil.copy2(ROOT / "plots" / "train" / "samples.png", repo / "plots" / "train")
    shutil.copytree(ROOT / "vendor" / "vega", repo / "vendor" / "vega")
    run(["git", "init", "-q", "-b", "main"], cwd=repo)
    run([str(BIN / "dvc"), "init", "-q"], cwd=repo)
    shutil.copy2(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    for offset in (0.0, 0.5):
        write_curves(repo, epochs=3, offset=offset)
        run(["git", "add", "-A"], cwd=repo)
        run(["git", "commit", "-q", "-m", f"curves {offset}"], cwd=repo)
    return repo


def specs(page: str) -> list[dict]:
    """The vega-lite specs a `dvc plots` page embeds."""
    found = re.findall(r"var spec = (\{.*?\});\s*vegaEmbed", page, flags=re.S)
    return [json.loads(text) for text in found]


def y_fields(node: object) -> set[str]:
    """Every field a spec (or one of its layers) puts on the y axis."""
    if isinstance(node, list):
        return set().union(*map(y_fields, node)) if node else set()
    if not isinstance(node, dict):
        return set()
    y = node.get("encoding", {}).get("y", {})
    own = {y["field"]} if isinstance(y, dict) and "field" in y else set()
    return own.union(*(y_fields(v) for k, v in node.items() if k != "data"))


def drawn(spec: dict) -> set[str]:
    """The curves a spec draws: its y field, or, for a chart of several (DVC's
    dvc_inferred_y_value), the curves named in its data's ``field`` column."""
    fields = y_fields(spec)
    if "dvc_inferred_y_value" in fields:
        return {row["field"] for row in spec["data"]["values"]}
    return fields


def charts_of_curves(dvc_yaml: dict) -> list[tuple[str, dict, list[str]]]:
    """Every chart dvc.yaml draws from curves.json: (id, props, the curves it draws), from the
    top-level plots and the train stage's own plot of the file."""
    charts = []
    for plot in dvc_yaml["plots"]:
        ((plot_id, props),) = plot.items()
        charts.append((plot_id, props, props["y"][CURVES]))
    for plot in dvc_yaml["stages"]["train"].get("plots", []):
        if isinstance(plot, dict) and CURVES in plot:
            props = plot[CURVES]
            charts.append((CURVES, props, [props["y"]]))
    return charts


def test_plots_draw_every_curve_once_against_the_epoch() -> None:
    charts = charts_of_curves(yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8")))
    for plot_id, props, _ in charts:
        assert props["x"] == "epoch" and props.get("title"), plot_id
    assert sorted(c for _, _, curves in charts for c in curves) == sorted(CURVE_NAMES)


def test_the_page_draws_every_curve_and_loads_nothing_from_the_network(
    plots_repo: Path,
) -> None:
    run([str(BIN / "dvc"), "plots", "show", "-o", "out"], cwd=plots_repo)
    page = (plots_repo / "out" / "index.html").read_text(encoding="utf-8")
    # No script from anywhere but the page itself: vega, vega-lite and vega-embed are inline.
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, flags=re.I)
    assert "cdn.jsdelivr" not in page
    for library in ("vega 5.", "vega-lite 5.", "vega-embed 6."):
        assert f"/* {library}" in page, library
    charts = specs(page)
    # One chart per definition, and no chart of its own for curves.json's last column.
    assert len(charts) == len(charts_of_curves(yaml.safe_load((ROOT / "dvc.yaml").read_text())))
    assert set().union(*(drawn(s) for s in charts)) == set(CURVE_NAMES)
    titles = [s["title"]["text"] for s in charts]
    assert all(titles) and CURVES not in titles


def test_plots_diff_draws_both_revisions_offline(plots_repo: Path) -> None:
    run([str(BIN / "dvc"), "plots", "diff", "HEAD~1", "HEAD", "-o", "out"], cwd=plots_repo)
    page = (plots_repo / "out" / "index.html").read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, flags=re.I)
    for spec in specs(page):
        assert {row["rev"] for row in spec["data"]["values"]} == {"HEAD~1", "HEAD"}
