"""Issue 24: the second hardening round, one regression test per failure class, with real processes and files
(a real `stablesdg-line` child, FIFOs, /dev/zero, non-UTF-8 names, a real server on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from badinputs import costly_valid_jpeg, hostile_bytes
from corpus import RED, image_bytes
from onnx import TensorProto, helper, numpy_helper
from onnx_models import OPSET, RGB, build_model, write_model
from processes import cli_command, free_port
from test_server import upload

from stablesdg_line.cli import EXIT_MODEL_REFUSED, TOKEN_ENV, main
from stablesdg_line.watch import DropFolderWatcher, WatchConfig

NON_UTF8 = os.fsdecode(b"camera\xff\xfe_frame.png")  # what os.listdir gives for such a name


def _bad_output_model(path: Path, kind: str) -> Path:
    """RGB-contract models whose logits are [1, K] for any batch or [N, 1, K]: both pass a batch-1 check."""
    k = len(RGB.class_names)
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["features"], axis=1)]
    if kind == "batch_one":
        nodes += [helper.make_node("ReduceMean", ["features"], ["mean"], axes=[0], keepdims=1),
                  helper.make_node("Gemm", ["mean", "W", "B"], ["logits"], transB=1)]
    else:
        nodes += [helper.make_node("Gemm", ["features", "W", "B"], ["flat"], transB=1),
                  helper.make_node("Unsqueeze", ["flat", "axis1"], ["logits"])]
    graph = helper.make_graph(
        nodes, "bad_output",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(RGB.weight, "W"),
                     numpy_helper.from_array(np.zeros(k, np.float32), "B"),
                     numpy_helper.from_array(np.array([1], np.int64), "axis1")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=9)
    helper.set_model_props(model, RGB.metadata())
    path.write_bytes(model.SerializeToString())
    return path


def _no_traceback(result) -> None:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys):
    """The real CLI entry point in this process (a child costs ~15 s on the shared CI box): exit code and
    both streams, like a CompletedProcess."""
    def run(*args: str) -> Ran:
        code = main(list(args))
        out, err = capsys.readouterr()
        return Ran(code, out, err)
    return run


# ----------------------------------------------------------------------------- class 3: the model contract
@pytest.mark.parametrize("kind", ["batch_one", "extra_axis"])
def test_model_whose_output_is_not_n_by_k_is_refused_at_load_by_classify_and_serve(tmp_path, kind, cli):
    model = _bad_output_model(tmp_path / f"{kind}.onnx", kind)
    (tmp_path / "a.png").write_bytes(image_bytes(RED))
    for args in (("classify", str(model), str(tmp_path / "a.png")),
                 ("serve", str(model), "--port", str(free_port()))):
        result = cli(*args)
        assert result.returncode == EXIT_MODEL_REFUSED, (args[0], result.stderr)
        _no_traceback(result)
        assert "for a batch of 2" in result.stderr and "[N, 3]" in result.stderr, result.stderr


def test_metadata_nested_100000_deep_is_exit_2_not_a_recursion_traceback(tmp_path, cli):
    deep = "[" * 100_000 + "]" * 100_000
    model = write_model(replace(RGB, metadata_overrides={"class_names": deep}), tmp_path / "deep.onnx")
    result = cli("info", str(model))
    assert result.returncode == EXIT_MODEL_REFUSED, result.stderr
    _no_traceback(result)
    assert "model metadata 'class_names'" in result.stderr


def test_info_prints_escape_sequences_and_newlines_escaped(tmp_path, cli):
    hostile = "resnet\x1b[2J\x1b[31m\nsha256          0000 (forged line)"
    model = write_model(replace(RGB, metadata_overrides={"model_name": hostile}), tmp_path / "esc.onnx")
    result = cli("info", str(model))
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout and "(forged line)" in result.stdout
    assert "\\x1b[2J" in result.stdout and "\\n" in result.stdout
    assert sum(line.startswith("sha256") for line in result.stdout.splitlines()) == 1


@pytest.mark.parametrize("name", ["red\x1b[31m", "two\nlines", "Crazing Big", "x" * 65])
def test_class_names_the_pipeline_refuses_are_refused(tmp_path, cli, name):
    names = json.dumps(["red_defect", name, "blue_defect"])
    model = write_model(replace(RGB, metadata_overrides={"class_names": names}), tmp_path / "names.onnx")
    result = cli("info", str(model))
    assert result.returncode == EXIT_MODEL_REFUSED and "names the pipeline refuses" in result.stderr
    assert "\x1b" not in result.stderr


@pytest.mark.timeout(240)
def test_model_path_that_is_a_fifo_or_dev_zero_is_refused_without_reading_it(tmp_path, cli):
    fifo = tmp_path / "model.onnx"
    os.mkfifo(fifo)
    for path, kind in ((fifo, "FIFO"), (Path("/dev/zero"), "character device")):
        result = cli("info", str(path))  # before the fix: a hang / memory exhaustion (pytest-timeout)
        assert result.returncode == EXIT_MODEL_REFUSED, result.stderr
        assert f"not a regular file ({kind})" in result.stderr


@pytest.mark.timeout(120)
def test_model_with_external_data_is_refused(tmp_path):
    model = build_model(RGB)
    onnx.save_model(model, tmp_path / "ext.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.data", size_threshold=0)
    assert (tmp_path / "ext.onnx.data").exists()
    result = subprocess.run(cli_command("info", "ext.onnx"), capture_output=True, text=True, timeout=60,
                            cwd=tmp_path)
    assert result.returncode == EXIT_MODEL_REFUSED, result.stdout + result.stderr
    assert "external data" in result.stderr, result.stderr


# ----------------------------------------------------------------------------- class 4: watch
def _watch_once(cli, model: Path, drop: Path, results: Path) -> Ran:
    return cli("watch", str(model), str(drop), "--results", str(results), "--once",
                   "--settle-seconds", "0.05", "--incomplete-grace-seconds", "0")


def _rows(results: Path) -> list[dict]:
    return [json.loads(line) for line in results.read_text().splitlines() if line.strip()]


def test_non_utf8_names_neither_stall_watch_nor_duplicate_rows(rgb_model, tmp_path, cli):
    drop, results = tmp_path / "drop", tmp_path / "results.jsonl"
    drop.mkdir()
    (drop / "red.png").write_bytes(image_bytes(RED))
    (drop / NON_UTF8).write_bytes(image_bytes(RED))
    bad_name = os.fsdecode(b"junk\xff.png")
    (drop / bad_name).write_bytes(b"not an image at all")
    for _ in range(3):  # before the fix each pass failed and wrote one more reject row
        result = _watch_once(cli, rgb_model, drop, results)
        assert result.returncode == 0, result.stderr
        _no_traceback(result)
    rows = _rows(results)
    by_name = {row["name"]: row for row in rows}
    assert len(rows) == 3 == len(by_name)
    assert by_name["red.png"]["class"] == "red_defect"
    assert by_name[NON_UTF8]["class"] == "red_defect"
    assert by_name[bad_name]["class"] is None and "not a recognised image" in by_name[bad_name]["error"]
    assert (tmp_path / "drop" / "rejected" / bad_name).exists()


@pytest.mark.timeout(240)
def test_deleting_the_results_file_while_watching_stops_with_a_reason(rgb_model, tmp_path):
    drop, results = tmp_path / "drop", tmp_path / "results.jsonl"
    drop.mkdir()
    process = subprocess.Popen(cli_command("watch", str(rgb_model), str(drop), "--results", str(results),
                                           "--poll-interval", "0.1", "--settle-seconds", "0.05"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        (drop / "first.png").write_bytes(image_bytes(RED))
        deadline = time.monotonic() + 120
        while not (results.exists() and results.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(_rows(results)) == 1
        results.unlink()
        (drop / "second.png").write_bytes(image_bytes(RED))
        _, stderr = process.communicate(timeout=120)  # before the fix: ran on, writing to the deleted file
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == EXIT_MODEL_REFUSED, stderr
    assert "was deleted or replaced while watching" in stderr and "Traceback" not in stderr
    assert not results.exists()  # nothing was written to a file nobody can read; second.png is still there
    assert (drop / "second.png").exists()


def test_readiness_does_not_depend_on_the_writers_clock(rgb_model, tmp_path, cli):
    drop, results = tmp_path / "drop", tmp_path / "results.jsonl"
    drop.mkdir()
    ahead = drop / "camera_clock_ahead.png"
    ahead.write_bytes(image_bytes(RED))
    in_a_day = time.time() + 86_400
    os.utime(ahead, (in_a_day, in_a_day))  # before the fix: "still being written" forever
    result = _watch_once(cli, rgb_model, drop, results)
    assert result.returncode == 0, result.stderr
    (row,) = _rows(results)
    assert row["name"] == ahead.name and row["class"] == "red_defect"


def test_start_up_state_holds_only_the_names_in_the_drop_folder(rgb_model, tmp_path, cli):
    from stablesdg_line import Classifier

    drop, results = tmp_path / "drop", tmp_path / "results.jsonl"
    drop.mkdir()
    (drop / "kept.png").write_bytes(image_bytes(RED))
    result = _watch_once(cli, rgb_model, drop, results)
    assert result.returncode == 0 and len(_rows(results)) == 1
    history = "".join(json.dumps({"name": f"old-{i}.png", "size": 1, "mtime_ns": i, "sha256": f"{i:064x}",
                                  "class": "red_defect", "rejected_to": None}) + "\n" for i in range(50_000))
    with results.open("a") as handle:
        handle.write(history)
    config = WatchConfig(drop_dir=drop, results=results, rejected_dir=tmp_path / "rejected",
                         settle_seconds=0.0)
    with DropFolderWatcher(Classifier(rgb_model), config) as watcher:
        assert len(watcher._state.done) == 1  # before the fix: 50 001 entries, the whole history in memory
        watcher.poll()
        summary = watcher.poll()
    assert summary.classified == 0  # kept.png is not classified a second time
    assert len(_rows(results)) == 50_001


# ----------------------------------------------------------------------------- class 5: names
def test_classify_csv_output_keeps_the_row_of_a_non_utf8_name(rgb_model, tmp_path, cli):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / NON_UTF8).write_bytes(image_bytes(RED))
    out = tmp_path / "out.csv"
    result = cli("classify", str(rgb_model), str(folder), "--format", "csv", "--output", str(out))
    assert result.returncode == 0, result.stderr
    _no_traceback(result)
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 and "camera\\udcff\\udcfe_frame.png" in lines[1] and "red_defect" in lines[1]
    stdout = cli("classify", str(rgb_model), str(folder), "--format", "csv")
    assert stdout.returncode == 0 and "red_defect" in stdout.stdout, stdout.stderr


# ----------------------------------------------------------------------------- class 7: secrets
def test_empty_token_in_the_environment_is_refused(rgb_model, cli, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, " ")
    result = cli("serve", str(rgb_model), "--port", str(free_port()))  # before the fix: served, open
    assert result.returncode == EXIT_MODEL_REFUSED, result.stderr
    assert f"env {TOKEN_ENV} is set but empty" in result.stderr


def test_token_file_keeps_the_secret_off_the_command_line_and_is_enforced(rgb_model, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from stablesdg_line import Classifier
    from stablesdg_line.cli import _build_parser, resolve_token
    from stablesdg_line.server import ServeConfig, create_app

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    token_file = tmp_path / "token"
    token_file.write_text("file-secret-24\n")
    parser = _build_parser()
    help_text = parser._subparsers._group_actions[0].choices["serve"].format_help()
    assert "--token-file" in help_text and "`ps`" in help_text
    args = parser.parse_args(["serve", str(rgb_model), "--token-file", str(token_file)])
    assert "file-secret-24" not in " ".join(map(str, vars(args).values()))
    token = resolve_token(args)
    assert token == "file-secret-24"
    with TestClient(create_app(Classifier(rgb_model), ServeConfig(token=token, max_batch=1))) as http:
        files = upload(("a.png", image_bytes(RED)))
        assert http.post("/classify", files=files).status_code == 401
        ok = http.post("/classify", files=files, headers={"Authorization": "Bearer file-secret-24"})
        assert ok.status_code == 200, ok.text
    token_file.write_text("\n")
    with pytest.raises(ValueError, match="is set but empty"):
        resolve_token(args)


# ----------------------------------------------------------------------------- class 1: cost bounds
@pytest.mark.parametrize("name", sorted(hostile_bytes()))
def test_hostile_structure_is_refused_before_decoding(rgb_model, tmp_path, cli, name):
    data, reason = hostile_bytes()[name]
    (tmp_path / name).write_bytes(data)
    result = cli("classify", str(rgb_model), str(tmp_path / name))
    assert result.returncode == 3, result.stderr
    _no_traceback(result)
    (row,) = map(json.loads, result.stdout.splitlines())
    assert row["class"] is None and reason in row["error"], row


# The costliest image the structure limits let through: a valid, textured, progressive 40 MP JPEG (0.4 s of
# CPU here). Only the decode deadline bounds it.
DEADLINE = "0.1"


@pytest.fixture(scope="module")
def slow_jpeg() -> bytes:
    return costly_valid_jpeg()


def test_a_slow_jpeg_within_the_structure_limits_is_refused_by_the_decode_deadline(rgb_model, tmp_path, cli,
                                                                                 slow_jpeg):
    (tmp_path / "slow.jpg").write_bytes(slow_jpeg)
    (tmp_path / "red.png").write_bytes(image_bytes(RED))
    result = cli("classify", str(rgb_model), str(tmp_path), "--decode-timeout", DEADLINE)
    assert result.returncode == 3, result.stderr
    _no_traceback(result)
    rows = {Path(r["file"]).name: r for r in map(json.loads, result.stdout.splitlines())}
    assert rows["slow.jpg"]["class"] is None
    assert rows["slow.jpg"]["error"] == "decode took longer than 0.1 s (--decode-timeout): refused"
    assert rows["red.png"]["class"] == "red_defect"  # the next file of the batch has its own deadline
    unbounded = cli("classify", str(rgb_model), str(tmp_path / "slow.jpg"), "--decode-timeout", "0")
    assert unbounded.returncode == 0, unbounded.stdout  # it is a valid image: only its cost is refused


def test_watch_rejects_a_file_past_the_decode_deadline_with_the_reason(rgb_model, tmp_path, cli, slow_jpeg):
    drop, results = tmp_path / "drop", tmp_path / "results.jsonl"
    drop.mkdir()
    (drop / "slow.jpg").write_bytes(slow_jpeg)
    (drop / "red.png").write_bytes(image_bytes(RED))
    result = cli("watch", str(rgb_model), str(drop), "--results", str(results), "--once",
                 "--settle-seconds", "0.05", "--incomplete-grace-seconds", "0", "--decode-timeout", DEADLINE)
    assert result.returncode == 0, result.stderr
    by_name = {row["name"]: row for row in _rows(results)}
    assert "decode took longer than 0.1 s" in by_name["slow.jpg"]["error"]
    assert (drop / "rejected" / "slow.jpg").exists()
    assert by_name["red.png"]["class"] == "red_defect"


@pytest.mark.timeout(120)
def test_serve_refuses_a_request_past_its_decode_deadline_and_frees_the_slot(rgb_model, slow_jpeg):
    import threading

    import httpx
    from test_server import TOKEN, wait_until_up

    port = free_port()
    process = subprocess.Popen(cli_command("serve", str(rgb_model), "--port", str(port), "--token", TOKEN,
                                           "--decode-timeout", DEADLINE, "--max-concurrent", "1",
                                           "--max-waiting", "8"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            wait_until_up(http, process)
            answers: list[httpx.Response] = []

            def post(files):
                answers.append(http.post("/classify", headers=auth, files=upload(*files)))

            # Three slow requests and a good one on the only decode slot: each slow one is cut at its
            # deadline and frees the slot (before the fix each was decoded in full, then classified).
            slow = [("slow.jpg", slow_jpeg), ("red.png", image_bytes(RED))]
            jobs = [slow, slow, slow, [("ok.png", image_bytes(RED))]]
            threads = [threading.Thread(target=post, args=(files,)) for files in jobs]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            by_status = sorted((r.status_code, r.json()["results"][0]["error"] or "") for r in answers)
            assert [status for status, _ in by_status] == [200, 422, 422, 422], by_status
            reason = "decode took longer than 0.1 s (--decode-timeout for the whole request): refused"
            assert all(error == reason for status, error in by_status if status == 422), by_status
            assert http.get("/health").status_code == 200
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=20)
    assert b"Traceback" not in output, output.decode()[-3000:]
