"""Small helpers shared by every stage: seeding, device choice, hashing, JSON output."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    import torch  # lazy: `stablesdg data demo|ingest` use these helpers without loading torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seed(*parts: Any) -> int:
    """A stable 63-bit seed from any parts (class, source image, index): same parts, same seed, any machine."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def pick_device(requested: str = "auto") -> str:
    import torch  # lazy: `stablesdg data demo|ingest` use these helpers without loading torch

    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(path: str | Path) -> str:
    """Content hash of a file or of a folder (relative names + file hashes), independent of mtimes."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(file.relative_to(path).as_posix().encode("utf-8", "surrogateescape"))
        try:
            h.update(sha256_file(file).encode())
        except OSError as err:  # unreadable to this user: named in the hash and the log, not fatal
            log.warning("sha256_tree: cannot read %s (%s); hashed as unreadable", file, err.strerror or err)
            h.update(b"unreadable")
    return h.hexdigest()


def write_json(path: str | Path, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)  # atomic: an interrupted stage never leaves half a JSON file
    return path


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def canonical_safetensors_header(path: Path) -> None:
    """Rewrite the header with sorted `__metadata__` keys: safetensors writes that map in hash order, which
    changes from process to process, so equal weights would otherwise give unequal bytes (and DVC hashes)."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    meta = header.pop("__metadata__", None)
    ordered = ({"__metadata__": dict(sorted(meta.items()))} if meta else {}) | header
    text = json.dumps(ordered, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keep the tensor data 8-byte aligned, as safetensors does
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + size :])
