"""`stablesdg prior`: `reconstruct` runs the prior's VAE over a folder of images and reports PSNR / SSIM per
class with a grid."""

from __future__ import annotations

from click.testing import CliRunner

from stablesdg.commands.prior import prior_group
from stablesdg.utils import read_json


def test_reconstruct_reports_per_class(tiny_prior, prior_corpus, tmp_path):
    out, _ = tiny_prior
    result = CliRunner().invoke(prior_group, ["reconstruct", "--images", str(prior_corpus), "--folder", str(out),
                                              "--limit", "8", "--out", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    report = read_json(tmp_path / "rep" / "vae_reconstruction.json")
    assert report["resolution"] == 32 and report["images"] == 8
    assert set(report["per_class"]) == {"crazing", "patches"}
    assert all(0 < r["psnr"] < 100 and -1 <= r["ssim"] <= 1 for r in report["per_class"].values())
    assert (tmp_path / "rep" / "vae_grid.png").exists()
