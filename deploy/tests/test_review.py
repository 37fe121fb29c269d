"""The review folder (issue 25): serve, classify and watch keep the images they are unsure of, within a cap,
and never an image the runtime refused.

With the RGB test model (logits = 10 x normalised channel means) a pure red image is sure (p ~ 1), a mid
grey is a three-way tie (p = 1/3), red+green is a two-way tie (margin ~ 0) and red with green 245 has
top-1 p ~ 0.69 but a margin of ~ 0.37.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
from pathlib import Path

import httpx
import pytest
from PIL import Image
from processes import cli_command, free_port, run_cli, stop_process
from test_reload import START_S
from test_server import wait_until_up

from stablesdg_line.classifier import Classifier
from stablesdg_line.review import ReviewFolder, ReviewPolicy, top2_margin

SURE, TIE3, TIE2, NARROW = (255, 0, 0), (128, 128, 128), (255, 255, 0), (255, 245, 0)


def png(colour, size=(16, 16), marker: int = 0) -> bytes:
    image = Image.new("RGB", size, colour)
    image.putpixel((0, 0), (marker % 256, colour[1], colour[2]))  # distinct bytes, same prediction
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def kept(review: Path) -> list[dict]:
    sidecars = sorted(review.glob("*.json"))
    for sidecar in sidecars:
        assert (review / json.loads(sidecar.read_text())["image"]).is_file()
    images = [p for p in review.iterdir() if p.suffix != ".json" and not p.name.startswith(".")]
    assert len(images) == len(sidecars), "an image without its sidecar or the reverse"
    return [json.loads(s.read_text()) for s in sidecars]


def write_inputs(folder: Path) -> dict[str, bytes]:
    folder.mkdir()
    files = {"sure.png": png(SURE), "tie3.png": png(TIE3), "tie2.png": png(TIE2), "narrow.png": png(NARROW),
             "text.png": b"not an image at all", "cut.png": png(TIE3, (64, 64))[:60]}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def test_top2_margin():
    assert top2_margin({"a": 0.7, "b": 0.2, "c": 0.1}) == pytest.approx(0.5)
    assert top2_margin({"a": 1.0}) == 1.0


def test_cap_holds_and_the_oldest_go_first(tmp_path, rgb_model):
    classifier = Classifier(rgb_model)
    review = ReviewFolder(tmp_path / "review", ReviewPolicy(below=0.6, max_files=4), line="line-3")
    for i in range(10):
        data = png(TIE3, marker=i)
        prediction = classifier.classify([data], names=[f"img-{i}.png"])[0]
        assert review.keep(prediction, data, classifier.sha256) is not None
    rows = kept(tmp_path / "review")
    assert [row["source_file"] for row in rows] == [f"img-{i}.png" for i in range(6, 10)]
    row = rows[-1]
    assert row["line"] == "line-3" and row["model_version"] == "7"
    assert row["model_sha256"] == classifier.sha256
    assert row["sha256"] == hashlib.sha256(png(TIE3, marker=9)).hexdigest()
    assert row["confidence"] == pytest.approx(1 / 3, abs=0.02) and row["margin"] < 0.05
    # the same bytes again are already waiting for review: kept once
    again = classifier.classify([png(TIE3, marker=9)], names=["again.png"])[0]
    assert review.keep(again, png(TIE3, marker=9)) is None and len(kept(tmp_path / "review")) == 4

    one_image = len(png(TIE3, marker=1)) + 600  # an image and its sidecar
    by_bytes = ReviewFolder(tmp_path / "bytes", ReviewPolicy(below=0.6, max_bytes=3 * one_image))
    for i in range(8):
        data = png(TIE3, marker=i)
        by_bytes.keep(classifier.classify([data])[0], data)
    total = sum(p.stat().st_size for p in (tmp_path / "bytes").iterdir())
    assert total <= 3 * one_image and len(kept(tmp_path / "bytes")) >= 2


def test_classify_keeps_the_unsure_and_never_a_refused_file(tmp_path, rgb_model):
    files = write_inputs(tmp_path / "in")
    review = tmp_path / "review"
    result = run_cli("classify", str(rgb_model), str(tmp_path / "in"), "--review-dir", str(review),
                     "--review-below", "0.6", "--line-id", "line-1")
    assert result.returncode == 3, result.stderr  # two files failed
    rows = kept(review)
    assert sorted(row["source_file"] for row in rows) == ["tie2.png", "tie3.png"]
    for row in rows:
        assert (review / row["image"]).read_bytes() == files[row["source_file"]]
        assert row["line"] == "line-1" and row["confidence"] < 0.6
    by_margin = tmp_path / "by-margin"
    run_cli("classify", str(rgb_model), str(tmp_path / "in"), "--review-dir", str(by_margin),
            "--review-margin", "0.5")
    assert sorted(row["source_file"] for row in kept(by_margin)) == ["narrow.png", "tie2.png", "tie3.png"]
    narrow = next(row for row in kept(by_margin) if row["source_file"] == "narrow.png")
    assert narrow["confidence"] > 0.6 and narrow["margin"] < 0.5 and narrow["class"] == "red_defect"


def test_review_options_without_a_folder_are_refused(tmp_path, rgb_model):
    result = run_cli("classify", str(rgb_model), str(tmp_path), "--review-below", "0.6")
    assert result.returncode == 2 and "--review-dir" in result.stderr


@pytest.mark.timeout(300)
def test_serve_keeps_unsure_uploads_within_the_cap(tmp_path, rgb_model):
    review, log = tmp_path / "review", tmp_path / "serve.log"
    port = free_port()
    process = subprocess.Popen(cli_command("serve", str(rgb_model), "--port", str(port), "--review-dir",
                                           str(review), "--review-below", "0.6", "--review-max-files", "5"),
                               stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=20) as http:
            wait_until_up(http, process, START_S)
            for i in range(12):
                files = [("files", (f"u-{i:02d}.png", png(TIE3, marker=i), "image/png")),
                         ("files", (f"s-{i:02d}.png", png(SURE, marker=i), "image/png")),
                         ("files", (f"bad-{i:02d}.png", b"\x89PNG\r\n\x1a\n broken", "image/png"))]
                assert http.post("/classify", files=files).status_code == 422  # the bad one fails
    finally:
        stop_process(process)
    rows = kept(review)
    assert [row["source_file"] for row in rows] == [f"u-{i:02d}.png" for i in range(7, 12)]


@pytest.mark.timeout(300)
def test_watch_keeps_unsure_files_and_not_the_rejected(tmp_path, rgb_model):
    drop, review = tmp_path / "drop", tmp_path / "review"
    files = write_inputs(drop)
    result = run_cli("watch", str(rgb_model), str(drop), "--results", str(tmp_path / "results.jsonl"),
                     "--once", "--settle-seconds", "0.05", "--incomplete-grace-seconds", "0",
                     "--review-dir", str(review), "--review-below", "0.6", timeout=START_S)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (drop / "rejected").glob("*.png")) == ["cut.png", "text.png"]
    rows = kept(review)
    assert sorted(row["source_file"] for row in rows) == ["tie2.png", "tie3.png"]
    assert all((review / row["image"]).read_bytes() == files[row["source_file"]] for row in rows)
