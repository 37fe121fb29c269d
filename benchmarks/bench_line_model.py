"""Line models on real data (issue 15): int8 calibration variants, and the backbone accuracy-vs-latency sweep.

    # int8 study: one fp32 model, every calibration variant, on the processed split's real test images
    python benchmarks/bench_line_model.py int8 --model /tmp/neu15/models/resnet18_s42.onnx \
        --processed /tmp/neu15/processed --synthetic /tmp/neu15/synthetic --out benchmarks/results/int8_neu.json

    # backbones: every OUT/<backbone>_s<seed>.onnx of benchmarks/train_line_models.py, fp32 and int8
    python benchmarks/bench_line_model.py backbones --models /tmp/neu15/models --processed /tmp/neu15/processed \
        --synthetic /tmp/neu15/synthetic --out benchmarks/results/backbones_neu.json --plot reports/neu/backbones.png

Accuracy and macro-F1 on the real test split (NEU-CLS: 100 per class); latency with onnxruntime on this CPU:
p50/p99 at batch 1 over --iters runs, images/s at batch 8 and 32. The int8 copies are made with
`stablesdg.quantize.quantize_model` (the export stage's code). Each table is printed and written as JSON.
Timings depend on what else runs on the machine: the JSON records the load average at start and end.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import click
import numpy as np
import onnxruntime as ort

from stablesdg.export import single_image_times
from stablesdg.quantize import QuantConfig, calibration_set, int8_layout, quantize_model

ROOT = Path(__file__).resolve().parents[1]
INPUT, OUTPUT = "input", "logits"
P99_BUDGET_MS = 10.0  # issue 15: the line PC's budget at batch 1
MAX_DROP_POINTS = 0.5


# --------------------------------------------------------------------------------------- data
def load_data(processed: Path, synthetic: Path | None, input_size: int = 128) -> dict[str, np.ndarray]:
    """Real train/test (and synthetic) images preprocessed exactly as training and export do."""
    from stablesdg.classifier import ClassifierConfig, load_images, make_spec, real_split, synthetic_split
    from stablesdg.data import class_names_in

    names = class_names_in(processed)
    spec = make_spec(names, ClassifierConfig(input_size=input_size))
    out: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        images = load_images(*real_split(processed, names, split), spec, desc=split)
        out[f"{split}_x"], out[f"{split}_y"] = images.x.numpy(), images.y.numpy()
    paths, labels = synthetic_split(synthetic, names) if synthetic else ([], [])
    images = load_images(paths, labels, spec, desc="synthetic")
    out["synthetic_x"], out["synthetic_y"] = images.x.numpy(), images.y.numpy()
    return out


def macro_f1(y: np.ndarray, pred: np.ndarray, num_classes: int) -> float:
    scores = []
    for c in range(num_classes):
        tp = np.sum((pred == c) & (y == c))
        fp, fn = np.sum((pred == c) & (y != c)), np.sum((pred != c) & (y == c))
        scores.append(2 * tp / max(1, 2 * tp + fp + fn))
    return float(np.mean(scores))


# --------------------------------------------------------------------------------------- onnxruntime
def make_session(path: str | Path, threads: int = 2, opt: str = "all", arena: bool = True) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                                     "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                     "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                     "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[opt]
    opts.enable_cpu_mem_arena = arena
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def logits(sess: ort.InferenceSession, x: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.concatenate([sess.run([OUTPUT], {INPUT: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def scores(sess: ort.InferenceSession, x: np.ndarray, y: np.ndarray) -> dict:
    pred = logits(sess, x).argmax(1)
    return {"accuracy": float((pred == y).mean()), "macro_f1": macro_f1(y, pred, int(y.max()) + 1)}


def fidelity(ref: np.ndarray, got: np.ndarray) -> dict:
    """How closely int8 follows fp32, less noisy than accuracy on 600 images (one image = 0.17 points):
    top-1 agreement and the RMS logit error relative to the fp32 logits' RMS."""
    return {"top1_agreement": round(float((ref.argmax(1) == got.argmax(1)).mean()), 4),
            "rel_logit_rmse": round(float(np.sqrt(np.mean((ref - got) ** 2)) / np.sqrt(np.mean(ref ** 2))), 4)}


def timing(sess: ort.InferenceSession, x: np.ndarray, iters: int = 200, batches: Sequence[int] = (8, 32),
           rounds: int = 5) -> dict:
    """p50/p99 at batch 1 over `iters` runs (after 10 warm-ups); img/s at each batch size: best of `rounds`."""
    times = single_image_times(sess, x, iters, warmups=10)
    out = {"p50_ms": round(float(np.percentile(times, 50)), 3), "p99_ms": round(float(np.percentile(times, 99)), 3)}
    for b in batches:
        xb = np.ascontiguousarray(np.resize(x, (b, *x.shape[1:])))
        sess.run([OUTPUT], {INPUT: xb})
        best = 0.0
        for _ in range(rounds):
            start = time.perf_counter()
            sess.run([OUTPUT], {INPUT: xb})
            best = max(best, b / (time.perf_counter() - start))
        out[f"img_s_b{b}"] = round(best, 1)
    return out


def machine(threads: int) -> dict:
    return {"python": platform.python_version(), "onnxruntime": ort.__version__,
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "threads": threads,
            "load_average_1m_at_start": round(os.getloadavg()[0], 2)}


# --------------------------------------------------------------------------------------- FLOPs
def count_flops(path: str | Path) -> dict:
    """Multiply-adds x 2 of Conv / Gemm / MatMul per image (batch 1), from the graph's inferred shapes.

    Equal to torch.utils.flop_counter for resnet18, mobilenet_v3_small/large, efficientnet_b0, regnet_x_400mf;
    a Conv whose output shape inference cannot infer is counted in `convs_without_shape`, not in `flops`
    (shufflenet_v2_x1_0: 11 of its 94 MFLOP are seen)."""
    import onnx
    from onnx import numpy_helper, shape_inference

    proto = onnx.load_model(str(path))
    dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    dim.ClearField("dim_param")
    dim.dim_value = 1
    proto = shape_inference.infer_shapes(proto)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*proto.graph.value_info, *proto.graph.input, *proto.graph.output]}
    inits = {t.name: numpy_helper.to_array(t).shape for t in proto.graph.initializer}
    shapes.update({k: list(v) for k, v in inits.items()})
    conv = gemm = unknown = 0
    for node in proto.graph.node:
        if node.op_type == "Conv":
            w = shapes[node.input[1]]
            out = shapes.get(node.output[0])
            if out and all(out):
                conv += 2 * int(np.prod(out)) * int(np.prod(w[1:]))
            else:  # shape inference lost the size (e.g. after shufflenet's channel-shuffle reshape)
                unknown += 1
        elif node.op_type in ("Gemm", "MatMul"):
            a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
            if a and b:
                gemm += 2 * int(np.prod(a)) * int(b[-1] if node.op_type == "MatMul" or not any(
                    at.name == "transB" and at.i for at in node.attribute) else b[0])
    return {"conv_flops": conv, "gemm_flops": gemm, "flops": conv + gemm, "convs_without_shape": unknown}


# --------------------------------------------------------------------------------------- int8 study
VARIANTS: list[tuple[str, str, QuantConfig]] = [
    # (name, calibration images, config); "train60" = today's export: the 60 real train images
    ("today: minmax/pc, 60 real train", "train", QuantConfig()),
    ("minmax/pc", "mixed", QuantConfig()),
    ("minmax/pt", "mixed", QuantConfig(per_channel=False)),
    ("entropy/pc", "mixed", QuantConfig(method="entropy")),
    ("entropy/pt", "mixed", QuantConfig(method="entropy", per_channel=False)),
    ("percentile 99.999/pc", "mixed", QuantConfig(method="percentile", percentile=99.999)),
    ("percentile 99.99/pc", "mixed", QuantConfig(method="percentile", percentile=99.99)),
    ("minmax/pc + fp32 first conv, last gemm", "mixed", QuantConfig(fp32_nodes=("first_conv", "last_gemm"))),
    ("minmax/pc + fp32 first conv", "mixed", QuantConfig(fp32_nodes=("first_conv",))),
    ("minmax/pc + fp32 last gemm", "mixed", QuantConfig(fp32_nodes=("last_gemm",))),
    ("today + fp32 first conv, last gemm", "train", QuantConfig(fp32_nodes=("first_conv", "last_gemm"))),
    ("entropy/pc + fp32 first conv, last gemm", "mixed",
     QuantConfig(method="entropy", fp32_nodes=("first_conv", "last_gemm"))),
    ("percentile 99.999/pc + fp32 first conv, last gemm", "mixed",
     QuantConfig(method="percentile", fp32_nodes=("first_conv", "last_gemm"))),
    ("minmax/pc qoperator", "mixed", QuantConfig(int8_format="qoperator")),
]


def calibration_images(data: dict, which: str, n: int, seed: int) -> np.ndarray:
    if which == "train":
        return data["train_x"]  # what export did: calibration_sample of the (60) train images
    return calibration_set([(data["train_x"], data["train_y"]), (data["synthetic_x"], data["synthetic_y"])], n,
                           seed)


def int8_study(model: Path, data: dict, n_calib: int, seed: int, threads: int, iters: int,
               only: Sequence[str] | None, workdir: Path) -> dict:
    x, y = data["test_x"], data["test_y"]
    fp32 = make_session(model, threads)
    base = {**scores(fp32, x, y), **timing(fp32, x, iters)}
    ref = logits(fp32, x)
    rows = [{"variant": "fp32", **base, "drop_points": 0.0, "speedup_b1": 1.0, "speedup_b32": 1.0,
             "top1_agreement": 1.0, "rel_logit_rmse": 0.0}]
    print_row(rows[-1])
    for name, which, cfg in VARIANTS:
        if only and not any(o in name for o in only):
            continue
        calib = calibration_images(data, which, n_calib, seed)
        path = workdir / f"{len(rows)}.onnx"
        start = time.perf_counter()
        done = quantize_model(model, path, calib, cfg)
        quant_s = time.perf_counter() - start
        sess = make_session(path, threads)
        row = {"variant": name, **scores(sess, x, y), **timing(sess, x, iters), "calibration": done,
               "quantize_s": round(quant_s, 1), "layout": int8_layout(path)}
        row["drop_points"] = round((base["accuracy"] - row["accuracy"]) * 100, 2)
        row.update(fidelity(ref, logits(sess, x)))
        row["speedup_b1"] = round(base["p50_ms"] / row["p50_ms"], 2)
        row["speedup_b32"] = round(row["img_s_b32"] / base["img_s_b32"], 2)
        rows.append(row)
        print_row(row)
    return {"model": str(model), "test_images": int(len(y)), "calibration_images": n_calib, "rows": rows}


HEADER = (f"{'variant':<52} {'acc':>6} {'F1':>6} {'drop':>6} {'agree':>6} {'rmse':>6} {'p50':>6} {'p99':>6} "
          f"{'b8/s':>7} {'b32/s':>7} {'x b1':>5} {'x b32':>5}")


def print_row(row: dict) -> None:
    if row["variant"] == "fp32":
        click.echo(HEADER)
    click.echo(f"{row['variant'][:52]:<52} {row['accuracy']:6.4f} {row['macro_f1']:6.4f} {row['drop_points']:+6.2f} "
               f"{row['top1_agreement']:6.4f} {row['rel_logit_rmse']:6.4f} {row['p50_ms']:6.2f} {row['p99_ms']:6.2f} {row['img_s_b8']:7.1f} {row['img_s_b32']:7.1f} "
               f"{row['speedup_b1']:5.2f} {row['speedup_b32']:5.2f}")


# --------------------------------------------------------------------------------------- backbones
def backbone_sweep(models: Path, data: dict, cfg: QuantConfig, calib_which: str, n_calib: int, seed: int,
                   threads: int, iters: int, workdir: Path, also_today: bool = True) -> dict:
    """fp32, int8 with `cfg`, and (also_today) int8 as the export made it before issue 15, per model file."""
    trained = json.loads((models / "train.json").read_text()) if (models / "train.json").exists() else {}
    x, y = data["test_x"], data["test_y"]
    rows = []
    for path in sorted(models.glob("*_s*.onnx")):
        backbone, seed_s = path.stem.rsplit("_s", 1)
        flops = count_flops(path)
        variants = [("fp32", path)]
        for precision, which, c in (("int8", calib_which, cfg), ("int8_today", "train", QuantConfig()))[
                :2 if also_today else 1]:
            variants.append((precision, workdir / f"{path.stem}.{precision}.onnx"))
            quantize_model(path, variants[-1][1], calibration_images(data, which, n_calib, seed), c)
        ref = logits(make_session(path, threads), x)
        for precision, p in variants:
            sess = make_session(p, threads)
            row = {"backbone": backbone, "seed": int(seed_s), "precision": precision, **scores(sess, x, y),
                   **fidelity(ref, logits(sess, x)),
                   **timing(sess, x, iters), "mflops": round(flops["flops"] / 1e6, 1),
                   "torch_test_accuracy": trained.get(path.stem, {}).get("test_accuracy")}
            rows.append(row)
            click.echo(f"{path.stem:<28} {precision:<10} acc {row['accuracy']:.4f} F1 {row['macro_f1']:.4f} "
                       f"p50 {row['p50_ms']:.2f} p99 {row['p99_ms']:.2f} b32 {row['img_s_b32']:.0f}/s "
                       f"{row['mflops']:.0f} MFLOP")
    return {"int8_config": cfg.label, "calibration": calib_which, "calibration_images": n_calib, "rows": rows,
            "summary": summarise(rows)}


def summarise(rows: list[dict]) -> list[dict]:
    """Per backbone and precision: accuracy/F1 mean +- std over seeds, median latency over seeds; Pareto flag
    (no other point has higher mean accuracy at lower p99) and the line pick (best accuracy with p99 <= 10)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["backbone"], r["precision"]), []).append(r)
    out = []
    for (backbone, precision), rs in sorted(groups.items()):
        acc, f1 = np.array([r["accuracy"] for r in rs]), np.array([r["macro_f1"] for r in rs])
        out.append({"backbone": backbone, "precision": precision, "seeds": len(rs),
                    "accuracy": round(float(acc.mean()), 4), "accuracy_std": round(float(acc.std(ddof=1)), 4)
                    if len(rs) > 1 else None, "macro_f1": round(float(f1.mean()), 4),
                    "macro_f1_std": round(float(f1.std(ddof=1)), 4) if len(rs) > 1 else None,
                    "p50_ms": round(float(np.median([r["p50_ms"] for r in rs])), 3),
                    "p99_ms": round(float(np.median([r["p99_ms"] for r in rs])), 3),
                    "img_s_b32": round(float(np.median([r["img_s_b32"] for r in rs])), 1),
                    "mflops": rs[0]["mflops"]})
    shipped = [s for s in out if s["precision"] in ("fp32", "int8")]  # what export can ship (int8 = chosen)
    for s in out:
        s["pareto"] = s in shipped and not any(
            o["p99_ms"] <= s["p99_ms"] and o["macro_f1"] > s["macro_f1"]
            or o["p99_ms"] < s["p99_ms"] and o["macro_f1"] >= s["macro_f1"] for o in shipped)
    within = [s for s in shipped if s["p99_ms"] <= P99_BUDGET_MS]
    if within:
        max(within, key=lambda s: s["macro_f1"])["line_pick"] = True
    return out


def plot(summary: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    summary = [s for s in summary if s["precision"] in ("fp32", "int8")]
    for s in summary:
        marker = "o" if s["precision"] == "fp32" else "s"
        ax.errorbar(s["p99_ms"], s["macro_f1"], yerr=s["macro_f1_std"] or 0, fmt=marker,
                    color="tab:red" if s["pareto"] else "tab:gray", capsize=3)
        ax.annotate(f"{s['backbone']} {s['precision']}" + (" *" if s.get("line_pick") else ""),
                    (s["p99_ms"], s["macro_f1"]), fontsize=7, xytext=(4, 2), textcoords="offset points")
    front = sorted((s for s in summary if s["pareto"]), key=lambda s: s["p99_ms"])
    ax.plot([s["p99_ms"] for s in front], [s["macro_f1"] for s in front], "-", color="tab:red", lw=1,
            label="Pareto front")
    ax.axvline(P99_BUDGET_MS, ls="--", color="k", lw=0.8, label=f"p99 budget {P99_BUDGET_MS:g} ms")
    ax.set_xscale("log")
    ax.set_xlabel("p99 latency at batch 1, ms (onnxruntime, log scale)")
    ax.set_ylabel("macro-F1 on NEU-CLS test (mean over seeds)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


# --------------------------------------------------------------------------------------- CLI
def _pm(value: float | None) -> str:
    return f"+-{value:.3f}" if value is not None else ""


@click.group()
def cli() -> None:
    """int8 calibration study and backbone sweep on real data."""


def _common(f):
    for opt in reversed([
        click.option("--processed", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True),
        click.option("--synthetic", type=click.Path(exists=True, file_okay=False, path_type=Path)),
        click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True),
        click.option("--calibration-images", "n_calib", type=int, default=240, show_default=True,
                     help="stratified real train + synthetic images for the 'mixed' calibration set"),
        click.option("--seed", type=int, default=42, show_default=True),
        click.option("--threads", type=int, default=2, show_default=True),
        click.option("--iters", type=int, default=200, show_default=True, help="batch-1 runs for p50/p99"),
    ]):
        f = opt(f)
    return f


@cli.command("int8")
@click.option("--model", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--only", multiple=True, help="run only variants whose name contains this (repeatable)")
@_common
def int8_command(model: Path, only: tuple[str, ...], processed: Path, synthetic: Path | None, out: Path,
                 n_calib: int, seed: int, threads: int, iters: int) -> None:
    data = load_data(processed, synthetic)
    env = machine(threads)
    with tempfile.TemporaryDirectory() as tmp:
        result = int8_study(model, data, n_calib, seed, threads, iters, only, Path(tmp))
    env["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": env, **result}, indent=2))


@cli.command("backbones")
@click.option("--models", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax")
@click.option("--per-channel/--per-tensor", default=True)
@click.option("--fp32-node", "fp32_nodes", multiple=True)
@click.option("--calibration", "calib_which", type=click.Choice(["train", "mixed"]), default="mixed")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--also-today/--no-also-today", default=True, show_default=True,
              help="also int8 as export made it before issue 15 (MinMax, per-channel, the 60 real train images)")
@_common
def backbones_command(models: Path, method: str, per_channel: bool, fp32_nodes: tuple[str, ...], calib_which: str,
                      plot_path: Path | None, also_today: bool, processed: Path, synthetic: Path | None, out: Path,
                      n_calib: int, seed: int, threads: int, iters: int) -> None:
    data = load_data(processed, synthetic)
    env = machine(threads)
    cfg = QuantConfig(method=method, per_channel=per_channel, fp32_nodes=fp32_nodes)
    with tempfile.TemporaryDirectory() as tmp:
        result = backbone_sweep(models, data, cfg, calib_which, n_calib, seed, threads, iters, Path(tmp), also_today)
    env["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": env, **result}, indent=2))
    click.echo(f"\n{'backbone':<20} {'prec':<5} {'seeds':>5} {'acc':>14} {'macro-F1':>14} {'p50':>6} {'p99':>6} "
               f"{'b32/s':>7} {'MFLOP':>6}  pareto")
    for s in result["summary"]:
        sd = _pm
        click.echo(f"{s['backbone']:<20} {s['precision']:<5} {s['seeds']:>5} {s['accuracy']:.4f}{sd(s['accuracy_std']):>8} "
                   f"{s['macro_f1']:.4f}{sd(s['macro_f1_std']):>8} {s['p50_ms']:6.2f} {s['p99_ms']:6.2f} "
                   f"{s['img_s_b32']:7.1f} {s['mflops']:6.0f}  {'yes' if s['pareto'] else ''}"
                   f"{'  <- line pick' if s.get('line_pick') else ''}")
    if plot_path:
        plot(result["summary"], plot_path, f"NEU-CLS k=10 + synthetic; int8 = {cfg.label} ({calib_which});\n"
                                           f"{threads} thread(s), load avg {env['load_average_1m_at_start']}")


if __name__ == "__main__":
    cli()
