"""`stablesdg data review-import` (issue 25): a line's review folder, labelled, back into the source folder.

The review folder is written by the line runtime's own ReviewFolder (sidecar format and all); the source
folder is ingested before and after, so the test sees what the next `dvc repro` sees.
"""

from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import stablesdg.commands.review  # noqa: F401  (the command module this file mirrors)
from stablesdg.cli import main
from stablesdg.config import DataConfig
from stablesdg.data import LINE_SPLIT, ingest, read_manifest, split_paths
from stablesdg.demo import demo_image
from stablesdg.review_import import MANIFEST
from stablesdg.utils import sha256_tree

line_review = pytest.importorskip("stablesdg_line.review", reason="needs the line runtime: pip install -e ./deploy")
line_classifier = pytest.importorskip("stablesdg_line.classifier")

CLASSES = ["crazing", "scratches"]
CFG = DataConfig(image_size=48, k_shot=3, val_per_class=2, test_per_class=3)


def png(cls: str, i: int) -> bytes:
    buffer = io.BytesIO()
    demo_image(cls, i, seed=3, size=48).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def project(tmp_path) -> Path:
    source = tmp_path / "data" / "source"
    for cls in CLASSES:
        (source / cls).mkdir(parents=True)
        for i in range(10):
            (source / cls / f"img{i}.png").write_bytes(png(cls, i))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"data": {"source": str(source), "image_size": 48, "k_shot": 3, "val_per_class": 2,
                  "test_per_class": 3}, "classes": {c: {} for c in CLASSES}}))
    return tmp_path


def write_review(review: Path, images: dict[str, tuple[str, bytes]]) -> dict[str, str]:
    """What `stablesdg-line ... --review-dir` leaves: image + sidecar. Returns source name -> stored name."""
    folder = line_review.ReviewFolder(review, line_review.ReviewPolicy(below=0.6), line="line-7")
    stored = {}
    for name, (predicted, data) in images.items():
        scores = {predicted: 0.41, "runner-up": 0.35, "third": 0.24}
        prediction = line_classifier.Prediction(name, predicted, 0.41, scores, 1.0, "12")
        stored[name] = folder.keep(prediction, data, "ab" * 32).name
    return stored


def splits(processed: Path) -> dict[tuple[str, str], list[str]]:
    return {(c, s): [p.name for p in split_paths(processed, c, s)]
            for c in CLASSES for s in ("train", "val", "test", "pool", LINE_SPLIT)}


def invoke(project: Path, *args: str):
    return CliRunner().invoke(main, ["data", "review-import", *args, "--params", str(project / "params.yaml"),
                                     "--report", str(project / "report.json")])


def test_labelled_review_images_join_the_source_with_their_origin_and_never_the_test_split(project):
    source = project / "data" / "source"
    ingest(source, project / "before", CFG, CLASSES, seed=0)
    before = splits(project / "before")

    review = project / "review"
    images = {"a.png": ("crazing", png("crazing", 50)), "b.png": ("crazing", png("crazing", 51)),
              "c.png": ("scratches", png("scratches", 52)), "dup.png": ("crazing", png("crazing", 4)),
              "odd.png": ("scratches", png("scratches", 53))}
    stored = write_review(review, images)
    labels = {"a.png": "crazing", "b.png": "crazing", "c.png": "scratches", "dup.png": "crazing",
              "odd.png": "oil_stain"}
    with (project / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label"])
        writer.writerows([stored[name], label] for name, label in labels.items())
    review_tree = sha256_tree(review)

    result = invoke(project, str(review), "--labels", str(project / "labels.csv"))
    assert result.exit_code == 0, result.output
    assert "3 added" in result.output and "2 refused" in result.output
    assert "duplicate" in result.output and "'oil_stain' is not a class" in result.output
    assert sha256_tree(review) == review_tree, "the review folder is only read"

    rows = {row["review_file"]: row for row in csv.DictReader((source / MANIFEST).open())}
    assert sorted(rows) == sorted(stored[n] for n in ("a.png", "b.png", "c.png"))
    for name in ("a.png", "b.png", "c.png"):
        row = rows[stored[name]]
        assert (source / row["path"]).read_bytes() == images[name][1]
        assert row["class"] == labels[name] and row["path"].startswith(f"{labels[name]}/line-")
        assert row["line"] == "line-7" and row["model_version"] == "12" and row["policy"] == "train-only"
        assert row["sha256"] == hashlib.sha256(images[name][1]).hexdigest() and row["imported_at"]
        assert row["predicted"] == images[name][0] and row["saved_at"]

    again = invoke(project, str(review), "--labels", str(project / "labels.csv"))
    assert again.exit_code == 0 and "0 added" in again.output
    assert len(list(csv.DictReader((source / MANIFEST).open()))) == 3

    ingest(source, project / "after", CFG, CLASSES, seed=0)
    after = splits(project / "after")
    for key, names in before.items():
        if key[1] != LINE_SPLIT:
            assert after[key] == names, f"{key}: the existing split moved"
    imported = {Path(r["path"]).stem for r in rows.values()}
    assert {n.rsplit("_", 1)[0] for c in CLASSES for n in after[(c, LINE_SPLIT)]} == imported
    test_sources = {r["source_file"] for r in read_manifest(project / "after") if r["split"] == "test"}
    assert not any(Path(s).stem in imported for s in test_sources)


def test_class_per_folder_review_with_allow_test_is_split_like_any_image(project):
    source = project / "data" / "source"
    review = project / "review"
    stored = write_review(review, {f"x{i}.png": ("crazing", png("crazing", 60 + i)) for i in range(3)})
    (review / "scratches").mkdir()
    for name in stored.values():  # a person sorted them (sidecars stay where they were)
        (review / name).rename(review / "scratches" / name)
    result = invoke(project, str(review), "--allow-test")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((source / MANIFEST).open()))
    assert len(rows) == 3 and {r["class"] for r in rows} == {"scratches"}
    assert {r["policy"] for r in rows} == {"any"} and {r["line"] for r in rows} == {"line-7"}
    ingest(source, project / "processed", CFG, CLASSES, seed=0)
    assert not split_paths(project / "processed", "scratches", LINE_SPLIT)
    assert len(read_manifest(project / "processed")) == 23


def test_a_flat_source_is_refused_with_what_to_do(project, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "Cr_1.bmp").write_bytes(b"x")
    result = invoke(project, str(project), "--source", str(flat))
    assert result.exit_code != 0 and "class-per-folder" in result.output
