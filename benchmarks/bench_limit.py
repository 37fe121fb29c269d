"""The machine's limit for the line model (issue 15): sustained conv GFLOP/s, each model against it, and what
the line runtime's knobs (threads, graph optimisation, memory arena, batching) buy.

    python benchmarks/bench_limit.py --models /tmp/neu15/models --seed 42 --default resnet18 \
        --out benchmarks/results/limit.json

1. **Conv roofline.** A large dense 3x3 convolution (1x256x56x56 -> 256, 3.7 GFLOP) in onnxruntime, fp32 and
   int8 (QDQ, uint8 x int8), 1 and 2 threads: the best sustained GFLOP/s (GOP/s for int8) over --reps runs.
2. **Each line model** (OUT/<backbone>_s<seed>.onnx of train_line_models.py and its int8 copy): FLOPs per image
   (Conv + Gemm multiply-adds x 2 from the graph's shapes), ideal latency = FLOPs / sustained rate, and the
   measured batch-1 p50 and batch-32 per-image time as a percentage of the ideal (100 % = at the limit).
3. **Knobs**, on the default model through the line runtime (`stablesdg_line.Classifier`): intra-op threads 1 vs
   2, graph optimisation disable/basic/extended/all, memory arena on/off (batch-1 p50/p99), batch size for files
   that arrive together (per-image time at 1/8/32), and serve's micro-batcher with 2 and 8 concurrent
   single-image callers (images/s with and without it).

Timings are noisy when other jobs share the CPU: the JSON records the load average at start and end.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import click
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_line_model import count_flops, make_session, timing  # noqa: E402

from stablesdg.quantize import QuantConfig, quantize_model  # noqa: E402

INPUT, OUTPUT = "input", "logits"


# --------------------------------------------------------------------------------------- 1. roofline
def big_conv(path: Path, c: int = 256, hw: int = 56) -> tuple[Path, float]:
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Conv", [INPUT, "W", "B"], ["y"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["y"], [OUTPUT])], "big_conv",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", c, hw, hw])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["N", c, hw, hw])],
        initializer=[numpy_helper.from_array((rng.normal(0, 0.05, (c, c, 3, 3))).astype(np.float32), "W"),
                     numpy_helper.from_array(np.zeros(c, np.float32), "B")])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(path))
    return path, 2.0 * c * hw * hw * c * 9


def sustained(path: Path, flops: float, threads: int, reps: int, x: np.ndarray) -> dict:
    sess = make_session(path, threads)
    sess.run([OUTPUT], {INPUT: x})
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        sess.run([OUTPUT], {INPUT: x})
        times.append(time.perf_counter() - start)
    return {"threads": threads, "best_gflops": round(flops / min(times) / 1e9, 1),
            "median_gflops": round(flops / float(np.median(times)) / 1e9, 1), "reps": reps}


def roofline(workdir: Path, reps: int) -> dict:
    path, flops = big_conv(workdir / "conv.onnx")
    x = np.random.default_rng(1).normal(size=(1, 256, 56, 56)).astype(np.float32)
    int8 = workdir / "conv.int8.onnx"
    quantize_model(path, int8, x, QuantConfig())
    out = {"workload": "Conv 3x3 1x256x56x56 -> 256 + Relu", "flops": flops}
    for threads in (1, 2):
        out[f"fp32_t{threads}"] = sustained(path, flops, threads, reps, x)
        out[f"int8_t{threads}"] = sustained(int8, flops, threads, reps, x)
        click.echo(f"conv limit, {threads} thread(s): fp32 {out[f'fp32_t{threads}']['best_gflops']} GFLOP/s, "
                   f"int8 {out[f'int8_t{threads}']['best_gflops']} GOP/s (best of {reps})")
    return out


# --------------------------------------------------------------------------------------- 2. models
def models_vs_limit(models: Path, seed: int, limit: dict, threads: int, iters: int, workdir: Path,
                    calib: np.ndarray) -> list[dict]:
    rows = []
    x = np.random.default_rng(2).normal(size=(32, 3, 128, 128)).astype(np.float32)
    for path in sorted(models.glob(f"*_s{seed}.onnx")):
        flops = count_flops(path)["flops"]
        int8 = workdir / f"{path.stem}.int8.onnx"
        quantize_model(path, int8, calib, QuantConfig())
        for precision, p in (("fp32", path), ("int8", int8)):
            t = timing(make_session(p, threads), x, iters, batches=(32,))
            rate = limit[f"{precision}_t{threads}"]["best_gflops"] * 1e9
            ideal_ms = flops / rate * 1000
            row = {"model": path.stem.rsplit("_s", 1)[0], "precision": precision, "mflops": round(flops / 1e6, 1),
                   "ideal_ms": round(ideal_ms, 3), **t,
                   "b1_pct_of_ideal": round(100 * t["p50_ms"] / ideal_ms), "b32_ms_per_image":
                   round(1000 / t["img_s_b32"], 3), "b32_pct_of_ideal": round(100 * 1000 / t["img_s_b32"] / ideal_ms)}
            rows.append(row)
            click.echo(f"{row['model']:<20} {precision} {row['mflops']:7.0f} MFLOP ideal {ideal_ms:6.2f} ms  "
                       f"b1 p50 {t['p50_ms']:6.2f} ms = {row['b1_pct_of_ideal']:4d} %  b32 "
                       f"{row['b32_ms_per_image']:6.2f} ms/img = {row['b32_pct_of_ideal']:4d} %")
    return rows


# --------------------------------------------------------------------------------------- 3. knobs
def line_latency(model: Path, iters: int, **options) -> dict:
    from stablesdg_line import Classifier, RuntimeOptions

    classifier = Classifier(model, RuntimeOptions(**options))
    x = np.random.default_rng(3).normal(size=(1, *classifier.spec.input_shape)).astype(np.float32)
    for _ in range(10):
        classifier.run_batch(x)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        classifier.run_batch(x)
        times.append((time.perf_counter() - start) * 1000)
    return {"p50_ms": round(float(np.percentile(times, 50)), 3), "p99_ms": round(float(np.percentile(times, 99)), 3)}


def batch_sizes(model: Path, threads: int, reps: int) -> dict:
    from stablesdg_line import Classifier, RuntimeOptions

    classifier = Classifier(model, RuntimeOptions(threads=threads))
    out = {}
    for b in (1, 8, 32):
        x = np.random.default_rng(4).normal(size=(b, *classifier.spec.input_shape)).astype(np.float32)
        classifier.run_batch(x)
        best = min(_timed(lambda x=x: classifier.run_batch(x)) for _ in range(reps))
        out[f"b{b}_ms_per_image"] = round(best * 1000 / b, 3)
    return out


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def concurrent_callers(model: Path, threads: int, callers: int, per_caller: int, batched: bool) -> dict:
    """`callers` threads each classify `per_caller` single images back to back (serve's shape)."""
    from stablesdg_line import Classifier, RuntimeOptions

    classifier = Classifier(model, RuntimeOptions(threads=threads))
    batcher = classifier.enable_batching(32) if batched else None
    run = batcher.run if batcher else classifier.run_batch
    x = np.random.default_rng(5).normal(size=(1, *classifier.spec.input_shape)).astype(np.float32)
    latencies: list[float] = []
    lock = threading.Lock()

    def caller() -> None:
        for _ in range(per_caller):
            t = _timed(lambda: run(x))
            with lock:
                latencies.append(t * 1000)

    workers = [threading.Thread(target=caller) for _ in range(callers)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - start
    out = {"img_s": round(callers * per_caller / wall, 1), "p50_ms": round(float(np.percentile(latencies, 50)), 2),
           "p99_ms": round(float(np.percentile(latencies, 99)), 2)}
    if batcher:
        out["mean_batch"] = round(batcher.stats.images / max(1, batcher.stats.runs), 2)
        classifier.close()
    return out


def knobs(model: Path, iters: int, reps: int) -> dict:
    out: dict = {"model": str(model)}
    for threads in (1, 2):
        out[f"threads_{threads}"] = line_latency(model, iters, threads=threads)
        click.echo(f"threads {threads}: {out[f'threads_{threads}']}")
    for level in ("disable", "basic", "extended", "all"):
        out[f"opt_{level}"] = line_latency(model, iters, threads=2, graph_optimization=level)
        click.echo(f"graph optimisation {level}: {out[f'opt_{level}']}")
    for arena in (True, False):
        key = f"arena_{'on' if arena else 'off'}"
        out[key] = line_latency(model, iters, threads=2, memory_arena=arena)
        click.echo(f"memory arena {arena}: {out[key]}")
    for threads in (1, 2):
        out[f"batch_t{threads}"] = batch_sizes(model, threads, reps)
        click.echo(f"batching, {threads} thread(s): {out[f'batch_t{threads}']}")
    for callers in (2, 8):  # 2: serve's default --max-concurrent
        for batched in (False, True):
            key = f"serve_{callers}_callers_{'batched' if batched else 'unbatched'}"
            out[key] = concurrent_callers(model, 2, callers, max(4, iters // callers), batched)
            click.echo(f"{key}: {out[key]}")
    return out


@click.command()
@click.option("--models", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--default", "default_model", default="resnet18", show_default=True,
              help="backbone whose int8 copy the knobs are measured on")
@click.option("--processed", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="real train images for int8 calibration (else random inputs)")
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--iters", type=int, default=200, show_default=True)
@click.option("--reps", type=int, default=10, show_default=True)
@click.option("--skip", multiple=True, type=click.Choice(["roofline", "models", "knobs"]))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
def main(models: Path, seed: int, default_model: str, processed: Path | None, threads: int, iters: int, reps: int,
         skip: tuple[str, ...], out: Path) -> None:
    result: dict = json.loads(out.read_text()) if out.exists() else {}
    result["load_average_1m_at_start"] = round(os.getloadavg()[0], 2)
    if processed:
        from bench_line_model import load_data

        from stablesdg.quantize import stratified_sample

        data = load_data(processed, None)
        calib = stratified_sample(data["train_x"], data["train_y"], 60, seed)
    else:
        calib = np.random.default_rng(0).normal(size=(16, 3, 128, 128)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "roofline" not in skip:
            result["roofline"] = roofline(work, reps)
        if "models" not in skip:
            result["models"] = models_vs_limit(models, seed, result["roofline"], threads, iters, work, calib)
        if "knobs" not in skip:
            fp32 = models / f"{default_model}_s{seed}.onnx"
            int8 = work / f"{default_model}.knobs.int8.onnx"
            quantize_model(fp32, int8, calib, QuantConfig())
            _copy_metadata(fp32, int8)
            result["knobs_int8"] = knobs(int8, iters, reps)
            result["knobs_fp32"] = knobs(fp32, iters, reps)
    result["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


def _copy_metadata(src: Path, dst: Path) -> None:
    """The line runtime needs the preprocessing contract in the int8 file's metadata_props."""
    from stablesdg.export import set_metadata

    meta = {p.key: p.value for p in onnx.load_model(str(src)).metadata_props}
    proto = onnx.load_model(str(dst))
    set_metadata(proto, {**meta, "quantized": "true"})
    onnx.save_model(proto, str(dst))


if __name__ == "__main__":
    main()
