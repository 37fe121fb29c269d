"""The embedded diffusion prior: a small SD-architecture model pretrained offline on procedural textures.

`stablesdg prior pretrain` makes a broad texture corpus on the fly (noise fields, grain, stripes, scratches,
blobs, pits, flakes, cracks, streaks, rings, grids, shading) at many scales, contrasts and orientations, trains
the VAE, then the text-conditioned U-Net (with the CLIP-style text encoder), and writes a diffusers folder that
stock `StableDiffusionImg2ImgPipeline.from_pretrained` loads. The corpus is drawn from its own seed namespace
and generators, never from the dataset's images, so the prior has seen no image used for testing.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from scipy import ndimage
from tqdm import tqdm

from .utils import derive_seed, sha256_file, write_json

CORPUS_VERSION = "textures-v1"
EMBEDDED_PRIOR = Path(__file__).parent / "assets" / "prior"


# --------------------------------------------------------------------------------------- corpus
def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), sigma)
    return field / (field.std() + 1e-9)


def _mask(size: int, draw: Callable[[ImageDraw.ImageDraw], None]) -> np.ndarray:
    img = Image.new("L", (size, size), 0)
    draw(ImageDraw.Draw(img))
    return np.asarray(img, dtype=np.float64) / 255.0


def _noise(rng, size):
    return _smooth_noise(rng, size, rng.uniform(0.5, 6))


def _grain(rng, size):
    return ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), rng.uniform(0.3, 1.0)) * 1.5


def _stripes(rng, size):
    yy, xx = np.mgrid[0:size, 0:size]
    a, freq = rng.uniform(0, np.pi), rng.uniform(0.05, 0.6)
    phase = _smooth_noise(rng, size, 8) * rng.uniform(0, 2)
    return np.sin((xx * np.cos(a) + yy * np.sin(a)) * freq + phase)


def _lines(rng, size):
    def draw(d):
        base = rng.uniform(0, np.pi)
        for _ in range(rng.integers(1, 12)):
            a = base + rng.normal(0, rng.uniform(0.02, 1.0))
            cx, cy = rng.uniform(0, size, 2)
            half = rng.uniform(0.1, 0.9) * size
            d.line([(cx - np.cos(a) * half, cy - np.sin(a) * half), (cx + np.cos(a) * half, cy + np.sin(a) * half)],
                   fill=255, width=int(rng.integers(1, 4)))
    return _mask(size, draw) * rng.choice([-2.5, 2.5])


def _blobs(rng, size):
    field = _smooth_noise(rng, size, rng.uniform(3, 14))
    return ndimage.gaussian_filter((field > rng.uniform(-0.5, 1.2)).astype(float), rng.uniform(0.5, 3)) * 2 - 1


def _dots(rng, size):
    def draw(d):
        centre, spread = rng.uniform(0, size, 2), rng.uniform(0.1, 0.8) * size
        for _ in range(rng.integers(5, 200)):
            x, y = rng.normal(centre, spread)
            r = rng.uniform(0.5, 4)
            d.ellipse([x - r, y - r, x + r, y + r], fill=255)
    return _mask(size, draw) * rng.choice([-2.5, 2.5])


def _flakes(rng, size):
    def draw(d):
        for _ in range(rng.integers(3, 40)):
            x, y = rng.uniform(0, size, 2)
            w, h, rot = rng.uniform(2, 20), rng.uniform(1, 10), rng.uniform(0, np.pi)
            pts = []
            for a in np.linspace(0, 2 * np.pi, 8)[:-1]:
                px, py = w * np.cos(a) * rng.uniform(0.5, 1.2), h * np.sin(a) * rng.uniform(0.5, 1.2)
                pts.append((x + px * np.cos(rot) - py * np.sin(rot), y + px * np.sin(rot) + py * np.cos(rot)))
            d.polygon(pts, fill=255)
    m = _mask(size, draw)
    edge = m - ndimage.grey_erosion(m, size=3)
    return -m * rng.uniform(0.5, 2) + edge * rng.uniform(0, 3)


def _cracks(rng, size):
    pts = rng.uniform(0, size, (int(rng.integers(5, 80)), 2))
    yy, xx = np.mgrid[0:size, 0:size]
    d = np.sort(np.hypot(xx[..., None] - pts[:, 0], yy[..., None] - pts[:, 1]), axis=-1)
    return -np.exp(-((d[..., 1] - d[..., 0]) ** 2) / rng.uniform(0.5, 4)) * 2.5


def _streaks(rng, size):
    field = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), (rng.uniform(0.3, 2), rng.uniform(4, 30)))
    field /= field.std() + 1e-9
    return np.rot90(field, int(rng.integers(0, 4)))


def _rings(rng, size):
    yy, xx = np.mgrid[0:size, 0:size]
    cx, cy = rng.uniform(0, size, 2)
    return np.sin(np.hypot(xx - cx, yy - cy) * rng.uniform(0.1, 0.8))


def _grid(rng, size):
    yy, xx = np.mgrid[0:size, 0:size]
    period = rng.uniform(4, 24)
    return ((np.mod(xx, period) < 1.5) | (np.mod(yy, period) < 1.5)).astype(float) * rng.choice([-2, 2])


def _shading(rng, size):
    yy, xx = np.mgrid[0:size, 0:size] / size
    a = rng.uniform(0, 2 * np.pi)
    return (xx * np.cos(a) + yy * np.sin(a)) * 3 - 1.5


FAMILIES: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "noise": _noise, "grain": _grain, "stripes": _stripes, "lines": _lines, "blobs": _blobs, "dots": _dots,
    "flakes": _flakes, "cracks": _cracks, "streaks": _streaks, "rings": _rings, "grid": _grid,
    "shading": _shading,
}


def corpus_sample(index: int, seed: int, size: int) -> tuple[Image.Image, str]:
    """One corpus image and its caption: one or two texture families over a textured base, random look."""
    rng = np.random.default_rng(derive_seed("prior-corpus", CORPUS_VERSION, seed, index))
    names = list(FAMILIES)
    picked = [names[i] for i in rng.choice(len(names), size=int(rng.integers(1, 3)), replace=False)]
    canvas = _grain(rng, size) * rng.uniform(0.05, 0.4) + _shading(rng, size) * rng.uniform(0, 0.3)
    for name in picked:
        canvas = canvas + FAMILIES[name](rng, size) * rng.uniform(0.3, 1.0)
    level, contrast = rng.uniform(60, 190), rng.uniform(10, 45)
    pixels = np.clip(level + canvas * contrast, 0, 255).astype(np.uint8)
    caption = f"a photo of {' and '.join(picked)} texture"
    return Image.fromarray(pixels, mode="L"), caption


# --------------------------------------------------------------------------------------- training
@dataclass
class PriorRecipe:
    seed: int = 0
    resolution: int = 64
    vae_channels: tuple[int, ...] = (32, 64, 64)
    unet_channels: tuple[int, ...] = (32, 64, 128)
    text_hidden: int = 64
    text_layers: int = 2
    vae_steps: int = 3000
    unet_steps: int = 6000
    batch_size: int = 16
    vae_lr: float = 1e-3
    unet_lr: float = 3e-4
    kl_weight: float = 1e-6
    caption_dropout: float = 0.1
    corpus_version: str = CORPUS_VERSION


def batch_pixels(recipe: PriorRecipe, step: int) -> tuple[torch.Tensor, list[str]]:
    """Batch `step` of the endless corpus (image index = step * batch + i): no image is ever repeated."""
    images, captions = [], []
    for i in range(recipe.batch_size):
        img, cap = corpus_sample(step * recipe.batch_size + i, recipe.seed, recipe.resolution)
        images.append(np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1)
        captions.append(cap)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), captions


def build_prior(recipe: PriorRecipe):
    """Untrained pipeline with the recipe's sizes (same builder as the `tiny` model, larger config)."""
    from .diffusion import TinyConfig, build_tiny_pipeline

    return build_tiny_pipeline(TinyConfig(
        seed=recipe.seed, resolution=recipe.resolution, unet_channels=recipe.unet_channels,
        vae_channels=recipe.vae_channels, text_hidden=recipe.text_hidden, text_layers=recipe.text_layers,
    ))


def train_vae(pipe, recipe: PriorRecipe, log: Callable[[str, int, float], None]) -> None:
    vae = pipe.vae
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe.vae_lr, total_steps=recipe.vae_steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(recipe.seed)
    for step in tqdm(range(recipe.vae_steps), desc="prior vae"):
        pixels, _ = batch_pixels(recipe, step)
        dist = vae.encode(pixels).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        kl = dist.kl().mean() / pixels[0].numel()
        loss = F.l1_loss(recon, pixels) + F.mse_loss(recon, pixels) + recipe.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        log("vae_loss", step, float(loss))
    vae.eval().requires_grad_(False)


def latent_scale(pipe, recipe: PriorRecipe) -> float:
    """SD's `scaling_factor`: 1 / std of the latents, so the U-Net sees unit-variance inputs."""
    with torch.no_grad():
        pixels, _ = batch_pixels(recipe, 10**6)
        return float(1.0 / pipe.vae.encode(pixels).latent_dist.mean.std())


def train_unet(pipe, recipe: PriorRecipe, log: Callable[[str, int, float], None]) -> None:
    unet, text_encoder, tok, sched = pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler
    unet.train().requires_grad_(True)
    text_encoder.train().requires_grad_(True)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.unet_lr, weight_decay=1e-2)
    lr = torch.optim.lr_scheduler.OneCycleLR(opt, recipe.unet_lr, total_steps=recipe.unet_steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(recipe.seed + 1)
    scale = pipe.vae.config.scaling_factor
    for step in tqdm(range(recipe.unet_steps), desc="prior unet"):
        pixels, captions = batch_pixels(recipe, step + recipe.vae_steps)
        drop = torch.rand(len(captions), generator=gen) < recipe.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        with torch.no_grad():
            latents = pipe.vae.encode(pixels).latent_dist.mean * scale
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(latents),), generator=gen)
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        pred = unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=text_encoder(ids)[0]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr.step()
        log("unet_loss", step, float(loss))
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)


def pretrain(recipe: PriorRecipe, out_dir: Path, log: Callable[[str, int, float], None] | None = None) -> dict:
    """Train VAE then U-Net + text encoder; save a diffusers folder with recipe.json (sha256 of every file)."""
    torch.manual_seed(recipe.seed)
    log = log or (lambda *_: None)
    started = time.time()
    pipe = build_prior(recipe)
    train_vae(pipe, recipe, log)
    pipe.vae.register_to_config(scaling_factor=latent_scale(pipe, recipe))
    train_unet(pipe, recipe, log)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out_dir)
    files = {p.relative_to(out_dir).as_posix(): sha256_file(p) for p in sorted(out_dir.rglob("*"))
             if p.is_file() and p.name != "recipe.json"}
    record = {"recipe": asdict(recipe), "seconds": round(time.time() - started, 1), "torch": torch.__version__,
              "files": files, "size_mb": round(sum((out_dir / f).stat().st_size for f in files) / 2**20, 2)}
    write_json(out_dir / "recipe.json", record)
    return record


def verify_prior(folder: Path) -> list[str]:
    """Files whose sha256 no longer matches recipe.json (empty list: intact)."""
    record = json.loads((folder / "recipe.json").read_text())
    return [f for f, digest in record["files"].items() if sha256_file(folder / f) != digest]


# --------------------------------------------------------------------------------------- evaluation
def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM with an 11x11 Gaussian window (sigma 1.5), as in Wang et al. 2004, on 8-bit grey images."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    blur = lambda x: ndimage.gaussian_filter(x, 1.5, truncate=3.5)  # noqa: E731
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return float(np.mean(num / den))


@torch.no_grad()
def vae_reconstruction(vae, paths: list[Path], resolution: int) -> tuple[dict, list[tuple[Image.Image, Image.Image]]]:
    """PSNR/SSIM of VAE round trips at the model resolution; returns metrics and (original, recon) pairs."""
    pairs, scores_p, scores_s = [], [], []
    for path in tqdm(paths, desc="vae reconstruction"):
        with Image.open(path) as img:
            original = img.convert("L").resize((resolution, resolution), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(original.convert("RGB"), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
        recon = vae.decode(vae.encode(x[None]).latent_dist.mean).sample[0]
        arr = ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        rec_img = Image.fromarray(arr).convert("L")
        scores_p.append(psnr(np.asarray(original), np.asarray(rec_img)))
        scores_s.append(ssim(np.asarray(original), np.asarray(rec_img)))
        pairs.append((original, rec_img))
    return {"psnr": float(np.mean(scores_p)), "ssim": float(np.mean(scores_s)), "images": len(paths)}, pairs


@click.group("prior")
def prior_group() -> None:
    """The embedded pretrained diffusion prior (model.base: embedded)."""


@prior_group.command("pretrain")
@click.option("--out", default=str(EMBEDDED_PRIOR), show_default=True, type=click.Path(path_type=Path))
@click.option("--vae-steps", default=PriorRecipe.vae_steps, show_default=True)
@click.option("--unet-steps", default=PriorRecipe.unet_steps, show_default=True)
@click.option("--batch-size", default=PriorRecipe.batch_size, show_default=True)
@click.option("--seed", default=0, show_default=True)
def pretrain_command(out: Path, vae_steps: int, unet_steps: int, batch_size: int, seed: int) -> None:
    """Pretrain the prior on the procedural texture corpus (CPU: tens of minutes; GPU: minutes)."""
    recipe = PriorRecipe(seed=seed, vae_steps=vae_steps, unet_steps=unet_steps, batch_size=batch_size)
    record = pretrain(recipe, out)
    click.echo(f"prior: {record['size_mb']} MB in {record['seconds']} s -> {out}")


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
              help="folder of real images the prior never saw (searched recursively)")
@click.option("--folder", default=str(EMBEDDED_PRIOR), show_default=True, type=click.Path(path_type=Path))
@click.option("--limit", default=120, show_default=True)
@click.option("--out", default="reports/prior", show_default=True, type=click.Path(path_type=Path))
def reconstruct_command(images: Path, folder: Path, limit: int, out: Path) -> None:
    """VAE reconstruction PSNR/SSIM on real images, with a reconstruction grid."""
    from diffusers import AutoencoderKL

    from .data import IMAGE_EXTENSIONS
    from .viz import image_grid

    paths = sorted(p for p in images.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    step = max(1, len(paths) // limit)
    paths = paths[::step][:limit]
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
    resolution = json.loads((folder / "recipe.json").read_text())["recipe"]["resolution"]
    metrics, pairs = vae_reconstruction(vae, paths, resolution)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "vae_reconstruction.json", {**metrics, "source": str(images), "prior": str(folder),
                                                  "sha": hashlib.sha256(str(paths).encode()).hexdigest()[:12]})
    image_grid([[o for o, _ in pairs[:8]], [r for _, r in pairs[:8]]], ["real", "vae"]).save(out / "vae_grid.png")
    click.echo(f"VAE reconstruction on {metrics['images']} images: PSNR {metrics['psnr']:.2f} dB, "
               f"SSIM {metrics['ssim']:.3f} -> {out}")
