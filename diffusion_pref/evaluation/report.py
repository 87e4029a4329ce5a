"""The evaluation report: one self-contained HTML file (no network, no external files, no JavaScript).

It holds a summary table (mean, median and win rate with its 95% interval per variant and reward model), win-rate
bars with interval whiskers and score histograms per reward model (both inline SVG, so no plotting library is
needed), per-category means, and a grid of media (rows: prompts, columns: variants, one seed). Images are
embedded as base64 PNG (JPEG thumbnails above 256 px); audio files (``.wav``/``.flac``, which evaluate writes
beside the report under ``media/``) are embedded as ``<audio controls>`` players, each with its spectrogram
(:func:`spectrogram_png`: the log-mel of :mod:`diffusion_pref.audio`, low frequencies at the bottom) as a PNG.

Example::

    from diffusion_pref.evaluation.report import write_report
    write_report("outputs/eval/report.html", metrics, table, media_root="outputs/eval", title="SD1.5 vs DPO")
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from diffusion_pref.fileio import atomic_write

if TYPE_CHECKING:
    import pandas as pd

# Colour-blind-safe palette (Okabe-Ito); variants take colours in order.
COLOURS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
AUDIO_MIME = {".wav": "audio/wav", ".flac": "audio/flac", ".ogg": "audio/ogg", ".mp3": "audio/mpeg"}
THUMBNAIL_SIZE = 256  # px, longest side: keeps a 24-row grid of 512 px images to a few MB

_CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; background: #fff; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ddd; } h3 { font-size: 14px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; vertical-align: top; }
th { background: #f2f2f2; text-align: center; } td.name, th.name { text-align: left; }
#grid td { text-align: center; } #grid td.prompt { text-align: left; max-width: 260px; }
#grid img { display: block; max-width: 256px; image-rendering: auto; }
#grid audio { display: block; width: 256px; }
.caption { font-size: 12px; color: #555; } .meta { font-size: 13px; color: #444; }
.charts { display: flex; flex-wrap: wrap; gap: 24px; }
"""


def _fmt(value: Optional[float], digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}g}" if abs(value) >= 1000 else f"{value:.{digits}f}"


def _colour(i: int) -> str:
    return COLOURS[i % len(COLOURS)]


SPECTROGRAM_RANGE = 80.0 / (20 / math.log(10))  # natural-log units shown below each clip's peak: 80 dB of power
# dark blue -> purple -> orange -> light yellow: (position, RGB) stops, interpolated linearly
_SPECTROGRAM_STOPS = ((0.0, (0, 0, 30)), (0.35, (90, 20, 120)), (0.7, (230, 100, 40)), (1.0, (255, 250, 190)))


def spectrogram_png(wave: Any, sample_rate: int, height: int = 128, width: int = THUMBNAIL_SIZE) -> bytes:
    """A clip's log-mel spectrogram (:func:`diffusion_pref.audio.log_mel` with Tango's settings, after resampling
    to 16 kHz) as PNG bytes: time left to right, mel bin 0 (lowest frequencies) at the bottom, the loudest value
    white-yellow and values ``SPECTROGRAM_RANGE`` or more below it dark blue. Rendered with PIL."""
    import numpy as np
    import torch
    from PIL import Image

    from diffusion_pref.audio import MelSettings, log_mel, resample

    settings = MelSettings()
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim == 2:  # [samples, channels] as soundfile reads it
        wave = wave.mean(axis=1)
    wave = resample(wave, int(sample_rate), settings.sampling_rate)
    mel = log_mel(torch.from_numpy(np.ascontiguousarray(wave))[None], settings)[0].numpy()  # [T, n_mels]
    level = np.clip((mel - mel.max()) / SPECTROGRAM_RANGE + 1.0, 0.0, 1.0)
    level[mel <= math.log(1e-5) + 1e-6] = 0.0  # log_mel's floor (silence) is dark, also in an all-silent clip
    level = level[:, ::-1].T  # [n_mels, T], mel bin 0 in the bottom row
    positions = [p for p, _ in _SPECTROGRAM_STOPS]
    rgb = np.stack([np.interp(level, positions, [c[k] for _, c in _SPECTROGRAM_STOPS]) for k in range(3)], -1)
    image = Image.fromarray(np.round(rgb).astype(np.uint8), "RGB").resize((width, height), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def media_html(path: Path, alt: str = "") -> str:
    """An embedded ``<img>``, or an ``<audio>`` player with its spectrogram, for the media file at ``path``.

    Images up to ``THUMBNAIL_SIZE`` are embedded as PNG (exact pixels); larger ones as a JPEG thumbnail.
    """
    suffix = path.suffix.lower()
    if suffix in AUDIO_MIME:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        player = f'<audio controls preload="none" src="data:{AUDIO_MIME[suffix]};base64,{data}"></audio>'
        try:
            from diffusion_pref.audio import read_audio

            wave, rate = read_audio(path)
            png = base64.b64encode(spectrogram_png(wave, rate)).decode("ascii")
        except (ValueError, OSError) as err:  # a clip soundfile cannot decode (AudioError, e.g. mp3) keeps its player
            return player + f'<div class="caption">no spectrogram ({html.escape(type(err).__name__)})</div>'
        return (player + f'<img class="spectrogram" alt="{html.escape("spectrogram of " + alt)}" width="{THUMBNAIL_SIZE}" '
                f'height="128" src="data:image/png;base64,{png}">')
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        small = max(image.size) <= THUMBNAIL_SIZE
        image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG" if small else "JPEG", **({} if small else {"quality": 88}))
        width, height = image.size
    mime = "image/png" if small else "image/jpeg"
    # Tiny images (toy model: 32 px) are shown at least 128 px wide so the grid stays legible.
    shown = max(width, 128)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return (f'<img alt="{html.escape(alt)}" width="{shown}" height="{round(height * shown / width)}" '
            f'style="image-rendering: {"pixelated" if width < 128 else "auto"}" src="data:{mime};base64,{data}">')


def win_rate_svg(win_rates: Dict[str, Dict[str, Any]], variants: Sequence[str], reward: str) -> str:
    """Horizontal bars of each variant's win rate over the baseline with 95% interval whiskers; 0.5 dashed."""
    names = [v for v in variants if v in win_rates]
    left, width, row = 140, 320, 26
    height = 30 + row * len(names) + 24
    x = lambda value: left + width * min(max(value, 0.0), 1.0)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="winrate" width="{left + width + 70}" height="{height}" '
             f'role="img" aria-label="win rates, {html.escape(reward)}">',
             f'<text x="{left}" y="16" font-size="13" font-weight="bold">'
             f'{html.escape(reward)}: win rate vs baseline</text>']
    for i, name in enumerate(names):
        stats = win_rates[name]
        y = 30 + i * row
        parts.append(f'<text x="{left - 6}" y="{y + 15}" font-size="12" text-anchor="end">{html.escape(name)}</text>')
        parts.append(f'<rect x="{left}" y="{y + 3}" width="{x(stats["win_rate"]) - left:.1f}" height="{row - 8}" '
                     f'fill="{_colour(variants.index(name))}" opacity="0.8"/>')
        low, high = stats.get("ci_low"), stats.get("ci_high")
        if low is not None and not math.isnan(low):
            mid = y + row / 2 - 1
            stroke = 'stroke="#000" stroke-width="1.5"'
            parts.append(f'<line x1="{x(low):.1f}" x2="{x(high):.1f}" y1="{mid}" y2="{mid}" {stroke}/>')
            for end in (low, high):
                parts.append(f'<line x1="{x(end):.1f}" x2="{x(end):.1f}" y1="{mid - 5}" y2="{mid + 5}" {stroke}/>')
        parts.append(f'<text x="{left + width + 6}" y="{y + 15}" font-size="12">{stats["win_rate"]:.3f}</text>')
    axis_y = 30 + row * len(names)
    parts.append(f'<line x1="{left}" x2="{left + width}" y1="{axis_y}" y2="{axis_y}" stroke="#444"/>')
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<text x="{x(tick):.1f}" y="{axis_y + 16}" font-size="11" text-anchor="middle">{tick:g}</text>')
    parts.append(f'<line x1="{x(0.5)}" x2="{x(0.5)}" y1="26" y2="{axis_y}" stroke="#888" stroke-dasharray="4 3"/>')
    parts.append("</svg>")
    return "".join(parts)


def histogram_svg(
    values_by_variant: Dict[str, List[float]], variants: Sequence[str], reward: str, bins: int = 20
) -> str:
    """Overlaid step histograms (shared bins) of each variant's scores on one reward model."""
    from diffusion_pref.evaluation.stats import histogram

    edges, counts = histogram(values_by_variant, bins=bins)
    left, top, width, height = 40, 24, 360, 150
    peak = max(max(c) for c in counts.values()) or 1
    sx = lambda value: left + width * (value - edges[0]) / (edges[-1] - edges[0])  # noqa: E731
    sy = lambda count: top + height - height * count / peak  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="histogram" width="{left + width + 130}" '
             f'height="{top + height + 36}" role="img" aria-label="score histogram, {html.escape(reward)}">',
             f'<text x="{left}" y="15" font-size="13" font-weight="bold">{html.escape(reward)}: score histogram</text>']
    for name, bin_counts in counts.items():
        points = [f"{sx(edges[0]):.1f},{sy(0):.1f}"]
        for i, count in enumerate(bin_counts):
            points += [f"{sx(edges[i]):.1f},{sy(count):.1f}", f"{sx(edges[i + 1]):.1f},{sy(count):.1f}"]
        points.append(f"{sx(edges[-1]):.1f},{sy(0):.1f}")
        colour = _colour(variants.index(name))
        parts.append(f'<polyline points="{" ".join(points)}" fill="{colour}" fill-opacity="0.25" '
                     f'stroke="{colour}" stroke-width="1.5"/>')
    parts.append(f'<line x1="{left}" x2="{left + width}" y1="{top + height}" y2="{top + height}" stroke="#444"/>')
    for value in (edges[0], (edges[0] + edges[-1]) / 2, edges[-1]):
        parts.append(f'<text x="{sx(value):.1f}" y="{top + height + 16}" font-size="11" text-anchor="middle">'
                     f'{_fmt(value, 3)}</text>')
    parts.append(f'<text x="{left - 4}" y="{top + 10}" font-size="11" text-anchor="end">{peak}</text>')
    for i, name in enumerate(counts):
        y = top + 12 + 18 * i
        parts.append(f'<rect x="{left + width + 12}" y="{y - 9}" width="10" height="10" '
                     f'fill="{_colour(variants.index(name))}"/>')
        parts.append(f'<text x="{left + width + 26}" y="{y}" font-size="12">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _summary_table(metrics: Dict[str, Any]) -> str:
    rewards, variants, baseline = metrics["rewards"], metrics["variants"], metrics["baseline"]
    head = ['<th class="name" rowspan="2">variant</th>'] + [f'<th colspan="3">{html.escape(r)}</th>' for r in rewards]
    sub = ["<th>mean</th><th>median</th><th>win rate [95% CI]</th>"] * len(rewards)
    rows = []
    for variant in variants:
        cells = [f'<td class="name">{html.escape(variant)}{" (baseline)" if variant == baseline else ""}</td>']
        for reward in rewards:
            s = metrics["scores"][reward][variant]
            w = metrics["win_rates"][reward].get(variant)
            wr = "–" if w is None else f'{w["win_rate"]:.3f} [{_fmt(w["ci_low"], 3)}, {_fmt(w["ci_high"], 3)}]'
            if w is not None and "wins" in w:
                wr += f'<br><small>wins/ties/losses {w["wins"]}/{w["ties"]}/{w["losses"]}</small>'
            if w is not None and w.get("errors"):
                from diffusion_pref.evaluation.stats import errors_text

                wr += f"<br><small>{html.escape(errors_text(w['errors']))}</small>"
            cells.append(f"<td>{_fmt(s['mean'])}</td><td>{_fmt(s['median'])}</td><td>{wr}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<table id="summary"><thead><tr>{"".join(head)}</tr><tr>{"".join(sub)}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def _category_tables(metrics: Dict[str, Any]) -> str:
    out = []
    for reward in metrics["rewards"]:
        per_variant = metrics["scores"][reward]
        categories = sorted({c for v in per_variant.values() for c in v.get("by_category", {})})
        if not categories:
            continue
        head = '<th class="name">category</th>' + "".join(f"<th>{html.escape(v)}</th>" for v in metrics["variants"])
        rows = []
        for cat in categories:
            cells = "".join(f"<td>{_fmt(per_variant[v].get('by_category', {}).get(cat))}</td>"
                            for v in metrics["variants"])
            rows.append(f'<tr><td class="name">{html.escape(cat)}</td>{cells}</tr>')
        out.append(f"<h3>{html.escape(reward)}: mean per category</h3>"
                   f'<table class="categories"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>')
    return "".join(out)


def _grid(table: "pd.DataFrame", metrics: Dict[str, Any], media_root: Path, max_prompts: int) -> str:
    variants, rewards = metrics["variants"], metrics["rewards"]
    seed = metrics["seeds"][0]
    rows_for_seed = table[table["seed"] == seed]
    prompt_ids = sorted(rows_for_seed["prompt_index"].unique())[:max_prompts]
    head = '<th class="name">prompt</th>' + "".join(f"<th>{html.escape(v)}</th>" for v in variants)
    rows = []
    for pid in prompt_ids:
        here = rows_for_seed[rows_for_seed["prompt_index"] == pid]
        first = here.iloc[0]
        category = first["category"]
        label = html.escape(str(first["prompt"]))
        if isinstance(category, str) and category:
            label += f'<br><span class="caption">{html.escape(category)}</span>'
        cells = [f'<td class="prompt">{label}</td>']
        for variant in variants:
            match = here[here["variant"] == variant]
            if match.empty:
                cells.append("<td>–</td>")
                continue
            item = match.iloc[0]
            scores = " · ".join(f"{html.escape(r)} {_fmt(float(item[r]), 3)}" for r in rewards)
            cells.append(f"<td>{media_html(media_root / str(item['media']), alt=f'{variant}: {first.prompt}')}"
                         f'<div class="caption">{scores}</div></td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    note = (f'<p class="meta">Seed {seed}; first {len(prompt_ids)} of {table["prompt_index"].nunique()} prompts. '
            "Same seed = same initial noise in every column.</p>")
    return note + f'<table id="grid"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def render_report(
    metrics: Dict[str, Any],
    table: "pd.DataFrame",
    *,
    media_root: str | Path,
    title: str = "diffusion_pref evaluation",
    details: Optional[Dict[str, Any]] = None,
    grid_prompts: int = 24,
) -> str:
    """The report as one HTML string. ``table['media']`` paths are relative to ``media_root`` (or absolute)."""
    media_root = Path(media_root)
    variants = metrics["variants"]
    detail_rows = "".join(
        f'<tr><td class="name">{html.escape(str(k))}</td><td class="name">{html.escape(str(v))}</td></tr>'
        for k, v in (details or {}).items()
    )
    boot = metrics["bootstrap"]
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        f'<table class="details">{detail_rows}</table>' if detail_rows else "",
        "<h2>Summary</h2>",
        f'<p class="meta">{metrics["n_prompts"]} prompts × seeds {metrics["seeds"]}. Win rate: share of '
        f'(prompt, seed) on which a variant scores higher than the baseline '
        f'<b>{html.escape(metrics["baseline"])}</b>, ties count half; '
        f'{int(boot["level"] * 100)}% interval: {boot["method"]} bootstrap over {boot["resample"]}, '
        f'{boot["samples"]} samples, seed {boot["seed"]}.</p>',
        _summary_table(metrics),
    ]
    if len(variants) > 1:
        bars = "".join(win_rate_svg(metrics["win_rates"][r], variants, r) for r in metrics["rewards"])
        sections += ["<h2>Win rates</h2>", f'<div class="charts">{bars}</div>']
    hists = "".join(
        histogram_svg({v: table.loc[table["variant"] == v, r].astype(float).tolist() for v in variants}, variants, r)
        for r in metrics["rewards"]
    )
    sections += ["<h2>Score histograms</h2>", f'<div class="charts">{hists}</div>']
    categories = _category_tables(metrics)
    if categories:
        sections += ["<h2>Per category</h2>", categories]
    sections += ["<h2>Samples</h2>", _grid(table, metrics, media_root, grid_prompts)]
    body = "\n".join(s for s in sections if s)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body>\n{body}\n</body></html>\n")


def write_report(path: str | Path, metrics: Dict[str, Any], table: "pd.DataFrame", **kwargs: Any) -> Path:
    path = Path(path)
    return atomic_write(path, render_report(metrics, table, **kwargs))


def _fit(image, cell: int):
    """Scaled to fill a ``cell`` square, aspect ratio kept: nearest-neighbour when enlarging (small images stay
    crisp), Lanczos when shrinking."""
    from PIL import Image

    scale = cell / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)


def write_grid_png(path: str | Path, table: "pd.DataFrame", variants: Sequence[str], media_root: str | Path,
                   max_prompts: int = 8, max_seeds: int = 4, cell: int = 128, label_width: int = 160) -> Optional[Path]:
    """One PNG to paste into a paper or an issue: rows are prompts (their text in a left column of
    ``label_width`` px), columns are seeds, each seed a block of the variants side by side (same seed = same
    initial noise), with the variant names on top.

    Images only (returns None when any sample is audio, as the report tells them apart). Cells are ``cell`` px
    squares (images are scaled to fit, not cropped); prompts are the first ``max_prompts`` by index, seeds the first ``max_seeds`` in the table.
    """
    import textwrap

    from PIL import Image, ImageDraw

    media_root = Path(media_root)
    if table.empty or any(Path(str(m)).suffix.lower() in AUDIO_MIME for m in table["media"]):
        return None
    prompts = sorted(table["prompt_index"].unique())[:max_prompts]
    seeds = list(dict.fromkeys(table["seed"].tolist()))[:max_seeds]
    by_key = {(r.variant, r.prompt_index, r.seed): r.media for r in table.itertuples()}
    text_of = dict(zip(table["prompt_index"], table["prompt"]))
    header, gap = 14, 4  # px: the text line above the cells; the space between seed blocks
    block = len(variants) * cell
    grid = Image.new("RGB", (label_width + len(seeds) * block + (len(seeds) - 1) * gap,
                             header + len(prompts) * cell), "white")
    draw = ImageDraw.Draw(grid)
    chars = max(8, label_width // 6)  # PIL's built-in font is about 6 px a character
    for i, prompt in enumerate(prompts):
        lines = textwrap.wrap(str(text_of[prompt]), chars)[: cell // 12]
        draw.multiline_text((2, header + i * cell + 2), "\n".join(lines), fill="black", spacing=2)
    for k, seed in enumerate(seeds):
        x0 = label_width + k * (block + gap)
        for j, variant in enumerate(variants):
            draw.text((x0 + j * cell + 2, 1), f"{variant} s{seed}"[: cell // 6], fill="black")
            for i, prompt in enumerate(prompts):
                media = by_key.get((variant, prompt, seed))
                if media is None:
                    continue
                with Image.open(media_root / str(media)) as image:
                    image = _fit(image.convert("RGB"), cell)
                    grid.paste(image, (x0 + j * cell + (cell - image.width) // 2,
                                       header + i * cell + (cell - image.height) // 2))
    path = Path(path)
    grid.save(path)
    return path
