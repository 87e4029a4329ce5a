"""The evaluation report as a browser shows it: rendered by headless Chromium, screenshot and DOM checked.

Needs Debian's ``chromium`` on PATH (``apt-get install -y chromium``); skipped with that reason otherwise. The
report is built from a synthetic per-image table (coloured squares, known scores), so no model is involved.
"""

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from diffusion_pref.evaluation.stats import compute_metrics
from diffusion_pref.evaluation.report import write_report

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not on PATH; install it with `apt-get update && apt-get install -y chromium`"
)

VARIANTS = ["base", "dpo", "smpo"]
PROMPTS = ["a red square", "a green square", "a blue square"]


class _Elements(HTMLParser):
    """Counts elements by tag inside the element with a given id (the DOM as Chromium serialised it)."""

    def __init__(self, element_id):
        super().__init__()
        self.element_id, self.depth, self.found, self.counts = element_id, 0, False, {}

    def handle_starttag(self, tag, attrs):
        if self.depth:
            self.counts[tag] = self.counts.get(tag, 0) + 1
            if tag not in ("img", "br", "input", "source"):  # void elements never close
                self.depth += 1
        elif dict(attrs).get("id") == self.element_id:
            self.found, self.depth = True, 1

    def handle_endtag(self, tag):
        if self.depth:
            self.depth -= 1


def _elements(dom: str, element_id: str) -> dict:
    parser = _Elements(element_id)
    parser.feed(dom)
    assert parser.found, f"no element with id={element_id!r} in the rendered DOM"
    return parser.counts


def _report(tmp_path: Path) -> Path:
    rows = []
    rng = np.random.default_rng(0)
    for v, variant in enumerate(VARIANTS):
        for p, prompt in enumerate(PROMPTS):
            for seed in (0, 1):
                colour = [40, 40, 40]
                colour[p] = 120 + 60 * v
                path = tmp_path / "media" / variant / f"{p:05d}_s{seed}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (64, 64), tuple(colour)).save(path)
                rows.append(dict(variant=variant, prompt_index=p, prompt=prompt, category="squares", seed=seed,
                                 media=str(path.relative_to(tmp_path)), score=v + rng.normal()))
    table = pd.DataFrame(rows)
    metrics = compute_metrics(table, ["score"], "base", bootstrap_samples=100)
    return write_report(tmp_path / "report.html", metrics, table, media_root=tmp_path, title="browser check")


def test_report_renders_in_headless_chromium(tmp_path):
    report = _report(tmp_path)
    shot = tmp_path / "shot.png"
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1600", f"--screenshot={shot}", "--dump-dom",
         report.as_uri()],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]

    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)  # [H, W, 3]
    assert pixels.shape[:2] == (1600, 1200)
    not_white = (pixels < 245).any(axis=-1).mean()
    assert not_white > 0.02, f"screenshot is nearly blank ({not_white:.1%} non-white pixels)"
    # The embedded squares: a pure colour of each variant/prompt must appear on screen.
    colours = {tuple(c) for c in pixels.reshape(-1, 3)[::7].tolist()}
    assert (40, 40, 120 + 60 * 2) in colours and (240, 40, 40) in colours

    dom = result.stdout
    summary = _elements(dom, "summary")
    assert summary.get("tr", 0) == 2 + len(VARIANTS)  # two header rows, one row per variant
    grid = _elements(dom, "grid")
    assert grid.get("img", 0) == len(PROMPTS) * len(VARIANTS)
    assert grid.get("tr", 0) == 1 + len(PROMPTS)
    assert dom.count('class="winrate"') == 1 and dom.count('class="histogram"') == 1


# -- audio ---------------------------------------------------------------------------------------------------

# Appended to a copy of the report (which itself has no JavaScript): loads every <audio> and records its duration
# (-1 for an error), and every spectrogram's decoded width, into an element the dumped DOM then holds.
_AUDIO_PROBE = """<script>
Promise.all([...document.querySelectorAll('audio')].map(a => new Promise(done => {
  a.addEventListener('loadedmetadata', () => done(a.duration), {once: true});
  a.addEventListener('error', () => done(-1), {once: true});
  a.load();
}))).then(durations => {
  const out = document.createElement('pre');
  out.id = 'audio-probe';
  const widths = [...document.querySelectorAll('img.spectrogram')].map(i => i.naturalWidth);
  out.textContent = JSON.stringify({durations: durations, spectrograms: widths});
  document.body.appendChild(out);
});
</script>"""


def _audio_report(tmp_path: Path) -> Path:
    from diffusion_pref.audio import wav_bytes, write_wav

    rate, rows = 16000, []
    for v, variant in enumerate(VARIANTS):
        for p, prompt in enumerate(PROMPTS):
            for seed in (0, 1):
                wave = 0.3 * np.sin(2 * np.pi * (300 + 200 * p + 50 * v) * np.arange(rate // 2) / rate)
                suffix = ".flac" if variant == "dpo" else ".wav"  # both encodings must play
                path = tmp_path / "media" / variant / f"{p:05d}_s{seed}{suffix}"
                path.parent.mkdir(parents=True, exist_ok=True)
                if suffix == ".wav":
                    write_wav(path, wave, rate)
                else:
                    path.write_bytes(wav_bytes(wave, rate, format="FLAC"))
                rows.append(dict(variant=variant, prompt_index=p, prompt=prompt, category="tones", seed=seed,
                                 media=str(path.relative_to(tmp_path)), score=v + 0.1 * p + 0.01 * seed))
    table = pd.DataFrame(rows)
    metrics = compute_metrics(table, ["score"], "base", bootstrap_samples=100)
    return write_report(tmp_path / "report.html", metrics, table, media_root=tmp_path, title="audio check")


def test_audio_report_players_load_in_headless_chromium(tmp_path):
    import json
    import re

    report = _audio_report(tmp_path)
    text = report.read_text()
    assert "<script" not in text  # the report itself stays script-free
    probed = tmp_path / "probed.html"
    probed.write_text(text.replace("</body>", _AUDIO_PROBE + "</body>"))
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--mute-audio",
         f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1600", "--virtual-time-budget=10000",
         "--dump-dom", probed.as_uri()],
        capture_output=True, text=True, timeout=90,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    grid = _elements(dom, "grid")
    cells = len(PROMPTS) * len(VARIANTS)  # one seed is shown: one player and one spectrogram per sample shown
    assert grid.get("audio", 0) == cells and grid.get("img", 0) == cells
    match = re.search(r'<pre id="audio-probe">(.*?)</pre>', dom, re.S)
    assert match, "the audio probe did not finish (an <audio> element neither loaded nor failed)"
    probe = json.loads(match.group(1).replace("&quot;", '"'))
    assert len(probe["durations"]) == cells
    # every clip decodes to its 0.5 s (an <audio> that failed reports -1)
    assert all(abs(d - 0.5) < 0.01 for d in probe["durations"]), probe["durations"]
    assert probe["spectrograms"] == [256] * cells
