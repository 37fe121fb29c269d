"""Model registry: the best classifier of a training run becomes a version; aliases say which one the line runs.

Policy. Each `stablesdg train` registers ONE version: the better of its two variants on the primary metric
(real+synthetic only when strictly better than the real-only baseline, the simpler model wins ties). Both stay
as MLflow runs, so the baseline is always one click away, and the version's tags record the variant and the
gain. The new version takes `champion` only when it beats the current champion on the same test set (the
champion is re-evaluated when its test-set hash differs); otherwise it is `challenger`. Nothing is ever
deleted: promotions and rollbacks move aliases and record their reason as tags.

The registry receives what it needs as arguments (names, the classifier section, the test set with a function
that scores a model on it, the evidence paths): it imports neither the classifier nor a stage. Its commands
(`stablesdg registry ...`) live in `commands/registry.py`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from .card import CARD_FILE, CARD_TAG, CardInputs, fid_per_class
from .card import render as render_card
from .config import ClassifierConfig
from .errors import RegistryError
from .preprocess import PreprocessSpec
from .provenance import registration_tags
from .tracking import tracking_uri, use_store

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

    from .comparison import VariantResult

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous-champion"


@dataclass
class Registration:
    model_name: str
    version: str
    alias: str
    variant: str
    reason: str
    primary_metric: str
    value: float
    champion_before: str | None
    champion_value: float | None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ComparisonSet:
    """The test set a training run was evaluated on, as the registry compares the champion on it."""

    sha256: str
    spec: PreprocessSpec
    score: Callable[[Any, PreprocessSpec, str], float]  # (model, the model's spec, metric) -> metric here


@dataclass
class Evidence:
    """Where the registered version's evidence lies (hashed into its tags, shown on its model card)."""

    processed: Path
    synthetic: Path = Path("data/synthetic")
    fid_file: Path | None = None
    fid_report: Path | None = None
    grids_dir: Path | None = None


# --------------------------------------------------------------------------------------- helpers
def client() -> MlflowClient:
    return MlflowClient(*use_store())


def alias_version(mlflow_client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return mlflow_client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def load_run_spec(run_id: str) -> PreprocessSpec:
    """The PreprocessSpec a run logged as `preprocess.json` (the model's input contract)."""
    return PreprocessSpec.from_dict(mlflow.artifacts.load_dict(f"runs:/{run_id}/preprocess.json"))


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def choose_best(results: Sequence[VariantResult], metric: str) -> VariantResult:
    """The augmented variant only when strictly better than the baseline (the simpler model wins ties)."""
    best = results[0]
    for candidate in results[1:]:
        if candidate.evaluation.metric(metric) > best.evaluation.metric(metric):
            best = candidate
    return best


def champion_score(champion: ModelVersion, test: ComparisonSet, metric: str) -> tuple[float | None, str]:
    """The champion's primary metric on the CURRENT test set: from its tag when the test set is the same,
    otherwise by loading the champion and re-evaluating it here."""
    tag = champion.tags.get(f"test_{metric}")
    if champion.tags.get("test_set_sha256") == test.sha256 and tag is not None:
        return float(tag), "same test set (test_set_sha256 tags match)"
    spec = load_run_spec(champion.run_id)
    if spec.class_names != test.spec.class_names:
        return None, (f"champion v{champion.version} predicts classes {spec.class_names}, this test set has "
                      f"{test.spec.class_names}: not comparable, promote manually if intended")
    model = mlflow.pytorch.load_model(f"models:/{champion.name}/{champion.version}", map_location="cpu")
    value = test.score(model, spec, metric)
    return value, f"champion v{champion.version} re-evaluated on the current test set (its own was different)"


def decide(value: float, champion: ModelVersion | None, champion_value: float | None, why: str,
           metric: str) -> tuple[str, str]:
    if champion is None:
        return CHAMPION, "first registered version"
    if champion_value is None:
        return CHALLENGER, why
    verdict = (CHAMPION, "beats") if value > champion_value else (CHALLENGER, "does not beat")
    return verdict[0], f"{metric} {value:.4f} {verdict[1]} champion v{champion.version} ({champion_value:.4f}); {why}"


# --------------------------------------------------------------------------------------- registration
def version_tags(best: VariantResult, cfg: ClassifierConfig, gain: dict | None, run_tags: dict[str, str],
                 evidence: Evidence, repeats: dict | None = None) -> dict[str, str]:
    metric = cfg.primary_metric
    tags = {k: v for k, v in run_tags.items() if k.startswith(("dvc_hash.", "data_sha256."))}
    tags.update(registration_tags(run_tags, evidence.processed, evidence.synthetic, gain, repeats,
                                  evidence.fid_file, evidence.fid_report))
    tags.update({
        "variant": best.variant,
        "test_set_sha256": best.test_hash,
        "synthetic_sha256": run_tags.get("synthetic_sha256", "none"),
        "primary_metric": metric,
        # repr: full precision, so a champion compared by its tag is compared exactly
        "test_accuracy": repr(float(best.evaluation.accuracy)),
        "test_macro_f1": repr(float(best.evaluation.macro_f1)),
        "gain_accuracy": "n/a" if gain is None else f"{gain['accuracy']:+.6f}",
        "gain_macro_f1": "n/a" if gain is None else f"{gain['macro_f1']:+.6f}",
        "backbone": cfg.backbone,
        "input_size": str(cfg.input_size),
        "n_train_real": str(best.n_train_real),
        "n_train_synthetic": str(best.n_train_synthetic),
    })
    return tags


def _artifact_link(run_id: str, experiment_id: str, path: str = "") -> str:
    uri = tracking_uri()
    if uri.startswith("http"):
        suffix = f"/artifacts/{path}" if path else ""
        return f"[{path or 'run'}]({uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}{suffix})"
    return f"`runs:/{run_id}/{path}`" if path else f"run `{run_id}`"


def describe(version: str, best: VariantResult, results: Sequence[VariantResult], registration: Registration,
             tags: dict[str, str], class_names: Sequence[str], experiment_id: str) -> str:
    """Markdown for the registry UI: what this version is, how it compares, where its evidence is."""
    metric = registration.primary_metric
    lines = [
        f"### {registration.model_name} v{version}: `{best.variant}`",
        f"**Alias: `{registration.alias}`** - {registration.reason}.",
        "",
        "| test metric | " + " | ".join(r.variant for r in results) + " | current champion |",
        "|---|" + "---|" * (len(results) + 1),
    ]
    for name in ("accuracy", "macro_f1"):
        champ = (f"{registration.champion_value:.4f} (v{registration.champion_before})"
                 if name == metric and registration.champion_value is not None else "-")
        lines.append(f"| {name} | " + " | ".join(f"{r.evaluation.metric(name):.4f}" for r in results) + f" | {champ} |")
    lines += ["", "| class | precision | recall |", "|---|---|---|"]
    lines += [f"| {c} | {p:.3f} | {r:.3f} |"
              for c, p, r in zip(class_names, best.evaluation.precision, best.evaluation.recall, strict=True)]
    line = best.line.to_dict() if best.line else None
    lines += [
        "",
        f"- gain over real-only: accuracy {tags['gain_accuracy']}, macro-F1 {tags['gain_macro_f1']}",
        f"- gain macro-F1 over {tags['gain_repeats']} seed(s): {tags['gain_macro_f1_mean']} "
        f"+/- {tags['gain_macro_f1_std']}",
        f"- test set sha256 `{tags['test_set_sha256'][:16]}`, synthetic `{tags['synthetic_hash'][:24]}`, "
        f"mean FID {tags['mean_fid']} / KID {tags['mean_kid']} ({tags['feature_net']}), "
        f"git `{tags.get('git_commit', 'unknown')[:12]}`" + (" (dirty)" if tags.get("git_dirty") == "true" else ""),
        f"- line images (review-import, trained on): {line['images']}, accuracy on them {line['accuracy']:.4f}"
        if line else "- line images: none imported",
        f"- **model card: {_artifact_link(best.run_id, experiment_id, CARD_FILE)}**",
        f"- evidence: {_artifact_link(best.run_id, experiment_id)}, "
        f"{_artifact_link(best.run_id, experiment_id, 'confusion_matrix.png')}, "
        f"{_artifact_link(best.run_id, experiment_id, 'misclassified.png')}, "
        f"{_artifact_link(best.run_id, experiment_id, 'preprocess.json')}",
    ]
    return "\n".join(lines)


def register_best(name: str, cfg: ClassifierConfig, results: Sequence[VariantResult], test: ComparisonSet,
                  gain: dict | None, parent_run_id: str, evidence: Evidence,
                  repeats: dict | None = None) -> Registration:
    """Register the better variant as registered model `name`'s new version, log its model card, give it
    `champion` or `challenger`."""
    mlflow_client = client()
    metric = cfg.primary_metric
    best = choose_best(results, metric)
    value = best.evaluation.metric(metric)
    champion = alias_version(mlflow_client, name, CHAMPION)
    champion_value, why = champion_score(champion, test, metric) if champion else (None, "")
    alias, reason = decide(value, champion, champion_value, why, metric)
    run = mlflow_client.get_run(best.run_id)
    parent_tags = mlflow_client.get_run(parent_run_id).data.tags
    tags = version_tags(best, cfg, gain, {**parent_tags, **run.data.tags}, evidence, repeats)
    if champion is not None and champion_value is not None:
        tags[f"champion_v{champion.version}_{metric}_on_this_test_set"] = f"{champion_value:.6f}"
    tags["registration_decision"] = f"{alias}: {reason}"[:5000]
    mv = mlflow.register_model(best.model_uri, name, tags=tags)
    registration = Registration(name, str(mv.version), alias, best.variant, reason, metric, value,
                                str(champion.version) if champion else None, champion_value)
    card = CardInputs(registration, results, test.spec.class_names, tags, repeats,
                      fid_per_class(evidence.fid_report), evidence.grids_dir)
    mlflow_client.log_text(best.run_id, render_card(card), CARD_FILE)
    mlflow_client.set_model_version_tag(name, mv.version, CARD_TAG, CARD_FILE)
    mlflow_client.update_model_version(name, mv.version, describe(
        str(mv.version), best, results, registration, tags, test.spec.class_names, run.info.experiment_id))
    if alias == CHAMPION and not may_move_champion(mlflow_client, name, mv.version):
        registration.alias, registration.reason = CHALLENGER, f"{reason}; awaiting the approver (`registry promote`)"
        alias = CHALLENGER
    if alias == CHAMPION and champion is not None:
        mlflow_client.set_registered_model_alias(name, PREVIOUS, champion.version)
    mlflow_client.set_registered_model_alias(name, alias, mv.version)
    return registration


def may_move_champion(mlflow_client: MlflowClient, name: str, version: str) -> bool:
    """On a shared registry only the approver moves `champion` (registry_auth.py): an engineer's training run
    asks by setting it, and a refusal (HTTP 403) leaves the version a challenger for the approver."""
    try:
        mlflow_client.set_registered_model_alias(name, CHAMPION, version)
    except MlflowException as err:
        if err.get_http_status_code() == 403 or err.error_code == "PERMISSION_DENIED":
            return False
        raise
    return True


# --------------------------------------------------------------------------------------- alias moves
def has_card(mlflow_client: MlflowClient, mv: ModelVersion) -> bool:
    """The version's tag names a card AND that artifact is in its run (a tag alone proves nothing)."""
    path = mv.tags.get(CARD_TAG)
    return bool(path) and any(a.path == path for a in mlflow_client.list_artifacts(mv.run_id))


def promotion_objections(mlflow_client: MlflowClient, mv: ModelVersion, champion: ModelVersion | None) -> list[str]:
    """Why `mv` should not become champion without a human override (empty: nothing against it)."""
    objections = []
    if not has_card(mlflow_client, mv):
        objections.append(f"v{mv.version} has no model card ({CARD_FILE} in run {mv.run_id})")
    if champion is not None:
        ours, theirs = mv.tags.get("test_set_sha256"), champion.tags.get("test_set_sha256")
        if not ours or ours != theirs:
            objections.append(f"v{mv.version} was tested on test set {str(ours)[:12]}, champion v{champion.version}"
                              f" on {str(theirs)[:12]}: the numbers are not comparable")
    return objections


def promote(mlflow_client: MlflowClient, name: str, version: str, reason: str, force: bool = False) -> str | None:
    """Make `version` the champion; the old champion becomes `previous-champion`. Returns the old one.

    Refused when the version has no model card or another test set than the champion's, unless `force`: the
    override and its reason are then recorded as the `forced_promotion` tag.
    """
    mv = mlflow_client.get_model_version(name, version)  # raises for an unknown version
    old = alias_version(mlflow_client, name, CHAMPION)
    if old is not None and str(old.version) == str(version):
        raise RegistryError(f"{name} v{version} is already the champion")
    objections = promotion_objections(mlflow_client, mv, old)
    if objections and not force:
        raise RegistryError(f"refusing to promote {name} v{version}: " + "; ".join(objections)
                                   + ". Pass --force --reason '...' to override (the reason is recorded).")
    if objections:
        mlflow_client.set_model_version_tag(name, version, "forced_promotion",
                                            f"{now()} {reason} (overrode: {'; '.join(objections)})"[:5000])
    if old is not None:
        mlflow_client.set_registered_model_alias(name, PREVIOUS, old.version)
        mlflow_client.set_model_version_tag(name, old.version, "demoted_reason", f"{now()} {reason}")
    challenger = alias_version(mlflow_client, name, CHALLENGER)
    if challenger is not None and str(challenger.version) == str(version):
        mlflow_client.delete_registered_model_alias(name, CHALLENGER)  # the alias only; the version stays
    mlflow_client.set_registered_model_alias(name, CHAMPION, version)
    mlflow_client.set_model_version_tag(name, version, "promotion_reason", f"{now()} {reason}")
    mlflow_client.set_model_version_tag(name, version, "promoted_from", old.version if old else "none")
    return str(old.version) if old else None


def rollback(mlflow_client: MlflowClient, name: str, reason: str, to_version: str | None = None) -> tuple[str, str]:
    """Champion back to `previous-champion` (or `to_version`); the rolled-back one becomes previous-champion."""
    current = alias_version(mlflow_client, name, CHAMPION)
    if current is None:
        raise RegistryError(f"{name} has no champion to roll back")
    if to_version is None:
        previous = alias_version(mlflow_client, name, PREVIOUS)
        if previous is None:
            raise RegistryError(f"{name} has no {PREVIOUS}; pass --to VERSION")
        to_version = str(previous.version)
    if str(to_version) == str(current.version):
        raise RegistryError(f"{name} v{to_version} is already the champion")
    mlflow_client.get_model_version(name, to_version)
    mlflow_client.set_registered_model_alias(name, CHAMPION, to_version)
    mlflow_client.set_registered_model_alias(name, PREVIOUS, current.version)
    mlflow_client.set_model_version_tag(name, to_version, "rollback_reason", f"{now()} {reason}")
    mlflow_client.set_model_version_tag(name, current.version, "rolled_back_reason", f"{now()} {reason}")
    return str(current.version), str(to_version)


def _rounded(tag: str | None) -> str:
    if tag is None:
        return "?"
    try:
        return f"{float(tag):.4f}"
    except (TypeError, ValueError):
        return tag or "?"


def list_versions(mlflow_client: MlflowClient, name: str) -> list[dict[str, Any]]:
    versions = mlflow_client.search_model_versions(f"name='{name}'")
    # Aliases by lookup: a server's search results do not always carry them.
    aliases: dict[str, list[str]] = {}
    for alias in (CHAMPION, CHALLENGER, PREVIOUS):
        holder = alias_version(mlflow_client, name, alias)
        if holder is not None:
            aliases.setdefault(str(holder.version), []).append(alias)
    rows = []
    for mv in sorted(versions, key=lambda v: int(v.version)):
        rows.append({
            "version": str(mv.version),
            "aliases": aliases.get(str(mv.version), []),
            "variant": mv.tags.get("variant", "?"),
            "test_accuracy": _rounded(mv.tags.get("test_accuracy")),
            "test_macro_f1": _rounded(mv.tags.get("test_macro_f1")),
            "gain_macro_f1": _rounded(mv.tags.get("gain_macro_f1")),
            "test_set": mv.tags.get("test_set_sha256", "?")[:12],
            "run_id": mv.run_id,
        })
    return rows
