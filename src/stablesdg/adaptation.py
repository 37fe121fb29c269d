"""Generator adaptation for one defect class: textual inversion, then LoRA on the U-Net and the text encoder.

Follows diffusers' `textual_inversion.py` and `train_dreambooth_lora.py` examples: explicit loops, the
noise-prediction loss, and the standard files `learned_embeds.safetensors` / `pytorch_lora_weights.safetensors`
that stock `load_textual_inversion` / `load_lora_weights` read.

Every random draw of step `s` (images, augmentation, prompt, noise, timestep) comes from a generator seeded with
(seed, class, stage, s). A run resumed from a checkpoint therefore replays exactly the steps an uninterrupted run
would have made.

Several GPUs: `accelerate launch --num_processes N -m stablesdg.cli adapt --class C` runs N data-parallel
replicas (each draws its own batch, gradients are averaged, so the effective batch is N x batch_size); only the
main process writes checkpoints, adapter files and MLflow records. The replicas' helpers and the checkpoints
(fingerprint, save, load) live in `adaptation_state.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import reduce
from PIL import Image
from safetensors.torch import save_file
from tqdm import tqdm

from .adaptation_state import (
    average_gradients,
    check_replicas_in_sync,
    checkpoint_fingerprint,
    load_checkpoint,
    process_state,
    rank_parts,
    restore_trainable,
    save_checkpoint,
)
from .config import AdaptConfig, AugmentConfig, LoraStageConfig, Params
from .data import split_paths
from .diffusion import EMBEDS_FILE, LORA_FILE, UNET_DIR, base_model_record, load_base_pipeline
from .errors import AdaptationError
from .preflight import initializer_message, initializer_problem
from .utils import canonical_safetensors_header, derive_seed, pick_device, sha256_file, write_json

UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class ClassData:
    """The class's few real images as a [-1, 1] RGB tensor at the model's resolution."""

    name: str
    placeholder: str
    initializer: str
    pixels: torch.Tensor  # (N, 3, R, R)
    files: list[Path]


@dataclass
class TrainState:
    stage: str
    step: int = 0


def load_class_images(paths: list[Path], resolution: int) -> torch.Tensor:
    if not paths:
        raise AdaptationError("no training images for this class: run the ingest stage first")
    arrays = []
    for path in paths:
        with Image.open(path) as img:
            rgb = img.convert("RGB").resize((resolution, resolution), Image.BICUBIC)
        arrays.append(np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def sample_batch(data: ClassData, aug: AugmentConfig, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    """Random images with the flips and 90-degree rotations that suit rolled-steel textures."""
    idx = torch.randint(len(data.pixels), (batch_size,), generator=gen)
    batch = data.pixels[idx].clone()
    for i in range(batch_size):
        flips = torch.randint(2, (3,), generator=gen).tolist()
        turns = int(torch.randint(4, (1,), generator=gen))
        if aug.hflip and flips[0]:
            batch[i] = batch[i].flip(-1)
        if aug.vflip and flips[1]:
            batch[i] = batch[i].flip(-2)
        if aug.rot90 and turns:
            batch[i] = torch.rot90(batch[i], turns, dims=(-2, -1))
    return batch


def prompt_ids(pipe, data: ClassData, templates: list[str], batch_size: int, gen: torch.Generator) -> torch.Tensor:
    picks = torch.randint(len(templates), (batch_size,), generator=gen).tolist()
    prompts = [templates[i].format(data.placeholder) for i in picks]
    tok = pipe.tokenizer
    return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


def diffusion_loss(pipe, pixels: torch.Tensor, input_ids: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The standard denoising objective (epsilon or v-prediction, as the scheduler says)."""
    device = pipe.unet.device
    with torch.no_grad():
        dist = pipe.vae.encode(pixels.to(device, pipe.vae.dtype)).latent_dist
        latents = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen).to(device)
        latents = latents * pipe.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=gen).to(device, latents.dtype)
    sched = pipe.scheduler
    t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=gen).to(device)
    noisy = sched.add_noise(latents, noise, t)
    hidden = pipe.text_encoder(input_ids.to(device))[0]
    pred = pipe.unet(noisy, t, encoder_hidden_states=hidden).sample
    target = sched.get_velocity(latents, noise, t) if sched.config.prediction_type == "v_prediction" else noise
    return F.mse_loss(pred.float(), target.float())


# --------------------------------------------------------------------------------------- stage 1
def add_placeholder_token(pipe, placeholder: str, initializer: str, cls: str = "*") -> int:
    """Add `placeholder` to the tokenizer, its embedding row initialised from the initializer word."""
    init_ids = pipe.tokenizer.encode(initializer, add_special_tokens=False)
    if len(init_ids) != 1:  # check-base and the stage's preflight stop earlier; this guards library callers
        emb = pipe.text_encoder.get_input_embeddings().weight.detach()
        raise AdaptationError(initializer_message(initializer_problem(pipe.tokenizer, cls, initializer, emb)))
    if pipe.tokenizer.add_tokens(placeholder) != 1:
        raise AdaptationError(f"model.placeholder: {placeholder!r} already exists in the tokenizer")
    token_id = pipe.tokenizer.convert_tokens_to_ids(placeholder)
    pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer), mean_resizing=False)
    with torch.no_grad():
        emb = pipe.text_encoder.get_input_embeddings().weight
        emb[token_id] = emb[init_ids[0]].clone()
    return token_id


def freeze_all(pipe) -> None:
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)


def autocast_dtype(cfg: AdaptConfig, device: str) -> torch.dtype | None:
    """Mixed precision on CUDA only (bf16 where supported under `auto`); CPU trains in fp32."""
    choice = cfg.mixed_precision
    if not device.startswith("cuda") or choice == "no":
        return None
    if choice == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[choice]


def enable_cuda_speedups(pipe, cfg: AdaptConfig, device: str) -> None:
    """SDPA attention (diffusers' default processor on torch 2) and gradient checkpointing on CUDA."""
    if not device.startswith("cuda"):
        return
    from diffusers.models.attention_processor import AttnProcessor2_0  # lazy: diffusers is slow to import

    pipe.unet.set_attn_processor(AttnProcessor2_0())
    if cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        pipe.text_encoder.gradient_checkpointing_enable()


def training_steps(pipe, data: ClassData, cfg: AdaptConfig, seed: int, stage: str, batch_size: int,
                   state: TrainState, optimizer: torch.optim.Optimizer, until: int,
                   after_step: Callable[[], None] | None = None) -> Iterator[float]:
    """The shared diffusion-loss loop; each step's randomness comes from (seed, class, stage, step) alone."""
    device = str(pipe.unet.device)
    dtype = autocast_dtype(cfg, device)
    dist = process_state()
    # fp16 needs loss scaling against underflow; bf16 and fp32 do not.
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    while state.step < until:
        gen = torch.Generator().manual_seed(derive_seed(seed, data.name, stage, state.step, *rank_parts(dist)))
        pixels = sample_batch(data, cfg.augment, batch_size, gen)
        ids = prompt_ids(pipe, data, cfg.prompt_templates, batch_size, gen)
        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
            loss = diffusion_loss(pipe, pixels, ids, gen)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if dist.num_processes > 1:
            average_gradients(optimizer)
            loss = reduce(loss.detach(), "mean")
        scaler.step(optimizer)
        scaler.update()
        if after_step is not None:
            after_step()
        state.step += 1
        yield loss.item()


def embedding_steps(pipe, data: ClassData, cfg: AdaptConfig, seed: int, token_id: int, state: TrainState,
                    optimizer: torch.optim.Optimizer, until: int) -> Iterator[float]:
    """Train only the placeholder row; every other row is put back after each step."""
    emb = pipe.text_encoder.get_input_embeddings()
    original = emb.weight.detach().clone()
    keep = torch.ones(len(original), dtype=torch.bool)
    keep[token_id] = False

    @torch.no_grad()
    def restore_other_rows() -> None:
        emb.weight[keep] = original[keep]

    yield from training_steps(pipe, data, cfg, seed, "embedding", cfg.embedding.batch_size, state, optimizer,
                              until, restore_other_rows)


# --------------------------------------------------------------------------------------- stage 2
def inject_lora(pipe, cfg: LoraStageConfig) -> None:
    """LoRA layers on the attention projections, through peft's injection API; with `unet: full` the U-Net
    gets none and trains every weight instead.

    `CLIPTextModel.add_adapter` breaks with transformers 5.24 + peft 0.21, so both models use
    `inject_adapter_in_model` (diffusers' own `unet.add_adapter` does the same underneath).
    """
    from peft import LoraConfig, inject_adapter_in_model  # lazy: peft is slow to import

    def lora(targets: list[str]) -> LoraConfig:
        return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights="gaussian", target_modules=targets)

    if cfg.unet == "lora":
        inject_adapter_in_model(lora(UNET_LORA_TARGETS), pipe.unet, adapter_name="default")
    if cfg.train_text_encoder:
        inject_adapter_in_model(lora(TEXT_LORA_TARGETS), pipe.text_encoder, adapter_name="default")
    for name, p in pipe.unet.named_parameters():
        p.requires_grad_(cfg.unet == "full" or "lora_" in name)
    for name, p in pipe.text_encoder.named_parameters():
        p.requires_grad_("lora_" in name)


def lora_param_groups(pipe, cfg: LoraStageConfig) -> list[dict]:
    unet = [p for p in pipe.unet.parameters() if p.requires_grad]
    text = [p for n, p in pipe.text_encoder.named_parameters() if "lora_" in n]
    groups = [{"params": unet, "lr": cfg.unet_learning_rate}]
    if text:
        groups.append({"params": text, "lr": cfg.text_learning_rate})
    return groups


def lora_steps(pipe, data: ClassData, cfg: AdaptConfig, seed: int, state: TrainState,
               optimizer: torch.optim.Optimizer, until: int) -> Iterator[float]:
    pipe.unet.train()
    pipe.text_encoder.train()
    yield from training_steps(pipe, data, cfg, seed, "lora", cfg.lora.batch_size, state, optimizer, until)


def lora_state_dicts(pipe) -> tuple[dict, dict]:
    """The U-Net's and the text encoder's LoRA layers ({} for a model without any)."""
    # lazy: diffusers and peft are slow to import
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    def layers(model) -> dict:
        has_lora = any("lora_" in n for n, _ in model.named_parameters())
        return convert_state_dict_to_diffusers(get_peft_model_state_dict(model)) if has_lora else {}

    return layers(pipe.unet), layers(pipe.text_encoder)


def save_adapter(pipe, data: ClassData, token_id: int, cfg: LoraStageConfig, out_dir: Path) -> dict[str, str]:
    """Write learned_embeds.safetensors, pytorch_lora_weights.safetensors and, with `unet: full`, the U-Net
    folder (what `UNet2DConditionModel.from_pretrained(out_dir, subfolder="unet")` reads); returns their sha256."""
    from diffusers import StableDiffusionPipeline  # lazy: diffusers is slow to import

    out_dir.mkdir(parents=True, exist_ok=True)
    row = pipe.text_encoder.get_input_embeddings().weight[token_id].detach().cpu().clone()
    save_file({data.placeholder: row[None]}, out_dir / EMBEDS_FILE)
    unet_sd, text_sd = lora_state_dicts(pipe)
    meta = {"r": cfg.rank, "lora_alpha": cfg.alpha}
    StableDiffusionPipeline.save_lora_weights(
        out_dir, unet_lora_layers=unet_sd or None, text_encoder_lora_layers=text_sd or None, weight_name=LORA_FILE,
        unet_lora_adapter_metadata={**meta, "target_modules": UNET_LORA_TARGETS} if unet_sd else None,
        text_encoder_lora_adapter_metadata={**meta, "target_modules": TEXT_LORA_TARGETS} if text_sd else None,
    )
    canonical_safetensors_header(out_dir / LORA_FILE)
    written = [EMBEDS_FILE, LORA_FILE]
    if cfg.unet == "full":
        pipe.unet.save_pretrained(out_dir / UNET_DIR, safe_serialization=True)
        written += [f"{UNET_DIR}/{f.name}" for f in sorted((out_dir / UNET_DIR).iterdir())]
    return {name: sha256_file(out_dir / name) for name in written}


# --------------------------------------------------------------------------------------- driver
@dataclass
class AdaptRun:
    """One class's adaptation: both stages with checkpoints, resumable, optionally stopped early."""

    params: Params
    data: ClassData
    out_dir: Path
    checkpoint_dir: Path
    device: str = "cpu"
    max_steps_this_run: int | None = None  # stop after this many steps (tests, time-boxed runs)
    stages: tuple[str, ...] = ("embedding", "lora")
    on_step: Callable[[str, int, float], Any] | None = None  # (stage, step, loss), e.g. MLflow logging
    losses: list[tuple[int, str, float]] = field(default_factory=list)

    def steps_for(self, stage: str) -> int:
        cls_cfg = self.params.class_config(self.data.name)
        if stage == "embedding":
            override, default = cls_cfg.embedding_steps, self.params.adapt.embedding.steps
        else:
            override, default = cls_cfg.lora_steps, self.params.adapt.lora.steps
        return default if override is None else override

    def run(self, pipe) -> dict | None:
        """Adapt `pipe` in place. Returns the adapter record, or None when stopped before the end."""
        freeze_all(pipe)
        token_id = add_placeholder_token(pipe, self.data.placeholder, self.data.initializer, self.data.name)
        fp = checkpoint_fingerprint(self.params, self.data)
        ckpt = load_checkpoint(self.checkpoint_dir / "checkpoint.pt", fp)
        self.losses = list(ckpt["losses"]) if ckpt else []
        budget = [self.max_steps_this_run]
        for stage in ("embedding", "lora"):
            if stage == "embedding" and ckpt and ckpt["stage"] == "lora":
                continue  # stage 1 had finished; its row is restored from the stage-2 checkpoint
            resume = ckpt if ckpt and ckpt["stage"] == stage else None
            if not self._run_stage(pipe, stage, token_id, resume, fp, budget):
                return None
        dist = process_state()
        if dist.num_processes > 1:
            check_replicas_in_sync(pipe)
        if not dist.is_main_process:
            return None
        hashes = save_adapter(pipe, self.data, token_id, self.params.adapt.lora, self.out_dir)
        return self._record(hashes, dist.num_processes)

    def _optimizer(self, pipe, stage: str) -> torch.optim.Optimizer:
        if stage == "embedding":
            emb = pipe.text_encoder.get_input_embeddings().weight
            emb.requires_grad_(True)
            return torch.optim.AdamW([emb], lr=self.params.adapt.embedding.learning_rate, weight_decay=0.0)
        cfg = self.params.adapt.lora
        # LoRA's random init must not depend on what ran before it (a resumed run skips stage 1).
        torch.manual_seed(derive_seed(self.params.seed, self.data.name, "lora-init"))
        inject_lora(pipe, cfg)
        pipe.text_encoder.get_input_embeddings().weight.requires_grad_(False)
        return torch.optim.AdamW(lora_param_groups(pipe, cfg), weight_decay=1e-2)

    def _run_stage(self, pipe, stage: str, token_id: int, ckpt: dict | None, fp: str, budget: list) -> bool:
        total = self.steps_for(stage) if stage in self.stages else 0
        optimizer = self._optimizer(pipe, stage)
        state = TrainState(stage)
        if ckpt:
            restore_trainable(pipe, ckpt["weights"])
            if ckpt["optimizer"] is not None:
                optimizer.load_state_dict(ckpt["optimizer"])
            state.step = ckpt["step"]
        if stage == "embedding":
            steps = embedding_steps(pipe, self.data, self.params.adapt, self.params.seed, token_id, state, optimizer,
                                    total)
        else:
            steps = lora_steps(pipe, self.data, self.params.adapt, self.params.seed, state, optimizer, total)
        ckpt_path = self.checkpoint_dir / "checkpoint.pt"
        bar = tqdm(steps, total=total - state.step, desc=f"{self.data.name} {stage}", leave=False)
        for loss in bar:
            self.losses.append((state.step, stage, loss))
            bar.set_postfix(loss=f"{loss:.4f}")
            if self.on_step:
                self.on_step(stage, state.step, loss)
            at_checkpoint = state.step % self.params.adapt.checkpoint_every == 0 or state.step == total
            if at_checkpoint and process_state().is_main_process:
                save_checkpoint(ckpt_path, pipe, optimizer, state, fp, self.losses)
            if budget[0] is not None:
                budget[0] -= 1
                if budget[0] <= 0 and state.step < total:
                    return False
        if stage == "embedding" and process_state().is_main_process:  # hand the row to stage 2 (fresh optimizer)
            save_checkpoint(ckpt_path, pipe, None, TrainState("lora"), fp, self.losses)
        return True

    def _record(self, hashes: dict[str, str], num_processes: int) -> dict:
        final = {stage: next((loss for _, s, loss in reversed(self.losses) if s == stage), None)
                 for stage in ("embedding", "lora")}
        record = {
            "class": self.data.name, "placeholder": self.data.placeholder, "initializer": self.data.initializer,
            **base_model_record(self.params.model),
            "embedding_steps": self.steps_for("embedding") if "embedding" in self.stages else 0,
            "lora_steps": self.steps_for("lora") if "lora" in self.stages else 0,
            "lora_rank": self.params.adapt.lora.rank, "lora_alpha": self.params.adapt.lora.alpha,
            "unet": self.params.adapt.lora.unet,
            "num_processes": num_processes,
            "train_images": [f.name for f in self.data.files], "final_loss": final, "sha256": hashes,
        }
        write_json(self.out_dir / "adapter.json", record)
        return record


def class_data(params: Params, processed: Path, cls: str) -> ClassData:
    files = split_paths(processed, cls, "train")
    return ClassData(
        name=cls, placeholder=params.model.placeholder.format(cls=cls),
        initializer=params.class_config(cls).initializer,
        pixels=load_class_images(files, params.adapt.resolution or params.model.resolution), files=files,
    )


def prepare_adaptation(params: Params, cls: str, processed: Path, out_root: Path,
                       checkpoint_root: Path = Path(".cache/adapt"), max_steps_this_run: int | None = None,
                       stages: tuple[str, ...] = ("embedding", "lora")) -> tuple[Any, AdaptRun]:
    """The base model on its device and the class's AdaptRun, ready to `run` (with or without tracking)."""
    torch.manual_seed(params.seed)
    dist = process_state()
    # Under `accelerate launch` each process takes its own GPU (cuda:<local rank>).
    device = str(dist.device) if dist.num_processes > 1 and params.adapt.device == "auto" else \
        pick_device(params.adapt.device)
    with dist.main_process_first():  # one process builds or downloads the base model, the others then read it
        pipe = load_base_pipeline(params.model, device)
    enable_cuda_speedups(pipe, params.adapt, device)
    data = class_data(params, processed, cls)
    return pipe, AdaptRun(params, data, out_root / cls, checkpoint_root / cls, device, max_steps_this_run, stages)


def adapt_class(params: Params, cls: str, processed: Path, out_root: Path,
                checkpoint_root: Path = Path(".cache/adapt"), max_steps_this_run: int | None = None,
                stages: tuple[str, ...] = ("embedding", "lora")) -> tuple[Any, dict | None]:
    """Load the base model, adapt it to `cls`, save the adapter; returns (pipe, record or None)."""
    pipe, run = prepare_adaptation(params, cls, processed, out_root, checkpoint_root, max_steps_this_run, stages)
    record = run.run(pipe)
    process_state().wait_for_everyone()
    return pipe, record
