"""diffusion_pref: align diffusion models with human preferences.

Start with ``diffusion-pref --help`` or ``diffusion-pref quickstart``. The package imports nothing heavy at the
top level; each command and library module imports torch, diffusers or transformers when it is used.
"""

__version__ = "0.1.0"
