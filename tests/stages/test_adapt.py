"""Stage `adapt@<class>`: the command under torchrun with two data-parallel CPU processes (what `accelerate launch`
does on GPUs), and the loss curve it writes for the DVC plot."""

from __future__ import annotations

import json

import torch
import yaml
from conftest import adapt_params, adapt_raw, run_cli
from safetensors.torch import load_file

from stablesdg.adaptation import adapt_class
from stablesdg.stages.adapt import write_loss_csv


def test_accelerate_launch_runs_data_parallel_adaptation(processed, tmp_path):
    """Two data-parallel processes on CPU (gloo): each draws its own batch, gradients are averaged (the
    run checks that both replicas end bit-identical), and only the main process writes the adapter."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(adapt_raw()))
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "OMP_NUM_THREADS": "1"}
    # `accelerate launch --multi_gpu` starts its processes with torch.distributed.run; on CPU (where accelerate
    # itself would need mpirun) the test starts them the same way, and Accelerate's state picks gloo.
    run_cli(["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "stablesdg.cli", "adapt", "--class", "crazing", "--processed", str(processed),
             "--out", "adapters", "--reports", "reports"], tmp_path, env)
    record = json.loads((tmp_path / "adapters/crazing/adapter.json").read_text())
    assert record["num_processes"] == 2
    assert (tmp_path / "reports/crazing_loss.csv").read_text().count("\n") == 1 + 6 + 6
    _, single = adapt_class(adapt_params(), "crazing", processed, tmp_path / "single",
                            checkpoint_root=tmp_path / "ckpt")
    assert single["num_processes"] == 1
    assert record["sha256"] != single["sha256"], "two replicas average two batches: a different run"
    embeds = load_file(tmp_path / "adapters/crazing/learned_embeds.safetensors")
    assert list(embeds) == ["<crazing>"] and torch.isfinite(embeds["<crazing>"]).all()


def test_loss_csv_puts_both_stages_on_one_step_axis(tmp_path):
    losses = [(1, "embedding", 0.5), (2, "embedding", 0.25), (1, "lora", 0.125), (2, "lora", 0.0625)]
    write_loss_csv(tmp_path / "plots" / "crazing_loss.csv", losses)
    rows = (tmp_path / "plots" / "crazing_loss.csv").read_text().splitlines()
    assert rows == ["step,stage,loss", "1,embedding,0.500000", "2,embedding,0.250000", "3,lora,0.125000",
                    "4,lora,0.062500"]
