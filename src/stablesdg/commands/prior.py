"""`stablesdg prior`: pretrain the embedded diffusion prior, verify its files, measure its VAE on real images."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import click
import numpy as np

from ..decoding import IMAGE_EXTENSIONS
from ..diffusion import EMBEDDED_PRIOR
from ..pretraining.corpus import CorpusError
from ..pretraining.prior import PriorRecipe, pretrain, vae_reconstruction, verify_prior
from ..utils import pick_device, write_json
from ..viz import image_grid


@click.group("prior")
def prior_group() -> None:
    """The embedded pretrained diffusion prior (model.base: embedded)."""


@prior_group.command("pretrain")
@click.option("--corpus", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="folder of pretraining images, searched recursively; the first sub-folder is the caption "
                   "topic (default: the built-in procedural textures)")
@click.option("--out", default=str(EMBEDDED_PRIOR), show_default=True, type=click.Path(path_type=Path))
@click.option("--vae-steps", default=PriorRecipe.vae_steps, show_default=True)
@click.option("--unet-steps", default=PriorRecipe.unet_steps, show_default=True)
@click.option("--vae-seconds", default=0.0, show_default=True,
              help="> 0: as many VAE steps as fit in this time (replaces --vae-steps; the count is recorded)")
@click.option("--unet-seconds", default=0.0, show_default=True, help="> 0: the same for the U-Net")
@click.option("--batch-size", default=PriorRecipe.batch_size, show_default=True)
@click.option("--vae-batch-size", default=PriorRecipe.vae_batch_size, show_default=True)
@click.option("--vae-crop", default=PriorRecipe.vae_crop, show_default=True)
@click.option("--vae-lr", default=PriorRecipe.vae_lr, show_default=True)
@click.option("--ssim-weight", default=PriorRecipe.ssim_weight, show_default=True)
@click.option("--unet-lr", default=PriorRecipe.unet_lr, show_default=True)
@click.option("--latent-views", default=PriorRecipe.latent_views, show_default=True,
              help="augmented views of each corpus image in the U-Net's latent bank")
@click.option("--ema-decay", default=PriorRecipe.ema_decay, show_default=True,
              help="> 0: save an exponential moving average of the U-Net and text encoder")
@click.option("--workers", default=PriorRecipe.workers, show_default=True, help="view-making processes")
@click.option("--resolution", default=PriorRecipe.resolution, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
def pretrain_command(corpus: Path | None, out: Path, device: str, **recipe_fields) -> None:
    """Pretrain the prior on an image corpus (CPU: about an hour; GPU: minutes)."""
    recipe = PriorRecipe(**recipe_fields, device=pick_device(device))
    try:
        record = pretrain(recipe, out, corpus)
    except CorpusError as err:  # the same one-line error as `stablesdg pretrain backbone|feature-net`
        raise click.ClickException(str(err)) from None
    click.echo(f"prior: {record['size_mb']} MB in {record['seconds']} s on {record['device_name']} -> {out}")


@prior_group.command("verify")
@click.option("--folder", default=str(EMBEDDED_PRIOR), show_default=True, type=click.Path(path_type=Path))
def verify_command(folder: Path) -> None:
    """Check every prior file against the sha256 in its recipe.json."""
    bad = verify_prior(folder)
    if bad:
        raise click.ClickException(f"{folder}: sha256 mismatch for {', '.join(bad)}; re-run `stablesdg prior pretrain`")
    click.echo(f"{folder}: all files match recipe.json")


@prior_group.command("reconstruct")
@click.option("--images", required=True, type=click.Path(exists=True, path_type=Path),
              help="folder of real images the prior never saw (searched recursively; sub-folders are classes)")
@click.option("--folder", default=str(EMBEDDED_PRIOR), show_default=True, type=click.Path(path_type=Path))
@click.option("--limit", default=120, show_default=True, help="images in all, spread evenly over the folder")
@click.option("--out", default="reports/prior", show_default=True, type=click.Path(path_type=Path))
def reconstruct_command(images: Path, folder: Path, limit: int, out: Path) -> None:
    """VAE reconstruction PSNR/SSIM on real images at the prior's resolution, per class, with a grid."""
    from diffusers import AutoencoderKL

    paths = sorted(p for p in images.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise click.ClickException(f"{images}: no images found")
    by_class: dict[str, list[Path]] = {}
    for p in paths:
        by_class.setdefault(p.parent.name if p.parent != images else "all", []).append(p)
    each = max(1, limit // len(by_class))  # spread evenly over the classes (sub-folders)
    paths = [p for members in by_class.values() for p in members[::max(1, len(members) // each)][:each]]
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
    resolution = json.loads((folder / "recipe.json").read_text())["recipe"]["resolution"]
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(paths):
        groups.setdefault(p.parent.name if p.parent != images else "all", []).append(i)
    metrics, pairs, per_image = vae_reconstruction(vae, paths, resolution)
    per_class = {name: {"psnr": float(np.mean([per_image[i][0] for i in idx])),
                        "ssim": float(np.mean([per_image[i][1] for i in idx])), "images": len(idx)}
                 for name, idx in sorted(groups.items())}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "vae_reconstruction.json", {
        **metrics, "resolution": resolution, "per_class": per_class, "source": str(images),
        "prior": str(folder), "sha": hashlib.sha256(str(paths).encode()).hexdigest()[:12]})
    shown = [idx[0] for idx in groups.values()][:8] or list(range(min(8, len(pairs))))
    image_grid([[pairs[i][0] for i in shown], [pairs[i][1] for i in shown]], ["real", "vae"]).save(out / "vae_grid.png")
    click.echo(f"VAE reconstruction on {metrics['images']} images at {resolution} px: PSNR {metrics['psnr']:.2f} dB, "
               f"SSIM {metrics['ssim']:.3f} -> {out}")
    for name, rec in per_class.items():
        click.echo(f"  {name}: PSNR {rec['psnr']:.2f} dB, SSIM {rec['ssim']:.3f} ({rec['images']} images)")
