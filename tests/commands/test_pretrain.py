"""`stablesdg pretrain`: `backbone` and `feature-net` on a small demo corpus write their weights and a record that
names the corpus (its manifest hash), the recipe and the weights' sha256; an empty corpus is a one-line error."""

from __future__ import annotations

from click.testing import CliRunner
from conftest import invoke, write_corpus

from stablesdg.commands.pretrain import pretrain_group
from stablesdg.metrics import NET_RECORD, SURFACE_FILE, load_surface_net
from stablesdg.pretraining.corpus import FolderCorpus
from stablesdg.utils import read_json, sha256_file


def test_backbone_writes_the_body_weights_and_their_record(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", per_source=4, size=48)
    out = tmp_path / "mnv3_surface.safetensors"
    output = invoke(pretrain_group, ["backbone", "--corpus", corpus, "--backbone", "mobilenet_v3_small",
                                     "--epochs", 1, "--input-size", 32, "--threads", 1, "--out", out])
    record = read_json(out.with_suffix(".json"))
    assert record["file"] == out.name and record["sha256"] == sha256_file(out)
    assert record["recipe"]["backbone"] == "mobilenet_v3_small" and record["recipe"]["epochs"] == 1
    assert record["corpus_images"] == 12 and record["threads"] == 1 and record["device"] == "cpu"
    assert record["corpus_manifest_sha256"] == FolderCorpus(corpus, 32).manifest_sha256()
    assert record["sources"] == ["crazing", "patches", "scratches"]
    assert f"backbone mobilenet_v3_small: held-out source accuracy {record['heldout_accuracy']:.3f}" in output


def test_feature_net_writes_a_net_the_metrics_load(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", per_source=4, size=48)
    output = invoke(pretrain_group, ["feature-net", "--corpus", corpus, "--epochs", 1, "--dim", 8,
                                     "--out", tmp_path / "net"])
    record = read_json(tmp_path / "net" / NET_RECORD)
    assert record["recipe"]["feature_dim"] == 8 and record["recipe"]["epochs"] == 1
    assert record["corpus_images"] == 12 and record["sha256"] == sha256_file(tmp_path / "net" / SURFACE_FILE)
    assert load_surface_net(tmp_path / "net").num_features == 8  # checks the sha256 on load
    assert str(tmp_path / "net" / SURFACE_FILE) in output


def test_an_empty_corpus_is_a_one_line_error(tmp_path):
    (tmp_path / "empty" / "source").mkdir(parents=True)
    result = CliRunner().invoke(pretrain_group, ["feature-net", "--corpus", str(tmp_path / "empty"),
                                                 "--out", str(tmp_path / "net")])
    assert result.exit_code == 1 and "no images found" in result.output
    assert not (tmp_path / "net").exists()
