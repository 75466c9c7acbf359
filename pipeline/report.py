"""The experiments report (`make report`): one self-contained HTML page of the DVC experiments.

Reads the experiments derived from HEAD (or from --rev, --num commits back) with DVC's API
(`dvc.api.exp_show`, what `dvc exp show` prints) and, from each experiment's commit, the files
its stages wrote to git: the final sample grid (plots/evaluate/samples.png) and the training
curves (plots/train/curves.json). Writes OUT (default reports/experiments.html) holding:

  - the sweep: one row per point (the params that vary, train.seed aside, and the code: rows of
    other code are other points), each metric's mean over the point's seeds and its spread
    (min-max), and real data's values (evaluate's real_*);
  - every experiment: its params that vary and its metrics;
  - each experiment's final sample grid, side by side;
  - the loss curves (loss_d, loss_g) of every experiment, one panel per point.

Images are embedded (base64), so the file can be mailed or attached to a CI job. Not a DVC stage:
it reads the experiments, which are not a stage's deps.
"""

from __future__ import annotations

import base64
import html
import io
import json
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import click

# The metrics the table shows, with the direction that is better.
METRICS = {
    "fid": "lower",
    "is_mean": "higher",
    "precision": "higher",
    "recall": "higher",
    "coverage": "higher",
    "modes": "10",
    "memorized_fraction": "about real",
    "label_accuracy": "higher",
}
SEED = "train.seed"
# What a row is named by, and never a "param that varies".
META = {"Experiment", "rev", "typ", "Created", "parent", "State", "Executor"}


def git_file(rev: str, path: str) -> bytes | None:
    """A file as committed in ``rev`` (an experiment's commit), or the workspace's copy."""
    if rev == "workspace":
        file = Path(path)
        return file.read_bytes() if file.is_file() else None
    res = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, check=False)
    return res.stdout if res.returncode == 0 else None


def experiments(revs: list[str] | None = None, num: int = 1) -> list[dict[str, Any]]:
    """The baselines and their experiments, as ``dvc exp show`` lists them (``revs``: the
    baseline commits, default HEAD; ``num``: commits back from each); no workspace row (it
    repeats the baseline or an unfinished run) and no queued or failed one."""
    import dvc.api

    rows = dvc.api.exp_show(revs=revs or None, num=num)
    out, seen = [], set()
    for row in rows:
        if row.get("rev") == "workspace" or row.get("State") in ("Queued", "Failed", "Running"):
            continue
        # exp_show writes a null or missing cell as "None" (or "-", "!"): make it None again.
        row = {k: None if v in ("None", "-", "!") else v for k, v in row.items()}
        row = _with_new_params(row)
        name = row.get("Experiment") or f"baseline ({row.get('rev')})"
        # A baseline commit that only changed code repeats the last run: count it once.
        params = {k: v for k, v in row.items() if "." in k and "/" not in k and ":" not in k}
        same = json.dumps([params, [metric(row, m) for m in METRICS]], sort_keys=True)
        if not row.get("Experiment") and same in seen:
            continue
        seen.add(same)
        out.append({**row, "Experiment": name})
    return out


def _with_new_params(row: dict[str, Any]) -> dict[str, Any]:
    """Train params added after an experiment ran get their default: a new param's default is
    what the code did before it existed (train.seed stays None: that means base.seed)."""
    import dataclasses

    from mnist_gan.params import TrainParams, params_to_dict

    if not any(k.startswith("train.") for k in row):
        return row
    defaults = params_to_dict(TrainParams())
    out = dict(row)
    for f in dataclasses.fields(TrainParams):
        key = f"train.{f.name}"
        if f.name != "seed" and out.get(key) is None:
            value = defaults[f.name]
            if isinstance(value, int) and not isinstance(value, bool):
                value = float(value)  # as exp_show gives integers
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


def _number(row: dict[str, Any], name: str) -> float | None:
    # evaluate's column first: a bare name may be another metrics file's (DVC prefixes a name
    # with its file only when two files share it).
    for key in (f"metrics/evaluate.json:{name}", name):
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def metric(row: dict[str, Any], name: str) -> float | None:
    """A metric of evaluate's, whatever prefix DVC gave its column. evaluate writes each metric
    with its real_ twin, so a value without one is another file's (an unconditional model has
    no label_accuracy, whatever else is called so)."""
    if not name.startswith("real_") and _number(row, f"real_{name}") is None:
        return None
    return _number(row, name)


def varying_params(rows: list[dict[str, Any]]) -> list[str]:
    """The params (section.key columns) whose values differ between the rows (not the deps'
    hash columns, which are paths)."""
    keys = sorted(
        {k for r in rows for k in r if "." in k and ":" not in k and "/" not in k and k not in META}
    )
    return [k for k in keys if len({json.dumps(r.get(k), sort_keys=True) for r in rows}) > 1]


def code_of(row: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The code that made the row: the hashes of the stages' Python deps (DVC's dep columns)."""
    return tuple(sorted((k, row[k]) for k in row if k.endswith(".py")))


def code_names(rows: list[dict[str, Any]]) -> dict[tuple, str]:
    """A name per version of the code among ``rows``: the commit of a baseline that has it
    (else of its first experiment). Experiments that share params but not code (a trainer
    changed between two sweeps) are different points: the seeds of one trainer are not the
    spread of another's."""
    names: dict[tuple, str] = {}
    for r in sorted(rows, key=lambda r: not str(r.get("Experiment", "")).startswith("baseline")):
        names.setdefault(code_of(r), f"code {r.get('rev')}")
    return names


def plain(value: Any) -> Any:
    """A param as written in params.yaml: dvc.api.exp_show gives integers as floats (2.0)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def curves_png(groups: dict[str, list[tuple[str, list[dict]]]]) -> str | None:
    """loss_d and loss_g per epoch, one panel per point (a line per experiment), as base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(point, runs) for point, runs in groups.items() if any(c for _, c in runs)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (point, runs) in zip(axes[0], panels, strict=True):
        for i, (name, curve) in enumerate(runs):
            epochs = [c["epoch"] for c in curve]
            color = f"C{i}"
            ax.plot(epochs, [c["loss_d"] for c in curve], color=color, label=f"{name} loss_d")
            ax.plot(epochs, [c["loss_g"] for c in curve], color=color, linestyle="--",
                    label=f"{name} loss_g")  # fmt: skip
        ax.set_title(point, fontsize=8)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=6)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def real_values(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Real data's value of each metric: evaluate's real_ twins (the same for every row that
    shares the evaluate settings; the first row that has one gives it)."""
    out = {}
    for name in METRICS:
        found = [v for r in rows if (v := metric(r, f"real_{name}")) is not None]
        if found:
            out[name] = found[0]
    return out


def render(rows: list[dict[str, Any]], real: dict[str, float]) -> str:
    """The report's HTML."""
    varying = varying_params(rows)
    point_keys = [k for k in varying if k != SEED]
    shown = [m for m in METRICS if any(metric(r, m) is not None for r in rows)]
    codes = code_names(rows)
    points: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        label = ", ".join(f"{k}={plain(r.get(k))}" for k in point_keys) or "all"
        if len(codes) > 1:
            label = f"{codes[code_of(r)]}: {label}"
        points[label].append(r)

    out = ["<!doctype html><meta charset='utf-8'><title>mnist-gan experiments</title>",
           "<style>body{font:14px sans-serif;margin:24px}table{border-collapse:collapse;"
           "margin:12px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
           "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
           ".grids{display:flex;flex-wrap:wrap;gap:12px}.grids figure{margin:0}"
           "figcaption{font-size:12px;max-width:260px}img.grid{width:260px;"
           "image-rendering:pixelated}</style>",
           "<h1>mnist-gan experiments</h1>",
           f"<p>{len(rows)} experiments from <code>dvc exp show</code>; "
           f"params that vary: {', '.join(varying) or 'none'}. Metrics: the evaluate stage's "
           "(10,000 samples unless evaluate.num_samples says otherwise).</p>",
           f"<p>{len(codes)} versions of the code (the stages' Python deps), named by a commit "
           "that has each; a point is its params and its code.</p>" if len(codes) > 1 else "",
           "<h2>The sweep: mean over seeds [min, max]</h2><table><tr><th>point</th><th>seeds</th>"
           + "".join(f"<th>{m}<br><small>{METRICS[m]}</small></th>" for m in shown)
           + "</tr>"]  # fmt: skip
    for label, members in points.items():
        cells = []
        for m in shown:
            values = [v for r in members if (v := metric(r, m)) is not None]
            if not values:
                cells.append("<td>-</td>")
                continue
            mean = statistics.fmean(values)
            spread = f" [{fmt(min(values))}, {fmt(max(values))}]" if len(values) > 1 else ""
            cells.append(f"<td>{fmt(mean)}{spread}</td>")
        # train.seed null: the GAN took base.seed.
        seeds = ", ".join(
            "base" if r.get(SEED) in (None, "", "-") else str(plain(r[SEED])) for r in members
        )
        out.append(
            f"<tr><td>{html.escape(label)}</td><td>{html.escape(seeds)}</td>{''.join(cells)}</tr>"
        )
    real_cells = "".join(f"<td>{fmt(real.get(m))}</td>" for m in shown)
    out.append(f"<tr><td><b>real data</b></td><td></td>{real_cells}</tr></table>")

    out.append("<h2>Every experiment</h2><table><tr><th>experiment</th><th>rev</th>"
               + "".join(f"<th>{html.escape(k)}</th>" for k in varying)
               + "".join(f"<th>{m}</th>" for m in shown) + "</tr>")  # fmt: skip
    for r in rows:
        out.append(f"<tr><td>{html.escape(r['Experiment'])}</td><td>{fmt(r.get('rev'))}</td>"
                   + "".join(f"<td>{fmt(plain(r.get(k)))}</td>" for k in varying)
                   + "".join(f"<td>{fmt(metric(r, m))}</td>" for m in shown) + "</tr>")  # fmt: skip
    out.append("</table>")

    out.append("<h2>Final samples (plots/evaluate/samples.png)</h2><div class='grids'>")
    groups: dict[str, list[tuple[str, list[dict]]]] = defaultdict(list)
    for label, members in points.items():
        for r in members:
            png = git_file(str(r["rev"]), "plots/evaluate/samples.png")
            seed = "base" if r.get(SEED) is None else plain(r[SEED])
            caption = html.escape(f"{r['Experiment']}: {label}, seed {seed}")
            fid = metric(r, "fid")
            caption += f", FID {fid:.3g}" if fid is not None else ""
            if png:
                data = base64.b64encode(png).decode()
                out.append(f"<figure><img class='grid' src='data:image/png;base64,{data}'>"
                           f"<figcaption>{caption}</figcaption></figure>")  # fmt: skip
            curves = git_file(str(r["rev"]), "plots/train/curves.json")
            groups[label].append((r["Experiment"], json.loads(curves) if curves else []))
    out.append("</div>")
    png = curves_png(groups)
    if png:
        out.append("<h2>Training curves (plots/train/curves.json)</h2>"
                   f"<img src='data:image/png;base64,{png}' style='max-width:100%'>")  # fmt: skip
    return "\n".join(out) + "\n"


@click.command(help=__doc__)
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/experiments.html"),
              show_default=True, help="The HTML file to write.")  # fmt: skip
@click.option(
    "--rev",
    "revs",
    multiple=True,
    help="A baseline commit whose experiments to show (repeatable); default HEAD.",
)
@click.option(
    "--num",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Also the experiments of this many commits back from each baseline.",
)
def main(out: Path, revs: tuple[str, ...], num: int) -> None:
    """Write the experiments report."""
    from dvc.exceptions import DvcException

    try:
        rows = experiments(list(revs), num)
    except (DvcException, OSError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    if not rows:
        sys.exit("error: no finished experiments derived from HEAD: run some first (make sweep)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(render(rows, real_values(rows)), encoding="utf-8")
    tmp.replace(out)
    click.echo(f"wrote {out}: {len(rows)} experiments", err=True)


if __name__ == "__main__":
    main()
