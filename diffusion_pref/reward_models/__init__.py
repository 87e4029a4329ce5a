"""Reward models by name: a registry of scorers, imported only when one is used.

Every scorer follows the protocol in `base.py`: `score(prompts, media) -> Tensor[n]` (float32, CPU, higher is
better) and a human-readable `scale`. Each loads from a hub id (the official one by default) or a local
folder/file in the official layout (`pretrained=`/`checkpoint=`).

Example:

    from diffusion_pref.reward_models import load_reward_model, load_reward
    pick = load_reward_model("pickscore")                       # yuvalkirstain/PickScore_v1
    hps = load_reward_model("hpsv21", pretrained="HPS_v2.1_compressed.pt")
    both = load_reward({"pickscore": 1.0, "hpsv21": 10.0})
    scores = both.score(prompts, images)                        # [n]
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from diffusion_pref.suggest import did_you_mean

# name -> "module:Class"; resolved lazily so importing this package stays cheap. Plugins add theirs through
# register_reward_model (the shapes world: toy-fidelity, toy-size; see diffusion_pref.plugins).
REWARD_MODELS = {
    "pickscore": "diffusion_pref.reward_models.pickscore:PickScore",
    "hpsv2": "diffusion_pref.reward_models.hps:HPSv2",
    "hpsv21": "diffusion_pref.reward_models.hps:HPSv21",
    "clip": "diffusion_pref.reward_models.clip_score:CLIPScore",
    "aesthetic": "diffusion_pref.reward_models.aesthetic:LaionAesthetic",
    "imagereward": "diffusion_pref.reward_models.image_reward:ImageReward",
    "clap": "diffusion_pref.reward_models.clap:CLAPScore",
}


def register_reward_model(name: str, target: str) -> None:
    """Make ``name`` a reward model: ``target`` is ``"module:Class"``, imported when the model is first used."""
    if ":" not in target:
        raise ValueError(f"register_reward_model({name!r}, {target!r}): give the class as 'module:Class'")
    REWARD_MODELS[name] = target


def unknown_reward_model(name: str) -> str:
    """The message for a name that is not registered: the nearest name, if one is close, and every choice."""
    hint = did_you_mean(name, REWARD_MODELS)
    return f"unknown reward model {name!r}{'; ' + hint if hint else '.'} Choices: {', '.join(sorted(REWARD_MODELS))}"


def _unknown(name: str) -> ValueError:
    return ValueError(unknown_reward_model(name))


def reward_model_class(name: str) -> type:
    if name not in REWARD_MODELS:
        raise _unknown(name)
    module_name, attr = REWARD_MODELS[name].split(":")
    return getattr(importlib.import_module(module_name), attr)


def load_reward_model(name: str, **kwargs: Any) -> Any:
    """Build the scorer registered as `name`; kwargs go to its constructor (pretrained, device, batch_size, ...)."""
    return reward_model_class(name)(**kwargs)


def load_reward(spec: str | Mapping[str, Any], **shared_kwargs: Any):
    """A `WeightedReward` from a name or a `{name: weight}` mapping.

    A weight may also be a mapping `{"weight": w, **constructor_kwargs}`, e.g.
    `{"hpsv21": {"weight": 1.0, "pretrained": "/ckpt/HPS_v2.1_compressed.pt"}}`. `shared_kwargs` (device,
    batch_size) go to every component.
    """
    from .base import WeightedReward

    if isinstance(spec, str):
        spec = {spec: 1.0}
    if not isinstance(spec, Mapping) or not spec:
        raise ValueError(f"reward spec must be a model name or a non-empty {{name: weight}} mapping, got {spec!r}")
    for name in spec:  # fail on a typo before loading any (large) model
        if name not in REWARD_MODELS:
            raise _unknown(name)
    components = {}
    for name, value in spec.items():
        kwargs = dict(shared_kwargs)
        if isinstance(value, Mapping):
            value = dict(value)
            weight = value.pop("weight", 1.0)
            kwargs.update(value)
        else:
            weight = value
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise ValueError(f"reward weight for {name!r} must be a number, got {weight!r}") from None
        components[name] = (load_reward_model(name, **kwargs), weight)
    return WeightedReward(components)


def reward_spec(reward_cfg) -> dict[str, Any]:
    """``cfg.reward`` as a :func:`load_reward` spec: ``reward.models`` weights, with ``reward.pretrained`` paths."""
    spec: dict[str, Any] = {}
    for name, weight in dict(reward_cfg.models).items():
        path = dict(reward_cfg.pretrained).get(name)
        spec[name] = {"weight": weight, "pretrained": path} if path else weight
    return spec


def load_reward_from_config(reward_cfg, device: Any = None):
    """The `WeightedReward` that ``cfg.reward`` describes, on ``device`` (the command's ``runtime.device``; None:
    each scorer's own default, CUDA if present).

    Weights that cannot be loaded (missing files, no network) raise ``ConfigError`` naming the setting to fix.
    """
    from diffusion_pref.config import ConfigError

    from .base import WeightedReward

    spec = reward_spec(reward_cfg)
    for name in spec:  # fail on a typo before loading any (large) model
        if name not in REWARD_MODELS:
            raise _unknown(name)
    components = {}
    for name, value in spec.items():  # one at a time, so the error names the model that failed
        try:
            loaded = load_reward({name: value}, device=device, batch_size=reward_cfg.batch_size)
        except OSError as err:  # the user fixes the config, not the code
            lines = str(err).strip().splitlines()
            raise ConfigError(
                f"could not load reward model {name!r} of reward.models ({lines[0] if lines else type(err).__name__}); "
                f"set reward.pretrained.{name} to a local folder or file in the official layout"
            ) from err
        components.update(loaded.components)
    return WeightedReward(components)


__all__ = [
    "REWARD_MODELS",
    "load_reward",
    "load_reward_from_config",
    "load_reward_model",
    "register_reward_model",
    "reward_model_class",
    "reward_spec",
    "unknown_reward_model",
]

from diffusion_pref.plugins import load_plugins  # noqa: E402  (after the registry it fills)

load_plugins()
