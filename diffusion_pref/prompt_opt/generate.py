"""``prompt-opt generate``'s pieces: rewrites from the policy, rendered and scored against the ORIGINAL prompt, as pairs.

For each prompt (index ``i``): ``k`` rewrites are sampled from the policy with seed ``sample_seed(seed, i, -1)``
(one call per prompt, so the rewrites do not depend on batching or on resuming); each rewrite, and the original
prompt, is rendered by the image backbone at the same ``image_seeds`` seeds ``sample_seed(seed, i, j)``; the reward
scores every image against the original prompt (text relevance is measured against what the user asked for) and a
candidate's score is its mean over the seeds. The best- against the worst-scored candidate (ties and NaN scores
left out, as in ``diffusion-pref generate``) is written as one pair row:

    prompt, chosen, rejected, score_chosen, score_rejected, similarity,
    score_original, chosen_is_original, rejected_is_original, prompt_index, candidates

``similarity`` is cos(e(prompt), e(chosen)) with the given embedder (NaN without one; ``semantic.add_semantic_weights``
adds it and Sem-DPO's ``weight`` later). With ``include_original`` the unchanged prompt is a candidate too. A reward
with ``text_side = True`` (``diffusion_pref.toy.rewriter.ToyRewriteReward``) scores the rewrite's text directly:
nothing is rendered and no backbone is needed.

Output: ``pairs-NNNNN.parquet`` shards in ``out_dir`` (and ``pairs-NNNNN.empty.json`` for flushed prompts that gave
no pair) whose metadata lists the prompt indices they cover and the settings; every file is written to a temporary
name and renamed. A restarted run skips the covered prompts, so a run killed at any point and restarted ends with
every prompt done once; restarting into a folder written with other settings is refused. ``summary.json`` at the end.

    from diffusion_pref.pipelines import load_backbone
    from diffusion_pref.prompt_opt.generate import RewriteSettings, generate_pairs
    generate_pairs(prompts, "out/pairs", policy, reward, backbone=load_backbone(cfg.model), settings=RewriteSettings(k=4))
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from diffusion_pref.fileio import atomic_write
from diffusion_pref.pairing import form_pairs, sample_seed

__all__ = ["RewriteSettings", "generate_pairs", "read_done", "render"]

METADATA_KEY = b"diffusion_pref.prompt_opt"
SUMMARY_FILE = "summary.json"
_SHARD_RE = re.compile(r"^pairs-(\d{5})\.(parquet|empty\.json)$")


@dataclass(frozen=True)
class RewriteSettings:
    """What decides a prompt's pairs (all of it is checked on resume), plus ``flush_every_prompts``."""

    k: int = 4                       # rewrites sampled per prompt
    seed: int = 0
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    include_original: bool = True    # the unchanged prompt competes with the rewrites
    image_seeds: int = 1             # images per candidate; its score is their mean
    steps: int = 20                  # image sampling
    guidance_scale: float = 1.0
    resolution: Optional[int] = None
    flush_every_prompts: int = 16

    def __post_init__(self):
        for name in ("k", "image_seeds", "steps", "flush_every_prompts", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"prompt-opt generate: {name} must be an integer >= 1, got {value!r}.")
        if self.k + self.include_original < 2:
            raise ValueError("prompt-opt generate: k=1 without include_original gives one candidate per prompt, "
                             "so no pair; raise k or set include_original.")


def render(backbone: Any, prompts: Sequence[str], seeds: Sequence[int], settings: RewriteSettings) -> list:
    """The one call into the image backbone's sampler: one PIL image per (prompt, seed), with ``.blocked`` (the
    safety checker, when it is on, replaced the image)."""
    return backbone.sample(list(prompts), list(seeds), steps=settings.steps, guidance_scale=settings.guidance_scale,
                           resolution=settings.resolution, output_type="pil")


def _scores(values: Any, expected: int, name: str) -> list[float]:
    values = values.detach().cpu().double().tolist() if hasattr(values, "detach") else [float(v) for v in values]
    if len(values) != expected:
        raise RuntimeError(f"prompt-opt generate: reward {name} returned {len(values)} scores for {expected} inputs.")
    return values


def _score_candidates(index: int, prompt: str, texts: list[str], reward: Any, backbone: Any,
                      settings: RewriteSettings, keep_images: Optional[list] = None) -> list[float]:
    """Each text's mean reward against ``prompt``; ``keep_images``: a list the rendered images are appended to
    (text-major, ``settings.image_seeds`` per text; nothing for a text-side reward)."""
    name = getattr(reward, "name", type(reward).__name__)
    if getattr(reward, "text_side", False):
        return _scores(reward.score([prompt] * len(texts), texts), len(texts), name)
    if backbone is None:
        raise ValueError(f"prompt-opt generate: reward {name} scores images, so an image backbone is needed.")
    seeds = [sample_seed(settings.seed, index, j) for j in range(settings.image_seeds)]
    jobs = [(t, s) for t in texts for s in seeds]  # every candidate at the same seeds: a paired comparison
    images = render(backbone, [t for t, _ in jobs], [s for _, s in jobs], settings)
    if keep_images is not None:
        keep_images.extend(images)
    # relevance against the ORIGINAL prompt, whatever the image was drawn from
    values = _scores(reward.score([prompt] * len(jobs), images), len(jobs), name)
    # a blocked image is black, not a bad rewrite: its candidate's mean becomes NaN and it does not compete
    values = [float("nan") if b else v for v, b in zip(values, getattr(images, "blocked", [False] * len(jobs)))]
    n = settings.image_seeds
    return [math.fsum(values[c * n:(c + 1) * n]) / n for c in range(len(texts))]


def _pair_row(index: int, prompt: str, policy: Any, reward: Any, backbone: Any, embed: Optional[Callable],
              settings: RewriteSettings) -> tuple[Optional[dict], Counter]:
    rewrites = policy.sample(prompt, settings.k, seed=sample_seed(settings.seed, index, -1),
                             max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                             top_p=settings.top_p, top_k=settings.top_k, with_finished=True)
    rewrites, finished = rewrites
    stats = Counter(rewrites=len(rewrites))
    texts = [prompt] * settings.include_original + rewrites
    # An empty rewrite (the model stopped at once) or an unfinished one (cut at max_new_tokens, no eos) cannot be
    # trained on as a complete answer: it is scored (for the record) but does not compete.
    usable = [True] * settings.include_original + [bool(t.strip()) and f for t, f in zip(rewrites, finished)]
    scores = [s if ok else float("nan")
              for ok, s in zip(usable, _score_candidates(index, prompt, texts, reward, backbone, settings))]
    stats["empty_rewrites"] = sum(not t.strip() for t in rewrites)
    stats["unfinished_rewrites"] = sum(bool(t.strip()) and not f for t, f in zip(rewrites, finished))
    pairs, pair_stats = form_pairs(scores, "best_vs_worst")
    stats.update({k: v for k, v in pair_stats.items() if k in ("tie", "nan_scores")})
    if pairs and texts[pairs[0][0]] == texts[pairs[0][1]]:
        pairs, stats["same_text"] = [], 1
    if not pairs:
        return None, stats
    w, l = pairs[0]
    similarity = float("nan")
    if embed is not None:
        from diffusion_pref.prompt_opt.semantic import cosine_similarities

        similarity = float(cosine_similarities(embed, [prompt], [texts[w]])[0])
    original = scores[0] if settings.include_original else float("nan")
    row = {"prompt": prompt, "chosen": texts[w], "rejected": texts[l], "score_chosen": scores[w],
           "score_rejected": scores[l], "similarity": similarity, "score_original": original,
           "chosen_is_original": settings.include_original and w == 0,
           "rejected_is_original": settings.include_original and l == 0,
           "prompt_index": index, "candidates": json.dumps(list(zip(texts, scores)))}
    return row, stats


def _schema():
    import pyarrow as pa

    return pa.schema([("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()),
                      ("score_chosen", pa.float64()), ("score_rejected", pa.float64()), ("similarity", pa.float64()),
                      ("score_original", pa.float64()), ("chosen_is_original", pa.bool_()),
                      ("rejected_is_original", pa.bool_()), ("prompt_index", pa.int64()), ("candidates", pa.string())])


def read_done(folder: str | Path) -> dict[Path, dict]:
    """Metadata (``prompt_indices``, ``stats``, ``settings``, ``rows``) of every complete shard in ``folder``."""
    import pyarrow.parquet as pq

    folder = Path(folder)
    done = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if not _SHARD_RE.match(path.name):
            continue
        if path.suffix == ".parquet":
            meta = json.loads((pq.read_schema(path).metadata or {})[METADATA_KEY])
            meta["rows"] = pq.ParquetFile(path).metadata.num_rows
        else:
            meta = {**json.loads(path.read_text()), "rows": 0}
        done[path] = meta
    return done


def _write(folder: Path, number: int, rows: list[dict], meta: dict) -> None:
    if rows:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(rows, schema=_schema().with_metadata({METADATA_KEY: json.dumps(meta).encode()}))
        atomic_write(folder / f"pairs-{number:05d}.parquet", lambda tmp: pq.write_table(table, tmp))
    else:
        atomic_write(folder / f"pairs-{number:05d}.empty.json", json.dumps(meta))


def generate_pairs(
    prompts: Sequence[str],
    out_dir: str | Path,
    policy: Any,
    reward: Any,
    *,
    backbone: Any = None,
    embed: Optional[Callable] = None,
    settings: RewriteSettings = RewriteSettings(),
    names: Optional[dict] = None,
    progress: bool = False,
) -> dict:
    """Write best-vs-worst rewrite pairs for ``prompts`` into ``out_dir`` (resuming what is there); the summary.

    ``policy``: a :class:`~diffusion_pref.prompt_opt.model.CausalLMPolicy` (anything with its ``sample``).
    ``reward``: ``score(prompts, images)`` (a reward model, or a combination of them), or a text-side reward.
    ``backbone``: ``diffusion_pref.pipelines.load_backbone(cfg.model)``. ``embed``: a ``semantic`` embedder for
    the ``similarity`` column. ``names``: what identifies the policy / backbone / reward / embedder in the resume
    check (default: their ``name`` attributes; the backbone's class and family: a command should pass
    ``{"backbone": cfg.model.pretrained}``).
    """
    from tqdm.auto import tqdm

    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompt-opt generate: no prompts.")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompt-opt generate: prompt {i} is {p!r}; every prompt must be non-empty text.")
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".pairs-*.tmp"):  # left by a run killed mid-write
        stale.unlink()
    names = names or {}
    fingerprint = {
        **asdict(settings),
        "policy": names.get("policy", getattr(policy, "name", "")),
        "reward": names.get("reward", getattr(reward, "name", type(reward).__name__)),
        "backbone": names.get("backbone", "" if backbone is None else f"{type(backbone).__name__}/{backbone.family}"),
        "embedder": names.get("embedder", "" if embed is None else getattr(embed, "name", "embedder")),
        "prompts": hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16],
    }
    fingerprint.pop("flush_every_prompts")  # batching of writes, not of results
    done_meta = read_done(folder)
    for path, meta in done_meta.items():
        changed = sorted(k for k in set(fingerprint) | set(meta["settings"])
                         if fingerprint.get(k) != meta["settings"].get(k))
        if changed:
            raise ValueError(f"prompt-opt generate: {path} was written with other settings ({', '.join(changed)}); "
                             "use the same settings to resume, or another output folder.")
    done = {i for meta in done_meta.values() for i in meta["prompt_indices"]}
    number = max((int(_SHARD_RE.match(p.name)[1]) for p in done_meta), default=-1) + 1
    todo = [i for i in range(len(prompts)) if i not in done]

    rows, covered, stats = [], [], Counter()

    def flush():
        nonlocal rows, covered, stats, number
        if covered:
            _write(folder, number, rows, {"prompt_indices": covered, "stats": dict(stats), "settings": fingerprint})
            number += 1
            rows, covered, stats = [], [], Counter()

    for i in tqdm(todo, desc="prompt-opt generate", unit="prompt", disable=not progress):
        row, row_stats = _pair_row(i, prompts[i], policy, reward, backbone, embed, settings)
        if row is not None:
            rows.append(row)
        covered.append(i)
        stats.update(row_stats)
        if len(covered) >= settings.flush_every_prompts:
            flush()
    flush()

    totals: Counter = Counter()
    all_meta = read_done(folder)
    for meta in all_meta.values():
        totals.update(meta["stats"])
    covered_all = {i for meta in all_meta.values() for i in meta["prompt_indices"]}
    summary = {"prompts_total": len(prompts), "prompts_done": len(covered_all),
               "pairs_written": sum(m["rows"] for m in all_meta.values()), **dict(sorted(totals.items()))}
    atomic_write(folder / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    return summary
