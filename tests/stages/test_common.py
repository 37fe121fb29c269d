"""stages/common.py: the shared options, the params loading and the translation of domain errors into one-line
CLI errors (exit code 1, the message, no traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from stablesdg.errors import StableSDGError
from stablesdg.stages.common import (
    PROCESSED,
    class_option,
    cli_errors,
    load_for_class,
    load_or_exit,
    params_option,
    path_option,
)


@click.command()
@class_option
@params_option
@path_option("--processed", default=PROCESSED)
@cli_errors
def probe(cls: str, params_path: str, processed: Path) -> None:
    params = load_for_class(params_path, cls)
    if cls == "scratches":
        raise StableSDGError("scratches: the adapter file models/adapters/scratches/adapter.json is missing")
    click.echo(f"{cls} {type(processed).__name__} {processed} {params.seed}")


@pytest.fixture
def params_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"seed": 9, "classes": {"crazing": {"initializer": "crack"},
                                                           "scratches": {"initializer": "line"}}}))
    return str(path)


def test_options_give_paths_and_the_project_defaults(params_file):
    result = CliRunner().invoke(probe, ["--class", "crazing", "--params", params_file])
    assert result.exit_code == 0 and result.output.strip() == "crazing PosixPath data/processed 9"


def test_an_unknown_class_and_a_domain_error_are_one_line_errors(params_file):
    unknown = CliRunner().invoke(probe, ["--class", "dent", "--params", params_file])
    assert unknown.exit_code == 1 and "dent" in unknown.output and "Traceback" not in unknown.output
    domain = CliRunner().invoke(probe, ["--class", "scratches", "--params", params_file])
    assert domain.exit_code == 1
    assert domain.output.strip() == "Error: scratches: the adapter file models/adapters/scratches/adapter.json is missing"


def test_a_bad_param_names_the_key(tmp_path):
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"search": {"scheduler": ["heun"]}}))
    with pytest.raises(click.ClickException, match=r"search\.scheduler"):
        load_or_exit(str(tmp_path / "p.yaml"))


@pytest.mark.parametrize("threads", [1, 3])
def test_loading_params_sets_torch_threads_so_every_machine_sums_the_same_way(tmp_path, threads):
    import torch

    before = torch.get_num_threads()
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"seed": 1, "threads": threads}))
    try:
        assert load_or_exit(str(path)).threads == threads
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


def test_threads_null_leaves_torch_default(tmp_path):
    import torch

    before = torch.get_num_threads()
    path = tmp_path / "params.yaml"
    path.write_text("seed: 1\nthreads: null\n")
    assert load_or_exit(str(path)).threads is None
    assert torch.get_num_threads() == before


def test_threads_zero_is_refused_naming_the_key(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("threads: 0\n")
    with pytest.raises(click.ClickException, match="threads"):
        load_or_exit(str(path))


def test_a_stage_without_torch_does_not_import_it_and_a_later_import_gets_the_count(tmp_path):
    # demo and ingest never compute with torch: loading params must not import it (1-2 s a stage), yet a torch
    # imported afterwards must still run on params.yaml's thread count.
    path = tmp_path / "params.yaml"
    path.write_text("seed: 1\nthreads: 1\n")
    script = (
        "import sys\n"
        "from stablesdg.stages.common import load_or_exit\n"
        f"load_or_exit({str(path)!r})\n"
        "print('torch' in sys.modules)\n"
        "import torch\n"
        "print(torch.get_num_threads())\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    imported_before, threads_after = out.stdout.split()
    assert imported_before == "False"
    assert threads_after == "1"
