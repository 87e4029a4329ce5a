"""The commands of `diffusion-pref`: each module has a `run(cfg)` that the CLI calls."""
