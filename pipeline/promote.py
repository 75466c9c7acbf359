"""The promotion gate: make the workspace's generator the team's champion if it earns it.

Not a DVC stage: it changes shared state, the aliases of the registered model
mnist-gan-generator. It finds the registered version that holds GAN's generator (by SHA-256),
always points the alias challenger at it, and compares it with the version under the alias
champion on the metrics the evaluate stage logged for both, read from each version's logged
model (MLflow 3; the versions' tags are for the UI and do not count):

  fid                 at most (1 - promote.fid_margin) times the champion's
  modes               all 10 digits drawn
  memorized_fraction  not above real data's (real_memorized_fraction)

Only when every rule passes does champion move. The first promotion (no champion yet) checks
the last two rules. Exit codes, for CI: 0 promoted (or the challenger already is the champion),
3 refused (champion unchanged), 1 error (no registered version holds these weights, evaluate has
not scored it, the tracking store cannot be reached). --dry-run judges and says what it would do,
moving no alias, with the same exit codes: what CI runs on a pull request.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, NamedTuple

import click
import registry
import tracking
from common import PARAMS_OPTION, folder_option, load_or_exit
from mlflow.exceptions import MlflowException

from mnist_gan.models import GENERATOR_FILE
from mnist_gan.utils import sha256_file

REFUSED = 3
ALL_MODES = 10


class Rule(NamedTuple):
    """One line of the comparison: a metric, both values, the rule and whether it holds."""

    metric: str
    champion: float | None
    challenger: float
    rule: str
    passed: bool


def rules(challenger: dict[str, float], champion: dict[str, float] | None,
          fid_margin: float) -> list[Rule]:  # fmt: skip
    """The gate's rules for a challenger's metrics against the champion's (None: no champion)."""
    old = champion or {}
    out = []
    if champion is not None:
        bound = (1.0 - fid_margin) * champion["fid"]
        out.append(Rule("fid", champion["fid"], challenger["fid"], f"<= {bound:.4g}",
                        challenger["fid"] <= bound))  # fmt: skip
    out.append(Rule("modes", old.get("modes"), challenger["modes"], f"= {ALL_MODES}",
                    challenger["modes"] == ALL_MODES))  # fmt: skip
    real = challenger["real_memorized_fraction"]
    out.append(Rule("memorized_fraction", old.get("memorized_fraction"),
                    challenger["memorized_fraction"], f"<= {real:.4g} (real data)",
                    challenger["memorized_fraction"] <= real))  # fmt: skip
    return out


def table(result: list[Rule], versions: tuple[str, str], extra: dict[str, tuple[Any, Any]]) -> str:
    """The comparison as a text table; ``extra``: shown, not judged."""
    head = ("metric", f"champion {versions[0]}", f"challenger {versions[1]}", "rule", "")
    lines = [(r.metric, r.champion, r.challenger, r.rule, "pass" if r.passed else "FAIL")
             for r in result]  # fmt: skip
    lines += [(name, a, b, "(shown only)", "") for name, (a, b) in extra.items()]
    cells = [head] + [tuple("-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
                            for v in line) for line in lines]  # fmt: skip
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in cells)  # fmt: skip


# What decides a version's scores: its evaluator and evaluate's settings (batch_size does not).
SCORING = ("classifier_sha256", "base.seed", "evaluate.num_samples", "evaluate.k",
           "evaluate.is_splits")  # fmt: skip


def scoring_differences(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """How two versions' evaluations differ, from the tags evaluate put on them; a version
    scored before those tags existed is said to be unknown."""
    unknown = [name for name, tags in (("the champion", old), ("the challenger", new))
               if not all(k in tags for k in SCORING)]  # fmt: skip
    if unknown:
        return [f"{' and '.join(unknown)} does not record how it was scored"]
    out = [f"{k} {old[k]} vs {new[k]}" for k in SCORING[1:] if old[k] != new[k]]
    if old["classifier_sha256"] != new["classifier_sha256"]:
        out.insert(0, "another evaluator classifier")
    return out


def tag_mismatches(version: Any, metrics: dict[str, float]) -> list[str]:
    """The version's metric tags that differ from its logged model's metrics (edited by hand,
    or left by an older evaluation): said, never used."""
    out = []
    for key, value in metrics.items():
        tag = version.tags.get(key)
        try:
            same = tag is None or abs(float(tag) - value) <= 1e-9 * max(1.0, abs(value))
        except ValueError:
            same = False
        if not same:
            out.append(f"v{version.version} tag {key}={tag} (logged: {value:.6g})")
    return out


def _set_alias(alias: str, version: str) -> None:
    try:
        registry.set_alias(alias, version)
    except (*tracking.tracking_failures(), OSError) as exc:  # OSError: a file store's disk
        need = f"EDIT on the registered model {registry.REGISTERED_MODEL}"
        why = tracking.refusal(tracking.tracking_uri(), exc, need) or tracking.short(exc)
        sys.exit(f"error: could not point {alias} at version {version}: {why}")


@click.command(help=__doc__)
@folder_option("--gan", "GAN folder whose generator is the challenger, e.g. models/gan.")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Judge and print the verdict, moving no alias (for CI on a pull request).",
)
@PARAMS_OPTION
def main(gan: Path, dry_run: bool, params_file: Path) -> None:
    """Promote the generator in GAN to champion when it passes the gate."""
    margin = load_or_exit(params_file).promote.fid_margin
    try:
        tracking.check_reachable()
        sha = sha256_file(gan / GENERATOR_FILE)
        new = registry.find_model_version(sha)
        new_metrics = registry.version_metrics(new)
        old = registry.alias_version("champion")
        old_metrics = registry.version_metrics(old) if old is not None else None
    except (OSError, RuntimeError, ValueError, MlflowException) as exc:
        sys.exit(f"error: {tracking.short(exc, 300)}")
    name = registry.REGISTERED_MODEL
    if not dry_run:
        _set_alias("challenger", new.version)
    if old is not None and old.version == new.version:
        click.echo(f"{name} version {new.version} is the champion already")
        return
    result = rules(new_metrics, old_metrics, margin)
    extra = {k: ((old_metrics or {}).get(k), new_metrics[k])
             for k in ("is_mean", "precision", "recall", "coverage", "label_accuracy")
             if k in new_metrics}  # fmt: skip
    click.echo(table(result, (f"v{old.version}" if old else "-", f"v{new.version}"), extra))
    checked = [(new, new_metrics)] + ([(old, old_metrics)] if old is not None else [])
    if edited := [m for version, values in checked for m in tag_mismatches(version, values)]:
        click.echo(f"note: tags differ from the logged metrics, which the gate uses: "
                   f"{'; '.join(edited)}", err=True)  # fmt: skip
    if old is not None and (differ := scoring_differences(old.tags, new.tags)):
        click.echo(f"note: {'; '.join(differ)}: the comparison may not be like for like",
                   err=True)  # fmt: skip
    champion = f"version {old.version}" if old else "unset"
    if dry_run:  # the same exit codes, no alias moved
        passed = all(r.passed for r in result)
        click.echo(
            f"dry run: {name} version {new.version} would be "
            + ("promoted" if passed else f"refused; the champion stays {champion}")
        )
        sys.exit(0 if passed else REFUSED)
    if not all(r.passed for r in result):
        click.echo(f"refused: {name} version {new.version} is the challenger; the champion "
                   f"stays {champion}")  # fmt: skip
        sys.exit(REFUSED)
    _set_alias("champion", new.version)
    click.echo(f"promoted: {name} version {new.version} is the champion"
               + (f" (was version {old.version})" if old else ""))  # fmt: skip


if __name__ == "__main__":
    main()
