"""The per-class path at real size (SD 1.5's architecture, random weights, CLIP's real BPE) on CPU: check-base,
adapt (2 TI + 2 LoRA steps, batch 1), search (one trial), generate (2 images), then stock diffusers loading the
adapter files. It runs benchmarks/bench_realsize.py, which also records wall time and peak RSS per step.

Slow (about 15 min and 11 GiB at 512 px on 2 cores): `nice -n 19 pytest -m slow tests/test_realsize.py`, alone.
STABLESDG_REALSIZE_RES=256 for a quicker pass; STABLESDG_REALSIZE_OUT=benchmarks/results/realsize_cpu.json
keeps the numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _reject(constant: str):
    raise ValueError(f"bare {constant} in JSON")


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_real_size_per_class_path_on_cpu(tmp_path):
    resolution = int(os.environ.get("STABLESDG_REALSIZE_RES", "512"))
    out = Path(os.environ.get("STABLESDG_REALSIZE_OUT", tmp_path / "realsize.json")).resolve()
    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_realsize.py"), "--work", str(work),
                           "--resolution", str(resolution), "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=3500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    steps = {r["step"]: r for r in result["steps"]}
    assert set(steps) >= {"build", "check-base", "adapt", "search", "generate", "stock-load"}
    assert all(r["exit_code"] == 0 and r["seconds"] > 0 and r["peak_rss_gib"] > 0 for r in steps.values())

    check = (work / "check-base.log").read_text()
    assert "architecture: SD 1.x" in check and "cross-attention 768" in check and "12 x 768 quick_gelu" in check
    assert "prediction type: epsilon" in check and "result: OK" in check
    assert "listed, not loaded: feature_extractor, safety_checker" in check

    adapter = json.loads((work / "models/adapters/crazing/adapter.json").read_text())
    assert adapter["embedding_steps"] == 2 and adapter["lora_steps"] == 2
    # search.bootstrap: 0 -> the report is strict JSON (null, not NaN)
    report = json.loads((work / "reports/search/crazing.json").read_text(), parse_constant=_reject)
    assert len(report["trials"]) == 1
    images = sorted((work / "data/synthetic/crazing").glob("*.png"))
    assert len(images) == 2
    assert "stock-load: token 49408" in (work / "stock-load.log").read_text()
