"""CI's workflow (.github/workflows/): actionlint, what its jobs run, and the pull-request comment
(pipeline/pr_comment.py) from a real `dvc metrics diff --md` between two commits."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import BIN, ROOT, load_stage, run

WORKFLOWS = ROOT / ".github" / "workflows"
CI = WORKFLOWS / "ci.yml"


def actionlint() -> str:
    """The venv's actionlint: `make setup` installs it (the dev extra)."""
    found = BIN / "actionlint"
    assert found.exists(), f"{found}: missing; `make setup` installs it (the dev extra)"
    return str(found)


def lint(folder: Path) -> tuple[int, str]:
    env = {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # shellcheck, if there
    res = run([actionlint(), "-no-color"], cwd=folder, env=env, check=False, timeout=120)
    return res.returncode, res.stdout + res.stderr


def test_actionlint_passes_on_the_workflows(tmp_path: Path) -> None:
    code, output = lint(ROOT)
    assert code == 0, output
    # It checks something: a broken copy (an unknown job in needs, an injectable title) fails.
    (tmp_path / ".github" / "workflows").mkdir(parents=True)
    broken = CI.read_text(encoding="utf-8").replace(
        "    runs-on: ubuntu-latest\n",
        "    runs-on: ubuntu-latest\n    needs: no-such-job\n",
        1,
    )
    broken += "      - run: echo ${{ github.event.pull_request.title }}\n"
    (tmp_path / ".github" / "workflows" / "ci.yml").write_text(broken, encoding="utf-8")
    run(["git", "init", "-q"], cwd=tmp_path)
    code, output = lint(tmp_path)
    assert code != 0 and "no-such-job" in output and "untrusted" in output, output


def workflow() -> dict:
    data = yaml.safe_load(CI.read_text(encoding="utf-8"))
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as true
    return data


def runs(job: dict) -> str:
    return "\n".join(step.get("run", "") for step in job["steps"])


def test_make_test_runs_on_every_push_and_pull_request_with_the_pip_cache() -> None:
    data = workflow()
    assert set(data["on"]) == {"push", "pull_request"}
    test = data["jobs"]["test"]
    assert "if" not in test
    python = next(s for s in test["steps"] if s.get("uses", "").startswith("actions/setup-python"))
    assert python["with"]["cache"] == "pip"
    assert re.search(r"^MNIST_MIRROR=\S+ make test$", runs(test), flags=re.M)


def test_the_pull_request_job_pulls_reproduces_and_comments() -> None:
    data = workflow()
    job = data["jobs"]["report"]
    assert "github.event_name == 'pull_request'" in job["if"]
    assert job["permissions"] == {"contents": "read", "pull-requests": "write"}
    assert data["permissions"] == {"contents": "read"}  # the test job: read only
    script = runs(job)
    order = ['make run REPRO_ARGS="--pull', 'dvc metrics diff --md "origin/$BASE"',
             "promote.py --gan models/gan --dry-run", "make report", "dvc plots diff",
             "pr_comment.py", "gh pr comment"]  # fmt: skip
    positions = [script.index(part) for part in order]
    assert positions == sorted(positions)
    checkout = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/checkout"))
    assert checkout["with"]["fetch-depth"] == 0  # the base branch's commits, for the diffs


def test_secrets_are_only_named_and_each_is_documented() -> None:
    text = CI.read_text(encoding="utf-8")
    named = set(re.findall(r"\$\{\{\s*secrets\.([A-Z0-9_]+)\s*\}\}", text))
    assert named >= {"DVC_REMOTE_ACCESS_KEY_ID", "DVC_REMOTE_SECRET_ACCESS_KEY",
                     "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
                     "MLFLOW_TRACKING_PASSWORD"}  # fmt: skip
    env = {**workflow()["jobs"]["report"]["env"]}
    for key, value in env.items():  # every credential comes from a secret, none is written here
        if re.search(r"KEY|PASSWORD|USERNAME|TOKEN|URI", key):
            assert re.fullmatch(r"\$\{\{ secrets\.[A-Z0-9_]+ \}\}", value), key
    team = (ROOT / "docs" / "team.md").read_text(encoding="utf-8")
    assert [n for n in sorted(named) if f"`{n}`" not in team] == []


@pytest.fixture
def two_commits(tmp_path: Path) -> Path:
    """A git + DVC repository: metrics on `main`, then a change's metrics on a branch."""
    repo = tmp_path / "repo"
    (repo / "metrics").mkdir(parents=True)
    run(["git", "init", "-q", "-b", "main"], cwd=repo)
    run([str(BIN / "dvc"), "init", "-q"], cwd=repo)
    (repo / "dvc.yaml").write_text("metrics:\n  - metrics/evaluate.json\n", encoding="utf-8")
    for branch, fid, modes in (("main", 1.73478, 10), ("change", 1.39699, 10)):
        if branch != "main":
            run(["git", "checkout", "-q", "-b", branch], cwd=repo)
        metrics = {"fid": fid, "modes": modes, "precision": 0.8261 if fid > 1.5 else 0.8339}
        (repo / "metrics" / "evaluate.json").write_text(json.dumps(metrics), encoding="utf-8")
        run(["git", "add", "-A"], cwd=repo)
        run(["git", "commit", "-q", "-m", branch], cwd=repo)
    return repo


def test_the_comment_from_a_real_metrics_diff(two_commits: Path, tmp_path: Path) -> None:
    diff = run([str(BIN / "dvc"), "metrics", "diff", "--md", "main"], cwd=two_commits).stdout
    (tmp_path / "diff.md").write_text(diff, encoding="utf-8")
    gate = "metric  champion v3  challenger v4  rule  \nfid     1.735  1.397  <= 1.7  pass\n"
    (tmp_path / "gate.txt").write_text(gate, encoding="utf-8")
    stage = load_stage("pr_comment")
    args = ["--base", "main", "--metrics-diff", str(tmp_path / "diff.md"),
            "--gate", str(tmp_path / "gate.txt"), "--gate-code", "0",
            "--report-url", "https://example.invalid/artifacts/1", "--commit", "0123456789abcdef",
            "--out", str(tmp_path / "comment.md")]  # fmt: skip
    res = CliRunner().invoke(stage.main, args)
    assert res.exit_code == 0, res.output
    comment = (tmp_path / "comment.md").read_text(encoding="utf-8")
    assert comment.startswith(stage.MARKER)
    assert "**passes the gate: it would become the champion**" in comment
    rows = [line for line in comment.splitlines() if line.startswith("| metrics/evaluate.json")]
    assert [row.split("|")[2].strip() for row in rows] == ["fid", "precision"]  # modes: same
    assert "| main " in comment and "| workspace " in comment
    assert "1.73478" in rows[0] and "1.39699" in rows[0] and "-0.33779" in rows[0]
    assert "[Download the report](https://example.invalid/artifacts/1)" in comment

    # A run whose steps failed still comments, saying what is missing.
    args = ["--base", "main", "--metrics-diff", str(tmp_path / "none.md"), "--gate-code", "3",
            "--out", str(tmp_path / "failed.md")]  # fmt: skip
    assert CliRunner().invoke(stage.main, args).exit_code == 0
    failed = (tmp_path / "failed.md").read_text(encoding="utf-8")
    assert failed.count("an earlier step failed") == 3
