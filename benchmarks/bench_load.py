"""Load test of the line HTTP service: the real `stablesdg-line serve` process on 127.0.0.1, real resnet18.

    .venv/bin/python benchmarks/bench_load.py                       # resnet18 exported here (random weights)
    .venv/bin/python benchmarks/bench_load.py --model models/classifier.onnx   # the exported champion

Phases, all against one server process (default limits: 2 decode slots, 16 waiting, 64 MP per request),
run under RLIMIT_NOFILE 1024 (the usual default, issue 24):
1. steady: 50 sequential requests after start-up, then the server's RSS is the steady-state reference;
2. load: --clients threads x --requests requests each, one 200x200 grey PNG per request (a NEU-sized camera
   image), keep-alive connections; latency p50/p90/p99/max, errors, RSS sampled every 0.1 s. Meanwhile
   --idle-connections (1100) idle connections are held open, each one the server closes is reopened;
3. idle --idle seconds, then RSS again: it must be within 10% of the steady state;
4. heavy (issue 14.2): each client sends 2 requests of one 6300x6300 PNG (39.7 MP, 39 kB) and one request of
   8 of them (317 MP, refused by the per-request pixel budget); latency, statuses, RSS peak and after idle.

Writes benchmarks/results/load.json and prints a table. Not a test: it takes about a minute on 2 busy cores.
"""

from __future__ import annotations

import io
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click
import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "bench-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def export_resnet18(path: Path, size: int = 128, classes: int = 6, seed: int = 0, version: str = "bench") -> Path:
    """A resnet18 classifier (random weights from `seed`) exported with the pipeline's own exporter (contract
    metadata included, `model_version` as given)."""
    import torch
    from torchvision.models import resnet18

    from stablesdg.export import export_onnx
    from stablesdg.preprocess import PreprocessSpec

    torch.manual_seed(seed)
    model = resnet18(num_classes=classes)
    spec = PreprocessSpec(class_names=[f"class_{i}" for i in range(classes)], input_size=(size, size))
    metadata = {"model_name": "resnet18-loadtest", "model_version": version, "data_hash": "none",
                "weights_sha256": "none", "stablesdg_version": "bench"}
    return export_onnx(model, spec, path, opset=17, metadata=metadata)


def demo_pngs(count: int = 24) -> list[bytes]:
    from stablesdg.demo import demo_image

    classes = ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")
    out = []
    for i in range(count):
        buffer = io.BytesIO()
        demo_image(classes[i % len(classes)], i, seed=3, size=200).convert("L").save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


def big_png(side: int = 6300) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (side, side), 0).save(buffer, "PNG")
    return buffer.getvalue()


class RssSampler(threading.Thread):
    def __init__(self, pid: int, every_s: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.every_s, self.peak = pid, every_s, 0.0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            self._halt.wait(self.every_s)

    def stop(self) -> float:
        self._halt.set()
        self.join()
        return self.peak


def run_clients(base: str, clients: int, requests: int, payload_for) -> tuple[list[float], dict[int, int], float]:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()

    def client(index: int) -> None:
        mine, codes = [], {}
        with httpx.Client(base_url=base, timeout=120, headers=AUTH) as http:
            for r in range(requests):
                files = payload_for(index, r)
                start = time.perf_counter()
                try:
                    code = http.post("/classify", files=files).status_code
                except httpx.HTTPError:
                    code = -1
                mine.append((time.perf_counter() - start) * 1000)
                codes[code] = codes.get(code, 0) + 1
        with lock:
            latencies.extend(mine)
            for code, n in codes.items():
                statuses[code] = statuses.get(code, 0) + n

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, statuses, time.perf_counter() - started


def percentiles(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values)
    return {"p50_ms": round(float(np.percentile(arr, 50)), 1), "p90_ms": round(float(np.percentile(arr, 90)), 1),
            "p99_ms": round(float(np.percentile(arr, 99)), 1), "max_ms": round(float(arr.max()), 1)}


@click.command()
@click.option("--model", "model_path", type=click.Path(dir_okay=False), default=None,
              help="contract-following .onnx (default: resnet18 exported here)")
@click.option("--clients", default=8, show_default=True)
@click.option("--requests", "per_client", default=200, show_default=True)
@click.option("--idle", "idle_s", default=3.0, show_default=True, help="seconds idle before the after-RSS")
@click.option("--heavy/--no-heavy", default=True, show_default=True)
@click.option("--idle-connections", default=1100, show_default=True,
              help="idle connections held open (and reopened when closed) during the load phase")
@click.option("--out", type=click.Path(dir_okay=False), default=str(ROOT / "benchmarks/results/load.json"),
              show_default=True)
def main(model_path: str | None, clients: int, per_client: int, idle_s: float, heavy: bool,
         idle_connections: int, out: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(model_path) if model_path else export_resnet18(Path(tmp) / "resnet18.onnx")
        report = bench(model, clients, per_client, idle_s, heavy, idle_connections)
    report["model"] = str(model_path or "resnet18 (torchvision, random weights, 128 px, 6 classes), exported "
                                         "with stablesdg.export.export_onnx")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"\nwrote {out}")


def start_server(model: Path, *flags: str, command: list[str] | None = None,
                 preexec_fn=None) -> tuple[subprocess.Popen, str]:
    """`stablesdg-line serve` (or `command`, given the same arguments) on a free port; returns once /health
    answers. stderr is a pipe: read it after stopping the server (`stop_server`)."""
    port = free_port()
    server = subprocess.Popen([*(command or [str(Path(sys.executable).parent / "stablesdg-line")]), "serve",
                               str(model), "--port", str(port), "--token", TOKEN, "--warmup-runs", "3", *flags],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=preexec_fn)
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, timeout=30) as http:
        deadline = time.monotonic() + 60
        while True:
            try:
                if http.get("/health").status_code == 200:
                    return server, base
            except httpx.TransportError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(server.stderr.read().decode()[-2000:]) from None
                time.sleep(0.1)


def stop_server(server: subprocess.Popen) -> str:
    """SIGTERM, SIGKILL after 20 s; returns the server's stderr."""
    server.terminate()
    try:
        _, err = server.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
        _, err = server.communicate()
    return err.decode(errors="replace")


def limit_descriptors() -> None:
    """preexec_fn: the usual 1024-descriptor limit, soft and hard (issue 24's 1100 idle connections)."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))


class IdleFlood(threading.Thread):
    """Keeps `count` idle connections open to the server (reopening the ones it closes) until stopped."""

    def __init__(self, port: int, count: int):
        super().__init__(daemon=True)
        self.port, self.count, self.opened, self.refused = port, count, 0, 0
        self._halt = threading.Event()
        self.socks: list[socket.socket] = []

    def _open(self) -> socket.socket | None:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        except OSError:
            self.refused += 1
            return None
        sock.setblocking(False)
        self.opened += 1
        return sock

    def run(self) -> None:
        self.socks = [s for s in (self._open() for _ in range(self.count)) if s is not None]
        while not self._halt.wait(1.0):
            alive = []
            for sock in self.socks:
                try:
                    closed = sock.recv(1) == b""
                except BlockingIOError:
                    closed = False
                except OSError:
                    closed = True
                if closed:
                    sock.close()
                else:
                    alive.append(sock)
            self.socks = alive + [s for s in (self._open() for _ in range(self.count - len(alive))) if s]

    def stop(self) -> None:
        self._halt.set()
        self.join()
        for sock in self.socks:
            sock.close()


def bench(model: Path, clients: int, per_client: int, idle_s: float, heavy: bool, idle_connections: int) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < idle_connections + 256:  # this process holds the client ends of the idle connections
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, idle_connections + 1024), hard))
    server, base = start_server(model, preexec_fn=limit_descriptors)
    images = demo_pngs()
    try:
        with httpx.Client(base_url=base, timeout=30, headers=AUTH) as http:
            rss_start = rss_mb(server.pid)
            for i in range(50):
                assert http.post("/classify", files=[("files", (f"{i}.png", images[i % len(images)]))]
                                 ).status_code == 200
            rss_steady = rss_mb(server.pid)

        sampler = RssSampler(server.pid)
        sampler.start()
        flood = IdleFlood(int(base.rsplit(":", 1)[1]), idle_connections)
        if idle_connections:
            flood.start()
            time.sleep(1.0)  # the flood is in place before the clients start
        latencies, statuses, wall = run_clients(
            base, clients, per_client,
            lambda c, r: [("files", (f"c{c}r{r}.png", images[(c * 7 + r) % len(images)]))])
        if idle_connections:
            flood.stop()
        rss_peak = sampler.stop()
        time.sleep(idle_s)
        rss_after = rss_mb(server.pid)
        total = clients * per_client
        load = {"clients": clients, "requests_per_client": per_client, "requests": total,
                "errors": total - statuses.get(200, 0), "statuses": {str(k): v for k, v in statuses.items()},
                "wall_s": round(wall, 2), "requests_per_s": round(total / wall, 1), **percentiles(latencies),
                "rss_start_mb": round(rss_start, 1), "rss_steady_mb": round(rss_steady, 1),
                "rss_peak_mb": round(rss_peak, 1), "rss_after_idle_mb": round(rss_after, 1),
                "rss_after_vs_steady_pct": round(100 * (rss_after - rss_steady) / rss_steady, 1),
                "idle_connections": idle_connections, "idle_connections_opened": flood.opened,
                "idle_connections_refused_at_connect": flood.refused,
                "server_rlimit_nofile": 1024}
        report = {"machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                              "load_average_1m_at_start": round(os.getloadavg()[0], 2),
                              "server": "stablesdg-line serve, defaults (1 intra-op thread, 2 decode slots)"},
                  "load": load}
        if heavy:
            report["heavy"] = heavy_phase(base, server.pid, clients, idle_s, rss_steady)
    finally:
        err = stop_server(server)
    report["server_exit_code"] = server.returncode
    report["server_tracebacks"] = err.count("Traceback")
    report["server_connection_cap_log"] = next((line.split("connections: ", 1)[1] for line in err.splitlines()
                                                if "open connections" in line), None)
    return report


def heavy_phase(base: str, pid: int, clients: int, idle_s: float, rss_steady: float) -> dict:
    big = big_png()
    sampler = RssSampler(pid, every_s=0.05)
    sampler.start()
    latencies, statuses, wall = run_clients(base, clients, 2, lambda c, r: [("files", (f"big{c}.png", big))])
    with httpx.Client(base_url=base, timeout=60, headers=AUTH) as http:
        start = time.perf_counter()
        eight = http.post("/classify", files=[("files", (f"{i}.png", big)) for i in range(8)])
        eight_ms = (time.perf_counter() - start) * 1000
    rss_peak = sampler.stop()
    time.sleep(idle_s)
    rss_after = rss_mb(pid)
    return {"file": f"6300x6300 grey PNG, {len(big)} bytes", "requests": clients * 2,
            "statuses": {str(k): v for k, v in statuses.items()}, "wall_s": round(wall, 2),
            **percentiles(latencies), "eight_file_request_status": eight.status_code,
            "eight_file_request_ms": round(eight_ms, 1), "rss_peak_mb": round(rss_peak, 1),
            "rss_after_idle_mb": round(rss_after, 1),
            "rss_after_vs_steady_pct": round(100 * (rss_after - rss_steady) / rss_steady, 1)}


def print_table(report: dict) -> None:
    load = report["load"]
    rows = [("requests (clients x each)", f"{load['requests']} ({load['clients']} x {load['requests_per_client']})"),
            ("errors (non-200)", load["errors"]), ("throughput", f"{load['requests_per_s']} req/s"),
            ("latency p50 / p90 / p99 / max", f"{load['p50_ms']} / {load['p90_ms']} / {load['p99_ms']} / "
                                              f"{load['max_ms']} ms"),
            ("RSS start / steady / peak / after idle", f"{load['rss_start_mb']} / {load['rss_steady_mb']} / "
                                                       f"{load['rss_peak_mb']} / {load['rss_after_idle_mb']} MB"),
            ("RSS after idle vs steady", f"{load['rss_after_vs_steady_pct']:+} %"),
            ("idle connections held / opened in all", f"{load['idle_connections']} / "
                                                      f"{load['idle_connections_opened']} (server under "
                                                      f"RLIMIT_NOFILE {load['server_rlimit_nofile']})")]
    if "heavy" in report:
        heavy = report["heavy"]
        rows += [("heavy: 40 MP requests, statuses", heavy["statuses"]),
                 ("heavy: p50 / p99", f"{heavy['p50_ms']} / {heavy['p99_ms']} ms"),
                 ("heavy: 8 x 40 MP in one request", f"{heavy['eight_file_request_status']} in "
                                                     f"{heavy['eight_file_request_ms']} ms"),
                 ("heavy: RSS peak / after idle", f"{heavy['rss_peak_mb']} / {heavy['rss_after_idle_mb']} MB "
                                                  f"({heavy['rss_after_vs_steady_pct']:+} % vs steady)")]
    rows += [("server exit / tracebacks", f"{report['server_exit_code']} / {report['server_tracebacks']}")]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")


if __name__ == "__main__":
    main()
