"""``diffusion-pref evaluate``: compare a base model and tuned variants on one prompt set with the same seeds.

Every variant generates one sample per (prompt, seed) from the same initial noise; every sample is scored by each
reward model in ``reward.models`` separately (plus their weighted sum when there are several). The run writes into
``output.dir``:

- ``media/<variant>/…``: the samples (PNG, or WAV for audio). Re-running reuses a sample whose key (model weights,
  prompt, seed, sampling settings) matches; ``eval.no_cache=true`` regenerates everything.
- ``per_image.parquet`` and ``per_image.csv``: one row per sample: variant, prompt_index, prompt, category, seed,
  media (path relative to ``output.dir``) and one column per reward.
- ``metrics.json``: per reward and variant the mean, median, std and per-category means; per reward the win rate
  of each variant over the baseline (per prompt and seed, ties count half) with a 95% bootstrap interval over
  prompts. Every number is a function of ``per_image.parquet`` (see ``diffusion_pref.evaluation.stats``).
- ``report.html``: one self-contained page (see ``diffusion_pref.evaluation.report``).
- ``grid.png`` (images only): the first prompts x seeds x variants side by side, for pasting elsewhere.

Variants (``eval.variants``, name -> spec): ``base`` is ``model.pretrained``; a folder with LoRA weights
(``pytorch_lora_weights.safetensors``) is loaded on top of the base (``Backbone.load_lora``); a folder with
``model_index.json`` is a full pipeline. ``eval.images_dir`` instead scores images that already exist, in the HPDv2
benchmark layout ``<style>/{index:05d}.jpg`` (or ``<model>/<style>/{index:05d}.jpg`` for several models).

Run::

    diffusion-pref evaluate --config configs/toy_evaluate.yaml eval.variants.dpo=outputs/toy_dpo/final

Example (Python)::

    from diffusion_pref.config import load_config
    from diffusion_pref.commands.evaluate import run
    run(load_config("configs/eval_sd15.yaml", ["eval.variants.dpo=outputs/sd15_dpo/lora"]))
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence

from diffusion_pref.config import Config, ConfigError, resolve_runtime, validate
from diffusion_pref.fileio import atomic_write
from diffusion_pref.suggest import did_you_mean

if TYPE_CHECKING:
    import pandas as pd

LORA_WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
AUDIO_SUFFIXES = (".wav", ".flac")
WEIGHTED_SUM = "weighted_sum"  # the column holding sum(weight * score) when several reward models are configured
# Files whose size and modification time identify a model's weights for the sample cache.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt", ".json", ".txt", ".model")
_CACHE_NAME = re.compile(r"_([0-9a-f]{16})\.(png|wav)$")


@dataclass
class Variant:
    name: str
    spec: str  # what the user wrote: "base", a LoRA folder, a pipeline folder
    kind: str  # base | lora | pipeline
    path: Optional[Path] = None  # the LoRA or pipeline folder


@dataclass
class Sample:
    variant: str
    prompt_index: int
    prompt: str
    category: Optional[str]
    seed: int
    media: str  # path relative to output.dir, or absolute for images scored in place


# -- prompts -------------------------------------------------------------------------------------------------


def load_prompt_records(cfg: Config) -> list:
    """The prompt set as ``PromptRecord``s (``diffusion_pref.prompts.read_prompts``: files, the HPDv2 benchmark
    folder, hub datasets, named sets such as ``toy``, the shapes-world held-out prompts); ``eval.max_prompts`` keeps
    the first N."""
    from diffusion_pref.prompts import PROMPT_SETS, read_prompts

    if not cfg.eval.prompts:
        named = f" or a named set ({', '.join(PROMPT_SETS)})" if PROMPT_SETS else ""
        raise ConfigError("eval.prompts is not set; give a prompt file (txt, json, PartiPrompts tsv, parquet), "
                          f"the HPDv2 benchmark folder, a hub dataset id{named}")
    try:
        records = read_prompts(cfg.eval.prompts, column=cfg.eval.prompt_column)
    except ValueError as err:  # PromptFileError is a ValueError; say which key the file came from
        # The reader's hints name the generate.* keys; eval has the same keys under eval.*.
        message = str(err).replace("generate.prompt", "eval.prompt")
        raise ConfigError(f"eval.prompts={cfg.eval.prompts}: {message}") from None
    if cfg.eval.max_prompts is not None:
        records = records[: cfg.eval.max_prompts]
    if not records:
        raise ConfigError(f"eval.prompts={cfg.eval.prompts} gives no prompts (eval.max_prompts={cfg.eval.max_prompts})")
    return records


# -- variants and the sample cache ---------------------------------------------------------------------------


def resolve_variants(cfg: Config) -> List[Variant]:
    """Check every ``eval.variants`` entry before any model is loaded; a bad path is an error naming the variant."""
    specs = dict(cfg.eval.variants) or {"base": "base"}
    variants = []
    for name, spec in specs.items():
        if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
            raise ConfigError(f"eval.variants.{name}: variant names may use letters, digits, '.', '_' and '-' only")
        spec = str(spec)
        if spec == "base":
            variants.append(Variant(name, spec, "base"))
            continue
        path = Path(spec).expanduser()
        if not path.exists():
            raise ConfigError(
                f"eval.variants.{name}={spec}: no such folder; give 'base', a LoRA folder (with "
                f"{LORA_WEIGHT_NAMES[0]}) or a diffusers pipeline folder (with model_index.json)"
            )
        if (path / "model_index.json").is_file():
            variants.append(Variant(name, spec, "pipeline", path))
        elif path.is_dir() and any((path / n).is_file() for n in LORA_WEIGHT_NAMES):
            variants.append(Variant(name, spec, "lora", path))
        else:
            raise ConfigError(
                f"eval.variants.{name}={spec}: the folder has neither {LORA_WEIGHT_NAMES[0]} (a LoRA) nor "
                "model_index.json (a pipeline); point it at the LoRA or pipeline folder a training run saved"
            )
    return variants


def _folder_fingerprint(path: Path) -> list:
    """Names, sizes and modification times of the weight and config files: changes when the weights change."""
    return sorted(
        (str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in path.rglob("*")
        if p.is_file() and p.suffix in _WEIGHT_SUFFIXES
    )


def model_fingerprint(cfg: Config, variant: Variant) -> Dict[str, Any]:
    """What identifies the weights a variant samples with (part of the sample cache key)."""
    if variant.kind == "pipeline":
        return {"pipeline": _folder_fingerprint(variant.path)}
    base_path = Path(_resolved_pretrained(cfg.model.pretrained))
    base: Dict[str, Any] = {"pretrained": cfg.model.pretrained, "revision": cfg.model.revision,
                            "variant": cfg.model.variant, "vae": cfg.model.vae}
    if base_path.is_dir():  # a hub id stays a name: its snapshot is fixed by the revision
        base["files"] = _folder_fingerprint(base_path)
    if variant.kind == "lora":
        return {"base": base, "lora": _folder_fingerprint(variant.path)}
    return {"base": base}


SAMPLING_KEYS = {"steps": int, "guidance_scale": float, "resolution": int, "scheduler": str}


def sampling_settings(cfg: Config, variant: Optional[str] = None) -> Dict[str, Any]:
    """The sampling settings of ``variant``: ``sample.steps`` etc., with its ``eval.variant_sampling`` entry on top."""
    settings: Dict[str, Any] = {"steps": cfg.sample.steps, "guidance_scale": cfg.sample.guidance_scale,
                                "resolution": cfg.sample.resolution, "dtype": _dtype_name(cfg)}
    if cfg.sample.scheduler is not None:  # only when set: the sample cache keys of runs without one stay valid
        settings["scheduler"] = cfg.sample.scheduler
    overrides = (cfg.eval.variant_sampling.get(variant) or {}) if variant is not None else {}
    for key, value in overrides.items():
        if key not in SAMPLING_KEYS:
            hint = did_you_mean(key, SAMPLING_KEYS)
            raise ConfigError(f"eval.variant_sampling.{variant}.{key}: not a sampling setting"
                              f"{'; ' + hint if hint else '.'} Choices: {', '.join(SAMPLING_KEYS)}")
        try:
            settings[key] = None if value is None else SAMPLING_KEYS[key](value)
        except (TypeError, ValueError):
            raise ConfigError(f"eval.variant_sampling.{variant}.{key}={value!r} is not a "
                              f"{SAMPLING_KEYS[key].__name__}") from None
    if settings.get("scheduler") is not None:  # a misspelt class fails here, before any model is loaded
        from diffusion_pref.pipelines.base import scheduler_class

        key = "sample.scheduler" if "scheduler" not in overrides else f"eval.variant_sampling.{variant}.scheduler"
        scheduler_class(settings["scheduler"], key)
    return settings


def check_variant_sampling(cfg: Config, variant_names: Sequence[str]) -> None:
    """Every ``eval.variant_sampling`` entry names a variant and only known settings (checked before generating)."""
    for name in cfg.eval.variant_sampling:
        if name not in variant_names:
            raise ConfigError(f"eval.variant_sampling.{name}: no variant of that name; variants: {list(variant_names)}")
        sampling_settings(cfg, name)


def sample_key(fingerprint: Mapping[str, Any], prompt: str, seed: int, settings: Mapping[str, Any]) -> str:
    blob = json.dumps({"model": fingerprint, "prompt": prompt, "seed": int(seed), "settings": settings},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _cached_media(media_dir: Path) -> Dict[str, Path]:
    """key -> file of every sample already on disk (any variant folder, so renaming a variant reuses its samples)."""
    found = {}
    if media_dir.is_dir():
        for path in media_dir.glob("*/*"):
            match = _CACHE_NAME.search(path.name)
            if match:
                found[match.group(1)] = path
    return found


def _resolved_pretrained(pretrained: str) -> str:
    from diffusion_pref.pipelines import resolve_pretrained

    return resolve_pretrained(pretrained)


# -- generation ----------------------------------------------------------------------------------------------


def _dtype_name(cfg: Config) -> str:
    """The dtype samples are generated in; "auto" resolved, so fp16 and fp32 samples never share a cache key."""
    return resolve_runtime(cfg.runtime, sampling=True).precision


def _torch_device_and_dtype(cfg: Config):
    runtime = resolve_runtime(cfg.runtime, sampling=True)
    return runtime.device, runtime.dtype


def load_variant(cfg: Config, variant: Variant):
    """The backbone (``diffusion_pref.pipelines``) that samples ``variant``, on the eval device."""
    from diffusion_pref.pipelines import load_backbone

    model_cfg = cfg.model
    if variant.kind == "pipeline":
        model_cfg = dataclasses.replace(cfg.model, pretrained=str(variant.path), revision=None, variant=None)
    backbone = load_backbone(model_cfg)
    if variant.kind == "lora":
        try:
            backbone.load_lora(variant.path)
        except Exception as err:
            from diffusion_pref.pipelines import summarize_mismatch

            # PyTorch lists every mismatched tensor (128 lines for an SD UNet): one count and one example say it
            summary = summarize_mismatch(str(err))
            if summary is not None:
                raise ValueError(f"eval.variants.{variant.name}={variant.spec}: the LoRA does not fit "
                                 f"model.pretrained={cfg.model.pretrained} ({summary}); it was most likely trained "
                                 "on another base model") from None
            raise ValueError(f"eval.variants.{variant.name}={variant.spec}: could not load the LoRA onto "
                             f"{cfg.model.pretrained} ({type(err).__name__}: {str(err).splitlines()[0][:300]}); "
                             "was it trained on this base model?") from None
    device, dtype = _torch_device_and_dtype(cfg)
    return backbone.to(device, dtype)


def save_media(item: Any, path: Path, sample_rate: Optional[int] = None) -> Path:
    """A PIL image as PNG (lossless, so cached and fresh samples score the same); an audio array as WAV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if hasattr(item, "save") and hasattr(item, "size"):
        # atomically: a run killed mid-write must not leave a partial file that a rerun takes for a cached sample
        return atomic_write(path.with_suffix(".png"), lambda tmp: item.save(tmp, format="PNG"))
    import numpy as np
    import soundfile

    audio = np.asarray(item.detach().float().cpu() if hasattr(item, "detach") else item, dtype=np.float32)
    if audio.ndim == 2 and audio.shape[0] < audio.shape[1]:  # [channels, samples] -> soundfile's [samples, channels]
        audio = audio.T
    if sample_rate is None:
        raise ValueError("an audio sample needs the backbone's sample_rate to be saved")
    return atomic_write(path.with_suffix(".wav"),
                        lambda tmp: soundfile.write(str(tmp), audio, int(sample_rate), format="WAV"))


def generate_samples(cfg: Config, variants: Sequence[Variant], records: Sequence[Any], out_dir: Path) -> tuple:
    """Every (variant, prompt, seed) sample on disk; returns ``(samples, n_generated, n_reused, prompts_cut)``.

    ``prompts_cut``: per variant sampled now, how many prompts its text encoder sees cut at its token limit.
    """
    from tqdm.auto import tqdm

    media_dir = out_dir / "media"
    cached = {} if cfg.eval.no_cache else _cached_media(media_dir)
    samples: List[Sample] = []
    todo: Dict[str, List[tuple]] = {}
    for variant in variants:
        fingerprint = model_fingerprint(cfg, variant)
        settings = sampling_settings(cfg, variant.name)
        for index, record in enumerate(records):
            for seed in cfg.eval.seeds:
                key = sample_key(fingerprint, record.prompt, seed, settings)
                sample = Sample(variant.name, index, record.prompt, record.category, int(seed), "")
                if key in cached:
                    sample.media = str(cached[key].relative_to(out_dir))
                else:
                    todo.setdefault(variant.name, []).append((sample, key))
                samples.append(sample)
    n_todo = sum(len(v) for v in todo.values())
    prompts_cut: Dict[str, int] = {}
    with tqdm(total=n_todo, desc="generating", unit="sample", disable=n_todo == 0) as bar:
        for variant in variants:
            jobs = todo.get(variant.name, [])
            if not jobs:
                continue
            backbone = load_variant(cfg, variant)
            prompts_cut[variant.name] = sum(backbone.prompts_cut([r.prompt for r in records]))
            settings = sampling_settings(cfg, variant.name)
            for start in range(0, len(jobs), cfg.sample.batch_size):
                batch = jobs[start: start + cfg.sample.batch_size]
                media = backbone.sample([s.prompt for s, _ in batch], [s.seed for s, _ in batch],
                                        steps=settings["steps"], guidance_scale=settings["guidance_scale"],
                                        resolution=settings["resolution"], scheduler=settings.get("scheduler"),
                                        safety_checker=False)
                for (sample, key), item in zip(batch, media):
                    stem = media_dir / variant.name / f"{sample.prompt_index:05d}_s{sample.seed}_{key}"
                    path = save_media(item, stem, backbone.sample_rate)
                    sample.media = str(path.relative_to(out_dir))
                bar.update(len(batch))
            del backbone
            _free_accelerator_memory()
    return samples, n_todo, len(samples) - n_todo, prompts_cut


def _free_accelerator_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- already generated images (HPDv2 benchmark layout) -------------------------------------------------------


def _find_image(folder: Path, index: int) -> Optional[Path]:
    for suffix in IMAGE_SUFFIXES:
        path = folder / f"{index:05d}{suffix}"
        if path.is_file():
            return path
    return None


def benchmark_samples(images_dir: str | Path, records: Sequence[Any]) -> List[Sample]:
    """Samples for images that already exist: ``<style>/{i:05d}.jpg`` where ``i`` counts prompts within the style.

    ``images_dir`` holds one model's images (style folders directly inside, or ``{i:05d}.jpg`` for prompts without a
    category) or several models' (one subfolder per model, each in that layout); each model is a variant named
    after its folder. Every prompt must have its image: a missing one is an error, never silently skipped.
    """
    root = Path(images_dir).expanduser()
    if not root.is_dir():
        raise ConfigError(f"eval.images_dir={images_dir}: no such folder")
    positions, counters = [], {}
    for record in records:  # HPDv2 numbers images within each style file
        positions.append(counters.get(record.category, 0))
        counters[record.category] = positions[-1] + 1

    def folder_for(model_root: Path, category: Optional[str]) -> Path:
        return model_root if category is None else model_root / category

    def looks_like_model(folder: Path) -> bool:
        return any(_find_image(folder_for(folder, r.category), i) for r, i in zip(records[:50], positions[:50]))

    if looks_like_model(root):
        models = {root.name: root}
    else:
        models = {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and looks_like_model(p)}
    if not models:
        first = records[0]
        example = root / (first.category or "") / f"{positions[0]:05d}.jpg"
        raise ConfigError(
            f"eval.images_dir={images_dir}: found no images in the HPDv2 layout; expected e.g. {example} "
            "(<style>/<index:05d>.jpg, index counted within each style of eval.prompts) or <model>/<style>/..."
        )
    samples = []
    for name, model_root in models.items():
        missing = []
        for index, (record, position) in enumerate(zip(records, positions)):
            path = _find_image(folder_for(model_root, record.category), position)
            if path is None:
                missing.append(folder_for(model_root, record.category) / f"{position:05d}.jpg")
                continue
            samples.append(Sample(name, index, record.prompt, record.category, 0, str(path.resolve())))
        if missing:
            raise ConfigError(
                f"eval.images_dir: model folder {model_root} lacks {len(missing)} of {len(records)} images "
                f"(first: {', '.join(map(str, missing[:3]))}); generate them or limit eval.prompts / eval.max_prompts"
            )
    return samples


# -- scoring -------------------------------------------------------------------------------------------------


def check_reward_names(cfg: Config) -> None:
    """Fail on an unknown reward model name before anything is generated."""
    from diffusion_pref.reward_models import REWARD_MODELS, unknown_reward_model

    if not cfg.reward.models:
        raise ConfigError("reward.models is empty; name at least one reward model, e.g. reward.models.pickscore=1.0")
    for name in cfg.reward.models:
        if name not in REWARD_MODELS:
            raise ConfigError(f"reward.models.{name}: {unknown_reward_model(name)}")


def load_scorers(cfg: Config) -> Dict[str, Any]:
    """One scorer per configured reward model (each scored separately; the weighted sum is derived), loaded as
    ``generate`` loads them: weights that cannot load are a ConfigError naming ``reward.pretrained``."""
    from diffusion_pref.reward_models import load_reward_from_config

    check_reward_names(cfg)
    reward = load_reward_from_config(cfg.reward, resolve_runtime(cfg.runtime).device)
    return {name: model for name, (model, _) in reward.components.items()}


def _load_media(paths: Sequence[Path]) -> tuple:
    """``(media, score_kwargs)``: PIL images, or audio arrays plus the ``sample_rate`` keyword audio scorers take."""
    if paths and paths[0].suffix.lower() in AUDIO_SUFFIXES:
        import soundfile

        clips, rates = zip(*(soundfile.read(str(p), dtype="float32") for p in paths))
        if len(set(rates)) > 1:
            raise ValueError(f"audio samples have different sample rates {sorted(set(rates))}; resample them to one")
        return list(clips), {"sample_rate": rates[0]}
    from PIL import Image

    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images, {}


def score_samples(
    samples: Sequence[Sample], scorers: Mapping[str, Any], out_dir: Path, batch_size: int
) -> Dict[str, List[float]]:
    """Each reward model's score of every sample, in sample order."""
    from tqdm.auto import tqdm

    scores: Dict[str, List[float]] = {name: [] for name in scorers}
    with tqdm(total=len(samples) * len(scorers), desc="scoring", unit="sample") as bar:
        for start in range(0, len(samples), batch_size):
            batch = samples[start: start + batch_size]
            media, kwargs = _load_media([out_dir / s.media for s in batch])
            prompts = [s.prompt for s in batch]
            for name, scorer in scorers.items():
                values = scorer.score(prompts, media, **kwargs)
                values = [float(v) for v in (values.tolist() if hasattr(values, "tolist") else values)]
                if len(values) != len(batch):
                    raise ValueError(f"reward model {name} returned {len(values)} scores for {len(batch)} samples")
                bad = [v for v in values if not math.isfinite(v)]
                if bad:
                    raise ValueError(f"reward model {name} returned non-finite scores {bad[:3]} "
                                     f"(in the batch starting at {batch[0].media})")
                scores[name].extend(values)
                bar.update(len(batch))
    return scores


def build_table(
    samples: Sequence[Sample], scores: Mapping[str, List[float]], weights: Mapping[str, float]
) -> "pd.DataFrame":
    import pandas as pd

    table = pd.DataFrame([dataclasses.asdict(s) for s in samples])
    table["category"] = table["category"].astype(object)
    for name, values in scores.items():
        table[name] = values
    if len(scores) > 1:
        table[WEIGHTED_SUM] = sum(float(weights[name]) * table[name] for name in scores)
    return table


# -- the command ---------------------------------------------------------------------------------------------


def _pick_baseline(cfg: Config, variant_names: Sequence[str], specs: Mapping[str, str]) -> str:
    if cfg.eval.baseline is not None:
        if cfg.eval.baseline not in variant_names:
            raise ConfigError(f"eval.baseline={cfg.eval.baseline} is not one of the variants {list(variant_names)}")
        return cfg.eval.baseline
    bases = [name for name in variant_names if specs.get(name) == "base"]
    return bases[0] if bases else variant_names[0]


def run(cfg: Config, scorers: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Generate (or reuse, or read) every sample, score it, and write the table, ``metrics.json`` and the report.

    ``scorers`` (name -> object with ``score(prompts, media)``) replaces the reward models of ``reward.models``;
    tests use it for scorers with known values. Returns the metrics.
    """
    from diffusion_pref.evaluation.stats import compute_metrics
    from diffusion_pref.evaluation.report import write_grid_png, write_report

    validate(cfg)  # again: a Config built or changed in code (quickstart, iterate, notebooks) skips load_config
    if cfg.sample.safety_checker:
        raise ConfigError("sample.safety_checker=true: evaluate compares models on every sample, and a blocked (black) "
                          "image would be scored as the model's output; unset sample.safety_checker")
    if not cfg.eval.seeds:
        raise ConfigError("eval.seeds is empty; give at least one seed, e.g. eval.seeds=[0,1]")
    if scorers is None:
        check_reward_names(cfg)  # a typo costs nothing; loading the reward models waits for the cheaper checks
    out_dir = Path(cfg.output.dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = load_prompt_records(cfg)

    if cfg.eval.images_dir is not None:
        samples = benchmark_samples(cfg.eval.images_dir, records)
        specs = {s.variant: f"images: {Path(s.media).parents[1 if s.category else 0]}" for s in samples}
        n_generated, n_reused, prompts_cut = 0, 0, {}
        variant_names = list(dict.fromkeys(s.variant for s in samples))
        baseline = _pick_baseline(cfg, variant_names, specs)
    else:
        variants = resolve_variants(cfg)
        specs = {v.name: v.spec for v in variants}
        variant_names = [v.name for v in variants]
        baseline = _pick_baseline(cfg, variant_names, specs)  # before generating: a typo should cost nothing
        check_variant_sampling(cfg, variant_names)
    if scorers is None:
        # Before the first sample, as generate does: a reward model that cannot load (offline, a wrong path) must
        # not cost a whole sampling run first.
        scorers = load_scorers(cfg)
    if cfg.eval.images_dir is None:
        samples, n_generated, n_reused, prompts_cut = generate_samples(cfg, variants, records, out_dir)

    weights = {name: float(cfg.reward.models.get(name, 1.0)) for name in scorers}
    scores = score_samples(samples, scorers, out_dir, cfg.reward.batch_size)
    table = build_table(samples, scores, weights)
    table.to_parquet(out_dir / "per_image.parquet", index=False)
    table.to_csv(out_dir / "per_image.csv", index=False)

    rewards = list(scorers) + ([WEIGHTED_SUM] if len(scorers) > 1 else [])
    maxima = {name: (float(s.max_score), float(getattr(s, "max_tolerance", 0.0)))
              for name, s in scorers.items() if getattr(s, "max_score", None) is not None}
    metrics = compute_metrics(table, rewards, baseline, variants=variant_names,
                              bootstrap_samples=cfg.eval.bootstrap_samples, bootstrap_seed=cfg.eval.bootstrap_seed,
                              maxima=maxima)
    metrics["run"] = {
        "model": cfg.model.pretrained,
        "prompts": cfg.eval.prompts,
        "images_dir": cfg.eval.images_dir,
        "variant_specs": specs,
        "reward_weights": weights,
        "settings": None if cfg.eval.images_dir else {name: sampling_settings(cfg, name) for name in variant_names},
        "n_samples": len(samples),
        "n_generated": n_generated,
        "n_reused": n_reused,
        "prompts_cut": prompts_cut,
    }
    atomic_write(out_dir / "metrics.json", json.dumps(metrics, indent=2, allow_nan=True))
    details = {"model": cfg.model.pretrained, "prompts": f"{cfg.eval.prompts} ({len(records)} prompts)"}
    details.update({f"variant {k}": v for k, v in specs.items()})
    if cfg.eval.images_dir is None:
        details["sampling"] = (f"{cfg.sample.steps} steps, guidance {cfg.sample.guidance_scale}, "
                               f"seeds {list(cfg.eval.seeds)}")
        for name, overrides in cfg.eval.variant_sampling.items():
            details[f"sampling {name}"] = ", ".join(f"{k} {v}" for k, v in overrides.items())
    details["reward models"] = ", ".join(f"{k} (weight {w:g})" for k, w in weights.items())
    write_report(out_dir / "report.html", metrics, table, media_root=out_dir, details=details,
                 title=f"Evaluation: {', '.join(variant_names)}", grid_prompts=cfg.eval.report_prompts)
    write_grid_png(out_dir / "grid.png", table, metrics["variants"], out_dir)
    _print_summary(metrics, out_dir)
    for name, cut in prompts_cut.items():
        if cut:
            print(f"warning: {cut} of {len(records)} prompts are longer than the text encoder of {name} takes and "
                  "were sampled cut to its token limit (metrics.json: run.prompts_cut)")
    return metrics


def _print_summary(metrics: Mapping[str, Any], out_dir: Path) -> None:
    from diffusion_pref.evaluation.stats import errors_text

    for reward in metrics["rewards"]:
        for variant in metrics["variants"]:
            s = metrics["scores"][reward][variant]
            line = f"{reward:>14} {variant:>12}: mean {s['mean']:.4f} median {s['median']:.4f}"
            w = metrics["win_rates"][reward].get(variant)
            if w:
                line += (f"  win rate {w['win_rate']:.3f} [{w['ci_low']:.3f}, {w['ci_high']:.3f}]"
                         f"  wins/ties/losses {w['wins']}/{w['ties']}/{w['losses']}")
                if w.get("errors"):
                    line += "  " + errors_text(w["errors"])
            print(line)
    grid = " and grid.png" if (out_dir / "grid.png").is_file() else ""
    print(f"wrote {out_dir / 'metrics.json'}, {out_dir / 'per_image.parquet'}, {out_dir / 'report.html'}{grid}")
