"""Packages that add names to the core's registries when imported: prompt sets (``prompts.register_prompt_set``),
reward models (``reward_models.register_reward_model``) and ``model.pretrained`` short names
(``pipelines.register_named_model``).

The core knows no plugin by name except in :data:`PLUGINS`. Each registry module calls :func:`load_plugins` once it
is defined, so ``"toy"`` is a prompt set, ``"toy-fidelity"`` a reward model and ``model.pretrained=toy`` a model
wherever any of the three is imported. A plugin imports only light modules at import time (no torch).

Example (a plugin's ``__init__.py``)::

    from diffusion_pref.prompts import register_prompt_set
    register_prompt_set("my-set", load_my_prompts)
"""

from __future__ import annotations

import importlib

PLUGINS = ("diffusion_pref.toy", "diffusion_pref.tones")

_state = {"loaded": False}


def load_plugins() -> None:
    """Import every package of :data:`PLUGINS` once (a plugin's own imports of the registries come back here and
    return at once)."""
    if _state["loaded"]:
        return
    _state["loaded"] = True
    try:
        for name in PLUGINS:
            importlib.import_module(name)
    except BaseException:
        _state["loaded"] = False  # a later import tries again and raises the same error, instead of missing names
        raise


__all__ = ["PLUGINS", "load_plugins"]
