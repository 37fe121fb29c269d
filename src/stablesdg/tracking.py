"""MLflow tracking: one place that knows the store, the experiment and the tags every run carries."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import mlflow

from .config import Params, flatten
from .provenance import dvc_hash
from .utils import sha256_tree

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # MLflow 3's own default; a ./mlruns file store is refused


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def use_store() -> tuple[str, str]:
    """Point MLflow's process-global URIs at the one configured store; returns (tracking, registry) URI.

    Fluent calls (`mlflow.pytorch.load_model("models:/...")`, artifact downloads) read those globals, so every
    entry point sets them from MLFLOW_TRACKING_URI rather than trusting whatever an earlier caller left there.
    The registry always lives in the tracking store (the sqlite file or the server): `mlflow.set_registry_uri`
    writes MLFLOW_REGISTRY_URI into the environment, so reading that variable back would resurrect stale stores.
    """
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri, uri


def configure(experiment: str) -> None:
    use_store()
    mlflow.set_experiment(experiment)


def git_commit(cwd: str | Path = ".") -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# What "dirty" means for provenance: the code and pipeline definition differ from the commit. Pipeline outputs
# (metrics/, dvc.lock, reports/) are rewritten by every `dvc repro`, so counting them would mark every run dirty.
CODE_PATHS = ("src", "deploy/src", "dvc.yaml", "params.yaml", "pyproject.toml")


def git_dirty(cwd: str | Path = ".") -> str:
    """"true" when tracked code/pipeline files differ from HEAD, "false" when clean, "unknown" without git."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS],
                             cwd=cwd, capture_output=True, text=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return "true" if out.stdout.strip() else "false"


def data_tags(paths: Sequence[str | Path]) -> dict[str, str]:
    """Tags that pin a run to its input data: DVC's md5 where dvc.lock has it, and our own content hash."""
    tags: dict[str, str] = {}
    for path in paths:
        name = Path(path).as_posix()
        if not Path(path).exists():
            continue
        md5 = dvc_hash(name)
        if md5:
            tags[f"dvc_hash.{name}"] = md5
        tags[f"data_sha256.{name}"] = sha256_tree(path)
    return tags


@contextlib.contextmanager
def stage_run(
    stage: str,
    params: Params,
    inputs: Sequence[str | Path] = (),
    run_name: str | None = None,
    nested: bool = False,
    extra_tags: dict[str, Any] | None = None,
) -> Iterator[Any]:
    """An MLflow run for one pipeline stage with flattened params, git commit and input-data hashes."""
    configure(params.tracking.experiment)
    with mlflow.start_run(run_name=run_name or stage, nested=nested) as run:
        mlflow.set_tags(
            {"stage": stage, "git_commit": git_commit(), "git_dirty": git_dirty(), **data_tags(inputs), **(extra_tags or {})}
        )
        flat = {k: ("" if v is None else str(v))[:500] for k, v in flatten(params).items()}
        # log_params refuses batches over 100 keys on some stores; chunk them.
        items = sorted(flat.items())
        for i in range(0, len(items), 90):
            mlflow.log_params(dict(items[i : i + 90]))
        yield run


def log_image(image: Any, artifact_file: str) -> None:
    """Log a PIL image as a PNG artifact (mlflow.log_image wants numpy or PIL; keep the name explicit)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        image.save(path)
        folder = Path(artifact_file).parent.as_posix()
        mlflow.log_artifact(str(path), artifact_path=None if folder in ("", ".") else folder)
