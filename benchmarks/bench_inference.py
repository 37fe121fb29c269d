"""Classifier inference on CPU: torch eager vs ONNX fp32 vs ONNX int8, on the same real test images.

    python benchmarks/bench_inference.py                    # the exported champion on data/processed's test split
    python benchmarks/bench_inference.py --synthetic-model  # random mobilenet_v3_small, 128 px, 6 demo classes
    python benchmarks/bench_inference.py --synthetic-model --backbone resnet18   # a heavier backbone

The champion mode reads models/classifier.onnx and loads the torch model of the same registry version (from its
metadata) from MLflow. --synthetic-model needs no pipeline run: a random-init backbone (mobilenet_v3_small) whose
BatchNorm statistics come from demo train images and whose linear head is a closed-form least-squares fit on
their features (no gradient training; a random head would make every accuracy chance level).
Both int8 layouts (QOperator, QDQ) are quantized here from the fp32 file with the export stage's code and
calibration settings. Latency: batch 1, p50/p99 over --iters runs; throughput: images/s at batch 8 and 32.
Writes benchmarks/results/inference.json (champion) or inference_synthetic[_<backbone>].json, prints a table.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from stablesdg.export import INT8_FORMATS, quantize_int8

ROOT = Path(__file__).resolve().parents[1]
THREADS = 2
TARGETS = {"fp32_vs_torch_speedup_b1": 2.0, "int8_vs_fp32_speedup_b1": 1.5, "int8_max_accuracy_loss_points": 0.5,
           "p99_b1_ms_below": 20.0}
Runner = Callable[[np.ndarray], np.ndarray]


@dataclass
class Workload:
    source: str
    model: nn.Module
    fp32_path: Path
    calibration: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "onnxruntime": ort.__version__,
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "threads": THREADS,
            "load_average_1m_at_start": round(os.getloadavg()[0], 2)}


# --------------------------------------------------------------------------------------- workloads
def probe_model(backbone: str, train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int) -> nn.Module:
    """Random backbone: BatchNorm statistics from the train images, least-squares (ridge) linear head."""
    from stablesdg.classifier import build_backbone

    torch.manual_seed(0)
    model = build_backbone(backbone, num_classes)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.momentum = None  # cumulative average over the one pass below
    name, head = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    parent = model.get_submodule(name.rpartition(".")[0])
    with torch.no_grad():
        model.train()(train_x)
        model.eval()
        setattr(parent, name.rpartition(".")[2], nn.Identity())  # the head's input features
        feats = torch.cat([model(train_x), torch.ones(len(train_x), 1)], dim=1)
        setattr(parent, name.rpartition(".")[2], head)
        targets = nn.functional.one_hot(train_y, num_classes).float()
        ridge = feats.T @ feats + 1e-2 * torch.eye(feats.shape[1])
        solution = torch.linalg.solve(ridge, feats.T @ targets)
        head.weight.copy_(solution[:-1].T)
        head.bias.copy_(solution[-1])
    return model.eval()


def synthetic_workload(tmp: Path, backbone: str, size: int = 128, train_per_class: int = 10, test_per_class: int = 20,
                       seed: int = 42) -> Workload:
    from stablesdg.classifier import make_spec
    from stablesdg.config import ClassifierConfig
    from stablesdg.demo import TEXTURES, demo_image
    from stablesdg.export import export_onnx
    from stablesdg.preprocess import preprocess_image

    classes = list(TEXTURES)
    spec = make_spec(classes, ClassifierConfig(input_size=size))

    def images(start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        x = [preprocess_image(demo_image(c, i, seed), spec) for c in classes for i in range(start, start + count)]
        return np.stack(x), np.repeat(np.arange(len(classes)), count)

    train_x, train_y = images(0, train_per_class)
    test_x, test_y = images(train_per_class, test_per_class)
    model = probe_model(backbone, torch.from_numpy(train_x), torch.from_numpy(train_y), len(classes))
    meta = {"model_name": f"synthetic-{backbone}", "model_version": "0", "data_hash": "demo",
            "weights_sha256": "n/a", "stablesdg_version": "n/a"}
    fp32 = export_onnx(model, spec, tmp / "classifier.onnx", 17, meta)
    return Workload(f"synthetic {backbone} {size} px (random, BN stats + least-squares head), demo images", model, fp32, train_x,
                    test_x, test_y)


def champion_workload(onnx_path: Path, processed: Path, params_path: Path) -> Workload:
    import mlflow
    import onnx

    from stablesdg import tracking
    from stablesdg.classifier import load_images, real_split
    from stablesdg.config import load_params
    from stablesdg.export import calibration_sample
    from stablesdg.preprocess import PreprocessSpec

    if not onnx_path.exists():
        raise click.ClickException(f"{onnx_path} not found: run `dvc repro export` first, or use --synthetic-model")
    params = load_params(params_path)
    meta = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    tracking.configure(params.tracking.experiment)
    model = mlflow.pytorch.load_model(f"models:/{meta['model_name']}/{meta['model_version']}", map_location="cpu")
    spec = PreprocessSpec.from_dict({**{k: json.loads(meta[k]) for k in ("class_names", "input_size", "mean", "std")},
                                     "channel_mode": meta["channel_mode"],
                                     "input_channels": int(meta["input_channels"]), "resize": meta["resize"]})
    test = load_images(*real_split(processed, spec.class_names, "test"), spec)
    train = load_images(*real_split(processed, spec.class_names, "train"), spec)
    calibration = calibration_sample(train.x.numpy(), params.export.calibration_images, params.seed)
    return Workload(f"{meta['model_name']} v{meta['model_version']} ({onnx_path}), {processed} test split",
                    model.eval(), onnx_path, calibration, test.x.numpy(), test.y.numpy())


# --------------------------------------------------------------------------------------- runners
def torch_runner(model: nn.Module) -> Runner:
    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    return run


def ort_session(path: Path, level: ort.GraphOptimizationLevel, save_to: Path | None = None
                ) -> tuple[ort.InferenceSession, float]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = THREADS, 1
    opts.graph_optimization_level = level
    if save_to is not None:
        opts.optimized_model_filepath = str(save_to)
    start = time.perf_counter()
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    return sess, (time.perf_counter() - start) * 1000


def ort_runner(sess: ort.InferenceSession) -> Runner:
    return lambda x: sess.run(["logits"], {"input": x})[0]


def latency_ms(run: Runner, x1: np.ndarray, iters: int, max_seconds: float, warmup: int = 20
               ) -> tuple[float, float, int]:
    """p50/p99 over `iters` runs, or fewer when they take longer than max_seconds (a pathological variant)."""
    for _ in range(warmup):
        run(x1)
    times: list[float] = []
    deadline = time.perf_counter() + max_seconds
    while len(times) < iters and (len(times) < 20 or time.perf_counter() < deadline):
        start = time.perf_counter()
        run(x1)
        times.append((time.perf_counter() - start) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99)), len(times)


def throughput(run: Runner, x: np.ndarray, batch: int, seconds: float) -> float:
    batches = [x[i : i + batch] for i in range(0, len(x) - batch + 1, batch)] or [x[:batch]]
    run(batches[0])
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for b in batches:
            run(b)
            done += len(b)
    return done / (time.perf_counter() - start)


def measure(name: str, run: Runner, work: Workload, iters: int, seconds: float, **extra) -> dict:
    logits = np.concatenate([run(work.test_x[i : i + 32]) for i in range(0, len(work.test_x), 32)])
    p50, p99, runs = latency_ms(run, work.test_x[:1], iters, max_seconds=10 * seconds)
    row = {"variant": name, "accuracy": float((logits.argmax(1) == work.test_y).mean()),
           "p50_b1_ms": p50, "p99_b1_ms": p99, "runs_b1": runs,
           **{f"images_per_s_b{b}": throughput(run, work.test_x, b, seconds) for b in (8, 32)}, **extra}
    click.echo(f"  {name}: p50 {p50:.2f} ms, accuracy {row['accuracy']:.4f}", err=True)
    return row


def run_all(work: Workload, tmp: Path, iters: int, seconds: float) -> list[dict]:
    torch.set_num_threads(THREADS)
    levels = ort.GraphOptimizationLevel
    rows = [measure("torch eager", torch_runner(work.model), work, iters, seconds)]
    # Reference only: with 2 threads, torch's OpenMP barriers stall badly when the cores are already busy.
    torch.set_num_threads(1)
    rows.append(measure("torch eager (1 thread)", torch_runner(work.model), work, iters, seconds))
    torch.set_num_threads(THREADS)
    for label, level in (("basic", levels.ORT_ENABLE_BASIC), ("all", levels.ORT_ENABLE_ALL)):
        sess, load_ms = ort_session(work.fp32_path, level)
        rows.append(measure(f"onnx fp32 ({label})", ort_runner(sess), work, iters, seconds, session_load_ms=load_ms,
                            size_bytes=work.fp32_path.stat().st_size))
    # ORT_ENABLE_ALL's layout rewrites are machine specific: a saved optimised file only saves load time here.
    optimised = tmp / "classifier.opt.onnx"
    ort_session(work.fp32_path, levels.ORT_ENABLE_ALL, save_to=optimised)
    sess, load_ms = ort_session(optimised, levels.ORT_DISABLE_ALL)
    rows.append(measure("onnx fp32 (saved optimised)", ort_runner(sess), work, iters, seconds,
                        session_load_ms=load_ms, size_bytes=optimised.stat().st_size))
    for fmt in INT8_FORMATS:
        path = quantize_int8(work.fp32_path, tmp / f"classifier.int8.{fmt}.onnx", work.calibration, fmt)
        sess, load_ms = ort_session(path, levels.ORT_ENABLE_ALL)
        rows.append(measure(f"onnx int8 {fmt} (all)", ort_runner(sess), work, iters, seconds,
                            session_load_ms=load_ms, size_bytes=path.stat().st_size))
    return rows


def against_targets(rows: list[dict]) -> dict:
    by = {r["variant"]: r for r in rows}
    fp32, eager = by["onnx fp32 (all)"], by["torch eager"]
    int8 = by[f"onnx int8 {INT8_FORMATS[0]} (all)"]  # the layout `stablesdg export` ships by default
    result = {
        "fp32_vs_torch_speedup_b1": eager["p50_b1_ms"] / fp32["p50_b1_ms"],
        "int8_variant": int8["variant"],
        "int8_vs_fp32_speedup_b1": fp32["p50_b1_ms"] / int8["p50_b1_ms"],
        "int8_vs_fp32_speedup_b32": int8["images_per_s_b32"] / fp32["images_per_s_b32"],
        "int8_accuracy_loss_points": (fp32["accuracy"] - int8["accuracy"]) * 100,
        "p99_b1_ms": {r["variant"]: r["p99_b1_ms"] for r in rows},
    }
    result["met"] = {
        "fp32_2x_faster_than_torch_b1": result["fp32_vs_torch_speedup_b1"] >= TARGETS["fp32_vs_torch_speedup_b1"],
        "int8_1.5x_faster_than_fp32_b1": result["int8_vs_fp32_speedup_b1"] >= TARGETS["int8_vs_fp32_speedup_b1"],
        "int8_loss_within_0.5_points": result["int8_accuracy_loss_points"] <= TARGETS["int8_max_accuracy_loss_points"],
        "p99_b1_below_20ms": {k: v < TARGETS["p99_b1_ms_below"] for k, v in result["p99_b1_ms"].items()},
    }
    return result


def print_table(rows: list[dict], targets: dict) -> None:
    click.echo(f"{'variant':<30}{'acc':>7}{'p50 b1':>9}{'p99 b1':>9}{'img/s b8':>10}{'img/s b32':>10}"
               f"{'load ms':>9}{'MB':>7}")
    for r in rows:
        load = f"{r['session_load_ms']:.0f}" if "session_load_ms" in r else "-"
        size = f"{r['size_bytes'] / 1e6:.2f}" if "size_bytes" in r else "-"
        click.echo(f"{r['variant']:<30}{r['accuracy']:>7.3f}{r['p50_b1_ms']:>9.2f}{r['p99_b1_ms']:>9.2f}"
                   f"{r['images_per_s_b8']:>10.0f}{r['images_per_s_b32']:>10.0f}{load:>9}{size:>7}")
    click.echo(f"fp32 vs torch (b1 p50): {targets['fp32_vs_torch_speedup_b1']:.2f}x (target >= 2x); "
               f"{targets['int8_variant']} vs fp32: {targets['int8_vs_fp32_speedup_b1']:.2f}x at b1, "
               f"{targets['int8_vs_fp32_speedup_b32']:.2f}x at b32 (target >= 1.5x), "
               f"accuracy loss {targets['int8_accuracy_loss_points']:+.2f} points (target <= 0.5)")


@click.command()
@click.option("--synthetic-model", is_flag=True, help="random backbone + demo images (no pipeline run)")
@click.option("--backbone", default="mobilenet_v3_small", show_default=True, help="with --synthetic-model")
@click.option("--onnx", "onnx_path", default=str(ROOT / "models" / "classifier.onnx"), show_default=True)
@click.option("--processed", default=str(ROOT / "data" / "processed"), show_default=True)
@click.option("--params", "params_path", default=str(ROOT / "params.yaml"), show_default=True)
@click.option("--iters", default=300, show_default=True, help="batch-1 runs per variant for p50/p99")
@click.option("--seconds", default=2.0, show_default=True, help="time per throughput measurement")
@click.option("--note", default="", help="free text stored with the results (e.g. machine load)")
@click.option("--out", default=str(ROOT / "benchmarks" / "results"), show_default=True)
def main(synthetic_model: bool, backbone: str, onnx_path: str, processed: str, params_path: str, iters: int, seconds: float,
         note: str, out: str) -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        work = (synthetic_workload(tmp, backbone) if synthetic_model
                else champion_workload(Path(onnx_path), Path(processed), Path(params_path)))
        info = machine()
        rows = run_all(work, tmp, iters, seconds)
    info["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    targets = against_targets(rows)
    result = {"source": work.source, "test_images": len(work.test_y), "calibration_images": len(work.calibration),
              "iters_b1": iters, "note": note, "machine": info, "targets": TARGETS, "results": rows,
              "against_targets": targets}
    suffix = ("_synthetic" + ("" if backbone == "mobilenet_v3_small" else f"_{backbone}")) if synthetic_model else ""
    path = Path(out) / f"inference{suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print_table(rows, targets)
    click.echo(f"-> {path}")


if __name__ == "__main__":
    main()
