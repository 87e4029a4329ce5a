"""``prompt-opt evaluate``'s HTML report: one self-contained file in the style of the evaluation report.

A table of the metrics (mean and 95% interval per row of :mod:`.evaluate`), then the examples: per prompt the
original and its first rewrite, their rewards and similarity, and both images (embedded, as
:func:`diffusion_pref.evaluation.report.media_html` embeds them) when an image backbone rendered them; text only
otherwise (the shapes world's text-side reward).

    from diffusion_pref.prompt_opt.report import write_rewrite_report
    write_rewrite_report("out/eval/report.html", metrics, media_root="out/eval")   # metrics: evaluate_rewrites'
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from diffusion_pref.evaluation.report import _CSS, _fmt, media_html
from diffusion_pref.fileio import atomic_write

__all__ = ["METRIC_ROWS", "render_rewrite_report", "write_rewrite_report"]

METRIC_ROWS = (
    ("reward_original", "reward of the prompts as written"),
    ("reward_rewrite", "reward of the rewrites"),
    ("win_rate", "share of rewrites above their prompt (ties half)"),
    ("similarity", "cosine similarity of rewrite and prompt"),
    ("drift_rate", "share of rewrites below the drift threshold"),
    ("drift_rate_exact", "share of rewrites that changed what was asked for"),
)


def _metric_table(metrics: dict) -> str:
    rows = []
    for key, meaning in METRIC_ROWS:
        m = metrics.get(key)
        if not m:
            continue
        rows.append(f'<tr><td class="name">{key}</td><td>{_fmt(m["mean"])}</td><td>{_fmt(m["ci_low"])}</td>'
                    f'<td>{_fmt(m["ci_high"])}</td><td class="name">{html.escape(meaning)}</td></tr>')
    head = ('<tr><th class="name">metric</th><th>mean</th><th>95% low</th><th>95% high</th>'
            '<th class="name">meaning</th></tr>')
    return f'<table id="metrics">{head}{"".join(rows)}</table>'


def _examples(examples: list, media_root: Path) -> str:
    with_images = any("image_original" in e for e in examples)
    head = ('<tr><th class="name">original prompt</th><th class="name">rewrite</th><th>reward original</th>'
            '<th>reward rewrite</th><th>similarity</th>'
            + ("<th>original image</th><th>rewrite image</th>" if with_images else "") + "</tr>")
    rows = []
    for e in examples:
        cells = [f'<td class="name prompt">{html.escape(e["prompt"])}</td>',
                 f'<td class="name prompt">{html.escape(e["rewrite"])}</td>',
                 f"<td>{_fmt(e['score_original'])}</td>", f"<td>{_fmt(e['score_rewrite'])}</td>",
                 f"<td>{_fmt(e.get('similarity'))}</td>"]
        if with_images:
            for side in ("original", "rewrite"):
                path = e.get(f"image_{side}")
                cells.append(f"<td>{media_html(media_root / path, alt=e[side if side == 'rewrite' else 'prompt'])}"
                             "</td>" if path else "<td>–</td>")
        rows.append(f'<tr class="example">{"".join(cells)}</tr>')
    return f'<table id="grid">{head}{"".join(rows)}</table>'


def render_rewrite_report(metrics: dict, *, media_root: str | Path, title: str = "prompt-opt evaluation") -> str:
    """The report as one HTML string; image paths in ``metrics['examples']`` are relative to ``media_root``."""
    details = {"policy": metrics.get("policy", ""), "prompts": metrics.get("prompts"),
               "rewrites per prompt": metrics.get("k"), "seed": metrics.get("seed"),
               "drift threshold": metrics.get("drift_threshold"),
               "bootstrap samples (over prompts)": metrics.get("bootstrap_samples")}
    detail_rows = "".join(f'<tr><td class="name">{html.escape(str(k))}</td><td class="name">{html.escape(str(v))}'
                          "</td></tr>" for k, v in details.items() if v not in (None, ""))
    examples = metrics.get("examples", [])
    body = "\n".join([
        f"<h1>{html.escape(title)}</h1>", f'<table class="details">{detail_rows}</table>',
        "<h2>Summary</h2>",
        ('<p class="meta">Each rewrite and its original prompt are scored against the ORIGINAL prompt with the same '
         "seeds; intervals: percentile bootstrap over prompts.</p>"), _metric_table(metrics),
        "<h2>Examples</h2>", f'<p class="meta">{len(examples)} prompts, the first rewrite of each.</p>',
        _examples(examples, Path(media_root)),
    ])
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body>\n{body}\n</body></html>\n")


def write_rewrite_report(path: str | Path, metrics: dict, *, media_root: str | Path, **kwargs: Any) -> Path:
    return atomic_write(Path(path), render_rewrite_report(metrics, media_root=media_root, **kwargs))
