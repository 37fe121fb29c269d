"""Cost of hostile images against the real `stablesdg-line serve` (issue 24): CPU seconds and peak RSS per
request, with the limits as shipped ("after") and with them lifted ("before"), then 16 concurrent hostile
clients against the shipped limits while /health is polled.

    .venv/bin/python benchmarks/bench_hostile.py                    # resnet18 exported here (random weights)
    .venv/bin/python benchmarks/bench_hostile.py --model models/classifier.onnx

Per kind, --repeats requests of one file each, one at a time: CPU = the server's utime + stime over the
request (/proc/PID/stat), peak RSS above idle = VmHWM after the request (reset through /proc/PID/clear_refs
before it) less VmRSS before it. "before" is the same server with the structure limits (scans, scans x
pixels, progression order, strips, metadata bytes, PNG chunks) raised out of reach, Pillow's own PNG text
limits (1 MB a chunk, 64 MB in all) and no decode deadline: what main had before issue 24's limits. A
"before" request is cut after --before-timeout seconds (the server is then restarted, so one slow file does
not bill the next). Valid reference images (`reference_kinds`) join the per-request table for scale only.

Targets (issue 24): each kind under 0.5 s CPU and 64 MB above idle; 16 concurrent hostile clients keep
/health under 100 ms and RSS under 600 MB. Writes benchmarks/results/hostile.json and prints a table.
Not a test: it takes a few minutes on 2 busy cores.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import click
import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_load import AUTH, RssSampler, export_resnet18, rss_mb, start_server, stop_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TICKS = os.sysconf("SC_CLK_TCK")
# The server with issue 24's structure limits lifted and Pillow's PNG text limits back to its defaults.
LIFTED = ("import sys, PIL.PngImagePlugin as png, stablesdg_line.images as im; "
          "im.MAX_JPEG_SCANS = im.MAX_JPEG_SCAN_PIXELS = im.MAX_TIFF_STRIPS = im.MAX_PNG_CHUNKS = 10**18; "
          "im.MAX_METADATA_BYTES = 10**18; im._jpeg_progression_fault = lambda data, first_scan: None; "
          "png.MAX_TEXT_CHUNK = 2**20; png.MAX_TEXT_MEMORY = 64 * 2**20; "
          "from stablesdg_line.cli import main; sys.exit(main(sys.argv[1:]))")


def _badinputs():
    """The corpus generator of the deploy tests, loaded by path (it is not a package)."""
    path = ROOT / "deploy" / "tests" / "badinputs.py"
    spec = importlib.util.spec_from_file_location("stablesdg_line_badinputs", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def hostile_kinds() -> dict[str, tuple[str, bytes]]:
    """kind -> (file name, content): one file per hostile header kind of issue 24."""
    bad = _badinputs()
    corpus = bad.hostile_corpus()
    text_60mb = bad.png_with_text([(b"zTXt", b"k%d\x00\x00" % i + zlib.compress(b"t" * 1_000_000, 9))
                                   for i in range(60)])
    kinds = {
        "PNG 60 zTXt chunks inflating to 1 MB each": ("ztxt_60mb.png", text_60mb),
        "PNG zTXt chunk inflating to 8 MB": ("ztxt_inflates.png", corpus["ztxt_inflates.png"][0]),
        "PNG 70 000 text chunks": ("text_chunks_70k.png", corpus["text_chunks_70k.png"][0]),
        "PNG 70 000 IDAT chunks": ("idat_70k.png", corpus["idat_70k.png"][0]),
        "PNG 2 MB iCCP (stored)": ("iccp_huge.png", corpus["iccp_huge.png"][0]),
        "TIFF 1 000 000 strips": ("strips_1m.tif", bad.tiff_with_strips(1_000_000)),
        "TIFF 100 000 tiles": ("tiles_100k.tif", corpus["tiles_100k.tif"][0]),
        "JPEG 5000 scans of 1000x1000": ("scans_5000.jpg", bad.slow_progressive_jpeg(1000, 5000)),
        "JPEG 60 scans of 6000x6000": ("scan_budget.jpg", corpus["scan_budget.jpg"][0]),
        "JPEG 60 scans of 2580x2580 (one refinement repeated)": ("slow_2580.jpg", bad.slow_progressive_jpeg(2580)),
        "JPEG 45 scans of 2981x2981 (deepest valid progression)": ("deep_2981.jpg", bad.deepest_progression_jpeg(2981)),
        "JPEG 4 MB ICC profile": ("icc_huge.jpg", corpus["icc_huge.jpg"][0]),
        "JPEG 40 EXIF segments (2.4 MB)": ("app1_exif_many.jpg", corpus["app1_exif_many.jpg"][0]),
        "WebP 2 MB EXIF chunk": ("webp_exif_huge.webp", corpus["webp_exif_huge.webp"][0]),
        "BMP claiming 60000x60000": ("bomb.bmp", bad.malformed_bytes()["bomb.bmp"][0]),
    }
    return kinds


def reference_kinds() -> dict[str, tuple[str, bytes]]:
    """Valid images, measured per request for scale only: what the pixel limit itself lets a request cost."""
    return {"JPEG 40 MP progressive, textured (valid: the costliest image the limits let through)":
            ("costly_valid.jpg", _badinputs().costly_valid_jpeg())}


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def measure(http: httpx.Client, pid: int, name: str, data: bytes, timeout_s: float) -> dict:
    """One request of one file: status, the answer's reason, CPU seconds and peak RSS above idle."""
    time.sleep(0.2)  # let the previous request's threads settle
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    rss_before, cpu_before = rss_mb(pid), cpu_s(pid)
    started = time.perf_counter()
    try:
        response = http.post("/classify", files=[("files", (name, data))], timeout=timeout_s)
        status, body = response.status_code, response.json()
        reason = body["results"][0]["error"] if "results" in body else body.get("detail")
    except httpx.TimeoutException:
        status, reason = None, f"no answer within {timeout_s:g} s"
    wall = time.perf_counter() - started
    return {"status": status, "reason": reason, "wall_s": round(wall, 3),
            "cpu_s": round(cpu_s(pid) - cpu_before, 3), "peak_rss_above_idle_mb": round(hwm_mb(pid) - rss_before, 1),
            "timed_out": status is None}


def per_request(model: Path, kinds: dict[str, tuple[str, bytes]], repeats: int, lifted: bool,
                timeout_s: float) -> dict:
    flags = ("--max-upload-mb", "20")
    command = [sys.executable, "-c", LIFTED] if lifted else None
    if lifted:
        flags += ("--decode-timeout", "0")
    results: dict[str, dict] = {}
    server, base = start_server(model, *flags, command=command)
    try:
        for kind, (name, data) in kinds.items():
            runs = []
            for _ in range(repeats):
                with httpx.Client(base_url=base, headers=AUTH) as http:
                    runs.append(measure(http, server.pid, name, data, timeout_s))
                if runs[-1]["timed_out"]:  # the server still decodes it: start afresh for the next kind
                    stop_server(server)
                    server, base = start_server(model, *flags, command=command)
                    break
            results[kind] = {"file_bytes": len(data), "status": runs[-1]["status"], "reason": runs[-1]["reason"],
                             "cpu_s": max(r["cpu_s"] for r in runs),
                             "peak_rss_above_idle_mb": max(r["peak_rss_above_idle_mb"] for r in runs),
                             "wall_s_median": round(statistics.median(r["wall_s"] for r in runs), 3),
                             "requests": len(runs), "timed_out": any(r["timed_out"] for r in runs)}
    finally:
        log = stop_server(server)
    return {"kinds": results, "server_tracebacks": log.count("Traceback")}


# /health is probed from a process of its own: the 16 client threads would otherwise delay the probe (GIL).
PROBE = """
import json, sys, time, httpx
latencies, failures = [], 0
with httpx.Client(base_url=sys.argv[1], timeout=5) as http:
    end = time.monotonic() + float(sys.argv[2])
    while time.monotonic() < end:
        started = time.perf_counter()
        try:
            ok = http.get("/health").status_code == 200
        except httpx.HTTPError:
            ok = False
        latencies.append((time.perf_counter() - started) * 1000)
        failures += not ok
        time.sleep(0.05)
print(json.dumps({"ms": latencies, "failures": failures}))
"""


def probe_health(base: str, seconds: float) -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE, base, str(seconds)], capture_output=True, text=True,
                            timeout=seconds + 60, check=True)
    probed = json.loads(result.stdout)
    arr = np.asarray(probed["ms"])
    return {"probes": len(arr), "failures": probed["failures"], "p50_ms": round(float(np.percentile(arr, 50)), 1),
            "p99_ms": round(float(np.percentile(arr, 99)), 1), "max_ms": round(float(arr.max()), 1)}


def concurrent(model: Path, kinds: dict[str, tuple[str, bytes]], clients: int, seconds: float) -> dict:
    """`clients` threads post hostile files back to back for `seconds` (shipped limits) while another process
    probes /health every 50 ms; the same probe without clients first, as this machine's own baseline."""
    server, base = start_server(model, "--max-upload-mb", "20")
    files = list(kinds.values())
    statuses: dict[str, int] = {}
    lock = threading.Lock()
    halt = threading.Event()

    def client(index: int) -> None:
        with httpx.Client(base_url=base, headers=AUTH, timeout=60) as http:
            i = index
            while not halt.is_set():
                name, data = files[i % len(files)]
                i += 1
                try:
                    code = str(http.post("/classify", files=[("files", (name, data))]).status_code)
                except httpx.HTTPError as err:
                    code = type(err).__name__
                with lock:
                    statuses[code] = statuses.get(code, 0) + 1

    try:
        rss_idle = rss_mb(server.pid)
        baseline = probe_health(base, seconds)
        sampler = RssSampler(server.pid, every_s=0.02)
        sampler.start()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)  # every client has a request in flight
        health = probe_health(base, seconds)
        halt.set()
        for thread in threads:
            thread.join(120)
        rss_peak = sampler.stop()
    finally:
        log = stop_server(server)
    return {"clients": clients, "seconds": seconds, "requests": sum(statuses.values()), "statuses": statuses,
            "health_failures": health["failures"], "health_probes": health["probes"],
            "health_p50_ms": health["p50_ms"], "health_p99_ms": health["p99_ms"], "health_max_ms": health["max_ms"],
            "health_without_clients": baseline, "rss_idle_mb": round(rss_idle, 1), "rss_peak_mb": round(rss_peak, 1),
            "server_tracebacks": log.count("Traceback")}


@click.command()
@click.option("--model", "model_path", type=click.Path(dir_okay=False), default=None,
              help="contract-following .onnx (default: resnet18 exported here)")
@click.option("--repeats", default=3, show_default=True, help="requests per kind (the worst one is reported)")
@click.option("--before/--no-before", default=True, show_default=True, help="also measure with limits lifted")
@click.option("--before-timeout", default=30.0, show_default=True, help="seconds before a 'before' request is cut")
@click.option("--clients", default=16, show_default=True)
@click.option("--seconds", default=15.0, show_default=True, help="length of the concurrent phase")
@click.option("--out", type=click.Path(dir_okay=False), default=str(ROOT / "benchmarks/results/hostile.json"),
              show_default=True)
def main(model_path: str | None, repeats: int, before: bool, before_timeout: float, clients: int, seconds: float,
         out: str) -> None:
    kinds = hostile_kinds()
    # the reference images join the per-request table, not the concurrent phase: a valid image at the pixel limit
    # costs what max_pixels allows (bench_load measures valid images under load)
    measured = {**kinds, **reference_kinds()}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(model_path) if model_path else export_resnet18(Path(tmp) / "resnet18.onnx")
        report = {"machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                              "load_average_1m_at_start": round(os.getloadavg()[0], 2)},
                  "model": str(model_path or "resnet18 (torchvision, random weights, 128 px, 6 classes), exported "
                                             "with stablesdg.export.export_onnx"),
                  "targets": {"cpu_s": 0.5, "peak_rss_above_idle_mb": 64, "health_ms": 100, "rss_mb": 600},
                  "after": per_request(model, measured, repeats, lifted=False, timeout_s=60)}
        if before:
            report["before"] = per_request(model, measured, 1, lifted=True, timeout_s=before_timeout)
        report["concurrent"] = concurrent(model, kinds, clients, seconds)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"\nwrote {out}")


def print_table(report: dict) -> None:
    after, before = report["after"]["kinds"], report.get("before", {}).get("kinds", {})
    head = f"{'hostile kind':<44} {'bytes':>9}  {'before: CPU s / MB':>20}  {'after: CPU s / MB':>18}  status"
    print(head)
    print("-" * len(head))
    for kind, row in after.items():
        old = before.get(kind)
        was = "-" if old is None else (f"{'>' if old['timed_out'] else ''}{old['cpu_s']:.2f} / "
                                       f"{old['peak_rss_above_idle_mb']:.0f}")
        print(f"{kind:<44} {row['file_bytes']:>9}  {was:>20}  {row['cpu_s']:>9.2f} / {row['peak_rss_above_idle_mb']:<6.0f}"
              f"  {row['status']} {(row['reason'] or '')[:60]}")
    c = report["concurrent"]
    print(f"\n{c['clients']} concurrent hostile clients for {c['seconds']:g} s: {c['requests']} requests "
          f"{c['statuses']}; /health p50 / p99 / max {c['health_p50_ms']} / {c['health_p99_ms']} / "
          f"{c['health_max_ms']} ms ({c['health_failures']} failed of {c['health_probes']}; without clients "
          f"{c['health_without_clients']['p50_ms']} / {c['health_without_clients']['p99_ms']} / "
          f"{c['health_without_clients']['max_ms']} ms); RSS idle "
          f"{c['rss_idle_mb']} MB, peak {c['rss_peak_mb']} MB; tracebacks {c['server_tracebacks']}")


if __name__ == "__main__":
    main()
