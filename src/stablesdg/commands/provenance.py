"""`stablesdg provenance MODEL.onnx`: check an exported model's provenance metadata against this repository and
the MLflow registry (commit, DVC hashes, prior, adapters, registered weights and logits)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import click
import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from torch import nn

from .. import registry
from ..classifier import predict_logits
from ..export import onnx_logits, session, weights_sha256
from ..provenance import (
    ADAPTERS_DIR,
    UNKNOWN,
    Check,
    check_adapters,
    check_commit,
    check_data,
    compare,
    prior_recipe_sha256,
    read_metadata,
)
from ..stages.common import PROCESSED, SYNTHETIC, cli_errors, path_option
from ..tracking import use_store


def check_registry(meta: Mapping[str, str], onnx_path: Path, atol: float = 1e-3, rtol: float = 1e-3) -> list[Check]:
    """The MLflow version: same run, same weights (state_dict hash), and the ONNX graph computes the same
    logits as the registered torch model on a fixed seeded input (a copied metadata block cannot pass)."""
    name, version = meta.get("model_name", UNKNOWN), meta.get("model_version", UNKNOWN)
    label = f"{name} v{version}"
    try:
        mv = registry.client().get_model_version(name, version)
        model = mlflow.pytorch.load_model(f"models:/{name}/{version}", map_location="cpu").eval()
    except MlflowException as err:
        return [Check("mlflow version", "MISMATCH", f"{label} not found in the registry: {err.message[:200]}")]
    checks = [compare("mlflow run id", meta.get("mlflow_run_id", UNKNOWN), mv.run_id, f"registry {label}"),
              compare("weights", meta.get("weights_sha256", UNKNOWN), weights_sha256(model), f"registry {label}")]
    if meta.get("quantized") == "true":
        checks.append(Check("logits", "SKIP", "int8 model: its logits differ from fp32 by design"))
        return checks
    checks.append(_logits_check(model, onnx_path, atol, rtol, label))
    return checks


def _logits_check(model: nn.Module, onnx_path: Path, atol: float, rtol: float, label: str) -> Check:
    sess = session(onnx_path)
    x = np.random.default_rng(0).normal(size=(4, *sess.get_inputs()[0].shape[1:])).astype(np.float32)
    expected, got = predict_logits(model, x), onnx_logits(sess, x)
    diff = float(np.abs(expected - got).max())
    if not np.allclose(got, expected, atol=atol, rtol=rtol):
        return Check("logits", "MISMATCH", f"ONNX vs registry {label} on a fixed input: max |diff| {diff:.3g}")
    return Check("logits", "OK", f"ONNX = registry {label} on a fixed input (max |diff| {diff:.2g})")


def run_checks(onnx_path: Path, repo: Path, processed: Path, synthetic: Path, adapters_dir: Path,
               lock: Path, registry_check: bool = True) -> list[Check]:
    meta = read_metadata(onnx_path)
    checks = [check_commit(meta, repo),
              check_data("data_hash", meta.get("data_hash", UNKNOWN), processed, lock),
              check_data("synthetic_hash", meta.get("synthetic_hash", UNKNOWN), synthetic, lock),
              compare("prior recipe", meta.get("prior_recipe_sha256", UNKNOWN), prior_recipe_sha256(),
                       "embedded prior recipe.json"),
              check_adapters(meta, adapters_dir)]
    if registry_check:
        checks += check_registry(meta, onnx_path)
    return checks


@click.command("provenance")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@path_option("--processed", default=PROCESSED)
@path_option("--synthetic", default=SYNTHETIC)
@path_option("--adapters", default=str(ADAPTERS_DIR))
@path_option("--lock", default="dvc.lock")
@click.option("--no-registry", is_flag=True, help="Skip the MLflow checks (no store reachable).")
@cli_errors
def provenance_command(model: Path, processed: Path, synthetic: Path, adapters: Path, lock: Path,
                       no_registry: bool) -> None:
    """Check MODEL.onnx against this repository: commit, DVC hashes, prior, adapters, MLflow weights.

    Prints each check as OK / MISMATCH (SKIP: the evidence is not in this workspace); exit 1 on any mismatch.
    """
    if not no_registry:
        use_store()
    checks = run_checks(model, Path("."), processed, synthetic, adapters, lock, registry_check=not no_registry)
    for c in checks:
        click.echo(f"{c.status:<9} {c.name:<15} {c.detail}")
    bad = [c.name for c in checks if c.status == "MISMATCH"]
    if bad:
        click.echo(f"provenance: {len(bad)} mismatch(es): {', '.join(bad)}", err=True)
        raise SystemExit(1)
    click.echo(f"provenance: {model} matches this repository")
