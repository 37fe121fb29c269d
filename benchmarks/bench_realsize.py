"""The per-class path at real size: SD 1.5's architecture (random weights, CLIP's real BPE) through check-base,
adapt (textual inversion then LoRA), search (the smallest grid) and generate, each as the CLI command a user
runs, then stock diffusers loading the adapter files. Wall time and peak RSS per step -> JSON + a table.

    nice -n 19 python benchmarks/bench_realsize.py --work /tmp/realsize --out benchmarks/results/realsize_cpu.json

`tests/test_realsize.py` (slow) runs this script and checks its outputs. On CPU a 512 px step needs ~11 GiB and
about a minute: run it alone. `--resolution 256` for a quicker pass; `--device cuda` on a GPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CLASS = "crazing"

STOCK_LOAD = """
import sys, torch
from diffusers import StableDiffusionImg2ImgPipeline
base, adapters = sys.argv[1], sys.argv[2]
pipe = StableDiffusionImg2ImgPipeline.from_pretrained(base, safety_checker=None, feature_extractor=None,
                                                      requires_safety_checker=False)
pipe.load_textual_inversion(adapters, weight_name="learned_embeds.safetensors")
pipe.load_lora_weights(adapters, weight_name="pytorch_lora_weights.safetensors")
token = pipe.tokenizer.convert_tokens_to_ids("<crazing>")
lora = sum("lora" in n for n, _ in pipe.unet.named_parameters())
lora_text = sum("lora" in n for n, _ in pipe.text_encoder.named_parameters())
print(f"stock-load: token {token} lora-unet {lora} lora-text {lora_text}")
assert token == len(pipe.tokenizer) - 1 and lora > 0 and lora_text > 0
"""


def run_step(name: str, args: list[str], cwd: Path, env: dict) -> dict:
    """One command in its own process: wall time and that process's own peak RSS (wait4's rusage)."""
    start = time.perf_counter()
    with open(cwd / f"{name}.log", "w") as log:
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    record = {"step": name, "seconds": round(seconds, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),
              "exit_code": code}
    print(f"{name:12s} {seconds:8.1f} s {record['peak_rss_gib']:6.2f} GiB  exit {code}", flush=True)
    if code != 0:
        raise SystemExit(f"{name} failed; see {cwd / (name + '.log')}:\n{(cwd / (name + '.log')).read_text()[-3000:]}")
    return record


def write_params(work: Path, base: Path, resolution: int, device: str) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update({"source": "data/demo", "k_shot": 2, "val_per_class": 2, "test_per_class": 2,
                           "demo": {"per_class": 6, "size": 200}})
    params["model"].update({"base": str(base), "resolution": resolution})
    params["adapt"].update({"embedding": {"steps": 2, "learning_rate": 0.005, "batch_size": 1},
                            "checkpoint_every": 2, "sample_images": 0, "device": device})
    params["adapt"]["lora"].update({"steps": 2, "batch_size": 1})
    params["search"].update({"strength": [0.5], "guidance_scale": [5.0], "steps": [4], "images_per_trial": 2,
                             "refine": False, "bootstrap": 0})
    params["generate"].update({"per_class": 2, "batch_size": 1, "steps": 4, "device": device, "resolution": None})
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--base", type=Path, default=None, help="an SD folder (default: build sd15 random in WORK)")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "STABLESDG_CACHE": str(work / "cache")}
    sd = [str(BIN / "stablesdg")]
    records = []
    base = (args.base or work / "sd15").resolve()
    if not (base / "model_index.json").exists():
        records.append(run_step("build", [*sd, "base", "build-random", "--arch", "sd15", "--out", str(base)], work, env))
    params = str(write_params(work, base, args.resolution, args.device))
    p = ["--params", params]
    run_step("demo", [*sd, "data", "demo", *p, "--out", "data/demo"], work, env)
    run_step("ingest", [*sd, "data", "ingest", *p, "--out", "data/processed", "--reports", "reports/data",
                        "--metrics", "metrics/data.json"], work, env)
    records.append(run_step("check-base", [*sd, "check-base", *p, "--out", "reports/base/base.json"], work, env))
    records.append(run_step("adapt", [*sd, "adapt", "--class", CLASS, *p, "--processed", "data/processed",
                                      "--out", "models/adapters", "--reports", "reports/adapt"], work, env))
    records.append(run_step("search", [*sd, "search", "--class", CLASS, *p, "--processed", "data/processed",
                                       "--adapters", "models/adapters", "--out", "reports/search"], work, env))
    records.append(run_step("generate", [*sd, "generate", "--class", CLASS, *p, "--processed", "data/processed",
                                         "--adapters", "models/adapters", "--search", "reports/search",
                                         "--out", "data/synthetic"], work, env))
    records.append(run_step("stock-load", [sys.executable, "-c", STOCK_LOAD, str(base),
                                           str(work / "models/adapters" / CLASS)], work, env))
    result = {"arch": "sd15 (random weights)", "resolution": args.resolution, "device": args.device,
              "threads": yaml.safe_load(Path(params).read_text())["threads"], "cpu_count": os.cpu_count(),
              "embedding_steps": 2, "lora_steps": 2, "batch_size": 1, "search_trials": 1, "images": 2,
              "steps": records}
    out = args.out or work / "realsize.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
