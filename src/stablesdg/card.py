"""The model card: one self-contained HTML page per registered version, for the reviewer who approves it.

Logged as `model_card.html` to the version's training run and linked from the version description. Images
(real-vs-synthetic grids, the line images' plot) are embedded as base64, confusion matrices are HTML tables: the page needs no other
file, so it can be downloaded, mailed or archived as it is.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .utils import read_json

if TYPE_CHECKING:
    from .comparison import VariantResult
    from .registry import Registration

CARD_FILE = "model_card.html"
CARD_TAG = "model_card"  # version tag: the card's artifact path in the version's run
HASH_KEYS = ("git_commit", "git_dirty", "data_hash", "synthetic_hash", "test_set_sha256", "prior_recipe_sha256",
             "adapter_sha256", "feature_net")


@dataclass
class CardInputs:
    registration: Registration
    results: Sequence[VariantResult]
    class_names: Sequence[str]
    tags: Mapping[str, str]
    repeats: Mapping | None = None
    fid_per_class: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    grids_dir: Path | None = None


def _esc(value: object) -> str:
    return html.escape(str(value))


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _metrics_section(c: CardInputs) -> str:
    reg = c.registration
    rows = []
    for name in ("accuracy", "macro_f1"):
        champ = (f"{reg.champion_value:.4f} (v{reg.champion_before})"
                 if name == reg.primary_metric and reg.champion_value is not None else "-")
        rows.append([name, *(f"{r.evaluation.metric(name):.4f}" for r in c.results), champ])
    # equal numbers = equal optimizer steps (classifier.baseline_steps: equal): the gain is not extra training
    rows.append(["training images an epoch", *(str(r.epoch_size) for r in c.results), "-"])
    if len(c.results) == 2:  # real_only, real_plus_synthetic
        base, aug = c.results
        rows += [[f"gain {m} (this seed)", "-", f"{aug.evaluation.metric(m) - base.evaluation.metric(m):+.4f}", "-"]
                 for m in ("accuracy", "macro_f1")]
    out = _table(["test metric", *(r.variant for r in c.results), "current champion"], rows)
    if c.repeats and "seeds" in c.repeats:
        seeds = c.repeats["seeds"]
        rep_rows = [[f"gain {m}", f"{c.repeats[f'gain_{m}_mean']:+.4f}", f"{c.repeats[f'gain_{m}_std']:.4f}",
                     " ".join(f"{g:+.4f}" for g in c.repeats[f"gain_{m}"])]
                    for m in ("accuracy", "macro_f1") if f"gain_{m}_mean" in c.repeats]
        out += f"<p>Over {len(seeds)} seeds {seeds}:</p>" + _table(["", "mean", "std", "per seed"], rep_rows)
    return "<h2>Test metrics (real test set)</h2>" + out


def _per_class_section(c: CardInputs) -> str:
    parts = ["<h2>Per class</h2>"]
    for r in c.results:
        ev = r.evaluation
        rows = [[cls, f"{p:.3f}", f"{rc:.3f}"] for cls, p, rc in zip(c.class_names, ev.precision, ev.recall,
                                                                      strict=True)]
        parts.append(f"<h3>{_esc(r.variant)}</h3>" + _table(["class", "precision", "recall"], rows))
        matrix = [[f"true {cls}", *row] for cls, row in zip(c.class_names, ev.confusion.tolist(), strict=True)]
        parts.append("<p>Confusion matrix (rows: true class, columns: predicted)</p>"
                     + _table(["", *c.class_names], matrix))
    return "".join(parts)


def _synthetic_section(c: CardInputs) -> str:
    parts = ["<h2>Synthetic data per class</h2>",
             f"<p>Mean FID {_esc(c.tags.get('mean_fid', 'n/a'))}, KID {_esc(c.tags.get('mean_kid', 'n/a'))} "
             f"({_esc(c.tags.get('feature_net', 'n/a'))} features)</p>"]
    if c.fid_per_class:
        keys = sorted({k for rec in c.fid_per_class.values() for k in rec})
        rows = [[cls, *(_fmt(c.fid_per_class[cls].get(k)) for k in keys)] for cls in sorted(c.fid_per_class)]
        parts.append(_table(["class", *keys], rows))
    else:
        parts.append("<p>No per-class FID report was given to the train stage.</p>")
    for cls in c.class_names:
        grid = c.grids_dir / f"{cls}.png" if c.grids_dir else None
        if grid is not None and grid.exists():
            parts.append(f"<h3>{_esc(cls)}: real (top) vs synthetic (bottom)</h3>" + _embedded_png(grid, f"{cls} grid"))
        else:
            missing = f"{grid} missing" if grid else "no grids folder given to the train stage"
            parts.append(f"<p>{_esc(cls)}: no grid ({_esc(missing)})</p>")
    return "".join(parts)


def _embedded_png(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{data}">'


def _line_section(best: VariantResult) -> str:
    """The line images a person labelled and imported (review-import), per class, and how this model does on
    them (`comparison.LineScore`)."""
    head = "<h2>Line images (the line's doubts, reviewed)</h2>"
    if best.line is None:
        return head + ("<p>No line images in this training data: none were imported with "
                       "<code>stablesdg data review-import</code> (the processed data has no <code>line</code> "
                       "split).</p>")
    score = best.line.to_dict()
    rows = [[cls, rec["images"], rec["correct"], _fmt(rec["accuracy"])] for cls, rec in score["per_class"].items()]
    rows.append(["all", score["images"], score["correct"], _fmt(score["accuracy"])])
    parts = [head, f"<p>{score['images']} images the line was unsure of came back labelled. They are in this "
             "model's training set (split <code>line</code>, never test): the accuracy says how well it learned "
             "them, not what it scores on unseen images (the test metrics above do).</p>",
             _table(["class", "line images", f"{best.variant} correct", "accuracy"], rows)]
    if best.line_plot is not None and best.line_plot.exists():
        parts.append(_embedded_png(best.line_plot, "line images per class"))
    return "".join(parts)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def _hashes_section(c: CardInputs) -> str:
    rows = []
    for key in HASH_KEYS:
        value = c.tags.get(key, "unknown")
        if key == "adapter_sha256" and value.startswith("{"):
            value = "; ".join(f"{cls}: " + ", ".join(f"{f} {h[:12]}" for f, h in files.items())
                              for cls, files in json.loads(value).items()) or "none"
        rows.append([key, value])
    return "<h2>Data and code</h2>" + _table(["what", "hash"], rows)


def _decision_section(c: CardInputs) -> str:
    reg = c.registration
    champion = f"v{reg.champion_before}" if reg.champion_before else "none"
    rows = [["decision", f"@{reg.alias}"], ["reason", reg.reason], ["primary metric", reg.primary_metric],
            ["this version", f"{reg.value:.4f}"], ["champion before", champion],
            ["champion on this test set", "-" if reg.champion_value is None else f"{reg.champion_value:.4f}"]]
    return "<h2>Champion / challenger</h2>" + _table(["", ""], rows)


STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;margin:6px 0}"
         "td,th{border:1px solid #bbb;padding:2px 8px;text-align:right}img{max-width:100%}")


def render(c: CardInputs) -> str:
    reg = c.registration
    best = next(r for r in c.results if r.variant == reg.variant)
    title = f"{reg.model_name} v{reg.version}: {best.variant}"
    return "".join([
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_esc(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{_esc(title)}</h1>",
        f"<p>Training run <code>{_esc(best.run_id)}</code></p>",
        _decision_section(c), _metrics_section(c), _per_class_section(c), _line_section(best), _synthetic_section(c),
        _hashes_section(c),
        "</body></html>\n",
    ])


def fid_per_class(report: str | Path | None) -> dict[str, dict[str, float]]:
    """Per-class FID/KID from the evaluate report (reports/evaluate/fid_per_class.json), {} if absent."""
    if report is None or not Path(report).exists():
        return {}
    data = read_json(report)
    return dict(data.get("per_class", data))
