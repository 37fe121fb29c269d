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


# Issue 14.9: non-finite numbers and unsafe class names, from real YAML text.
@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("data: {max_file_mb: .nan}", r"data\.max_file_mb: expected a finite number, got nan"),
        ("data: {max_file_mb: .inf}", r"data\.max_file_mb: expected a finite number, got inf"),
        ("generate: {strength: -.inf}", r"generate\.strength: expected a finite number, got -inf"),
        ("search: {strength: [0.3, .nan]}", r"search\.strength\[1\]: expected a finite number, got nan"),
        ("export: {parity_atol: .NaN}", r"export\.parity_atol: expected a finite number"),
    ],
)
def test_non_finite_numbers_are_refused(yaml_text, message):
    with pytest.raises(ConfigError, match=message):
        parse_params(yaml.safe_load(yaml_text))


@pytest.mark.parametrize("name", [".", "..", "a\tb", "a\nb", "-x", "a:b", "a/b", "Crazing", "a b", "_x", "é", ""])
def test_unsafe_class_names_are_refused(name):
    raw = {"classes": {name: {}, "scratches": {}}}
    with pytest.raises(ConfigError, match=r"class names must match \[a-z0-9\]\[a-z0-9_-\]\*"):
        parse_params(raw)


def test_safe_class_names_pass_including_the_neu_ones():
    names = ["rolled-in_scale", "pitted_surface", "a", "0day", "x-1_y"]
    assert parse_params({"classes": {n: {} for n in names}}).class_names == names


def test_dotdot_class_from_params_yaml_is_refused_before_any_stage_runs(tmp_path):
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    raw["classes"][".."] = {"initializer": "dirt"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"params\.yaml: classes\.'\.\.': class names must match"):
        load_params(tmp_path / "params.yaml")


def test_dataclass_defaults_are_the_pipeline_params():
    """One source of defaults: code built with parse_params({...}) runs the pipeline's configuration."""
    pipeline = {k: v for k, v in flatten(load_params(REPO_ROOT / "params.yaml")).items()
                if not k.startswith("classes.")}
    defaults = {k: v for k, v in flatten(parse_params({})).items() if not k.startswith("classes.")}
    differing = {k: (defaults.get(k), pipeline.get(k)) for k in pipeline.keys() | defaults.keys()
                 if defaults.get(k) != pipeline.get(k)}
    assert differing == {}, f"config.py default vs params.yaml: {differing}"
