"""`make report`: the experiments' sweep table, sample grids and curves in one HTML page."""

from __future__ import annotations

import base64
import io
import json
import re
from types import ModuleType

import pytest
from conftest import load_stage
from PIL import Image


@pytest.fixture(scope="module")
def report() -> ModuleType:
    return load_stage("report")


def png(shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8), shade).save(buf, format="PNG")
    return buf.getvalue()


ROWS = [  # as dvc.api.exp_show lists them: params and metrics as columns, integers as floats
    {"Experiment": f"exp-{i}", "rev": f"r{i}", "train.ema": ema, "train.seed": float(seed),
     "train.epochs": 100.0, "fid": fid, "is_mean": 8.0 + i, "modes": 10.0, "real_fid": 0.19,
     "real_is_mean": 9.7, "real_modes": 10.0, "label_accuracy": 0.99}
    for i, (ema, seed, fid) in enumerate([(0.0, 1, 3.0), (0.0, 2, 2.0),
                                          (0.999, 1, 1.5), (0.999, 2, 1.0)])
]  # fmt: skip


def test_the_sweep_table_gives_each_points_mean_and_spread(report, monkeypatch) -> None:
    files = {}
    for i, row in enumerate(ROWS):
        files[(row["rev"], "plots/evaluate/samples.png")] = png(40 * i)
        curve = [{"epoch": e, "loss_d": 1.0 + e / 10, "loss_g": 0.9} for e in (1, 2, 3)]
        files[(row["rev"], "plots/train/curves.json")] = json.dumps(curve).encode()
    monkeypatch.setattr(report, "git_file", lambda rev, path: files.get((rev, path)))
    real = report.real_values([{**ROWS[0], "real_fid": 0.188, "real_is_mean": 9.66,
                                "metrics/evaluate.json:real_modes": 10.0}])  # fmt: skip
    assert real == {"fid": 0.188, "is_mean": 9.66, "modes": 10.0}
    # Another file's label_accuracy (no real_ twin in evaluate's) is not this model's.
    assert report.metric(ROWS[0], "label_accuracy") is None
    assert report.metric(ROWS[0], "fid") == 3.0
    page = report.render(ROWS, real)
    assert "label_accuracy" not in page

    # Only what varies is a column (not a dep's hash: a path); the seed is not part of a point.
    with_deps = [{**r, "src/mnist_gan/models.py": f"abc{i}"} for i, r in enumerate(ROWS)]
    assert report.varying_params(with_deps) == ["train.ema", "train.seed"]
    rows = re.findall(r"<tr><td>(train\.ema=[^<]*)</td><td>([^<]*)</td>(.*?)</tr>", page)
    assert [(label, seeds) for label, seeds, _ in rows] == [
        ("train.ema=0", "1, 2"),
        ("train.ema=0.999", "1, 2"),
    ]
    first_fid = re.findall(r"<td>([^<]*)</td>", rows[0][2])[0]
    assert first_fid == "2.5 [2, 3]"  # the mean over the two seeds, [min, max]
    assert re.findall(r"<td>([^<]*)</td>", rows[1][2])[0] == "1.25 [1, 1.5]"
    assert "<td><b>real data</b></td><td></td><td>0.188</td><td>9.66</td><td>10</td>" in page
    # Every experiment's grid, embedded, and one picture of the curves.
    grids = re.findall(r"<img class='grid' src='data:image/png;base64,([^']+)'>", page)
    assert [base64.b64decode(g) for g in grids] == [png(40 * i) for i in range(4)]
    curves = re.search(r"<h2>Training curves.*?base64,([^']+)'", page, re.S)
    assert curves is not None
    with Image.open(io.BytesIO(base64.b64decode(curves.group(1)))) as image:
        assert image.format == "PNG" and image.width > 400  # one panel per point


def test_the_same_params_under_other_code_are_another_point(report, monkeypatch) -> None:
    """Two sweeps of one grid, a trainer change between them: four points, not two."""
    monkeypatch.setattr(report, "git_file", lambda rev, path: None)
    old = [{**r, "src/mnist_gan/training.py": "aaa", "pipeline/train.py": "p"} for r in ROWS]
    new = [{**r, "Experiment": f"new-{i}", "rev": f"n{i}", "fid": r["fid"] / 2,
            "src/mnist_gan/training.py": "bbb", "pipeline/train.py": "p"}
           for i, r in enumerate(ROWS)]  # fmt: skip
    base = {**new[0], "Experiment": "baseline (c0ffee1)", "rev": "c0ffee1"}
    page = report.render([*old, base, *new], {})
    rows = re.findall(r"<tr><td>(code [^<]*)</td><td>([^<]*)</td><td>([^<]*)</td>", page)
    assert rows == [
        ("code r0: train.ema=0", "1, 2", "2.5 [2, 3]"),
        ("code r0: train.ema=0.999", "1, 2", "1.25 [1, 1.5]"),
        ("code c0ffee1: train.ema=0", "1, 1, 2", "1.333 [1, 1.5]"),
        ("code c0ffee1: train.ema=0.999", "1, 2", "0.625 [0.5, 0.75]"),
    ]
    assert "2 versions of the code" in page
    # One version: no code in the labels (the common case, as before).
    assert "code " not in report.render(new, {}).split("<h2>Every experiment")[0]


def test_without_experiments_it_says_so(report, monkeypatch, tmp_path) -> None:
    from click.testing import CliRunner

    monkeypatch.setattr(report, "experiments", lambda revs, num: [])
    out = tmp_path / "r.html"
    res = CliRunner().invoke(report.main, ["--out", str(out)])
    assert res.exit_code == 1 and "no finished experiments" in res.output
    assert not out.exists()


def test_rows_come_from_dvc_exp_show_with_nulls_restored(report, monkeypatch) -> None:
    import dvc.api

    shown = [
        {"Experiment": None, "rev": "workspace", "train.seed": "None", "fid": 9.0},
        {"Experiment": None, "rev": "abc1234", "train.seed": "None", "fid": 2.7, "real_fid": 0.2},
        {"Experiment": "grave-whop", "rev": "def5678", "train.seed": 1.0, "fid": "-"},
        {"Experiment": "queued-one", "rev": "0000000", "State": "Queued"},
    ]
    asked = {}

    def exp_show(revs=None, num=1):
        asked.update(revs=revs, num=num)
        return shown

    monkeypatch.setattr(dvc.api, "exp_show", exp_show)
    rows = report.experiments(["main"], 2)
    assert asked == {"revs": ["main"], "num": 2}
    assert [r["Experiment"] for r in rows] == ["baseline (abc1234)", "grave-whop"]
    assert rows[0]["train.seed"] is None and rows[1]["fid"] is None
    page = report.render(rows, {})
    assert "<td>base, 1</td>" in page  # the baseline took base.seed


def test_params_added_after_an_experiment_take_their_default(report: ModuleType) -> None:
    """An experiment older than train.lr_decay and train.nproc is the point those defaults give."""
    old = {"Experiment": "old", "train.ema": 0.999, "train.seed": 1.0, "train.lr_decay": None}
    new = {**old, "Experiment": "new", "train.lr_decay": "none", "train.nproc": 1.0}
    filled = report._with_new_params(old)
    assert filled["train.lr_decay"] == "none" and filled["train.nproc"] == 1.0
    assert filled["train.ema"] == 0.999 and filled["train.seed"] == 1.0  # kept as they ran
    assert report.varying_params([filled, report._with_new_params(new)]) == []
    assert report._with_new_params({"Experiment": "x", "fid": 1.0}) == {
        "Experiment": "x",
        "fid": 1.0,
    }
