"""int8 calibration options (issue 15): each option reaches onnxruntime's quantizer and shows in the model file.

Real onnxruntime quantization of a small convolutional ONNX model (no torch, no training): the layout of the
int8 file (QDQ or QOperator), the nodes left in fp32, per-channel vs per-tensor scales, the calibration method's
effect on the ranges, stratified calibration sampling, and the export params that select all of it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from stablesdg import quantize as q
from stablesdg.config import ExportConfig, parse_params
from stablesdg.export import quant_config, quantize_int8, set_metadata


def conv_model(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    init = {"W1": rng.normal(0, 0.5, (8, 3, 3, 3)), "B1": rng.normal(0, 0.1, 8),
            "W2": rng.normal(0, 0.3, (8, 8, 3, 3)), "B2": rng.normal(0, 0.1, 8),
            "W3": rng.normal(0, 1.0, (4, 8)), "B3": np.zeros(4)}
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1], name="conv_first"),
         helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
         helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv_mid"),
         helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
         helper.make_node("GlobalAveragePool", ["r2"], ["pooled"], name="gap"),
         helper.make_node("Flatten", ["pooled"], ["features"], axis=1, name="flatten"),
         helper.make_node("Gemm", ["features", "W3", "B3"], ["logits"], transB=1, name="head")],
        "conv", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in init.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save_model(model, str(path))
    return path


@pytest.fixture(scope="module")
def fp32(tmp_path_factory) -> Path:
    return conv_model(tmp_path_factory.mktemp("quant") / "fp32.onnx")


@pytest.fixture(scope="module")
def calib() -> np.ndarray:
    x = np.random.default_rng(1).normal(size=(24, 3, 16, 16)).astype(np.float32)
    x[0, 0, 0, 0] = 40.0  # one outlier: MinMax stretches the input range for it, Percentile does not
    return x


def nodes(path: Path) -> list[onnx.NodeProto]:
    return list(onnx.load_model(str(path)).graph.node)


def input_scale(path: Path) -> float:
    """Scale of the QuantizeLinear that quantizes the graph input."""
    model = onnx.load_model(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "input")
    return float(inits[node.input[1]])


def weight_scales(path: Path) -> list[np.ndarray]:
    model = onnx.load_model(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [inits[n.input[1]] for n in model.graph.node
            if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
            and inits[n.input[0]].dtype == np.int8 and inits[n.input[0]].ndim == 4]


def test_qdq_and_qoperator_layouts(fp32, calib, tmp_path):
    q.quantize_model(fp32, tmp_path / "qdq.onnx", calib, q.QuantConfig(int8_format="qdq"))
    q.quantize_model(fp32, tmp_path / "qop.onnx", calib, q.QuantConfig(int8_format="qoperator"))
    qdq, qop = q.int8_layout(tmp_path / "qdq.onnx"), q.int8_layout(tmp_path / "qop.onnx")
    assert qdq.get("QuantizeLinear", 0) >= 2 and qdq.get("DequantizeLinear", 0) >= 4 and "QLinearConv" not in qdq
    assert qop.get("QLinearConv") == 2
    assert "Conv" in {n.op_type for n in nodes(tmp_path / "qdq.onnx")}  # float Conv between Q/DQ pairs
    assert "Conv" not in {n.op_type for n in nodes(tmp_path / "qop.onnx")}


def test_fp32_nodes_stay_float(fp32, calib, tmp_path):
    out = tmp_path / "keep.onnx"
    done = q.quantize_model(fp32, out, calib, q.QuantConfig(int8_format="qoperator",
                                                            fp32_nodes=("first_conv", "last_gemm")))
    assert len(done["fp32_node_names"]) == 2
    ops = [n.op_type for n in nodes(out)]
    assert ops.count("Conv") == 1 and ops.count("QLinearConv") == 1  # the first conv is float, the second int8
    assert "Gemm" in ops and "QGemm" not in ops
    first = next(n for n in nodes(out) if n.op_type == "Conv")
    assert first.input[0] == "input"  # the float image goes straight into the float first conv


def test_unknown_fp32_node_is_an_error(fp32, calib, tmp_path):
    with pytest.raises(ValueError, match="no_such_node"):
        q.quantize_model(fp32, tmp_path / "x.onnx", calib, q.QuantConfig(fp32_nodes=("no_such_node",)))


def test_per_channel_vs_per_tensor_weight_scales(fp32, calib, tmp_path):
    q.quantize_model(fp32, tmp_path / "pc.onnx", calib, q.QuantConfig(per_channel=True))
    q.quantize_model(fp32, tmp_path / "pt.onnx", calib, q.QuantConfig(per_channel=False))
    per_channel, per_tensor = weight_scales(tmp_path / "pc.onnx"), weight_scales(tmp_path / "pt.onnx")
    assert [s.shape for s in per_channel] == [(8,), (8,)]
    assert all(s.size == 1 for s in per_tensor) and len(per_tensor) == 2


def test_calibration_method_changes_the_ranges(fp32, calib, tmp_path):
    scales = {}
    for method in q.CALIBRATION_METHODS:
        path = tmp_path / f"{method}.onnx"
        q.quantize_model(fp32, path, calib, q.QuantConfig(method=method, percentile=99.0))
        scales[method] = input_scale(path)
        logits = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": calib})[0]
        assert logits.shape == (24, 4) and np.isfinite(logits).all()
    # uint8 over [min(0, lo), max(0, hi)]: MinMax spans the outlier (40) -> (40 - min) / 255
    assert scales["minmax"] == pytest.approx((40.0 - min(0.0, float(calib.min()))) / 255, rel=1e-4)
    assert scales["percentile"] < scales["minmax"] / 2  # the 99th percentile ignores the outlier


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_methods_take_a_set_that_does_not_fill_the_last_batch(fp32, calib, tmp_path, method):
    out = tmp_path / f"{method}13.onnx"
    done = q.quantize_model(fp32, out, calib[:13], q.QuantConfig(method=method, batch_size=8))
    assert done["calibration_images"] == 13 and q.int8_layout(out).get("QuantizeLinear", 0) >= 2


def test_calibration_method_reaches_quantize_static(fp32, calib, tmp_path, monkeypatch):
    import onnxruntime.quantization as ortq

    seen = {}
    real = ortq.quantize_static

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(ortq, "quantize_static", spy)
    q.quantize_model(fp32, tmp_path / "e.onnx", calib,
                     q.QuantConfig(method="percentile", percentile=99.9, per_channel=False))
    assert seen["calibrate_method"] == ortq.CalibrationMethod.Percentile
    assert seen["extra_options"] == {"CalibPercentile": 99.9}
    assert seen["per_channel"] is False


def test_export_params_select_the_quantizer(fp32, calib, tmp_path):
    params = parse_params({"export": {"calibration_method": "entropy", "calibration_per_channel": False,
                                      "fp32_nodes": ["last_gemm"], "calibration_sources": "train+synthetic",
                                      "calibration_sampling": "stratified"}})
    cfg = quant_config(params.export, "qoperator")
    assert (cfg.method, cfg.per_channel, cfg.fp32_nodes, cfg.int8_format) == ("entropy", False, ("last_gemm",),
                                                                               "qoperator")
    # defaults: MinMax per-channel as before issue 15, with the first conv and the last Gemm left in fp32
    assert quant_config(ExportConfig()) == q.QuantConfig(fp32_nodes=("first_conv", "last_gemm"))
    model = onnx.load_model(str(fp32))
    set_metadata(model, {"opset": "17", "model_name": "m"})
    onnx.save_model(model, str(tmp_path / "meta.onnx"))
    out = quantize_int8(tmp_path / "meta.onnx", tmp_path / "int8.onnx", calib, "qoperator", cfg)
    meta = {p.key: p.value for p in onnx.load_model(str(out)).metadata_props}
    assert meta["quantized"] == "true" and meta["int8_calibration"] == "entropy/pt/qoperator+fp32(last_gemm)"
    ops = [n.op_type for n in nodes(out)]
    assert "QLinearConv" in ops and "Gemm" in ops


def test_bad_export_calibration_params_are_refused():
    from stablesdg.config import ConfigError

    with pytest.raises(ConfigError, match="calibration_method"):
        parse_params({"export": {"calibration_method": "kl"}})
    with pytest.raises(ConfigError, match="calibration_sources"):
        parse_params({"export": {"calibration_sources": "synthetic"}})


def test_stratified_sample_is_balanced_and_seeded():
    y = np.repeat(np.arange(3), [50, 5, 20])
    x = np.arange(len(y))
    picked = q.stratified_sample(x, y, 12, seed=0)
    assert np.bincount(y[picked], minlength=3).tolist() == [4, 4, 4]
    more = q.stratified_sample(x, y, 30, seed=0)
    assert np.bincount(y[more], minlength=3).tolist() == [13, 5, 12]  # the small class gives all it has
    assert np.array_equal(picked, q.stratified_sample(x, y, 12, seed=0))
    assert not np.array_equal(picked, q.stratified_sample(x, y, 12, seed=1))
    assert len(q.stratified_sample(x, y, 1000, seed=0)) == len(y)


def test_calibration_set_mixes_sources():
    real = (np.zeros((6, 1)), np.array([0, 0, 0, 1, 1, 1]))
    synthetic = (np.ones((60, 1)), np.repeat([0, 1], 30))
    x = q.calibration_set([real, synthetic], 20, seed=0)
    assert len(x) == 20 and 0 < x.sum() < 20  # both sources present
    with pytest.raises(ValueError, match="no calibration images"):
        q.calibration_set([(np.zeros((0, 1)), np.zeros(0))], 5, 0)


def test_quant_config_rejects_unknown_values():
    with pytest.raises(ValueError, match="calibration method"):
        q.QuantConfig(method="kl")
    with pytest.raises(ValueError, match="int8 format"):
        q.QuantConfig(int8_format="int4")
