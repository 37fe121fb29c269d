"""Provenance: what a registered version (and the ONNX file made from it) was built from, and the check back.

Recorded once, at registration, as version tags: a later export of an older champion then describes THAT
champion, not whatever the workspace holds today. `stablesdg export` copies the tags into the ONNX
metadata_props (flat strings: the line reads them with onnxruntime alone), `stablesdg-line info` shows them
and `stablesdg provenance MODEL.onnx` checks them against this repository and the MLflow registry.

Data hashes are labelled with their kind: `dvc-md5:<md5>` when dvc.lock had the path, else `sha256:<hex>` (our
own content hash of the folder, `utils.sha256_tree`).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import StableSDGError
from .utils import read_json, sha256_file, sha256_tree

PRIOR_RECIPE = Path(__file__).parent / "assets" / "prior" / "recipe.json"  # diffusion.EMBEDDED_PRIOR (no torch)
ADAPTERS_DIR = Path("models/adapters")
UNKNOWN = "unknown"


class ProvenanceError(StableSDGError, ValueError):
    """A provenance input is unusable (not a readable ONNX model, a malformed adapter record)."""

# Copied from the version tags into the ONNX metadata (same names on both sides).
VERSION_KEYS = ("git_commit", "git_dirty", "data_hash", "synthetic_hash", "prior_recipe_sha256", "adapter_sha256",
                "test_set_sha256", "test_accuracy", "test_macro_f1", "gain_macro_f1_mean", "gain_macro_f1_std",
                "gain_repeats", "mean_fid", "mean_kid", "feature_net")
# Written by the export itself.
EXPORT_KEYS = ("mlflow_run_id", "parity_max_abs_diff", "parity_top1_agreement", "parity_images", "int8_decision",
               "int8_reason")
PROVENANCE_KEYS = (*VERSION_KEYS, *EXPORT_KEYS)  # deploy/src/stablesdg_line/contract.py


# --------------------------------------------------------------------------------------- gathering
def dvc_hash(path: str | Path, lock_file: str | Path = "dvc.lock") -> str | None:
    """The md5 DVC recorded for `path` as a stage output or dependency in dvc.lock (None if not there)."""
    lock = Path(lock_file)
    if not lock.exists():
        return None
    wanted = Path(path).as_posix().rstrip("/")
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    for stage in stages.values():
        for entry in stage.get("outs", []) + stage.get("deps", []):
            if entry.get("path", "").rstrip("/") == wanted and entry.get("md5"):
                return entry["md5"]
    return None


def labelled_hash(tags: Mapping[str, str], path: str | Path) -> str:
    """`dvc-md5:` / `sha256:` hash of `path` from data tags (`tracking.data_tags`); `unknown` if neither."""
    wanted = Path(path).as_posix()
    name = Path(path).name
    for prefix, label in (("dvc_hash.", "dvc-md5"), ("data_sha256.", "sha256")):
        exact = tags.get(prefix + wanted)
        loose = [v for k, v in sorted(tags.items()) if k.startswith(prefix) and k.endswith(name)]
        if exact or loose:
            return f"{label}:{exact or loose[0]}"
    return UNKNOWN


def adapter_hashes(adapters_dir: str | Path = ADAPTERS_DIR) -> dict[str, dict[str, str]]:
    """The `sha256` field of every models/adapters/<class>/adapter.json ({} when no adapter was trained here)."""
    out = {}
    for record in sorted(Path(adapters_dir).glob("*/adapter.json")):
        hashes = read_json(record).get("sha256")
        if not isinstance(hashes, dict):
            raise ProvenanceError(f"{record}: field 'sha256' must map file names to sha256, got {hashes!r}")
        out[record.parent.name] = hashes
    return out


def prior_recipe_sha256(recipe: Path = PRIOR_RECIPE) -> str:
    return sha256_file(recipe) if recipe.exists() else "none"


def short_name(report_key: str) -> str | None:
    """A mean's short name in the provenance: `fid_<net>` -> fid, `kid_<net>_mean` -> kid (the short names
    themselves too); None for the other means (the registry tags and the ONNX provenance keep mean FID and KID
    only: that contract is the line runtime's, deploy/ PROVENANCE_KEYS). The table of evaluate metrics is
    `evaluation.EVALUATE_MEANS`."""
    if report_key == "fid" or report_key.startswith("fid_"):
        return "fid"
    if report_key == "kid" or (report_key.startswith("kid_") and report_key.endswith("_mean")):
        return "kid"
    return None


def fid_means(fid_file: str | Path | None) -> dict[str, float | str]:
    """Mean FID / KID of the synthetic set from metrics/fid.json, whatever the feature net.

    Reads the compact layout (`fid`, `kid`, ...) and the older one (`mean: {fid_<net>, kid_<net>_mean}`).
    """
    if fid_file is None or not Path(fid_file).exists():
        return {}
    return means_of(read_json(fid_file))


def means_of(data: Mapping) -> dict[str, float | str]:
    """`fid_means` of an evaluate result already in memory."""
    mean = data.get("mean", data)
    out: dict[str, float | str] = {}
    for key, value in mean.items():
        short = short_name(key)
        if short and isinstance(value, (int, float)) and not isinstance(value, bool):
            out.setdefault(short, float(value))
    if isinstance(data.get("feature_net"), str):
        out["feature_net"] = data["feature_net"]
    return out


def gain_stats(gain: Mapping[str, float] | None, repeats: Mapping | None, metric: str = "macro_f1") -> dict:
    """Gain over real-only as mean and sample std over the seeds (one seed: the gain itself, std n/a)."""
    if repeats and f"gain_{metric}_mean" in repeats:
        return {"mean": float(repeats[f"gain_{metric}_mean"]), "std": float(repeats[f"gain_{metric}_std"]),
                "repeats": len(repeats.get("seeds", []))}
    if gain is None:
        return {}
    return {"mean": float(gain[metric]), "std": None, "repeats": 1}


def registration_tags(run_tags: Mapping[str, str], processed: str | Path, synthetic: str | Path,
                      gain: Mapping | None, repeats: Mapping | None, fid_file: str | Path | None,
                      fid_report: str | Path | None = None,
                      adapters_dir: str | Path = ADAPTERS_DIR) -> dict[str, str]:
    """The provenance part of a new version's tags (the metrics part is `registry.version_tags`). The feature
    net's name is in the evaluate report only; the means are in both."""
    stats, fid = gain_stats(gain, repeats), {**fid_means(fid_report), **fid_means(fid_file)}
    fmt = lambda v: "n/a" if v is None else f"{v:+.6f}"  # noqa: E731
    return {
        "git_commit": run_tags.get("git_commit", UNKNOWN),
        "git_dirty": run_tags.get("git_dirty", UNKNOWN),
        "data_hash": labelled_hash(run_tags, processed),
        "synthetic_hash": labelled_hash(run_tags, synthetic),
        "prior_recipe_sha256": prior_recipe_sha256(),
        "adapter_sha256": json.dumps(adapter_hashes(adapters_dir), sort_keys=True, separators=(",", ":")),
        "gain_macro_f1_mean": fmt(stats.get("mean")),
        "gain_macro_f1_std": "n/a" if stats.get("std") is None else f"{stats['std']:.6f}",
        "gain_repeats": str(stats.get("repeats", 0)),
        "mean_fid": "n/a" if "fid" not in fid else f"{fid['fid']:.4f}",
        "mean_kid": "n/a" if "kid" not in fid else f"{fid['kid']:.4f}",
        "feature_net": str(fid.get("feature_net", "n/a")),
    }


def version_metadata(tags: Mapping[str, str]) -> dict[str, str]:
    """The ONNX metadata a version's tags give (`unknown` for a version registered before provenance)."""
    return {key: tags.get(key, UNKNOWN) for key in VERSION_KEYS}


# --------------------------------------------------------------------------------------- checking
@dataclass
class Check:
    name: str
    status: str  # OK | MISMATCH | SKIP (the evidence is not in this workspace, e.g. adapters not pulled)
    detail: str


def compare(name: str, recorded: str, actual: str | None, where: str) -> Check:
    if recorded in ("", UNKNOWN):
        return Check(name, "MISMATCH", "not recorded in the model file")
    if actual is None:
        return Check(name, "MISMATCH", f"{where} has no value to compare with {recorded}")
    if recorded != actual:
        return Check(name, "MISMATCH", f"file {recorded}, {where} {actual}")
    return Check(name, "OK", f"{recorded} ({where})")


def check_commit(meta: Mapping[str, str], repo: Path) -> Check:
    commit = meta.get("git_commit", UNKNOWN)
    if commit in ("", UNKNOWN):
        return Check("git commit", "MISMATCH", "not recorded in the model file")
    found = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=repo, capture_output=True,
                           timeout=10).returncode == 0
    dirty = " (tree was dirty at training: uncommitted code changes)" if meta.get("git_dirty") == "true" else ""
    if not found:
        return Check("git commit", "MISMATCH", f"{commit} is not a commit of the repository at {repo}")
    return Check("git commit", "OK", f"{commit} exists{dirty}")


def check_data(name: str, recorded: str, path: Path, lock: Path) -> Check:
    """A `dvc-md5:` hash against dvc.lock; a `sha256:` hash against the folder's content, when it is here."""
    kind, _, value = recorded.partition(":")
    if kind == "dvc-md5":
        return compare(name, recorded, f"dvc-md5:{dvc_hash(path, lock)}" if dvc_hash(path, lock) else None,
                        f"{lock.name} ({path.as_posix()})")
    if kind == "sha256":
        if not path.exists():
            return Check(name, "SKIP", f"{recorded} recorded; {path} is not in this workspace (dvc pull)")
        return compare(name, recorded, f"sha256:{sha256_tree(path)}", f"content of {path}")
    return compare(name, recorded, None, lock.name)


def check_adapters(meta: Mapping[str, str], adapters_dir: Path) -> Check:
    recorded = meta.get("adapter_sha256", UNKNOWN)
    if recorded in ("", UNKNOWN):
        return Check("adapters", "MISMATCH", "not recorded in the model file")
    here = adapter_hashes(adapters_dir)
    if not here:
        return Check("adapters", "SKIP", f"no adapter.json under {adapters_dir} (dvc pull)")
    theirs = json.loads(recorded)
    differ = sorted(c for c in set(theirs) | set(here) if theirs.get(c) != here.get(c))
    if differ:
        return Check("adapters", "MISMATCH", f"classes {differ} differ from {adapters_dir}/<class>/adapter.json")
    return Check("adapters", "OK", f"{len(here)} classes match {adapters_dir}/<class>/adapter.json")


def read_metadata(onnx_path: Path) -> dict[str, str]:
    import onnx  # lazy: `stablesdg provenance` and the registry tags need no onnx otherwise

    try:
        proto = onnx.load_model(str(onnx_path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - onnx raises DecodeError, OSError, ...: all mean "not a model"
        raise ProvenanceError(f"{onnx_path}: not a readable ONNX model ({err})") from None
    return {p.key: p.value for p in proto.metadata_props}
