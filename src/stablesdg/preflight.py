"""Checks on the base model before an hour of GPU time is spent: `stablesdg check-base` prints them, and the
adapt / search / generate stages run the same checks and stop with the same message.

- completeness, file by file: what diffusers will load for every component `model_index.json` lists (the safety
  checker and its feature extractor are never loaded: we pass `safety_checker=None`);
- the architecture (from the component configs) and the scheduler's prediction type;
- each class's initializer word: one token of this tokenizer, else the nearest single-token alternatives;
- a memory estimate for the chosen resolution, batch, precision and checkpointing, and the device.

The files listed here are also the base model's fingerprint: only they are hashed, not multi-GB single-file
checkpoints that a hub download puts beside the diffusers folders.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from .config import ModelConfig, Params
from .diffusion import BaseModelError, offline_hint, portable_path, resolve_base_model
from .utils import pick_device, sha256_file

NOT_LOADED = ("safety_checker", "feature_extractor", "image_encoder")  # passed as None by load_base_pipeline
WEIGHTS = {  # the file from_pretrained picks, in its order of preference (no variant)
    "diffusers": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "transformers": ("model.safetensors", "pytorch_model.bin"),
}
EMBEDDING_KEY = "text_model.embeddings.token_embedding.weight"
GIB = 1024 ** 3
# Training activations + gradients + AdamW state per image at 512 px in fp32 without gradient checkpointing,
# SD 1.5 size: the measured adapt peak on CPU (11.0 GiB, issue 23) less the fp32 weights (4.0 GiB). Scaled by
# pixels, batch and bytes per activation; checkpointing keeps about a third (diffusers' docs: "~1/3").
ACTIVATION_GIB_512 = 7.0
CHECKPOINTING_FACTOR = 0.35
REAL_SIZE_PARAMS = 500_000_000  # above this the model is real-size (SD 1.5's U-Net: 860 M)


@dataclass
class FileCheck:
    path: str
    present: bool
    size: int = 0


@dataclass
class BaseReport:
    """What check-base found; `problems` non-empty means the stages would stop."""

    source: str
    folder: Path | None
    files: list[FileCheck] = field(default_factory=list)
    not_loaded: list[str] = field(default_factory=list)
    architecture: dict = field(default_factory=dict)
    initializers: list[dict] = field(default_factory=list)
    memory: dict = field(default_factory=dict)
    device: str = "cpu"
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def loaded_files(self) -> list[Path]:
        assert self.folder is not None
        return [self.folder / f.path for f in self.files if f.present]


# --------------------------------------------------------------------------------------- files
def local_folder(model_cfg: ModelConfig) -> Path | None:
    """The folder `from_pretrained` reads: a local path, or a hub id's snapshot in the Hugging Face cache."""
    source, revision = resolve_base_model(model_cfg)
    if Path(source).is_dir():
        return Path(source)
    if Path(source).exists() or source.startswith((".", "/")) or source.count("/") != 1:
        return None
    from huggingface_hub import snapshot_download  # lazy: only for hub ids

    try:
        return Path(snapshot_download(source, revision=revision, local_files_only=True))
    except Exception:  # not in the cache (or no such repo): reported by the caller
        return None


def component_files(folder: Path, name: str, library: str, class_name: str) -> list[FileCheck]:
    """The files from_pretrained reads for one component of model_index.json."""
    sub = folder / name

    def check(rel: str) -> FileCheck:
        path = sub / rel
        return FileCheck(f"{name}/{rel}", path.is_file(), path.stat().st_size if path.is_file() else 0)

    if class_name.endswith("Tokenizer"):
        if (sub / "tokenizer.json").is_file():
            return [check("tokenizer.json")]
        return [check("vocab.json"), check("merges.txt")]
    if class_name.endswith("Scheduler"):
        return [check("scheduler_config.json")]
    names = WEIGHTS.get(library, WEIGHTS["diffusers"])
    for weight in names:
        index = sub / f"{weight}.index.json"
        if index.is_file():  # sharded: the index and every shard it names
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [check("config.json"), check(index.name), *(check(s) for s in shards)]
    weight = next((w for w in names if (sub / w).is_file()), names[0])
    return [check("config.json"), check(weight)]


def check_files(folder: Path, report: BaseReport) -> dict:
    """Fill report.files; returns model_index.json (empty when it is missing)."""
    index_path = folder / "model_index.json"
    report.files.append(FileCheck("model_index.json", index_path.is_file()))
    if not index_path.is_file():
        report.problems.append(f"{index_path}: missing; not a diffusers folder (see README 'Base model')")
        return {}
    index = json.loads(index_path.read_text())
    for name, spec in sorted(index.items()):
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        if name in NOT_LOADED:
            report.not_loaded.append(name)
            continue
        report.files += component_files(folder, name, spec[0], spec[1])
    report.problems += [f"{folder / f.path}: missing" for f in report.files if not f.present]
    return index


def base_fingerprint(report: BaseReport) -> str:
    """sha256 over the files diffusers loads (names + contents): another file beside them changes nothing."""
    digest = hashlib.sha256()
    for f in sorted(report.files, key=lambda f: f.path):
        if f.present:
            digest.update(f.path.encode())
            digest.update(sha256_file(report.folder / f.path).encode())  # type: ignore[operator]
    return digest.hexdigest()


def base_model_fingerprint(model_cfg: ModelConfig) -> str:
    """The base model's identity: a local folder (or cached snapshot) by the files diffusers loads from it (a
    re-pretrained prior is another model under the same path), an uncached hub id by id@revision."""
    source, revision = resolve_base_model(model_cfg)
    folder = local_folder(model_cfg)
    if folder is None:
        return f"{source}@{revision}"
    report = BaseReport(source=source, folder=folder)
    check_files(folder, report)
    return base_fingerprint(report)


# --------------------------------------------------------------------------------------- architecture
def safetensors_params(path: Path) -> int:
    """Parameter count from a safetensors header (no tensor is read)."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    count = 0
    for key, meta in header.items():
        if key != "__metadata__":
            n = 1
            for d in meta["shape"]:
                n *= d
            count += n
    return count


def _read_config(folder: Path, rel: str) -> dict:
    path = folder / rel
    return json.loads(path.read_text()) if path.is_file() else {}


def describe_architecture(folder: Path, report: BaseReport) -> dict:
    unet = _read_config(folder, "unet/config.json")
    vae = _read_config(folder, "vae/config.json")
    text = _read_config(folder, "text_encoder/config.json")
    sched = _read_config(folder, "scheduler/scheduler_config.json")
    params: dict[str, int] = {}
    for f in report.files:
        if f.present and f.path.endswith(".safetensors"):
            component = f.path.split("/")[0]
            params[component] = params.get(component, 0) + safetensors_params(folder / f.path)
    cross = unet.get("cross_attention_dim")
    family = {768: "SD 1.x", 1024: "SD 2.x"}.get(cross or 0, "not SD 1.x/2.x" if cross else "unknown")
    latent = len(vae.get("block_out_channels", [1])) - 1
    return {
        "family": family,
        "unet_channels": unet.get("block_out_channels"), "cross_attention_dim": cross,
        "text_layers": text.get("num_hidden_layers"), "text_hidden": text.get("hidden_size"),
        "text_act": text.get("hidden_act"), "vae_channels": vae.get("block_out_channels"),
        "latent_channels": vae.get("latent_channels"), "scaling_factor": vae.get("scaling_factor", 0.18215),
        "native_resolution": vae.get("sample_size") or (unet.get("sample_size", 0) * 2 ** latent),
        "prediction_type": sched.get("prediction_type", "epsilon"), "scheduler": sched.get("_class_name"),
        "parameters": params,
    }


# --------------------------------------------------------------------------------------- initializers
def single_token_words(vocab: dict[str, int]) -> dict[str, int]:
    return {tok[:-4]: i for tok, i in vocab.items() if tok.endswith("</w>") and tok[:-4].isalpha()}


def nearest_single_tokens(tokenizer, word: str, embeddings=None, k: int = 5) -> list[str]:
    """Single-token words near `word`: its own leading pieces (`pitted` -> `pit`), the closest spellings, and,
    when the text encoder's embeddings are given, the words whose embedding is closest to the mean of `word`'s
    pieces (with real weights that is the meaning; with random weights, noise)."""
    vocab = tokenizer.get_vocab()
    words = single_token_words(vocab)
    pieces = [word[:n] for n in range(len(word) - 1, 2, -1) if word[:n] in words]
    spelled = difflib.get_close_matches(word, list(words), n=k, cutoff=0.6)
    near: list[str] = []
    if embeddings is not None:
        import torch  # lazy: the checks import no torch unless weights are read

        ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(word))
        rows = torch.tensor([i for i in words.values() if i < len(embeddings)])
        table = embeddings[rows].float()
        query = embeddings[ids].float().mean(0)
        sims = torch.nn.functional.cosine_similarity(table, query[None], dim=1)
        names = [w for w, i in words.items() if i < len(embeddings)]
        near = [names[i] for i in sims.topk(k).indices.tolist()]
    return list(dict.fromkeys([*pieces, *spelled, *near]))[:k + 3]


def initializer_problem(tokenizer, cls: str, word: str, embeddings=None) -> dict:
    """One class's initializer check: {'class', 'word', 'tokens', 'ok', 'alternatives'}."""
    tokens = tokenizer.tokenize(word)
    out = {"class": cls, "word": word, "tokens": tokens, "ok": len(tokens) == 1}
    if not out["ok"]:
        out["alternatives"] = nearest_single_tokens(tokenizer, word, embeddings)
    return out


def initializer_message(check: dict) -> str:
    pieces = "|".join(t.removesuffix("</w>") for t in check["tokens"])
    return (f"classes.{check['class']}.initializer: {check['word']!r} is {len(check['tokens'])} tokens for this "
            f"tokenizer ({pieces}); use a single-token word, e.g. {', '.join(check.get('alternatives', []))}")


def read_embeddings(folder: Path, report: BaseReport):
    """The text encoder's token-embedding table, read alone from its safetensors file (None if not there)."""
    from safetensors import safe_open  # lazy: only when weights are read

    for f in report.files:
        if f.present and f.path.startswith("text_encoder/") and f.path.endswith(".safetensors"):
            with safe_open(folder / f.path, framework="pt") as st:
                if EMBEDDING_KEY in st.keys():  # noqa: SIM118  safe_open has no __contains__
                    return st.get_tensor(EMBEDDING_KEY)
    return None


def check_initializers(folder: Path, params: Params, classes: list[str], report: BaseReport) -> None:
    from transformers import CLIPTokenizer  # lazy: slow to import

    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    embeddings = None
    for cls in classes:
        check = initializer_problem(tokenizer, cls, params.class_config(cls).initializer)
        if not check["ok"]:
            if embeddings is None:
                embeddings = read_embeddings(folder, report)
            check = initializer_problem(tokenizer, cls, check["word"], embeddings)
            report.problems.append(initializer_message(check))
        report.initializers.append(check)


# --------------------------------------------------------------------------------------- memory, device
def precision_of(params: Params, device: str) -> str:
    if not device.startswith("cuda") or params.adapt.mixed_precision == "no":
        return "fp32"
    return "bf16/fp16" if params.adapt.mixed_precision == "auto" else params.adapt.mixed_precision


def memory_estimate(n_params: int, resolution: int, batch: int, precision: str, checkpointing: bool) -> dict:
    """GiB for training (fp32 master weights + activations) and for generation (weights in the precision)."""
    act_bytes = 4 if precision == "fp32" else 2
    activations = ACTIVATION_GIB_512 * (resolution / 512) ** 2 * batch * act_bytes / 4
    if checkpointing:
        activations *= CHECKPOINTING_FACTOR
    weights = n_params * 4 / GIB
    return {"train_gib": round(weights + activations, 1), "weights_gib": round(weights, 1),
            "generate_gib": round(n_params * act_bytes / GIB + 1.0 * (resolution / 512) ** 2, 1),
            "resolution": resolution, "batch": batch, "precision": precision, "checkpointing": checkpointing}


def check_memory_and_device(params: Params, report: BaseReport) -> None:
    device = pick_device(params.adapt.device)
    report.device = device
    n_params = sum(report.architecture.get("parameters", {}).values())
    precision = precision_of(params, device)
    checkpointing = params.adapt.gradient_checkpointing and device.startswith("cuda")
    batch = max(params.adapt.embedding.batch_size, params.adapt.lora.batch_size)
    report.memory = memory_estimate(n_params, params.model.resolution, batch, precision, checkpointing)
    if device == "cpu" and n_params > REAL_SIZE_PARAMS:
        report.warnings.append(
            f"a real-size model ({n_params / 1e6:.0f} M parameters) would train in fp32 on the CPU: 15-20 s a step "
            f"on 2 idle cores at 512 px (measured; a minute under load), up to ~{report.memory['train_gib']} GiB at "
            f"{params.model.resolution} px; use a GPU "
            "(adapt.device: cuda) for real runs")
    native = report.architecture.get("native_resolution")
    if native and params.model.resolution not in (native, native // 2) and n_params > REAL_SIZE_PARAMS:
        report.warnings.append(f"model.resolution {params.model.resolution} differs from the model's native "
                               f"{native} px")


# --------------------------------------------------------------------------------------- the whole check
def check_base(params: Params, classes: list[str] | None = None, memory: bool = True) -> BaseReport:
    """All checks on `model.base` for `classes` (default: every class in params)."""
    source, _ = resolve_base_model(params.model)
    folder = local_folder(params.model)
    report = BaseReport(source=source, folder=folder)
    if folder is None:
        report.problems.append(offline_hint(source))
        return report
    check_files(folder, report)
    if report.problems:
        return report
    report.architecture = describe_architecture(folder, report)
    check_initializers(folder, params, list(params.classes) if classes is None else classes, report)
    if memory:
        check_memory_and_device(params, report)
    return report


def require_base(params: Params, classes: list[str] | None = None) -> BaseReport:
    """check_base, raising BaseModelError with check-base's own text when anything would stop a stage."""
    report = check_base(params, classes)
    if report.problems:
        raise BaseModelError("base model check failed (`stablesdg check-base` shows the full report):\n  "
                             + "\n  ".join(report.problems))
    return report


def render_report(report: BaseReport) -> str:
    lines = [f"base model: {report.source}" + (f" -> {report.folder}" if report.folder and
                                                 str(report.folder) != report.source else "")]
    if report.files:
        lines.append("files (what diffusers loads):")
        lines += [f"  {'ok     ' if f.present else 'MISSING'}  {f.path}"
                  + (f" ({f.size / 1e6:.1f} MB)" if f.size > 1e6 else "") for f in report.files]
    if report.not_loaded:
        lines.append(f"  listed, not loaded: {', '.join(report.not_loaded)} (loaded with safety_checker=None, "
                     "feature_extractor=None)")
    a = report.architecture
    if a:
        counts = ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in sorted(a["parameters"].items()))
        lines += [f"architecture: {a['family']}: U-Net {a['unet_channels']} cross-attention "
                  f"{a['cross_attention_dim']}; text encoder {a['text_layers']} x {a['text_hidden']} "
                  f"{a['text_act']}; VAE {a['vae_channels']}, {a['latent_channels']} latent channels, scaling "
                  f"{a['scaling_factor']}; native {a['native_resolution']} px",
                  f"parameters: {counts}",
                  f"prediction type: {a['prediction_type']} ({a['scheduler']})"]
    if report.initializers:
        lines.append("initializers:")
        for c in report.initializers:
            lines.append(f"  ok       {c['class']}: {c['word']!r} is one token" if c["ok"]
                         else f"  FAIL     {initializer_message(c)}")
    m = report.memory
    if m:
        lines += [f"memory estimate: adapt ~{m['train_gib']} GiB ({m['resolution']} px, batch {m['batch']}, "
                  f"{m['precision']}, gradient checkpointing {'on' if m['checkpointing'] else 'off'}; fp32 "
                  f"weights {m['weights_gib']} GiB), generate ~{m['generate_gib']} GiB",
                  f"device: {report.device}"]
    lines += [f"warning: {w}" for w in report.warnings]
    lines.append("result: OK" if not report.problems else
                 f"result: FAILED ({len(report.problems)} problem{'s' if len(report.problems) > 1 else ''})")
    lines += [f"  {p}" for p in report.problems if not p.startswith("classes.")]
    return "\n".join(lines)


def fingerprint_record(report: BaseReport) -> dict:
    """What the `check-base` DVC stage writes: changes only when the loaded files or the architecture do."""
    return {"source": portable_path(report.source), "fingerprint": base_fingerprint(report),
            "files": [f.path for f in report.files if f.present], "architecture": report.architecture}
