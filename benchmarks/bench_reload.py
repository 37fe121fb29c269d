"""Model swap under load and the review folder's cap (issue 25): the real `stablesdg-line serve` on 127.0.0.1.

    .venv/bin/python benchmarks/bench_reload.py

1. swap: --clients threads send one 200x200 PNG per request, back to back, while the model file is replaced
   atomically (as `pull` does) and SIGHUP asks for a reload, --reloads times (v1 -> v2 -> v1 ...). Counted:
   requests, failed requests (any status but 200 or a transport error), the reload's load+check time and
   swap time (from the server's log), request latency p50/p99/max over the whole run;
2. review cap: 1000 unsure images kept into a review folder capped at 100 files; the folder is counted.

Writes benchmarks/results/reload.json and prints a table. Models: the conv test model of deploy/tests (real
onnxruntime convolutions, seeded weights), v1 and v2 differing by version and weights.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import click
import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "deploy" / "tests"))

from onnx_models import CONV_RGB, build_conv_model  # noqa: E402
from processes import cli_command, free_port  # noqa: E402
from stablesdg_line.classifier import Classifier  # noqa: E402
from stablesdg_line.review import ReviewFolder, ReviewPolicy  # noqa: E402


def write_version(path: Path, version: str, seed: int) -> Path:
    path.write_bytes(build_conv_model(replace(CONV_RGB, metadata_overrides={"model_version": version}),
                                      seed=seed).SerializeToString())
    return path


def png_bytes(size: int = 200) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def swap_in(source: Path, target: Path) -> None:
    tmp = target.with_name(".incoming.onnx")
    tmp.write_bytes(source.read_bytes())
    os.replace(tmp, target)


def client(base: str, stop: threading.Event, out: list) -> None:
    body = png_bytes()
    with httpx.Client(base_url=base, timeout=30) as http:
        while not stop.is_set():
            start = time.perf_counter()
            try:
                status = http.post("/classify", files=[("files", ("a.png", body, "image/png"))]).status_code
            except httpx.HTTPError:
                status = 0
            out.append((status, time.perf_counter() - start))


def wait_up(base: str, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("server exited early")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit("server did not come up")


def bench_swap(clients: int, reloads: int, tmp: Path) -> dict:
    versions = [write_version(tmp / "v1.onnx", "1", 0), write_version(tmp / "v2.onnx", "2", 1)]
    current, log = tmp / "current.onnx", tmp / "serve.log"
    swap_in(versions[0], current)
    port = free_port()
    process = subprocess.Popen(cli_command("serve", str(current), "--port", str(port)),
                               stdout=log.open("wb"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    results: list[list] = [[] for _ in range(clients)]
    stop = threading.Event()
    try:
        wait_up(base, process)
        threads = [threading.Thread(target=client, args=(base, stop, results[i])) for i in range(clients)]
        for thread in threads:
            thread.start()
        time.sleep(2)
        for n in range(reloads):
            swap_in(versions[(n + 1) % 2], current)
            process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while log.read_text().count("now running") < n + 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1)
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        process.terminate()
        process.wait(timeout=30)
    text = log.read_text()
    timings = [(float(a), float(b)) for a, b in re.findall(r"load and checks ([\d.]+) s, install ([\d.]+) s", text)]
    answers = [a for per in results for a in per]
    latencies = np.array([t for _, t in answers]) * 1000
    return {"clients": clients, "reloads_asked": reloads, "reloads_done": len(timings),
            "requests": len(answers), "failed": sum(status != 200 for status, _ in answers),
            "load_and_check_s": [round(a, 4) for a, _ in timings], "install_s": [b for _, b in timings],
            "latency_ms": {"p50": round(float(np.percentile(latencies, 50)), 1),
                           "p99": round(float(np.percentile(latencies, 99)), 1),
                           "max": round(float(latencies.max()), 1)}}


def bench_review_cap(tmp: Path, keeps: int = 1000, cap: int = 100) -> dict:
    classifier = Classifier(write_version(tmp / "review.onnx", "1", 0))
    folder = ReviewFolder(tmp / "review", ReviewPolicy(below=1.01, max_files=cap))  # every image is unsure
    start = time.perf_counter()
    for i in range(keeps):
        image = Image.new("RGB", (32, 32), (i % 256, (i // 256) % 256, 7))
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        folder.keep(classifier.classify([image], names=[f"img-{i}.png"])[0], buffer.getvalue())
    seconds = time.perf_counter() - start
    images = [p for p in (tmp / "review").iterdir() if p.suffix == ".png"]
    return {"kept_asked": keeps, "cap_files": cap, "images_in_folder": len(images),
            "sidecars_in_folder": len(list((tmp / "review").glob("*.json"))),
            "ms_per_image": round(seconds / keeps * 1000, 2)}


@click.command()
@click.option("--clients", default=8, show_default=True)
@click.option("--reloads", default=3, show_default=True)
@click.option("--out", default=str(ROOT / "benchmarks" / "results" / "reload.json"), show_default=True)
def main(clients: int, reloads: int, out: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        swap = bench_swap(clients, reloads, Path(tmp))
        review = bench_review_cap(Path(tmp))
    result = {"swap_under_load": swap, "review_cap": review, "cpus": os.cpu_count()}
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'swap under load':<28} {swap['clients']} clients, {swap['requests']} requests, "
          f"{swap['failed']} failed, {swap['reloads_done']}/{swap['reloads_asked']} reloads")
    print(f"{'  load + checks (s)':<28} {swap['load_and_check_s']}")
    print(f"{'  install (s)':<28} {swap['install_s']}")
    print(f"{'  latency ms p50/p99/max':<28} {swap['latency_ms']['p50']} / {swap['latency_ms']['p99']} / "
          f"{swap['latency_ms']['max']}")
    print(f"{'review cap':<28} {review['images_in_folder']} images + {review['sidecars_in_folder']} sidecars "
          f"after {review['kept_asked']} kept (cap {review['cap_files']}), {review['ms_per_image']} ms each")


if __name__ == "__main__":
    main()
