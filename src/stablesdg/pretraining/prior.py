"""The embedded diffusion prior: a small SD-architecture model pretrained offline, native at 128 px.

`stablesdg prior pretrain --corpus DIR` trains it on any folder of images (the surface corpus stands in for
Stable Diffusion's web-scale data): first the VAE (L1 + MSE + SSIM + a small KL term, on crops at the 128 px
texture scale), then the text-conditioned U-Net with the CLIP-style text encoder on latents of augmented 128 px
views, captioned by their source folder (with caption dropout, for classifier-free guidance). Without `--corpus`
it falls back to an endless procedural texture corpus. It writes a diffusers folder that stock
`StableDiffusionImg2ImgPipeline.from_pretrained` loads, and `recipe.json`: recipe, corpus manifest hash,
device, steps, wall time and the sha256 of every file.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from ..diffusion import TinyConfig, build_tiny_pipeline
from ..metrics import psnr, ssim
from ..utils import derive_seed, sha256_file, write_json
from .corpus import FolderCorpus, ProceduralCorpus


# --------------------------------------------------------------------------------------- training
@dataclass
class PriorRecipe:
    seed: int = 0
    resolution: int = 128
    vae_channels: tuple[int, ...] = (32, 64, 64)
    latent_channels: int = 8
    unet_channels: tuple[int, ...] = (32, 64, 128)
    text_hidden: int = 64
    text_layers: int = 2
    vae_steps: int = 1000
    vae_crop: int = 64           # the VAE is convolutional: 64 px crops at the 128 px scale cost 1/4
    vae_batch_size: int = 16
    latent_views: int = 1        # augmented views per corpus image encoded once for U-Net training
    unet_steps: int = 1400
    batch_size: int = 32
    vae_lr: float = 1e-3
    unet_lr: float = 5e-4
    kl_weight: float = 1e-6
    ssim_weight: float = 0.5     # SSIM is the binding reconstruction figure; L1/MSE alone reward blur
    caption_template: str = "a photo of {} texture"
    caption_dropout: float = 0.1
    ema_decay: float = 0.0       # > 0: the saved U-Net and text encoder are an EMA of the trained weights
    vae_seconds: float = 0.0     # > 0: train the VAE for as many steps as fit in this time (then recorded)
    unet_seconds: float = 0.0    # > 0: the same for the U-Net
    workers: int = 0             # view-making processes (a GPU outpaces one CPU core cropping and resizing)
    corpus: str = "procedural"
    corpus_manifest_sha256: str = ""
    corpus_images: int = 0
    device: str = "cpu"


class StepPlan:
    """A fixed step count, or, with a time budget, as many steps as fit: the step time is measured early (in the
    warm-up) and the count fixed then, so the cosine decay still ends at zero."""

    probe = (5, 25)  # timed from step 5: the first steps pay for start-up (workers, kernel selection)

    def __init__(self, steps: int, seconds: float) -> None:
        self.steps, self.seconds = steps, seconds
        self.warmup = 100 if seconds > 0 else max(1, steps // 20)
        self.begun = self.started = 0.0

    def lr_factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - self.warmup) / max(1, self.steps - self.warmup))))

    def after(self, step: int) -> bool:
        """Call after each step; True while training should go on."""
        if self.seconds > 0 and step == 0:
            self.begun = time.perf_counter()
        if self.seconds > 0 and step == self.probe[0]:
            self.started = time.perf_counter()
        if self.seconds > 0 and step == self.probe[1]:
            per_step = (time.perf_counter() - self.started) / (self.probe[1] - self.probe[0])
            left = self.seconds - (time.perf_counter() - self.begun)
            self.steps = max(self.warmup + 1, step + 1 + int(left / per_step))
        return step + 1 < self.steps

    def iterate(self, desc: str):
        """Step indices until the plan ends, with a progress bar; afterwards `steps` is the number taken."""
        bar, step = tqdm(desc=desc, total=self.steps), 0
        while True:
            yield step
            bar.total = self.steps
            bar.update()
            if not self.after(step):
                break
            step += 1
        bar.close()


class _ViewStream(torch.utils.data.IterableDataset):
    """Endless batches of corpus views; each worker draws from its own seeded stream."""

    def __init__(self, corpus, seed: int, count: int, crop: int) -> None:
        self.corpus, self.seed, self.count, self.crop = corpus, seed, count, crop

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        rng = np.random.default_rng(derive_seed(self.seed, worker))
        if hasattr(self.corpus, "drawn"):  # procedural: workers draw disjoint textures
            self.corpus.drawn = worker << 32
        while True:
            grey, captions = self.corpus.views(rng, self.count, self.crop)
            yield torch.from_numpy(grey), captions


def view_batches(corpus, seed: int, count: int, crop: int, workers: int):
    """Endless (uint8 grey (count, crop, crop), captions) batches, made in `workers` processes (0: here)."""
    stream = _ViewStream(corpus, seed, count, crop)
    return iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers,
                                            persistent_workers=workers > 0, prefetch_factor=4 if workers else None))


def build_prior(recipe: PriorRecipe):
    """Untrained pipeline with the recipe's sizes (same builder as the `tiny` model, larger config)."""
    return build_tiny_pipeline(TinyConfig(
        seed=recipe.seed, resolution=recipe.resolution, unet_channels=recipe.unet_channels,
        vae_channels=recipe.vae_channels, text_hidden=recipe.text_hidden, text_layers=recipe.text_layers,
        latent_channels=recipe.latent_channels,
    ))


def grey_to_pixels(grey: torch.Tensor, device: str) -> torch.Tensor:
    """uint8 (N, H, W) grey -> float (N, 3, H, W) in [-1, 1] on `device` (converted there: cheap on a GPU)."""
    x = grey.to(device, non_blocking=True).float()[:, None] / 127.5 - 1
    return x.expand(-1, 3, -1, -1).contiguous()


def ssim_torch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Differentiable mean SSIM (Gaussian 11x11, sigma 1.5) of images in [-1, 1], channel-averaged grey."""
    a, b = a.mean(1, keepdim=True), b.mean(1, keepdim=True)
    coords = torch.arange(11, dtype=a.dtype, device=a.device) - 5
    g = torch.exp(-coords**2 / (2 * 1.5**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :])[None, None]
    blur = lambda x: F.conv2d(x, window)  # noqa: E731
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    return (((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))).mean()


def train_vae(pipe, corpus, recipe: PriorRecipe, log: Callable[[str, int, float], None]) -> int:
    """Train the VAE; returns the number of steps taken."""
    vae, device = pipe.vae, recipe.device
    vae.train().requires_grad_(True)
    plan = StepPlan(recipe.vae_steps, recipe.vae_seconds)
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, plan.lr_factor)
    batches = view_batches(corpus, derive_seed("prior-vae", recipe.seed), recipe.vae_batch_size, recipe.vae_crop,
                           recipe.workers)
    gen = torch.Generator(device).manual_seed(recipe.seed)
    for step in plan.iterate("prior vae"):
        pixels = grey_to_pixels(next(batches)[0], device)
        dist = vae.encode(pixels).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen, device=device)
        recon = vae.decode(z).sample
        kl = dist.kl().mean() / pixels[0].numel()
        loss = (F.l1_loss(recon, pixels) + F.mse_loss(recon, pixels) + recipe.kl_weight * kl
                + recipe.ssim_weight * (1 - ssim_torch(recon, pixels)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 25 == 0:  # .item() waits for the device: not on every step
            log("vae_loss", step, loss.item())
    vae.eval().requires_grad_(False)
    return plan.steps


@torch.no_grad()
def encode_views(pipe, corpus, recipe: PriorRecipe, count: int) -> tuple[torch.Tensor, list[str]]:
    """Latent means of `count` augmented full-resolution views, encoded once (the VAE is frozen by now); the
    latents stay on the training device."""
    batches = view_batches(corpus, derive_seed("prior-latents", recipe.seed), 64, recipe.resolution, recipe.workers)
    latents, captions = [], []
    for start in tqdm(range(0, count, 64), desc="encode corpus"):
        grey, caps = next(batches)
        take = min(64, count - start)
        latents.append(pipe.vae.encode(grey_to_pixels(grey[:take], recipe.device)).latent_dist.mean)
        captions += caps[:take]
    return torch.cat(latents), captions


def train_unet(pipe, latents: torch.Tensor, captions: list[str], recipe: PriorRecipe,
               log: Callable[[str, int, float], None]) -> int:
    """Train U-Net + text encoder on the latent bank; returns the number of steps taken."""
    unet, text_encoder, tok, sched, device = pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, recipe.device
    unet.train().requires_grad_(True)
    text_encoder.train().requires_grad_(True)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    plan = StepPlan(recipe.unet_steps, recipe.unet_seconds)
    opt = torch.optim.AdamW(params, lr=recipe.unet_lr, weight_decay=1e-2)
    lr = torch.optim.lr_scheduler.LambdaLR(opt, plan.lr_factor)
    ema = None
    if recipe.ema_decay > 0:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=recipe.ema_decay, use_ema_warmup=True, foreach=True)
    # the few distinct captions are tokenized once; index `empty` is the empty caption (classifier-free guidance)
    texts = sorted(set(captions))
    empty = len(texts)
    ids = tok(texts + [""], padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.to(device)
    caption_index = torch.tensor([texts.index(c) for c in captions], device=device)
    gen = torch.Generator(device).manual_seed(recipe.seed + 1)
    latents = latents.to(device) * pipe.vae.config.scaling_factor
    alphas = sched.alphas_cumprod.to(device)
    for step in plan.iterate("prior unet"):
        idx = torch.randint(0, len(latents), (recipe.batch_size,), generator=gen, device=device)
        batch = latents[idx]
        drop = torch.rand(len(idx), generator=gen, device=device) < recipe.caption_dropout
        text_ids = ids[torch.where(drop, empty, caption_index[idx])]
        noise = torch.randn(batch.shape, generator=gen, device=device)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(batch),), generator=gen, device=device)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * batch + (1 - a).sqrt() * noise  # the scheduler's add_noise, kept on the device
        pred = unet(noisy, t, encoder_hidden_states=text_encoder(text_ids)[0]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr.step()
        if ema is not None:
            ema.step(params)
        if step % 25 == 0:
            log("unet_loss", step, loss.item())
    if ema is not None:
        ema.copy_to(params)
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    return plan.steps


def open_corpus(recipe: PriorRecipe, corpus_dir: Path | None):
    if corpus_dir is None:
        return ProceduralCorpus(recipe.seed, recipe.resolution)
    return FolderCorpus(corpus_dir, recipe.resolution, recipe.caption_template)


PACKING_FILE = "PACKING.json"  # beside a re-encoded copy of a corpus: what it was made from, and how


def pretrain(recipe: PriorRecipe, out_dir: Path, corpus_dir: Path | None = None,
             log: Callable[[str, int, float], None] | None = None) -> dict:
    """Train VAE then U-Net + text encoder; save a diffusers folder with recipe.json (sha256 of every file)."""
    torch.manual_seed(recipe.seed)
    if recipe.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    log = log or (lambda *_: None)
    started = time.time()
    corpus = open_corpus(recipe, corpus_dir)
    packing_file = corpus_dir / PACKING_FILE if corpus_dir else None
    packing = json.loads(packing_file.read_text()) if packing_file and packing_file.is_file() else None
    recipe.corpus = packing["source"] if packing else corpus.name  # a packed copy is named after its source
    recipe.corpus_manifest_sha256 = corpus.manifest_sha256()
    recipe.corpus_images = len(getattr(corpus, "images", ()))
    pipe = build_prior(recipe).to(recipe.device)
    recipe.vae_steps = train_vae(pipe, corpus, recipe, log)
    bank = max(recipe.corpus_images, 512) * recipe.latent_views
    latents, captions = encode_views(pipe, corpus, recipe, bank)
    pipe.vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    vae_done = time.time()
    recipe.unet_steps = train_unet(pipe, latents, captions, recipe, log)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.to("cpu").save_pretrained(out_dir)
    files = {p.relative_to(out_dir).as_posix(): sha256_file(p) for p in sorted(out_dir.rglob("*"))
             if p.is_file() and p.name != "recipe.json"}
    record = {
        "recipe": asdict(recipe), "device": recipe.device.split(":")[0],
        "device_name": torch.cuda.get_device_name() if recipe.device.startswith("cuda") else "cpu",
        "threads": torch.get_num_threads(), "steps": {"vae": recipe.vae_steps, "unet": recipe.unet_steps},
        "seconds": round(time.time() - started, 1), "seconds_vae": round(vae_done - started, 1),
        "latent_bank": len(latents), "skipped_images": getattr(corpus, "skipped", []),
        "corpus_packing": packing,
        "torch": torch.__version__, "files": files,
        "size_mb": round(sum((out_dir / f).stat().st_size for f in files) / 2**20, 2),
    }
    write_json(out_dir / "recipe.json", record)
    return record


def verify_prior(folder: Path) -> list[str]:
    """Files whose sha256 no longer matches recipe.json (empty list: intact)."""
    record = json.loads((folder / "recipe.json").read_text())
    return [f for f, digest in record["files"].items() if sha256_file(folder / f) != digest]


# --------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def vae_reconstruction(vae, paths: list[Path], resolution: int
                       ) -> tuple[dict, list[tuple[Image.Image, Image.Image]], list[tuple[float, float]]]:
    """PSNR/SSIM of VAE round trips at the model resolution against the original resized to it; returns the
    means, (original, recon) pairs and per-image (psnr, ssim)."""
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
    means = {"psnr": float(np.mean(scores_p)), "ssim": float(np.mean(scores_s)), "images": len(paths)}
    return means, pairs, list(zip(scores_p, scores_s, strict=True))


