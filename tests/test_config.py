"""params.yaml validation: messages name the key and what is allowed."""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO_ROOT, run_cli

from stablesdg.config import ConfigError, flatten, load_params, parse_params


def test_repository_params_parse_with_six_classes():
    params = load_params(REPO_ROOT / "params.yaml")
    assert params.class_names == ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]
    assert params.classes["scratches"].initializer == "line"
    assert params.data.k_shot == 10


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"data": {"k_shot": 0}}, r"data\.k_shot: 0 is out of range; allowed values: \[1, 10000\]"),
        ({"data": {"k_shot": "ten"}}, r"data\.k_shot: expected an integer, got 'ten'"),
        ({"data": {"color_mode": "CMYK"}}, r"data\.color_mode: 'CMYK' is not allowed; allowed values: L, RGB"),
        ({"data": {"kshot": 5}}, r"data\.kshot: unknown key; allowed keys: source, layout"),
        ({"generate": {"strength": 1.5}}, r"generate\.strength: 1\.5 is out of range; allowed values: \[0\.0, 1\.0\]"),
        ({"search": {"strength": [0.2, -1]}}, r"search\.strength: -1\.0 is out of range"),
        ({"classifier": {"backbone": "vgg"}}, r"classifier\.backbone: 'vgg' is not allowed; allowed values: resnet18"),
        ({"adapt": {"lora": {"rank": True}}}, r"adapt\.lora\.rank: expected an integer, got True"),
        ({"classes": {"crazing": {"initalizer": "x"}, "b": {}}}, r"classes\.crazing\.initalizer: unknown key"),
        ({"classes": {"only": {}}}, r"classes: at least two classes"),
        ({"bogus": 1}, r"bogus: unknown key"),
        ({"generate": {"use_search": "yes"}}, r"generate\.use_search: expected true or false"),
    ],
)
def test_bad_values_name_the_key_and_allowed_values(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_params(raw)


def test_flatten_gives_dotted_keys():
    flat = flatten(parse_params({}))
    assert flat["adapt.lora.rank"] == 4
    assert flat["data.demo.per_class"] == 40


def test_cli_reports_bad_param_with_file_and_key(tmp_path):
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    raw["data"]["image_size"] = 5
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    result = run_cli(["stablesdg", "data", "demo"], tmp_path, check=False)
    assert result.returncode != 0
    assert "params.yaml: data.image_size: 5 is out of range; allowed values: [32, 2048]" in result.stderr
    assert not (tmp_path / "data").exists()
