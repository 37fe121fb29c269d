"""`stablesdg-line pull`: follow a registry alias (e.g. `champion`) with plain HTTP, no mlflow or torch.

The MLflow REST API says which version holds the alias; the version's tags (set by `stablesdg export`) give
the ONNX's sha256 and the export run; the server's proxied artifact endpoint gives the file. A download is
refused unless its sha256 matches the tag AND the line runtime loads it (the same contract checks as
`serve`). DEST keeps two models and their descriptions:

    DEST/current.onnx   current.json     what the line runs
    DEST/previous.onnx  previous.json    what `--rollback` brings back, byte for byte

`current.onnx` is replaced with os.replace, so a reader sees the old file or the new one, never a half one.
Credentials: MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, as for every MLflow client.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("stablesdg_line.pull")

CURRENT, PREVIOUS = "current", "previous"
CHUNK = 1 << 20


class PullError(RuntimeError):
    """The registry could not be read, or what it offered was refused; DEST is unchanged."""


@dataclass(frozen=True)
class ModelInfo:
    version: str
    sha256: str
    git_commit: str
    test_macro_f1: str
    run_id: str
    model: str = ""
    alias: str = ""


@dataclass(frozen=True)
class PullResult:
    changed: bool
    before: ModelInfo | None
    after: ModelInfo | None
    seconds: float

    def summary(self) -> str:
        if not self.changed:
            return f"unchanged: v{self.after.version if self.after else '?'}"
        return (f"{_describe(self.before)} -> {_describe(self.after)}"
                f" ({self.seconds:.2f} s)")


def _describe(info: ModelInfo | None) -> str:
    if info is None:
        return "none"
    return f"v{info.version} (commit {info.git_commit[:12]}, test macro-F1 {info.test_macro_f1})"


class RegistryClient:
    def __init__(self, base_url: str, username: str | None = None, password: str | None = None,
                 timeout: float = 30.0):
        self.base_url, self.timeout = base_url.rstrip("/"), timeout
        self.headers = {}
        if username:
            token = base64.b64encode(f"{username}:{password or ''}".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"

    def _open(self, path: str, params: dict[str, str]):
        url = f"{self.base_url}{path}?{urllib.parse.urlencode(params)}"
        try:
            request = urllib.request.Request(url, headers=self.headers)
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as err:
            hint = {401: "wrong or missing MLFLOW_TRACKING_USERNAME/PASSWORD",
                    403: "this account may not read it",
                    404: "not found"}.get(err.code, err.reason)
            raise PullError(f"registry {url}: HTTP {err.code} ({hint})") from err
        except OSError as err:
            raise PullError(f"registry {self.base_url} unreachable: {err}") from err

    def get_json(self, endpoint: str, **params: str) -> dict:
        with self._open(endpoint, params) as response:
            return json.load(response)

    def download(self, path: str, target: Path) -> str:
        """Stream to `target`; returns its sha256."""
        digest = hashlib.sha256()
        with self._open(path, {}) as response, target.open("wb") as out:
            while chunk := response.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
        return digest.hexdigest()

    def resolve(self, model: str, alias: str) -> ModelInfo:
        found = self.get_json("/api/2.0/mlflow/registered-models/alias", name=model, alias=alias)
        mv = found["model_version"]
        tags = {t["key"]: t["value"] for t in mv.get("tags", [])}
        if "onnx_sha256" not in tags:
            raise PullError(f"{model} v{mv['version']} ({alias}) has no onnx_sha256 tag: "
                            "run `stablesdg export` "
                            "for it first (export logs the ONNX and tags the version)")
        return ModelInfo(str(mv["version"]), tags["onnx_sha256"], tags.get("git_commit", "unknown"),
                         _rounded(tags.get("test_macro_f1")),
                         tags.get("onnx_export_run_id", mv.get("run_id", "")),
                         model, alias)

    def onnx_artifact_path(self, run_id: str) -> str:
        """The proxied download path of the run's ONNX (export logs it under `onnx/`)."""
        run = self.get_json("/api/2.0/mlflow/runs/get", run_id=run_id)["run"]
        root = run["info"]["artifact_uri"]
        if not root.startswith("mlflow-artifacts:"):
            raise PullError(f"run {run_id} stores artifacts at {root}, which a line PC cannot "
                            "reach: start the "
                            "server with --artifacts-destination (proxied artifacts)")
        listing = self.get_json("/api/2.0/mlflow/artifacts/list", run_id=run_id, path="onnx").get("files", [])
        onnx = sorted(f["path"] for f in listing if not f.get("is_dir") and f["path"].endswith(".onnx"))
        if not onnx:
            raise PullError(f"run {run_id} has no .onnx under onnx/")
        relative = root.split(":", 1)[1].lstrip("/")
        return f"/api/2.0/mlflow-artifacts/artifacts/{relative}/{onnx[0]}"


def _rounded(value: str | None) -> str:
    try:
        return f"{float(value):.4f}" if value is not None else "?"
    except ValueError:
        return value or "?"


def read_info(dest: Path, which: str) -> ModelInfo | None:
    path = dest / f"{which}.json"
    return ModelInfo(**json.loads(path.read_text())) if path.exists() else None


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def check_loads(model_path: Path, expected_sha256: str) -> None:
    """The runtime's own load checks (contract, sha256, a warm-up inference)."""
    from .classifier import Classifier, RuntimeOptions

    try:
        Classifier(model_path, RuntimeOptions(expected_sha256=expected_sha256)).close()
    except Exception as err:  # noqa: BLE001 - any load failure (onnxruntime raises its own types) is a refusal
        raise PullError(f"refused: the downloaded model fails the load checks: {err}") from err


def install(dest: Path, new_model: Path, info: ModelInfo) -> None:
    """Keep the current model as previous, then put the new one in place with one atomic rename."""
    current, previous = dest / f"{CURRENT}.onnx", dest / f"{PREVIOUS}.onnx"
    if current.exists():
        keep = dest / ".previous.tmp"
        keep.unlink(missing_ok=True)
        os.link(current, keep)
        os.replace(keep, previous)
        os.replace(dest / f"{CURRENT}.json", dest / f"{PREVIOUS}.json")
    os.replace(new_model, current)
    _write_json_atomic(dest / f"{CURRENT}.json", asdict(info))


def pull(client: RegistryClient, model: str, alias: str, dest: Path) -> PullResult:
    start = time.perf_counter()
    dest.mkdir(parents=True, exist_ok=True)
    before = read_info(dest, CURRENT)
    wanted = client.resolve(model, alias)
    if before is not None and before.sha256 == wanted.sha256 and (dest / f"{CURRENT}.onnx").exists():
        return PullResult(False, before, before, time.perf_counter() - start)
    incoming = dest / ".incoming.onnx"
    try:
        digest = client.download(client.onnx_artifact_path(wanted.run_id), incoming)
        if digest != wanted.sha256:
            raise PullError(f"refused: {model} v{wanted.version} downloaded with sha256 {digest[:16]}, its "
                            f"onnx_sha256 tag says {wanted.sha256[:16]}: tampered or corrupt artifact")
        check_loads(incoming, wanted.sha256)
        install(dest, incoming, wanted)
    finally:
        incoming.unlink(missing_ok=True)
    return PullResult(True, before, wanted, time.perf_counter() - start)


def rollback(dest: Path) -> PullResult:
    """Swap current and previous (running it twice goes forward again)."""
    start = time.perf_counter()
    current, previous = dest / f"{CURRENT}.onnx", dest / f"{PREVIOUS}.onnx"
    if not previous.exists():
        raise PullError(f"{dest}: no previous model to roll back to")
    before, after = read_info(dest, CURRENT), read_info(dest, PREVIOUS)
    swap = dest / ".rollback.tmp"
    swap.unlink(missing_ok=True)
    os.link(current, swap)
    os.replace(previous, current)
    os.replace(swap, previous)
    if before is not None:
        _write_json_atomic(dest / f"{PREVIOUS}.json", asdict(before))
    if after is not None:
        _write_json_atomic(dest / f"{CURRENT}.json", asdict(after))
    return PullResult(True, before, after, time.perf_counter() - start)


def parse_interval(text: str) -> float:
    """'300', '30s', '5m', '1h' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    value = text.strip().lower()
    scale = units.get(value[-1:])
    number = float(value[:-1] if scale else value)
    if number <= 0:
        raise ValueError(f"--every {text}: must be positive")
    return number * (scale or 1)


def follow(client: RegistryClient, model: str, alias: str, dest: Path, every_s: float,
           rounds: int | None = None) -> None:
    """Pull every `every_s`; a failed round (server down, refused model) is only logged."""
    done = 0
    while rounds is None or done < rounds:
        try:
            log.info("pull: %s", pull(client, model, alias, dest).summary())
        except PullError as err:
            log.warning("pull failed, keeping the current model: %s", err)
        done += 1
        if rounds is None or done < rounds:
            time.sleep(every_s)


def add_parser(commands) -> None:
    """The `pull` sub-command (registered by cli.py)."""
    pull_cmd = commands.add_parser("pull", help="fetch the model a registry alias names (e.g. champion)")
    pull_cmd.add_argument("--registry", default=os.environ.get("MLFLOW_TRACKING_URI"),
                          help="MLflow server URL (default: $MLFLOW_TRACKING_URI)")
    pull_cmd.add_argument("--model", help="registered model name")
    pull_cmd.add_argument("--alias", default="champion")
    pull_cmd.add_argument("--dest", type=Path, required=True,
                          help="folder holding current.onnx / previous.onnx")
    pull_cmd.add_argument("--rollback", action="store_true",
                          help="swap back to the previous model, then exit")
    pull_cmd.add_argument("--every",
                          help="keep following: pull every 30s / 5m / 1h (failed rounds are logged)")
    pull_cmd.add_argument("--timeout", type=float, default=30.0, help="HTTP timeout in seconds (default 30)")


def run(args) -> int:
    """0: done (changed or not); 1: the registry failed or the model was refused (DEST unchanged)."""
    try:
        if args.rollback:
            print(rollback(args.dest).summary())
            return 0
        if not args.registry or not args.model:
            raise PullError("pull needs --registry (or $MLFLOW_TRACKING_URI) and --model")
        client = RegistryClient(args.registry, os.environ.get("MLFLOW_TRACKING_USERNAME"),
                                os.environ.get("MLFLOW_TRACKING_PASSWORD"), args.timeout)
        if args.every:
            follow(client, args.model, args.alias, args.dest, parse_interval(args.every))
            return 0
        print(pull(client, args.model, args.alias, args.dest).summary())
        return 0
    except (PullError, ValueError) as err:
        print(f"stablesdg-line pull: {err}", file=sys.stderr)
        return 1
