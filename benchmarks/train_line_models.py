"""Train candidate line models on a processed split + synthetic set, export each to ONNX fp32 (issue 15).

    python benchmarks/train_line_models.py --processed /tmp/neu15/processed --synthetic /tmp/neu15/synthetic \
        --out /tmp/neu15/models --backbones resnet18,mobilenet_v3_small --seeds 42,43,44 --synthetic-ratio 5

Each (backbone, seed) is trained exactly as the `train` stage trains its real_plus_synthetic variant
(`classifier.train_classifier` with params.yaml's classifier block, `--synthetic-ratio` synthetic images per
real train image, early stopping on val macro-F1), evaluated with torch on the real test split and exported with
the export stage's `export_onnx` to OUT/<backbone>_s<seed>.onnx (fp32; int8 copies: bench_line_model.py).
Seeds are the outer loop, so an interrupted run still covers every backbone. OUT/train.json collects test
accuracy / macro-F1 and training time per model (a finished model is skipped on a rerun).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import click
import torch

from stablesdg.classifier import evaluate, train_classifier
from stablesdg.comparison import combine, load_splits
from stablesdg.config import load_params
from stablesdg.export import export_onnx

ROOT = Path(__file__).resolve().parents[1]


@click.command()
@click.option("--processed", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--synthetic", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--backbones", default="resnet18,mobilenet_v3_small,mobilenet_v3_large,efficientnet_b0,"
              "shufflenet_v2_x1_0", show_default=True)
@click.option("--seeds", default="42,43,44", show_default=True)
@click.option("--synthetic-ratio", type=float, default=5.0, show_default=True,
              help="experiments/neu.params: classifier.synthetic_ratio=5.0")
@click.option("--epochs", type=int, default=None, help="default: params.yaml classifier.epochs")
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--params", "params_path", default=str(ROOT / "params.yaml"), show_default=True)
def main(processed: Path, synthetic: Path, out: Path, backbones: str, seeds: str, synthetic_ratio: float,
         epochs: int | None, threads: int, params_path: str) -> None:
    torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    record_file = out / "train.json"
    records = json.loads(record_file.read_text()) if record_file.exists() else {}
    base = load_params(params_path)
    for seed in [int(s) for s in seeds.split(",")]:
        cfg = dataclasses.replace(base.classifier, synthetic_ratio=synthetic_ratio, device="cpu",
                                  **({"epochs": epochs} if epochs else {}))
        params = dataclasses.replace(base, seed=seed, classifier=cfg)
        splits = None
        for backbone in backbones.split(","):
            name = f"{backbone}_s{seed}"
            if name in records and (out / f"{name}.onnx").exists():
                continue
            if splits is None:  # the synthetic choice depends on the seed: one load per seed
                splits = load_splits(processed, synthetic, params)
            train = combine(splits.train, splits.synthetic)
            start = time.perf_counter()
            result = train_classifier(train, splits.val, splits.spec, dataclasses.replace(cfg, backbone=backbone),
                                      seed, desc=name)
            train_s = time.perf_counter() - start
            ev = evaluate(result.model, splits.test, len(splits.spec.class_names))
            export_onnx(result.model, splits.spec, out / f"{name}.onnx", base.export.opset,
                        {"model_name": name, "model_version": "0", "data_hash": "unknown",
                         "weights_sha256": "unknown", "stablesdg_version": "bench"})
            records[name] = {"backbone": backbone, "seed": seed, "test_accuracy": ev.accuracy,
                             "test_macro_f1": ev.macro_f1, "best_epoch": result.best_epoch,
                             "epochs_run": len(result.history), "train_s": round(train_s, 1),
                             "n_train_real": len(splits.train),
                             "n_train_synthetic": len(splits.synthetic) if splits.synthetic else 0,
                             "n_test": len(splits.test)}
            record_file.write_text(json.dumps(records, indent=2))
            click.echo(f"{name}: test accuracy {ev.accuracy:.4f} macro-F1 {ev.macro_f1:.4f} "
                       f"(best epoch {result.best_epoch}, {train_s:.0f} s)", err=True)


if __name__ == "__main__":
    main()
