"""Lineage: each stage depends on all the code it runs, and MLflow links runs to models by content.

What DVC and MLflow show must be true: a stage whose code changed is rerun (never served from
the cache), and the metrics of a generator land in the MLflow run that trained it.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, run
from teamkit import SMALL_PARAMS, init_repo, set_params, stages_run

from mnist_gan.utils import sha256_file

PIPELINE, SRC = ROOT / "pipeline", ROOT / "src"
# Project files a stage runs without importing them: MLflow loads this one by its path to log
# the model (registry.log_generator_model), so the train stage declares it too.
LOADED_BY_PATH = {"train": {"pipeline/gan_pyfunc.py"}}


def stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def code_deps(stage: dict) -> set[str]:
    """The deps of a dvc.yaml stage that are project code (under pipeline/ or src/)."""
    deps = {d if isinstance(d, str) else next(iter(d)) for d in stage["deps"]}
    return {d for d in deps if d.startswith(("pipeline/", "src/"))}


def imported_files(script: Path) -> set[str]:
    """The project files ``script`` imports, directly or not, found by walking the import graph.

    Every import statement counts, at module level or inside a function (a lazy import runs
    too). ``mnist_gan.x`` is ``src/mnist_gan/x.py`` (and the package's ``__init__.py``); a bare
    name with a file in ``pipeline/`` is that file, as stage scripts import their helpers.
    """
    todo, seen = [script.resolve()], set()
    while todo:
        path = todo.pop()
        name = path.relative_to(ROOT).as_posix()
        if name in seen:
            continue
        seen.add(name)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            for module in modules:
                parts = module.split(".")
                if parts[0] == "mnist_gan":
                    for i in range(1, len(parts) + 1):  # the package, then each module
                        base = SRC.joinpath(*parts[:i])
                        file = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
                        if file.is_file():
                            todo.append(file)
                elif len(parts) == 1 and (PIPELINE / f"{module}.py").is_file():
                    todo.append(PIPELINE / f"{module}.py")
    return seen


def test_every_stage_depends_on_all_the_code_it_imports() -> None:
    for name, stage in stages().items():
        declared = code_deps(stage)
        needed = imported_files(PIPELINE / f"{name}.py")
        assert f"pipeline/{name}.py" in needed
        missing = sorted(needed - declared)
        assert not missing, f"dvc.yaml: stage {name} runs these files but lacks them: {missing}"
        # No dep on code the stage does not run either: editing it would rerun the stage.
        extra = sorted(declared - needed - LOADED_BY_PATH.get(name, set()))
        assert not extra, f"dvc.yaml: stage {name} depends on code it does not run: {extra}"


def test_the_import_walk_finds_lazy_imports_and_helpers(tmp_path: Path) -> None:
    # The walk itself, on the train stage: its direct imports and what they import in turn.
    found = imported_files(PIPELINE / "train.py")
    for name in ("pipeline/common.py", "pipeline/tracking.py", "src/mnist_gan/__init__.py",
                 "src/mnist_gan/losses.py", "src/mnist_gan/utils.py"):  # fmt: skip
        assert name in found, name
    assert "src/mnist_gan/metrics.py" not in found  # evaluate's, not train's
    # gan_pyfunc imports the models module inside a method: a lazy import counts.
    assert "src/mnist_gan/models.py" in imported_files(PIPELINE / "gan_pyfunc.py")


def test_the_code_a_stage_loads_is_what_dvc_yaml_declares() -> None:
    """The code hash of a checkpoint (common.code_files, on the modules a stage process really
    loads) covers the same files as the stage's deps: the two never disagree."""
    program = (
        "import importlib.util, json, sys\n"
        "from pathlib import Path\n"
        "sys.path.insert(0, 'pipeline')\n"
        "script = Path(sys.argv[1])\n"
        "spec = importlib.util.spec_from_file_location('stage', script)\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "import common\n"
        "print(json.dumps(sorted(common.code_files(script))))\n"
    )
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", program, f"pipeline/{name}.py"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for name in stages()
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        loaded = set(json.loads(out))
        declared = code_deps(stages()[name]) - LOADED_BY_PATH.get(name, set())
        assert loaded == declared, (name, sorted(loaded ^ declared))


# --- in a throwaway copy of the project, with DVC and MLflow for real --------------------------


def tiny_project(project: Path, shared_mirror: Path) -> dict[str, str]:
    """Make ``project`` a committed repository with the smallest params; return its env."""
    set_params(project, SMALL_PARAMS)
    init_repo(project)
    # An empty MLFLOW_TRACKING_URI selects the project's mlflow.db.
    return {"MNIST_MIRROR": str(shared_mirror), "MLFLOW_TRACKING_URI": "", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_editing_shared_code_marks_the_train_stage_changed(
    project_copy: Path, shared_mirror: Path
) -> None:
    """Appending a line to code that train runs (seeding, params, loading, the helpers of the
    stage scripts) makes ``dvc status`` report train's deps as changed."""
    env = tiny_project(project_copy, shared_mirror)
    run(["dvc", "repro", "train"], cwd=project_copy, env=env)
    assert "train" not in json.loads(run(["dvc", "status", "--json"], project_copy, env).stdout)
    for name in ("src/mnist_gan/utils.py", "src/mnist_gan/params.py", "src/mnist_gan/data.py",
                 "pipeline/common.py"):  # fmt: skip
        path = project_copy / name
        original = path.read_bytes()
        path.write_bytes(original + b"# edited\n")
        try:
            status = json.loads(run(["dvc", "status", "--json"], project_copy, env).stdout)
        finally:
            path.write_bytes(original)
        changed = [c["changed deps"] for c in status.get("train", []) if "changed deps" in c]
        assert changed and changed[0].get(name) == "modified", (name, status)
    assert "train" not in json.loads(run(["dvc", "status", "--json"], project_copy, env).stdout)


@pytest.mark.slow
def test_each_run_holds_only_its_own_generators_metrics(
    project_copy: Path, shared_mirror: Path
) -> None:
    """The sequence that once logged a generator's FID into another model's run.

    The baseline trains 2 epochs; experiment `one` trains 1 (the last run train wrote); `back`
    returns to 2 epochs, which DVC restores from its run cache without running train; `k4`
    changes only evaluate's params, so the reference and evaluate run, and evaluate scores the
    restored 2-epoch generator. Its FID belongs in the baseline's run, which trained that
    generator, not in `one`'s.
    """
    env = tiny_project(project_copy, shared_mirror)
    set_params(project_copy, {"train": {"epochs": 2}})
    run(["git", "commit", "-qam", "two epochs"], cwd=project_copy)
    run(["dvc", "repro"], cwd=project_copy, env=env)
    gen = project_copy / "models/gan/generator.safetensors"
    two = sha256_file(gen)
    fids = {"baseline": json.loads((project_copy / "metrics/evaluate.json").read_text())["fid"]}

    def exp(name: str, *sets: str) -> list[str]:
        cmd = ["dvc", "exp", "run", "-n", name, *(a for s in sets for a in ("-S", s))]
        res = run(cmd, cwd=project_copy, env=env)
        fids[name] = json.loads((project_copy / "metrics/evaluate.json").read_text())["fid"]
        return stages_run(res.stdout)

    assert exp("one", "train.epochs=1") == ["train", "evaluate"]
    one = sha256_file(gen)
    assert exp("back", "train.epochs=2") == []  # both restored from the run cache
    assert sha256_file(gen) == two
    assert exp("k4", "evaluate.k=4") == ["reference", "evaluate"]

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project_copy / 'mlflow.db'}")
    ids = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(ids)
    runs = {r.data.tags.get("generator_sha256"): r for r in found}
    assert len(found) == 2 and set(runs) == {two, one}  # one run per trained generator
    history = {sha: [m.value for m in client.get_metric_history(r.info.run_id, "fid")]
               for sha, r in runs.items()}  # fmt: skip
    assert history[one] == [pytest.approx(fids["one"])]
    assert history[two] == [pytest.approx(fids["baseline"]), pytest.approx(fids["k4"])]
    assert runs[one].data.tags["dvc_exp_name"] == "one"
