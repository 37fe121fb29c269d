"""Base diffusion model: a hub id, a local diffusers folder, or the built-in `tiny` SD-architecture model.

The tiny model has Stable Diffusion 1.5's module names (`to_q/to_k/to_v/to_out.0` in the U-Net,
`q_proj/k_proj/v_proj/out_proj` in CLIP), so every embedding and LoRA code path is the one a real checkpoint
takes. It is built deterministically from a seed, saved with `save_pretrained` and loaded back through the stock
`from_pretrained`, exactly like a downloaded checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import StableSDGError

# The pretrained prior shipped in the package (`model.base: embedded`; built by `stablesdg prior pretrain`).
EMBEDDED_PRIOR = Path(__file__).parent / "assets" / "prior"
# The adapter files stock `load_textual_inversion` / `load_lora_weights` read (written by adaptation).
EMBEDS_FILE = "learned_embeds.safetensors"
LORA_FILE = "pytorch_lora_weights.safetensors"
UNET_DIR = "unet"  # adapt.lora.unet: full writes the whole fine-tuned U-Net here (stock save_pretrained folder)

# Words the tiny tokenizer knows as whole tokens: prompt templates, initializer words, steel vocabulary.
TINY_WORDS = ["a", "an", "the", "of", "on", "in", "with", "and", "or", "photo", "close-up", "closeup", "grayscale", "greyscale", "picture", "image", "texture", "surface", "steel", "metal", "plate", "strip", "rolled", "hot", "cold", "defect", "defects", "crack", "cracks", "crazing", "spot", "spots", "inclusion", "patch", "patches", "stain", "blotch", "pit", "pits", "pitted", "dots", "dot", "scale", "flake", "flakes", "rolled-in", "scratch", "scratches", "line", "lines", "mark", "stripe", "stripes", "grain", "noise", "rough", "smooth", "dark", "bright", "gray", "grey", "light", "shadow", "fine", "coarse", "small", "large", "long", "thin", "industrial", "microscope", "macro", "view", "top", "detail", "pattern", "network", "cluster", "speck", "specks", "blob", "blobs", "streak", "streaks",
              "ring", "rings", "grid", "shading", "gradient"]


@dataclass(frozen=True)
class TinyConfig:
    """Sizes of the built-in model: small enough for CPU training steps in tens of milliseconds."""

    seed: int = 0
    resolution: int = 64
    unet_channels: tuple[int, ...] = (32, 64)
    vae_channels: tuple[int, ...] = (32, 64)
    text_hidden: int = 32
    text_layers: int = 2
    latent_channels: int = 4

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


class BaseModelError(StableSDGError, RuntimeError):
    """The base model cannot be loaded (offline hub id, missing folder, incomplete checkpoint)."""


# --------------------------------------------------------------------------------------- tiny model
def bpe_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges learnt on `words` until each is one symbol, ties broken by the pair itself.

    Written out because the `tokenizers` trainer breaks count ties differently on every run, and the merges
    decide the token ids, so the text encoder's weights would not reproduce from a seed.
    """
    corpus = {tuple(w[:-1]) + (w[-1] + "</w>",): 1 for w in dict.fromkeys(words)}
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter(p for word in corpus for p in zip(word, word[1:], strict=False))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = {}
        for word in corpus:
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = 1
        corpus = merged


def write_tiny_tokenizer(folder: Path) -> None:
    """A small CLIP-style BPE (end-of-word `</w>`) on TINY_WORDS: vocab.json + merges.txt, byte-identical on
    every run. Every printable ASCII character is in the vocabulary, so any text stays encodable."""
    alphabet = [chr(c) for c in range(33, 127)]
    merges = bpe_merges(TINY_WORDS)
    vocab = ["<|startoftext|>", "<|endoftext|>", *alphabet, *(ch + "</w>" for ch in alphabet)]
    vocab += [a + b for a, b in merges]
    folder.mkdir(parents=True, exist_ok=True)
    ids = {tok: i for i, tok in enumerate(dict.fromkeys(vocab))}
    (folder / "vocab.json").write_text(json.dumps(ids, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))


def build_tiny_pipeline(cfg: TinyConfig):
    """A randomly initialised Stable-Diffusion-architecture img2img pipeline (deterministic from cfg.seed)."""
    # lazy (here and below): diffusers and transformers take seconds to import; `stablesdg data` needs neither
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionImg2ImgPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_channels),
        block_out_channels=cfg.vae_channels,
        latent_channels=cfg.latent_channels,
        norm_num_groups=16,
        sample_size=cfg.resolution,
    )
    latent = cfg.resolution // 2 ** (len(cfg.vae_channels) - 1)
    unet = UNet2DConditionModel(
        sample_size=latent,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        layers_per_block=1,
        block_out_channels=cfg.unet_channels,
        # Attention at the coarser levels only, as SD does at its finest level's cost.
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(cfg.unet_channels) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(cfg.unet_channels) - 1) + ("UpBlock2D",),
        cross_attention_dim=cfg.text_hidden,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.text_hidden,
            intermediate_size=cfg.text_hidden * 2,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    return StableDiffusionImg2ImgPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def tiny_model_folder(cfg: TinyConfig, cache: Path | None = None) -> Path:
    """The tiny model as a diffusers folder (built once per config, then reused)."""
    cache = cache or Path(os.environ.get("STABLESDG_CACHE", ".cache")) / "tiny-sd"
    folder = cache / cfg.fingerprint()
    if not (folder / "model_index.json").exists():
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        build_tiny_pipeline(cfg).save_pretrained(tmp)
        if folder.exists():  # another process built it meanwhile
            shutil.rmtree(tmp)
        else:
            tmp.replace(folder)
    return folder


# --------------------------------------------------------------------------------------- loading
def resolve_base_model(model_cfg: ModelConfig) -> tuple[str, str | None]:
    """(path or hub id, revision) that `from_pretrained` is given.

    `embedded` is the pretrained prior shipped in the package; `tiny` a randomly initialised model (tests).
    """
    if model_cfg.base == "embedded":
        if not (EMBEDDED_PRIOR / "model_index.json").exists():
            raise BaseModelError(
                f"the embedded prior is missing from {EMBEDDED_PRIOR}; reinstall the package or rebuild it with "
                "`stablesdg prior pretrain`"
            )
        return str(EMBEDDED_PRIOR), None
    if model_cfg.base == "tiny":
        return str(tiny_model_folder(TinyConfig(seed=model_cfg.tiny_seed, resolution=model_cfg.resolution))), None
    return model_cfg.base, model_cfg.revision


def offline_hint(model_id: str) -> str:
    name = model_id.rstrip("/").split("/")[-1]
    return (
        f"base model {model_id!r} is neither a local folder nor in the Hugging Face cache, and the Hub cannot be "
        f"reached. On a machine with network run `hf download {model_id} --local-dir "
        f"models/base/{name}` (huggingface_hub's CLI), copy that folder here and set "
        f"`model.base: models/base/{name}` in params.yaml "
        "(or set model.base: tiny for the built-in model)."
    )


def load_base_pipeline(model_cfg: ModelConfig, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """StableDiffusionImg2ImgPipeline for `model.base` (tiny, local folder or hub id), safety checker off.

    A real SD folder's model_index.json lists a safety checker and its feature extractor: passing None for both
    skips them (they are not needed to adapt or generate, and a copied folder often lacks them)."""
    from diffusers import StableDiffusionImg2ImgPipeline  # lazy: slow to import

    source, revision = resolve_base_model(model_cfg)
    local = Path(source)
    if local.exists() and not (local / "model_index.json").exists():
        raise BaseModelError(f"{local}: not a diffusers folder (model_index.json missing); see README 'Base model'")
    try:
        pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
            source, revision=revision, dtype=dtype, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
    except OSError as err:
        if local.exists():
            raise BaseModelError(f"{local}: incomplete diffusers folder: {err}") from err
        raise BaseModelError(offline_hint(source)) from err
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def base_model_record(model_cfg: ModelConfig) -> dict[str, str | None]:
    """What a manifest records about the base model: the id the user chose and what it resolved to."""
    source, revision = resolve_base_model(model_cfg)
    return {"base_model": model_cfg.base, "base_model_path": portable_path(source), "revision": revision}


def portable_path(path: str) -> str:
    """A folder inside the project as a relative path, so records do not depend on where the clone lives."""
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:  # a hub id, or a folder outside the project
        return path
