"""How long a line PC takes to follow the champion (issue 25): `stablesdg-line pull` against a real registry.

    .venv/bin/python benchmarks/bench_pull.py

The registry is the plant's (tests/registry_services.py): PostgreSQL 15 (initdb / pg_ctl in a temp folder) and
`mlflow server --app-name basic-auth` with proxied artifacts on 127.0.0.1. Two versions of a resnet18 (torchvision,
random weights, 128 px, 6 classes; ~45 MB ONNX, exported with the pipeline's own exporter) are published as an
engineer; the approver moves `champion` between them before each round; the read-only line account pulls:

1. cli: the wall time of the `stablesdg-line pull` process (Python start-up and imports included) and the time
   the command itself reports (resolve + download + sha256 + load checks + swap), --rounds times;
2. phases, in-process, --rounds times: resolve the alias (1 REST call), find the export run's ONNX (2 calls:
   runs/get, artifacts/list), download through the proxied artifact endpoint (streamed, sha256 on the fly), the
   runtime's load checks (contract, warm-up), and the swap itself (`install`: keep current as previous, one
   os.replace); and, as the floor of a call, GET /health (basic-auth does not check a password there).

Both are run twice, on a fresh registry each: with basic-auth's credential cache off (MLflow's default: every
request hash-checks the password, scrypt) and on (`auth_cache_ttl_seconds = 60`, registry_server.auth_config).

Writes benchmarks/results/pull.json and prints a table (median / min / max). Loopback network: a real plant
adds the transfer time of ~45 MB over its own link.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from bench_load import export_resnet18  # noqa: E402
from registry_services import MODEL, plant_registry, publish, set_alias  # noqa: E402
from stablesdg_line.pull import RegistryClient, check_loads, install  # noqa: E402

LINE_USER = "line1"


def stats(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4), "n": len(values), "values": [round(v, 4) for v in values]}


def cli_pull(registry, dest: Path) -> tuple[float, float]:
    """(process wall seconds, seconds the command reports)."""
    env = {**os.environ, "MLFLOW_TRACKING_USERNAME": LINE_USER,
           "MLFLOW_TRACKING_PASSWORD": registry.password(LINE_USER)}
    cmd = [str(Path(sys.executable).parent / "stablesdg-line"), "pull", "--registry", registry.uri,
           "--model", MODEL, "--alias", "champion", "--dest", str(dest)]
    start = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=True).stdout
    wall = time.perf_counter() - start
    reported = re.search(r"\(([\d.]+) s\)\s*$", out.strip())
    if reported is None or "->" not in out:
        raise SystemExit(f"pull did not switch models: {out!r}")
    return wall, float(reported.group(1))


def phases(client: RegistryClient, dest: Path) -> dict[str, float]:
    """One pull, step by step, with pull.py's own functions."""
    times = {}
    start = time.perf_counter()
    urllib.request.urlopen(f"{client.base_url}/health", timeout=30).read()  # noqa: S310 - loopback
    times["health_s"] = time.perf_counter() - start
    start = time.perf_counter()
    wanted = client.resolve(MODEL, "champion")
    times["resolve_alias_s"] = time.perf_counter() - start
    start = time.perf_counter()
    path = client.onnx_artifact_path(wanted.run_id)
    times["find_artifact_s"] = time.perf_counter() - start
    incoming = dest / ".incoming.onnx"
    start = time.perf_counter()
    digest = client.download(path, incoming)
    times["download_s"] = time.perf_counter() - start
    if digest != wanted.sha256:
        raise SystemExit("downloaded sha256 does not match the onnx_sha256 tag")
    start = time.perf_counter()
    check_loads(incoming, wanted.sha256)
    times["load_checks_s"] = time.perf_counter() - start
    start = time.perf_counter()
    install(dest, incoming, wanted)
    times["swap_s"] = time.perf_counter() - start
    return times


def measure(tmp: Path, models: list[Path], rounds: int, auth_cache_ttl_s: int) -> dict:
    """Both measurements on a fresh registry whose basic-auth caches credentials for `auth_cache_ttl_s` (0: off)."""
    with pytest.MonkeyPatch.context() as monkeypatch, \
            plant_registry(tmp / f"registry-ttl{auth_cache_ttl_s}", auth_cache_ttl_s) as registry:
        versions = [publish(registry, monkeypatch, m, 0.9, f"{i}" * 40) for i, m in enumerate(models, 1)]
        client = RegistryClient(registry.uri, LINE_USER, registry.password(LINE_USER))
        dest, cli, reported, steps = tmp / f"line-ttl{auth_cache_ttl_s}", [], [], []
        for i in range(rounds):
            set_alias(registry, "ada", versions[i % 2])
            wall, said = cli_pull(registry, dest)
            cli.append(wall)
            reported.append(said)
        for i in range(rounds):
            set_alias(registry, "ada", versions[(i + rounds) % 2])
            steps.append(phases(client, dest))
    size_mb = models[0].stat().st_size / 2**20
    return {"auth_cache_ttl_seconds": auth_cache_ttl_s, "cli_wall_s": stats(cli), "cli_reported_s": stats(reported),
            **{name: stats([s[name] for s in steps]) for name in steps[0]},
            "download_mb_per_s": round(size_mb / statistics.median(s["download_s"] for s in steps), 1)}


ROWS = [("pull process wall (s)", "cli_wall_s"), ("pull as reported (s)", "cli_reported_s"),
        ("  GET /health, no login (s)", "health_s"), ("  resolve alias: 1 call (s)", "resolve_alias_s"),
        ("  find the ONNX: 2 calls (s)", "find_artifact_s"), ("  download + sha256 (s)", "download_s"),
        ("  load checks (s)", "load_checks_s"), ("  swap: install (s)", "swap_s")]


@click.command()
@click.option("--rounds", default=5, show_default=True, help="pulls per measurement (champion moved each time)")
@click.option("--out", default=str(ROOT / "benchmarks" / "results" / "pull.json"), show_default=True)
def main(rounds: int, out: str) -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        models = []
        for seed in (1, 2):
            (tmp / f"v{seed}").mkdir()
            models.append(export_resnet18(tmp / f"v{seed}" / "classifier.onnx", seed=seed, version=str(seed)))
        size_mb = models[0].stat().st_size / 2**20
        runs = {"auth_cache_off": measure(tmp, models, rounds, 0), "auth_cache_60s": measure(tmp, models, rounds, 60)}
    result = {
        "model": "resnet18 (torchvision, random weights, 128 px, 6 classes), stablesdg.export.export_onnx",
        "onnx_mb": round(size_mb, 1),
        "registry": "PostgreSQL 15 + mlflow server --app-name basic-auth, proxied artifacts, 127.0.0.1, 1 worker",
        "rounds": rounds, **runs, "cpus": os.cpu_count(),
    }
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"stablesdg-line pull, {result['onnx_mb']} MB ONNX, {rounds} pulls each ({result['registry']})")
    print(f"{'':<30} {'auth cache off: median':>22} {'min':>7} {'max':>7} {'cache 60 s: median':>19} {'min':>7} "
          f"{'max':>7}")
    for label, key in ROWS:
        cells = "".join(f" {runs[r][key]['median']:>{w}} {runs[r][key]['min']:>7} {runs[r][key]['max']:>7}"
                        for r, w in (("auth_cache_off", 22), ("auth_cache_60s", 19)))
        print(f"{label:<30}{cells}")
    print(f"download MB/s (loopback): {runs['auth_cache_off']['download_mb_per_s']} / "
          f"{runs['auth_cache_60s']['download_mb_per_s']} -> {out}")


if __name__ == "__main__":
    main()
