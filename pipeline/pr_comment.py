"""The pull-request comment CI posts (.github/workflows/ci.yml, job `report`), as Markdown.

Not a DVC stage: it only formats what the job's earlier steps wrote. METRICS_DIFF is the output
of `dvc metrics diff --md BASE` (the base branch against this change, after `dvc repro`); GATE
is what `make promote PROMOTE_ARGS=--dry-run` printed, and GATE_CODE its exit code (0 would
promote, 3 would refuse, anything else an error). A missing file (its step failed) is said to
be missing, so that a failed run still reports what it has. Writes OUT.
"""

from __future__ import annotations

from pathlib import Path

import click

# The first line of the comment: the job edits its own comment when it finds it.
MARKER = "<!-- mnist-gan pull-request report -->"
REFUSED = 3  # promote.py's exit code for a refusal

VERDICTS = {0: "passes the gate: it would become the champion", REFUSED: "refused by the gate"}


def _read(path: Path | None) -> str | None:
    if path is None or not path.is_file():
        return None
    return path.read_text(encoding="utf-8").strip()


def gate_section(output: str | None, code: int | None) -> list[str]:
    """The gate's verdict in one bold line, and its table as printed."""
    if output is None or code is None:
        return ["**Promotion gate**: not run (an earlier step failed: see the run's log)."]
    verdict = VERDICTS.get(code, f"could not judge (exit code {code})")
    if code == 0 and "is the champion already" in output:
        verdict = "these weights are the champion already"
    return [f"**Promotion gate** (`make promote`, dry run: no alias moved): **{verdict}**", "",
            "```text", output, "```"]  # fmt: skip


def metrics_section(diff: str | None, base: str) -> list[str]:
    """`dvc metrics diff --md` as DVC printed it (empty: no metric changed)."""
    head = f"### Metrics: `{base}` against this change (`dvc metrics diff --md {base}`)"
    if diff is None:
        return [head, "", "Not computed (an earlier step failed: see the run's log)."]
    return [head, "", diff or "No metric changed."]


def render(base: str, diff: str | None, gate: str | None, code: int | None,
           report_url: str | None, run_url: str | None, commit: str | None) -> str:  # fmt: skip
    """The whole comment."""
    lines = [MARKER, "## What this change does to the GAN", ""]
    lines += gate_section(gate, code) + [""] + metrics_section(diff, base) + [""]
    lines += ["### Sample grids and training curves", ""]
    if report_url:
        lines += [f"[Download the report]({report_url}) (one zip): `experiments.html` "
                  f"(`make report`: the sample grids of `{base}` and of this change side by side, "
                  "with their loss curves) and `dvc_plots/index.html` (`dvc plots diff`: every "
                  "training curve of both). Both pages work offline."]  # fmt: skip
    else:
        lines += ["Not uploaded (an earlier step failed: see the run's log)."]
    footer = " · ".join(x for x in (commit and f"commit {commit[:12]}",
                                    run_url and f"[the run]({run_url})") if x)  # fmt: skip
    if footer:
        lines += ["", f"<sub>{footer}</sub>"]
    return "\n".join(lines) + "\n"


@click.command(help=__doc__)
@click.option("--base", required=True, help="The base branch's name, e.g. main.")
@click.option("--metrics-diff", type=click.Path(path_type=Path), help="dvc metrics diff --md.")
@click.option("--gate", type=click.Path(path_type=Path), help="make promote's output.")
@click.option("--gate-code", type=int, help="make promote's exit code.")
@click.option("--report-url", help="Where the report and the plots page were uploaded.")
@click.option("--run-url", help="The CI run's page.")
@click.option("--commit", help="The commit the job ran on.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The Markdown file.")
def main(base: str, metrics_diff: Path | None, gate: Path | None, gate_code: int | None,
         report_url: str | None, run_url: str | None, commit: str | None,
         out: Path) -> None:  # fmt: skip
    """Write the pull-request comment."""
    text = render(base, _read(metrics_diff), _read(gate), gate_code, report_url, run_url, commit)
    out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
