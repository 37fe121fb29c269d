"""Issue 14.8 + the standing bad-input corpus through ingest (deploy/tests/badinputs.py writes it).

Ingest runs in a child process that cannot bypass file permissions (as the pipeline's user on a real
machine), so the unreadable file really is unreadable even when the tests run as root.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stablesdg.config import DataConfig
from stablesdg.data import DataError, ingest, read_manifest

BADINPUTS = Path(__file__).resolve().parents[1] / "deploy" / "tests" / "badinputs.py"


def _load_badinputs():
    """The corpus generator lives with the deploy tests; loaded by path, sys.path is left alone."""
    spec = importlib.util.spec_from_file_location("stablesdg_line_badinputs", BADINPUTS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


badinputs = _load_badinputs()

CFG = {"image_size": 48, "k_shot": 2, "val_per_class": 1, "test_per_class": 1}
INGEST_IN_CHILD = """
import json, sys
from pathlib import Path
from stablesdg.config import DataConfig
from stablesdg.data import ingest
cfg = DataConfig(**json.loads(sys.argv[3]))
summary = ingest(Path(sys.argv[1]), Path(sys.argv[2]), cfg, ["crazing", "inclusion"], seed=0)
# VmHWM is this process image's own peak; ru_maxrss would include the parent's RSS inherited at fork.
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
summary["peak_rss_mb"] = int(hwm.split()[1]) / 1024
print(json.dumps(summary))
"""


def write_other_class(folder: Path) -> list[str]:
    folder.mkdir(parents=True)
    names = []
    for i, colour in enumerate([(20, 20, 20), (90, 90, 90), (160, 160, 160)]):
        names.append(f"plain{i}.png")
        Image.new("RGB", (40, 30), colour).save(folder / names[-1])
    return names


def run_ingest(source: Path, out: Path) -> tuple[subprocess.CompletedProcess, dict | None]:
    result = subprocess.run([sys.executable, "-c", INGEST_IN_CHILD, str(source), str(out), json.dumps(CFG)],
                            capture_output=True, text=True, timeout=120,
                            preexec_fn=badinputs.drop_file_permission_override)
    summary = json.loads(result.stdout.splitlines()[-1]) if result.returncode == 0 else None
    return result, summary


@pytest.mark.timeout(120)
def test_corpus_is_quarantined_file_by_file_and_every_valid_image_kept(tmp_path):
    source = tmp_path / "source"
    cases, valid = badinputs.write_corpus(source / "crazing", sparse_mb=600)  # the 600 MB file
    other = write_other_class(source / "inclusion")
    out = tmp_path / "processed"
    result, summary = run_ingest(source, out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    outcomes: dict[str, list[str | None]] = {}
    for rejection in summary["rejected"]:
        outcomes.setdefault(rejection["file"].removeprefix("crazing/"), []).append(rejection["reason"])
    rows = read_manifest(out)
    for row in rows:
        outcomes.setdefault(row["source_file"].removeprefix("crazing/"), []).append(None)
    crashes = int("Traceback" in result.stderr)
    counted = badinputs.corpus_summary(cases, valid, outcomes, crashes, lambda case: case.ingest)
    print(json.dumps(counted, indent=1))
    badinputs.assert_clean(counted, refused=len(cases))
    kept = {row["source_file"] for row in rows}
    assert kept == {f"crazing/{n}" for n in valid} | {f"inclusion/{n}" for n in other}  # no valid file lost
    assert summary["quarantined"] == len(cases) >= 32 + 40
    assert summary["peak_rss_mb"] < 400, summary["peak_rss_mb"]  # the 600 MB file was never read


def test_failed_ingest_leaves_the_previous_output_untouched(tmp_path):
    source = tmp_path / "source"
    badinputs.write_corpus(source / "crazing")  # no valid image for "inclusion": the ingest fails
    (source / "inclusion").mkdir()
    (source / "inclusion" / "broken.png").write_bytes(b"nope")
    out = tmp_path / "processed"
    (out / "images").mkdir(parents=True)
    (out / "manifest.csv").write_text("the previous, complete output\n")
    cfg = DataConfig(**CFG)
    with pytest.raises(DataError, match="no valid image for class"):
        ingest(source, out, cfg, ["crazing", "inclusion"], seed=0)
    assert (out / "manifest.csv").read_text() == "the previous, complete output\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["processed", "source"]  # no partial output left


def test_successful_ingest_swaps_in_a_complete_output(tmp_path):
    source = tmp_path / "source"
    _, valid = badinputs.write_corpus(source / "crazing")
    (source / "crazing" / "unreadable.png").unlink()  # in-process: root could read it
    other = write_other_class(source / "inclusion")
    out = tmp_path / "processed"
    (out / "images" / "stale").mkdir(parents=True)
    (tmp_path / ".processed.partial").mkdir()  # left by an earlier, killed run
    summary = ingest(source, out, DataConfig(**CFG), ["crazing", "inclusion"], seed=0)
    assert summary["images"] == len(valid) + len(other)
    assert not (out / "images" / "stale").exists() and (out / "manifest.csv").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["processed", "source"]


# ----------------------------------------------------------------------------- issue 24: names and disks
def test_a_non_utf8_file_name_is_ingested_not_fatal(tmp_path):
    source, out = tmp_path / "source", tmp_path / "processed"
    write_other_class(source / "inclusion")
    (source / "crazing").mkdir()
    odd = os.fsdecode(b"frame\xff\xfe.png")
    for i, name in enumerate((odd, "plain.png", "other.png")):
        Image.new("RGB", (40, 30), (40 * i, 200, 10)).save(source / "crazing" / name)
    summary = ingest(source, out, DataConfig(**CFG), ["crazing", "inclusion"], seed=0)
    assert summary["images"] == 6 and summary["quarantined"] == 0
    rows = read_manifest(out)
    (row,) = [r for r in rows if r["source_file"].startswith("crazing/frame")]
    assert row["source_file"] == "crazing/frame\\udcff\\udcfe.png"
    assert row["path"].startswith("images/crazing/frame__") and (out / row["path"]).is_file()


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs: a full disk for real (needs root, as in CI; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_an_error_about_the_output_and_keeps_the_previous_output(tmp_path, small_disk):
    source, out = tmp_path / "source", small_disk / "processed"
    write_other_class(source / "inclusion")
    (source / "crazing").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (40, 30), (200, 10, 10)).save(source / "crazing" / name, "PNG")
    ingest(source, out, DataConfig(**CFG), ["crazing", "inclusion"], seed=0)  # the previous output
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    rng = np.random.default_rng(0)
    for i in range(8):  # incompressible: ~1 MB a PNG, far more than the 2 MB disk holds
        Image.fromarray(rng.integers(0, 256, (600, 600, 3), dtype=np.uint8)).save(source / "crazing" / f"n{i}.png")
    cfg = DataConfig(**{**CFG, "image_size": 600})
    with pytest.raises(DataError) as caught:
        ingest(source, out, cfg, ["crazing", "inclusion"], seed=0)
    message = str(caught.value)
    assert "no space left" in message and str(small_disk) in message and "MB free" in message
    assert "no valid image" not in message and "cannot read file" not in message
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before
    assert not (small_disk / ".processed.partial").exists()


SHA256_TREE_IN_CHILD = """
import sys
from stablesdg.utils import sha256_tree
print(sha256_tree(sys.argv[1]))
"""


def test_sha256_tree_of_a_source_with_an_unreadable_file_does_not_stop_the_stage(tmp_path):
    source = tmp_path / "source"
    write_other_class(source / "inclusion")
    (source / "inclusion" / "locked.png").write_bytes(b"x")
    (source / "inclusion" / "locked.png").chmod(0)
    result = subprocess.run([sys.executable, "-c", SHA256_TREE_IN_CHILD, str(source)], capture_output=True,
                            text=True, timeout=120, preexec_fn=badinputs.drop_file_permission_override)
    assert result.returncode == 0, result.stderr  # before the fix: PermissionError traceback
    assert len(result.stdout.strip()) == 64
    assert "cannot read" in result.stderr and "locked.png" in result.stderr
