"""Preference-dataset generation: sample a model, score the samples with reward models, write ranked pairs.

For every prompt, ``generate.samples_per_prompt`` images are drawn with per-sample seeds derived from
(``runtime.seed``, prompt index, sample index), scored by ``reward.models``, and turned into (winner, loser) pairs
by ``generate.strategy``:

- ``best_vs_worst``: the highest- against the lowest-scored sample (one pair per prompt);
- ``all_pairs``: every two samples, the higher-scored one as winner;
- ``best_vs_each``: the highest-scored sample against each of the others.

Pairs then pass the filters ``min_winner_score``, ``min_loser_score``, ``min_gap`` and ``max_gap`` (the
Audio-alpaca construction; ``min_loser_score`` keeps pairs whose loser is still a fair attempt).
Pairs of equal scores are never written: they are counted as filtered ("tie"). Samples whose score is NaN are
left out and counted. With ``rso_beta`` set, statistical rejection sampling (RSO) first thins the candidates.

``generate.lora`` samples the base with a LoRA that a training run wrote on top: the tuned model (``diffusion-pref
iterate`` samples each round's model that way).

Output: parquet shards ``pairs-p<process>-<n>.parquet`` in ``output.dir`` with the Pick-a-Pic v2 columns
``caption, jpg_0, jpg_1, label_0, label_1`` (images as PNG or JPEG bytes; ``label_0 = 1.0`` when ``jpg_0`` won)
plus ``score_0, score_1, reward_model, seed_0, seed_1, model, prompt_index, category``, and ``summary.json``.
Which side holds the winner is decided by a hash of the pair's seeds, so ``label_0`` is not constant.

Audio (a backbone whose ``sample_rate`` is set, e.g. Tango or ``model.pretrained=tones``): each clip is scored
with ``sample_rate=`` passed to the reward models and stored as FLAC (``generate.audio_format=wav``: WAV) bytes in
the Audio-alpaca layout that ``diffusion-pref train`` reads directly: ``prompt, chosen, rejected, strategy``
(``chosen``/``rejected`` as ``{"bytes", "path"}`` cells, the winner always in ``chosen``, so there is no label
column) plus ``score_0`` (the winner's) and ``score_1`` and the same bookkeeping columns as for images. With two or
more reward models configured, an audio pair is ranked by their weighted sum but must pass every filter on *each*
scorer's own score: the winner reaches ``min_winner_score`` and the loser ``min_loser_score`` on both, and the
winner-minus-loser gap lies within [``min_gap``, ``max_gap``] on both (so both scorers agree on the winner whenever
``min_gap`` > 0). A pair counts under the first filter that fails on any scorer. Images keep filtering the weighted
sum.

Resuming: every shard is written to a temporary name and renamed, and records in its parquet metadata which
prompt indices it covers (prompts whose pairs were all filtered are covered by a small ``.empty.json`` file
instead). A restarted run skips every covered prompt, so a run killed at any point and restarted ends with every
prompt done exactly once. Restarting into a folder written with different settings is refused. A shard is written
once ``shard_size`` pairs or ``flush_every_prompts`` prompts are pending, so a run killed without warning (SIGKILL)
redoes at most ``flush_every_prompts`` prompts plus the batches it was working on. On SIGTERM or SIGINT (Ctrl-C,
a cluster's time limit) the batch being sampled is finished, every finished prompt is written, and the command
exits with status 128 + the signal number; a second signal stops at once.

Several processes (``accelerate launch``) split the prompts by index modulo the process count; each writes its
own shards.

Run::

    diffusion-pref generate --config configs/datagen_sd15_pickscore.yaml generate.prompts=prompts.txt
    accelerate launch -m diffusion_pref.cli generate --config configs/datagen_sd15_pickscore.yaml

Example (Python)::

    from diffusion_pref.config import load_config
    from diffusion_pref.commands.generate import run
    run(load_config("configs/toy_generate.yaml", ["output.dir=/tmp/toy-pairs"]))
    # datasets.load_dataset("parquet", data_files="/tmp/toy-pairs/*.parquet")
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import re
import signal
import sys
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from diffusion_pref.config import Config, ConfigError, GenerateConfig, SampleConfig, resolve_runtime, validate
from diffusion_pref.fileio import atomic_write
from diffusion_pref.pairing import FILTER_REASONS, form_pairs, rso_select, sample_seed, winner_first

METADATA_KEY = b"diffusion_pref"
SUMMARY_FILE = "summary.json"
_SHARD_RE = re.compile(r"^pairs-p(\d+)-(\d+)\.(parquet|empty\.json)$")
# Settings that change which images or pairs a prompt gets; a restart must use the same ones (the names are the
# ones summary files have always recorded, so runs started before runtime/sample existed still resume).
_FINGERPRINT_KEYS = (
    "samples_per_prompt", "steps", "guidance_scale", "seed", "strategy", "min_winner_score", "min_gap",
    "max_gap", "scheduler", "resolution", "image_format", "rso_beta", "rso_keep", "dtype", "lora",
)
_FINGERPRINT_FROM = {"steps": "sample", "guidance_scale": "sample", "scheduler": "sample", "resolution": "sample",
                     "seed": "runtime", "dtype": "runtime"}


# ----------------------------------------------------------------------------------------------------------------
# Model loading and sampling


def _load_backbone(cfg: Config, device: Any):
    """The backbone generate samples with: ``model.*`` in ``runtime.dtype`` on ``device``, with ``generate.lora``
    on top. ``sample.scheduler`` is checked here, before a large model takes a while to load; ``sample`` uses it."""
    from diffusion_pref.pipelines import load_backbone
    from diffusion_pref.pipelines.base import scheduler_class

    if cfg.sample.scheduler:
        scheduler_class(cfg.sample.scheduler, "sample.scheduler")
    backbone = load_backbone(cfg.model, dtype=resolve_runtime(cfg.runtime, sampling=True).dtype)
    if cfg.generate.lora:
        try:
            backbone.load_lora(cfg.generate.lora)
        except Exception as err:
            raise ConfigError(f"generate.lora={cfg.generate.lora}: could not load a LoRA onto {cfg.model.pretrained} "
                              f"({type(err).__name__}: {err}); give the folder a LoRA training run of this base "
                              "model wrote") from None
    return backbone.to(device)


def _sample(backbone: Any, prompts: List[str], seeds: List[int], sample: SampleConfig):
    """PIL images, one per (prompt, seed) (``.blocked``: whether the model's safety checker blocked each one).

    Each sample's noise comes only from its own seed (``Backbone.sample``). A model that ships a safety checker
    (SD1.x) runs it: a blocked image comes back black, and is kept out of every pair by the caller rather than
    scored as a loser.
    """
    return backbone.sample(prompts, seeds, steps=sample.steps, guidance_scale=sample.guidance_scale,
                           resolution=sample.resolution, scheduler=sample.scheduler,
                           safety_checker=sample.safety_checker)


# ----------------------------------------------------------------------------------------------------------------
# Shards: writing, and reading back what is already done


def _encode_audio(wave: Any, rate: int, audio_format: str) -> bytes:
    from diffusion_pref.audio import wav_bytes

    return wav_bytes(wave, rate, format=audio_format.upper())


def _encode_image(image: Any, image_format: str) -> bytes:
    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, format="PNG")
    else:
        image.convert("RGB").save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _pair_schema():
    import pyarrow as pa

    return pa.schema([
        ("caption", pa.string()),
        ("jpg_0", pa.binary()),
        ("jpg_1", pa.binary()),
        ("label_0", pa.float64()),
        ("label_1", pa.float64()),
        *_bookkeeping_columns(),
    ])


def _bookkeeping_columns():
    """The columns both layouts write beside their media: scores, the reward model, seeds, model, prompt, category."""
    import pyarrow as pa

    return [("score_0", pa.float64()), ("score_1", pa.float64()), ("reward_model", pa.string()),
            ("seed_0", pa.int64()), ("seed_1", pa.int64()), ("model", pa.string()), ("prompt_index", pa.int64()),
            ("category", pa.string())]


def _audio_pair_schema():
    """The Audio-alpaca layout (``prompt, chosen, rejected, strategy``; audio as ``{"bytes", "path"}`` cells) and
    the columns the image layout has beside its media (the winner is always ``chosen``: ``score_0`` is its score)."""
    import pyarrow as pa

    audio = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    return pa.schema([
        ("prompt", pa.string()),
        ("chosen", audio),
        ("rejected", audio),
        ("strategy", pa.string()),
        *_bookkeeping_columns(),
    ])


def _write_shard(folder: Path, process: int, number: int, rows: List[dict], meta: dict) -> Path:
    if rows:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = (_audio_pair_schema() if "chosen" in rows[0] else _pair_schema()).with_metadata({METADATA_KEY: json.dumps(meta).encode()})
        table = pa.Table.from_pylist(rows, schema=schema)
        path = folder / f"pairs-p{process:03d}-{number:05d}.parquet"
        atomic_write(path, lambda tmp: pq.write_table(table, tmp))
    else:
        path = folder / f"pairs-p{process:03d}-{number:05d}.empty.json"
        atomic_write(path, json.dumps(meta))
    return path


def _shard_meta(path: Path) -> dict:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        metadata = pq.read_schema(path).metadata or {}
        if METADATA_KEY not in metadata:
            raise ValueError(f"{path} has no {METADATA_KEY.decode()} metadata: it was not written by generate")
        meta = json.loads(metadata[METADATA_KEY])
        meta["rows"] = pq.ParquetFile(path).metadata.num_rows
        return meta
    meta = json.loads(path.read_text())
    meta["rows"] = 0
    return meta


def read_shards(folder: str | Path) -> Dict[Path, dict]:
    """Metadata of every complete shard in ``folder`` (prompt indices covered, counts, settings)."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    return {path: _shard_meta(path) for path in sorted(folder.iterdir()) if _SHARD_RE.match(path.name)}


# ----------------------------------------------------------------------------------------------------------------
# The run


@dataclass
class _Candidate:
    sample: int
    seed: int
    image: Any
    score: float
    blocked: bool = False  # the pipeline's safety checker replaced the image with a black one
    components: Optional[Dict[str, float]] = None  # audio with several reward models: each one's score


def _check_settings(gen: GenerateConfig, sample: SampleConfig) -> None:
    if not gen.prompts:
        raise ConfigError("generate.prompts is not set; give a prompt file, folder or hub dataset id")
    if gen.samples_per_prompt < 2:
        raise ConfigError(
            f"generate.samples_per_prompt={gen.samples_per_prompt}: a pair needs at least 2 samples per prompt"
        )
    for key in ("sample.batch_size", "generate.shard_size", "generate.flush_every_prompts", "sample.steps",
                "generate.rso_keep"):
        section, name = key.split(".")
        value = getattr(sample if section == "sample" else gen, name)
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    if gen.max_prompts is not None and gen.max_prompts < 1:
        raise ConfigError(f"generate.max_prompts must be >= 1 or null, got {gen.max_prompts}")


def _settings(cfg: Config, prompts_digest: str, reward_name: str) -> dict:
    values = {key: getattr(getattr(cfg, _FINGERPRINT_FROM.get(key, "generate")), key) for key in _FINGERPRINT_KEYS}
    values.update(
        model=cfg.model.pretrained, model_revision=cfg.model.revision, model_variant=cfg.model.variant,
        model_vae=cfg.model.vae, reward_model=reward_name, prompts=prompts_digest,
    )
    # Newer settings are recorded only when they differ from their default, so older runs still resume.
    if cfg.generate.min_loser_score is not None:
        values["min_loser_score"] = cfg.generate.min_loser_score
    if cfg.generate.audio_format != "flac":
        values["audio_format"] = cfg.generate.audio_format
    return values


def _check_resume(done_meta: Dict[Path, dict], settings: dict, folder: Path) -> None:
    for path, meta in done_meta.items():
        old = meta.get("settings", {})
        changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if changed:
            details = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in changed)
            raise ConfigError(
                f"output.dir {folder} already holds pairs made with other settings ({path.name}: {details}); "
                "resume with the same settings, or choose a new output.dir"
            )


def _prompt_groups(indices: List[int], gen: GenerateConfig, batch_size: int) -> List[List[int]]:
    """Prompts processed together: whole prompts per batch, fixed over the process's full prompt list.

    Groups never change between a run and its restart, so a restarted run sees the same batches and produces
    bit-identical images even where kernels are not batch-invariant.
    """
    per_group = max(1, batch_size // gen.samples_per_prompt)
    return [indices[i:i + per_group] for i in range(0, len(indices), per_group)]


def _pairs_rows(
    prompt_index: int, record: Any, candidates: List[_Candidate], gen: GenerateConfig, model: str, reward_name: str,
    seed: int, sample_rate: Optional[int] = None,
) -> Tuple[List[dict], Counter]:
    """One prompt's rows (images: Pick-a-Pic layout; ``sample_rate`` set: audio in the Audio-alpaca layout)."""
    scores = [c.score for c in candidates]
    pool = [i for i, c in enumerate(candidates) if not c.blocked]  # a black image would only ever be a loser
    stats: Counter = Counter(safety_blocked=len(candidates) - len(pool))
    if gen.rso_beta is not None:
        nan_free = [i for i in pool if not math.isnan(scores[i])]
        rng = random.Random(sample_seed(seed, prompt_index, -1))
        accepted = rso_select([scores[i] for i in nan_free], gen.rso_keep, gen.rso_beta, rng)
        stats["rso_rejected"] = len(nan_free) - len(accepted)
        stats["nan_scores"] += len(pool) - len(nan_free)
        pool = [nan_free[i] for i in accepted]
    components = None
    if sample_rate is not None and candidates and candidates[0].components:  # audio, several scorers: each filters
        components = [[candidates[i].components[name] for i in pool] for name in candidates[0].components]
    pairs, pair_stats = form_pairs(
        [scores[i] for i in pool], gen.strategy, gen.min_winner_score, gen.min_gap, gen.max_gap,
        min_loser_score=gen.min_loser_score, components=components,
    )
    stats.update(pair_stats)
    encoded: Dict[int, bytes] = {}
    rows = []
    if sample_rate is not None:
        rows = _audio_rows(prompt_index, record, candidates, pool, pairs, gen, model, reward_name, sample_rate)
        pairs = []
    for w, l in pairs:
        win, lose = candidates[pool[w]], candidates[pool[l]]
        first, second = (win, lose) if winner_first(win.seed, lose.seed) else (lose, win)
        for c in (first, second):
            if c.sample not in encoded:
                encoded[c.sample] = _encode_image(c.image, gen.image_format)
        label_0 = 1.0 if first is win else 0.0
        rows.append({
            "caption": record.prompt,
            "jpg_0": encoded[first.sample],
            "jpg_1": encoded[second.sample],
            "label_0": label_0,
            "label_1": 1.0 - label_0,
            "score_0": first.score,
            "score_1": second.score,
            "reward_model": reward_name,
            "seed_0": first.seed,
            "seed_1": second.seed,
            "model": model,
            "prompt_index": prompt_index,
            "category": record.category,
        })
    stats["prompts"] = 1
    stats["samples"] = len(candidates)
    stats["prompts_without_pairs"] = int(not rows)
    return rows, stats


def _audio_rows(
    prompt_index: int, record: Any, candidates: List[_Candidate], pool: List[int], pairs: List[Tuple[int, int]],
    gen: GenerateConfig, model: str, reward_name: str, sample_rate: int,
) -> List[dict]:
    """Audio-alpaca rows: the winner is always ``chosen`` (``score_0``), each clip encoded once."""
    encoded: Dict[int, dict] = {}
    rows = []
    for w, l in pairs:
        win, lose = candidates[pool[w]], candidates[pool[l]]
        for c in (win, lose):
            if c.sample not in encoded:
                data = _encode_audio(c.image, sample_rate, gen.audio_format)
                encoded[c.sample] = {"bytes": data, "path": f"p{prompt_index:06d}-s{c.sample:03d}.{gen.audio_format}"}
        rows.append({
            "prompt": record.prompt,
            "chosen": encoded[win.sample],
            "rejected": encoded[lose.sample],
            "strategy": gen.strategy,
            "score_0": win.score,
            "score_1": lose.score,
            "reward_model": reward_name,
            "seed_0": win.seed,
            "seed_1": lose.seed,
            "model": model,
            "prompt_index": prompt_index,
            "category": record.category,
        })
    return rows


def summarize(folder: str | Path, total_prompts: Optional[int] = None) -> dict:
    """Counts over every shard in ``folder`` (all runs and restarts together)."""
    metas = read_shards(folder)
    totals: Counter = Counter()
    covered: set = set()
    for meta in metas.values():
        totals.update(meta.get("stats", {}))
        covered.update(meta["prompt_indices"])
    summary = {
        "prompts_done": len(covered),
        "pairs_written": sum(meta["rows"] for meta in metas.values()),
        "pairs_considered": totals["pairs_considered"],
        "pairs_filtered": {reason: totals[reason] for reason in _filter_reasons(totals)},
        "samples": totals["samples"],
        "samples_with_nan_score": totals["nan_scores"],
        "samples_rejected_by_rso": totals["rso_rejected"],
        "samples_blocked_by_safety_checker": totals["safety_blocked"],
        "prompts_without_pairs": totals["prompts_without_pairs"],
        "shards": sum(1 for path in metas if path.suffix == ".parquet"),
    }
    if total_prompts is not None:
        summary["prompts_total"] = total_prompts
        summary["prompts_missing"] = total_prompts - len(covered)
    return summary


def _filter_reasons(totals: Counter) -> Tuple[str, ...]:
    """FILTER_REASONS, with ``min_loser_score`` after ``min_winner_score`` where a run set that filter."""
    if "min_loser_score" not in totals:
        return FILTER_REASONS
    return FILTER_REASONS[:2] + ("min_loser_score",) + FILTER_REASONS[2:]


def _format_summary(summary: dict, folder: Path) -> str:
    filtered = ", ".join(f"{k} {v}" for k, v in summary["pairs_filtered"].items())
    lines = [
        f"prompts done: {summary['prompts_done']} of {summary.get('prompts_total', '?')}",
        f"pairs written: {summary['pairs_written']} of {summary['pairs_considered']} considered "
        f"in {summary['shards']} shards in {folder}",
        f"pairs filtered: {filtered}",
        f"samples with NaN score (left out): {summary['samples_with_nan_score']}",
        f"prompts without any pair: {summary['prompts_without_pairs']}",
    ]
    if summary["samples_blocked_by_safety_checker"]:
        lines.append(f"samples blocked by the pipeline's safety checker (left out): "
                     f"{summary['samples_blocked_by_safety_checker']}")
    if summary["samples_rejected_by_rso"]:
        lines.append(f"samples rejected by RSO: {summary['samples_rejected_by_rso']}")
    if summary.get("prompts_cut"):
        lines.append(f"warning: {summary['prompts_cut']} prompts are longer than the text encoder takes and were "
                     "sampled cut to its token limit")
    if summary.get("prompts_missing"):
        lines.append(f"{summary['prompts_missing']} prompts are not done yet (a process stopped early, or is still "
                     "running); run the same command again to finish them")
    return "\n".join(lines)


def generate(
    cfg: Config,
    *,
    backbone: Any = None,
    reward: Any = None,
    process_index: Optional[int] = None,
    num_processes: Optional[int] = None,
    raise_on_stop: bool = False,
) -> Optional[dict]:
    """Run generation; returns the summary on the main process (None elsewhere).

    ``backbone`` and ``reward`` replace the configured model and reward model (tests, notebooks);
    ``process_index`` / ``num_processes`` replace accelerate's, to run one share of a multi-process job by hand.
    A run stopped by SIGTERM/SIGINT saves its finished prompts and returns the summary (``prompts_missing`` says
    what is left), or with ``raise_on_stop`` (the command line) exits with status 128 + the signal number.
    """
    from diffusion_pref.prompts import read_prompts

    gen = cfg.generate
    validate(cfg)  # again: a Config built or changed in code (iterate's rounds, notebooks) skips load_config
    _check_settings(gen, cfg.sample)
    records = read_prompts(gen.prompts, gen.prompt_column, gen.prompt_split)
    # Of the whole file, so that raising max_prompts later resumes the same run.
    prompts_digest = hashlib.sha256(json.dumps([[r.prompt, r.category] for r in records]).encode()).hexdigest()[:16]
    if gen.max_prompts is not None:
        records = records[: gen.max_prompts]

    state = _process_state()
    # runtime.device=auto: the device accelerate gives this process (its GPU in a multi-process launch)
    device = state.device if cfg.runtime.device == "auto" else resolve_runtime(cfg.runtime).device
    process = state.process_index if process_index is None else process_index
    processes = state.num_processes if num_processes is None else num_processes
    if not 0 <= process < processes:
        raise ValueError(f"process_index {process} is outside 0..{processes - 1}")
    folder = Path(cfg.output.dir)
    folder.mkdir(parents=True, exist_ok=True)
    with _lock_process_share(folder, process):  # released on any exit, also by an exception
        for stale in folder.glob(f".pairs-p{process:03d}-*.tmp"):  # left by a run killed mid-write
            stale.unlink()
        if reward is None:
            from diffusion_pref.reward_models import load_reward_from_config

            reward = load_reward_from_config(cfg.reward, device)
        reward_name = getattr(reward, "name", type(reward).__name__)
        settings = _settings(cfg, prompts_digest, reward_name)
        done_meta = read_shards(folder)
        _check_resume(done_meta, settings, folder)
        done = {i for meta in done_meta.values() for i in meta["prompt_indices"]}
        numbers = [int(m[2]) for path in done_meta if (m := _SHARD_RE.match(path.name)) and int(m[1]) == process]

        mine = list(range(process, len(records), processes))
        # A group is done whole or not at all, unless batch_size changed since the interrupted run; then the rest
        # of a partly done group still runs, only without the bit-identical-batches guarantee.
        groups = [[i for i in g if i not in done] for g in _prompt_groups(mine, gen, cfg.sample.batch_size)]
        groups = [g for g in groups if g]
        if groups and backbone is None:
            backbone = _load_backbone(cfg, device)
        prompts_cut = None
        if process == 0 and backbone is not None:  # counted over every prompt of the run, once, by the main process
            prompts_cut = sum(backbone.prompts_cut([r.prompt for r in records]))
        writer = _ShardWriter(folder, process, max(numbers, default=-1) + 1, settings)
        with _StopOnSignal() as stop:
            _generate_groups(groups, records, cfg, backbone, reward, reward_name, writer, show_progress=process == 0,
                             stop=stop)
        if stop.signal_name:
            print(f"generate: stopped by {stop.signal_name}: every finished prompt is saved in {folder}; run the same "
                  "command again to continue", file=sys.stderr)

    state.wait_for_everyone()
    if process != 0:
        summary = None
    else:
        summary = summarize(folder, total_prompts=len(records))
        if prompts_cut is None and (folder / SUMMARY_FILE).is_file():
            # nothing was left to sample, so no model was loaded to count with: keep the finished run's count
            prompts_cut = json.loads((folder / SUMMARY_FILE).read_text()).get("prompts_cut")
        if prompts_cut is not None:
            summary["prompts_cut"] = prompts_cut
        atomic_write(folder / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
        print(_format_summary(summary, folder))
    if stop.signal_number is not None and raise_on_stop:
        raise SystemExit(128 + stop.signal_number)  # the shell's status for a process ended by that signal
    return summary


class _StopOnSignal:
    """Turns the first SIGTERM or SIGINT into a request to stop between batches (``signal_name`` is then set).

    The first signal puts the previous handlers back, so a second one acts as it would without this (SIGTERM kills,
    SIGINT raises KeyboardInterrupt): a run that must die now still can, and loses only its unwritten prompts.
    Handlers can only be set from the main thread; elsewhere this does nothing.
    """

    SIGNALS = ("SIGTERM", "SIGINT")

    def __init__(self):
        self.signal_name: Optional[str] = None
        self.signal_number: Optional[int] = None
        self._previous: dict = {}

    def _handle(self, number, frame) -> None:
        self.signal_number, self.signal_name = number, signal.Signals(number).name
        self._restore()
        # os.write, not print: the handler may run in the middle of another write to stderr.
        os.write(2, f"\ngenerate: {self.signal_name} received: finishing the current batch and saving every finished "
                    "prompt (send it again to stop at once)\n".encode())

    def _restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        self._previous = {}

    def __enter__(self) -> "_StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                number = getattr(signal, name, None)
                if number is not None:
                    self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()


class _ShardWriter:
    """Collects finished prompts and writes them as one shard once ``shard_size`` pairs are pending."""

    def __init__(self, folder: Path, process: int, next_number: int, settings: dict):
        self.folder, self.process, self.number, self.settings = folder, process, next_number, settings
        self.rows: List[dict] = []
        self.prompts: List[int] = []
        self.stats: Counter = Counter()

    def add(self, prompt_index: int, rows: List[dict], stats: Counter) -> None:
        self.rows.extend(rows)
        self.prompts.append(prompt_index)
        self.stats.update(stats)

    def flush(self) -> None:
        if not self.prompts:
            return
        meta = {"prompt_indices": self.prompts, "stats": dict(self.stats), "settings": self.settings}
        _write_shard(self.folder, self.process, self.number, self.rows, meta)
        self.number += 1
        self.rows, self.prompts, self.stats = [], [], Counter()


def _generate_groups(
    groups: List[List[int]], records: List[Any], cfg: Config, backbone: Any, reward: Any, reward_name: str,
    writer: _ShardWriter, show_progress: bool, stop: Optional[_StopOnSignal] = None,
) -> None:
    """Sample, score and pair every prompt of ``groups``; a shard is only ever written between groups.

    After a stop signal (``stop.signal_name`` set) the group being sampled is finished and no new one is started;
    the finished prompts are written as usual.

    Pairing and image encoding (PNG costs tens of ms per 512 px image) of one group run in worker threads while
    the next group is sampled; Pillow releases the GIL while encoding. Results are taken in group order, so the
    shards are the same as without threads.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    gen = cfg.generate
    progress = tqdm(total=sum(map(len, groups)), unit="prompt", desc="generate", disable=not show_progress,
                    dynamic_ncols=True)

    def collect(futures) -> None:
        for p, future in futures:
            writer.add(p, *future.result())
        progress.update(len(futures))
        if len(writer.rows) >= gen.shard_size or len(writer.prompts) >= gen.flush_every_prompts:
            writer.flush()

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="encode") as pool:
        previous: list = []
        for group in groups:
            candidates = _sample_and_score(group, records, cfg, backbone, reward, reward_name)
            futures = [
                (p, pool.submit(_pairs_rows, p, records[p], candidates[p], gen, cfg.model.pretrained, reward_name,
                                cfg.runtime.seed, getattr(backbone, "sample_rate", None)))
                for p in group
            ]
            collect(previous)
            previous = futures
            if stop is not None and stop.signal_name:
                break
        collect(previous)
    writer.flush()
    progress.close()


def _sample_and_score(
    group: List[int], records: List[Any], cfg: Config, backbone: Any, reward: Any, reward_name: str
) -> Dict[int, List[_Candidate]]:
    sample = cfg.sample
    jobs = [(p, s) for p in group for s in range(cfg.generate.samples_per_prompt)]
    candidates: Dict[int, List[_Candidate]] = {p: [] for p in group}
    for start in range(0, len(jobs), sample.batch_size):
        batch = jobs[start:start + sample.batch_size]
        prompts = [records[p].prompt for p, _ in batch]
        seeds = [sample_seed(cfg.runtime.seed, p, s) for p, s in batch]
        images = _sample(backbone, prompts, seeds, cfg.sample)
        blocked = images.blocked
        rate = getattr(backbone, "sample_rate", None)
        per_model: List[Optional[Dict[str, float]]] = [None] * len(batch)
        if rate is None:
            scores = _as_floats(reward.score(prompts, images), len(batch), reward_name)
        elif len(getattr(reward, "components", {})) > 1:  # each scorer's own scores: a pair must pass on each
            parts = reward.score_components(prompts, images, sample_rate=rate)
            scores = _as_floats(reward.combine(parts), len(batch), reward_name)
            lists = {name: _as_floats(v, len(batch), name) for name, v in parts.items()}
            per_model = [{name: v[k] for name, v in lists.items()} for k in range(len(batch))]
        else:
            scores = _as_floats(reward.score(prompts, images, sample_rate=rate), len(batch), reward_name)
        for (p, s), seed, image, score, flag, comp in zip(batch, seeds, images, scores, blocked, per_model):
            candidates[p].append(_Candidate(s, seed, image, score, flag, comp))
    return candidates


def _lock_process_share(folder: Path, process: int):
    """Hold an exclusive lock on this process's share of ``folder`` for the run.

    Two runs writing the same process's shards (the same command started twice) would reuse shard numbers; the
    second one stops here instead. The OS drops the lock when its process dies, so a killed run leaves none.
    """
    handle = open(folder / f".lock-p{process:03d}", "a")
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; runs are not guarded there
        return handle
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise RuntimeError(
            f"another generate run is writing the shards of process {process} in {folder}; wait for it to finish "
            "or stop it, or choose another output.dir"
        ) from None
    return handle


def _process_state():
    """accelerate's view of the processes of this launch (one process when not launched by accelerate/torchrun)."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # PartialState joins several CPU processes (gloo) only when told it runs on the CPU: `accelerate launch --cpu`
    # says so through ACCELERATE_USE_CPU, while torchrun on a machine without a GPU says nothing.
    no_accelerator = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or no_accelerator)


def _as_floats(scores: Any, expected: int, reward_name: str) -> List[float]:
    # float64: never round the scores a reward model returns (some return float64).
    values = scores.detach().cpu().double().tolist() if hasattr(scores, "detach") else [float(s) for s in scores]
    if len(values) != expected:
        raise RuntimeError(f"reward model {reward_name} returned {len(values)} scores for {expected} images")
    return values


def run(cfg: Config) -> None:
    """Entry point of ``diffusion-pref generate``."""
    generate(cfg, raise_on_stop=True)


__all__ = ["FILTER_REASONS", "form_pairs", "generate", "read_shards", "rso_select", "run", "sample_seed", "summarize"]
