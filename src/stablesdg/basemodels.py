"""Real-size Stable Diffusion folders with random weights: SD 1.5's and SD 2.1's exact architectures.

Real weights cannot be downloaded everywhere, but the architecture and the tokenizer can be built: a folder
written here loads through the stock `from_pretrained`, trains, generates and is checked by `check-base` exactly
like a downloaded checkpoint, so every failure that does not depend on the weights' values shows up.

Where each value comes from (the published diffusers folders on the Hugging Face Hub):
- SD 1.5: https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5 — `model_index.json`,
  `unet/config.json` (block_out_channels 320/640/1280/1280, cross_attention_dim 768, attention_head_dim 8,
  layers_per_block 2, sample_size 64), `vae/config.json` (128/256/512/512, latent_channels 4, sample_size 512;
  scaling_factor 0.18215 is AutoencoderKL's default, which that config does not override),
  `text_encoder/config.json` (openai/clip-vit-large-patch14's text tower: 12 layers x 768, 12 heads, MLP 3072,
  quick_gelu, vocab 49408, 77 positions, projection 768, bos/eos/pad ids 0/2/1 as that file has them),
  `scheduler/scheduler_config.json` (PNDM, scaled_linear 0.00085..0.012, 1000 steps, skip_prk_steps, steps_offset
  1), `tokenizer/` (CLIP BPE, pad `<|endoftext|>`).
- SD 2.1: https://huggingface.co/stabilityai/stable-diffusion-2-1 — `unet/config.json` (attention_head_dim
  5/10/20/20, cross_attention_dim 1024, use_linear_projection, upcast_attention, sample_size 96), `vae` as SD 1.5
  with sample_size 768, `text_encoder/config.json` (OpenCLIP ViT-H/14's text tower: 23 layers x 1024, 16 heads,
  MLP 4096, gelu, projection 512), `scheduler` (DDIM, prediction_type v_prediction), `tokenizer` (pad `!`).
- The BPE: CLIP's `bpe_simple_vocab_16e6.txt.gz`, read from the installed `open_clip_torch` package (MIT), and
  turned into vocab.json + merges.txt as CLIP's `simple_tokenizer.py` builds its vocabulary.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import StableSDGError

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# CLIP keeps the first 49152 - 256 - 2 merges (simple_tokenizer.py): 256 byte symbols x 2 (with and without
# `</w>`) + the merges + the 2 special tokens = 49408 ids.
CLIP_MERGES = 49152 - 256 - 2


class BaseBuildError(StableSDGError, RuntimeError):
    """A real-size folder cannot be built (unknown architecture, CLIP's BPE file not installed)."""


@dataclass(frozen=True)
class Arch:
    """One published Stable Diffusion architecture, as its diffusers folder's config files state it."""

    name: str
    hub_id: str
    resolution: int
    unet: dict
    vae: dict
    text: dict
    scheduler_class: str
    scheduler: dict
    pad_token: str
    model_index_extra: dict = field(default_factory=dict)


_UNET_COMMON = {
    "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "center_input_sample": False,
}
_VAE_COMMON = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2, "act_fn": "silu", "norm_num_groups": 32, "scaling_factor": 0.18215,
}
_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
          "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False}

ARCHS = {
    "sd15": Arch(
        name="sd15", hub_id="stable-diffusion-v1-5/stable-diffusion-v1-5", resolution=512,
        unet={**_UNET_COMMON, "sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8},
        vae={**_VAE_COMMON, "sample_size": 512},
        text={"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
              "hidden_act": "quick_gelu", "projection_dim": 768, "max_position_embeddings": 77,
              "vocab_size": 49408, "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2,
              "pad_token_id": 1},
        scheduler_class="PNDMScheduler", scheduler={**_BETAS, "skip_prk_steps": True},
        pad_token="<|endoftext|>",
        # SD 1.5's model_index lists a safety checker and its feature extractor; we load with both None.
        model_index_extra={"safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
                           "feature_extractor": ["transformers", "CLIPImageProcessor"],
                           "requires_safety_checker": True},
    ),
    "sd21": Arch(
        name="sd21", hub_id="stabilityai/stable-diffusion-2-1", resolution=768,
        unet={**_UNET_COMMON, "sample_size": 96, "cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20),
              "use_linear_projection": True, "upcast_attention": True},
        vae={**_VAE_COMMON, "sample_size": 768},
        text={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23, "num_attention_heads": 16,
              "hidden_act": "gelu", "projection_dim": 512, "max_position_embeddings": 77, "vocab_size": 49408,
              "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},
        scheduler_class="DDIMScheduler", scheduler={**_BETAS, "prediction_type": "v_prediction"},
        pad_token="!",
        model_index_extra={"safety_checker": [None, None],
                           "feature_extractor": ["transformers", "CLIPImageProcessor"],
                           "requires_safety_checker": False},
    ),
}


def get_arch(name: str) -> Arch:
    if name not in ARCHS:
        raise BaseBuildError(f"--arch {name!r} is not known; choose one of {', '.join(ARCHS)}")
    return ARCHS[name]


# --------------------------------------------------------------------------------------- CLIP's tokenizer
def bytes_to_unicode() -> dict[int, str]:
    """CLIP's byte -> printable character table (simple_tokenizer.py; GPT-2 uses the same one)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def clip_bpe_path() -> Path:
    """open_clip's copy of CLIP's BPE file, found without importing open_clip (that import pulls in timm)."""
    spec = importlib.util.find_spec("open_clip")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        if (Path(folder) / BPE_FILE).exists():
            return Path(folder) / BPE_FILE
    raise BaseBuildError(f"CLIP's BPE file {BPE_FILE} not found: `pip install open_clip_torch` (it ships the file)")


def clip_vocab_and_merges(bpe: Path | None = None) -> tuple[dict[str, int], list[str]]:
    """vocab.json's mapping and merges.txt's lines, built the way CLIP's simple_tokenizer.py builds its vocab."""
    with gzip.open(bpe or clip_bpe_path()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1:CLIP_MERGES + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def write_clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> None:
    vocab, merges = clip_vocab_and_merges()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special}, indent=2))


# --------------------------------------------------------------------------------------- the folder
def build_components(arch: Arch, device: str = "cpu") -> dict:
    """U-Net, VAE and CLIP text encoder with random weights (`device="meta"`: shapes only, no memory)."""
    # lazy: diffusers and transformers take seconds to import
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device(device):
        return {
            "unet": UNet2DConditionModel(**arch.unet),
            "vae": AutoencoderKL(**arch.vae),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**arch.text)),
        }


def build_random_base(arch: str | Arch, out: Path, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """Write a diffusers folder with `arch`'s exact architecture (a name in ARCHS, or an Arch: tests build a
    small one with the same files), CLIP's tokenizer, random weights in `dtype` safetensors."""
    import diffusers  # lazy: slow to import
    from transformers import CLIPTokenizer

    arch = get_arch(arch) if isinstance(arch, str) else arch
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    for name, module in build_components(arch).items():
        module.to(dtype).save_pretrained(out / name)
        del module  # one component in memory at a time: the U-Net alone is 3.4 GB in fp32
    # from_config: the published file keeps keys a class ignores (PNDM has no clip_sample)
    getattr(diffusers, arch.scheduler_class).from_config(arch.scheduler).save_pretrained(out / "scheduler")
    write_clip_tokenizer(out / "tokenizer", arch.pad_token)
    CLIPTokenizer.from_pretrained(out / "tokenizer")  # fails here, not in a stage, if the files are wrong
    (out / "feature_extractor").mkdir(exist_ok=True)
    (out / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True,
         "do_normalize": True, "do_resize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
         "image_processor_type": "CLIPImageProcessor", "image_std": [0.26862954, 0.26130258, 0.27577711],
         "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 224}}, indent=2))
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", arch.scheduler_class], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], **arch.model_index_extra}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "stablesdg_random.json").write_text(json.dumps(
        {"arch": arch.name, "architecture_of": arch.hub_id, "seed": seed, "dtype": str(dtype).split(".")[-1],
         "note": "random weights: for checking a setup, not for images"}, indent=2) + "\n")
    return out
