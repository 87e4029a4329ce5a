"""``diffusion-pref train``: fine-tune a diffusion model on preference pairs with any loss of the registry.

Run it::

    diffusion-pref train --config configs/sd15_dpo_lora.yaml model.pretrained=runwayml/stable-diffusion-v1-5 \\
        data.source=/data/pickapic_v2 train.max_steps=2000
    accelerate launch -m diffusion_pref.cli train --config configs/sdxl_dpo_lora.yaml

Writes into ``output.dir``: ``config.yaml`` (once the checks have passed), ``metrics.jsonl`` (one line per logged
step), TensorBoard logs under ``logs/``, ``checkpoints/step-N``, ``train_summary.json``, and the result: a LoRA in
the diffusers format (``pipe.load_lora_weights(output.dir)``) or, for ``model.finetune=full``, a pipeline folder
(``StableDiffusionPipeline.from_pretrained(output.dir)``). The setup is :mod:`diffusion_pref.training.setup`, the
loop :mod:`diffusion_pref.training.loop`.
"""

from __future__ import annotations


def run(cfg) -> None:
    """``diffusion-pref train``: see the module docstring."""
    from diffusion_pref.config import save_config
    from diffusion_pref.training.setup import Trainer

    trainer = Trainer(cfg)
    if trainer.accelerator.is_main_process:
        # Only now, after the config, data, model and resume checks: a run that fails them leaves the folder's
        # record of an earlier run alone.
        save_config(cfg, cfg.output.dir)
    trainer.train()
