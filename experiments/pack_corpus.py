"""Re-encode a pretraining corpus compactly (grey WebP) to carry it to a GPU machine, with PACKING.json.

The device tool carries at most 64 MiB; the surface corpus is 121 MB of colour JPEGs. `stablesdg prior
pretrain` copies PACKING.json (source folder, its manifest sha256, format) into the prior's recipe.json.

    python experiments/pack_corpus.py ../shared/datasets/surface-corpus .gpu/corpus --quality 80
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from stablesdg.pretraining.corpus import image_files, manifest_sha256
from stablesdg.pretraining.prior import PACKING_FILE
from stablesdg.utils import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--quality", type=int, default=80)
    args = parser.parse_args()
    paths = image_files(args.source)
    total = 0
    for path in tqdm(paths, desc="pack"):
        out = (args.dest / path.relative_to(args.source)).with_suffix(".webp")
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as img:
            img.convert("L").save(out, "WEBP", quality=args.quality, method=6)
        total += out.stat().st_size
    write_json(args.dest / PACKING_FILE, {
        "source": args.source.name, "source_images": len(paths),
        "source_manifest_sha256": manifest_sha256(args.source, paths),
        "format": f"grey WebP quality {args.quality}, same size", "packed_mib": round(total / 2**20, 1)})
    print(f"{len(paths)} images -> {args.dest}: {total / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
