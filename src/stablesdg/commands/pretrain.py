"""`stablesdg pretrain`: the networks pretrained on a surface corpus (the stand-in for web-scale data).

`stablesdg prior pretrain` makes the diffusion prior; this group makes the other two: the classifier backbone
that `classifier.weights_path` loads, and the surface feature network for FID/KID (`metrics.feature_net:
surface`). Each writes its weights and a JSON record (corpus manifest hash, recipe, device, time, sha256).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import click
import torch

from ..metrics import SURFACE_NET_DIR, SURFACE_SIZE
from ..pretraining.backbone import BackbonePretrainConfig, pretrain_backbone, save_body_weights
from ..pretraining.corpus import CorpusError, FolderCorpus
from ..pretraining.feature_net import SurfaceNetRecipe, pretrain_surface_net, save_surface_net
from ..stages.common import cli_errors
from ..utils import pick_device, sha256_file, write_json

corpus_option = click.option(
    "--corpus", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="folder of pretraining images, searched recursively; the first sub-folder names the source")


def open_corpus(path: Path, resolution: int) -> FolderCorpus:
    """The corpus, or the loader's error as a one-line CLI error (the same as `stablesdg prior pretrain`)."""
    try:
        return FolderCorpus(path, resolution)
    except CorpusError as err:
        raise click.ClickException(str(err)) from None


def write_record(weights: Path, record: dict) -> Path:
    out = weights.with_suffix(".json")
    write_json(out, {**record, "file": weights.name, "sha256": sha256_file(weights),
                     "size_mb": round(weights.stat().st_size / 2**20, 2)})
    return out


@click.group("pretrain")
def pretrain_group() -> None:
    """Pretrain the classifier backbone or the FID feature network on a surface corpus."""


@pretrain_group.command("backbone")
@corpus_option
@click.option("--backbone", default="resnet18", show_default=True)
@click.option("--epochs", default=5, show_default=True)
@click.option("--input-size", default=128, show_default=True)
@click.option("--out", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="default: models/pretrained/<backbone>_surface.safetensors")
@click.option("--threads", default=0, help="torch intra-op threads (0: torch's default)")
@click.option("--device", default="auto", show_default=True)
@cli_errors
def backbone_command(corpus: Path, backbone: str, epochs: int, input_size: int, out: Path | None,
                     threads: int, device: str) -> None:
    """Classifier backbone pretrained to tell the corpus sources apart (for classifier.weights_path)."""
    if threads:
        torch.set_num_threads(threads)
    out = out or Path("models/pretrained") / f"{backbone}_surface.safetensors"
    cfg = BackbonePretrainConfig(backbone=backbone, epochs=epochs, input_size=input_size)
    data = open_corpus(corpus, input_size)
    device = pick_device(device)
    started = time.time()
    model, stats = pretrain_backbone(data, cfg, device)
    record = {"recipe": asdict(cfg), "corpus": data.name, "corpus_images": len(data.images),
              "corpus_manifest_sha256": data.manifest_sha256(), "device": device,
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "seconds": round(time.time() - started, 1), **stats}
    save_body_weights(model, out, {"backbone": backbone, "recipe": json.dumps(asdict(cfg), sort_keys=True)})
    write_record(out, record)
    click.echo(f"backbone {backbone}: held-out source accuracy {stats['heldout_accuracy']:.3f} "
               f"in {record['seconds']} s -> {out}")


@pretrain_group.command("feature-net")
@corpus_option
@click.option("--epochs", default=8, show_default=True)
@click.option("--dim", default=64, show_default=True)
@click.option("--out", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="default: the copy shipped in the package")
@cli_errors
def feature_net_command(corpus: Path, epochs: int, dim: int, out: Path | None) -> None:
    """The surface feature network for FID/KID (metrics.feature_net: surface)."""
    out = out or SURFACE_NET_DIR
    data = open_corpus(corpus, SURFACE_SIZE)
    recipe = SurfaceNetRecipe(epochs=epochs, feature_dim=dim)
    started = time.time()
    net, stats = pretrain_surface_net(data, recipe)
    record = {"recipe": asdict(recipe), "corpus": data.name, "corpus_images": len(data.images),
              "corpus_manifest_sha256": data.manifest_sha256(), "torch": torch.__version__,
              "seconds": round(time.time() - started, 1), **stats}
    path = save_surface_net(net, out, record)
    click.echo(f"surface feature net: held-out source accuracy {stats['heldout_accuracy']:.3f} "
               f"in {record['seconds']} s -> {path}")
