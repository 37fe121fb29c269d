"""Stage `features`: the command records the feature net it measures with (the shipped surface net, its weights'
and corpus' hashes), so a change of net re-runs what depends on it."""

from __future__ import annotations

from click.testing import CliRunner

from stablesdg.metrics import NET_RECORD, SURFACE_NET_DIR
from stablesdg.stages.features import features_command
from stablesdg.utils import read_json


def test_features_command_records_the_shipped_net(tmp_path, mlflow_store):
    out = tmp_path / "fn"
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    result = CliRunner().invoke(features_command, ["--params", str(tmp_path / "params.yaml"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = read_json(out / NET_RECORD)
    shipped = read_json(SURFACE_NET_DIR / NET_RECORD)
    assert record["feature_net"] == "surface" and record["weights_sha256"] == shipped["sha256"]
    assert record["corpus_manifest_sha256"] == shipped["corpus_manifest_sha256"]
