"""Pretrain the tiny tones-world text-to-audio model (Tango-structured) and save it in the Tango folder layout.

Phases on a CPU: (1) the ``AutoencoderKL`` learns to reconstruct log-mels of rendered clips; (2) latents of
``--dataset-size`` clips are cached; (3) the ``UNet2DConditionModel`` and the T5 encoder learn v-prediction
denoising of those latents from captions. A fraction ``--corrupt`` of captions is replaced by a neighbouring
caption (one count, pitch or sound changed), so the base model follows its prompt only part of the time and
alignment has something to fix; ``--drop`` of captions become "" for classifier-free guidance. EMA weights are
saved (``OUT/final``) and their held-out ``tones-fidelity`` is logged.

Run::

    python -m diffusion_pref.tones.pretrain --out runs/tones_pretrain --max-minutes 20
    python -m diffusion_pref.tones.pretrain --eval-only diffusion_pref/tones/weights

Load::

    from diffusion_pref.tones.model import TonesModel
    model = TonesModel.from_pretrained("diffusion_pref/tones/weights")
    waves = model.sample(["two high beeps then a low hum"], [0])   # [1, 20480] at 16 kHz
"""

from __future__ import annotations

import argparse
import json
import math
import time

from diffusion_pref.pretraining import optimizer_step_with_ema, start_run
from diffusion_pref.tones.render import (
    Clip,
    all_groups,
    caption,
    eval_prompts,
    render,
    sample_clip,
    train_captions,
)


def neighbours(clip: Clip, allowed: set) -> list:
    """Captions that differ from ``clip``'s in one group's count, pitch or sound (only allowed ones)."""
    out = []
    for i in range(len(clip.groups)):
        for g in all_groups():
            if g == clip.groups[i]:
                continue
            groups = list(clip.groups)
            groups[i] = g
            try:
                text = caption(Clip(tuple(groups)))
            except ValueError:
                continue
            if text in allowed:
                out.append(text)
    return out


def mels(clips):
    """Clips -> log-mel tensor [n, 1, frames, n_mels]."""
    import numpy as np

    from diffusion_pref.tones.audio import log_mel, prepare

    return log_mel(np.stack([prepare(render(c)) for c in clips]))[:, None]


def lr_factor(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def evaluate(model, prompts, seeds: int, steps: int, guidance: float) -> dict:
    import torch

    from diffusion_pref.tones.rewards import TonesFidelity

    all_prompts = [p for p in prompts for _ in range(seeds)]
    all_seeds = [s for _ in prompts for s in range(seeds)]
    scores = []
    for i in range(0, len(all_prompts), 32):
        waves = model.sample(all_prompts[i:i + 32], all_seeds[i:i + 32], steps=steps, guidance_scale=guidance)
        scores.append(TonesFidelity().score(all_prompts[i:i + 32], waves))
    scores = torch.cat(scores)
    return {"fidelity": round(float(scores.mean()), 4), "all_right": round(float((scores >= 1).float().mean()), 4),
            "n": len(all_prompts), "steps": steps, "guidance": guidance}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="output folder (log.jsonl, final/)")
    parser.add_argument("--eval-only", metavar="MODEL_DIR", help="only measure a saved model's fidelity, then exit")
    parser.add_argument("--steps", type=int, default=3000, help="UNet/text-encoder steps (sets the LR schedule)")
    parser.add_argument("--max-minutes", type=float, default=0.0, help="stop UNet training after this (0 = off)")
    parser.add_argument("--vae-steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--vae-lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--ema", type=float, default=0.99)
    parser.add_argument("--corrupt", type=float, default=0.25, help="fraction of captions mislabelled on purpose")
    parser.add_argument("--drop", type=float, default=0.1, help="fraction of captions dropped to '' (CFG)")
    parser.add_argument("--min-snr", type=float, default=5.0, help="min-SNR-gamma weighting on the x0 error")
    parser.add_argument("--dataset-size", type=int, default=3000)
    parser.add_argument("--eval-seeds", type=int, default=2)
    parser.add_argument("--eval-steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.out and not args.eval_only:
        parser.error("give --out DIR to pretrain, or --eval-only MODEL_DIR to measure a saved model")

    import torch

    from diffusion_pref.tones.model import (
        MAX_TOKENS,
        TonesModel,
        build_models,
        schedulers,
        tones_tokenizer,
    )
    from diffusion_pref.tones.vocoder import GriffinLimVocoder

    torch.set_num_threads(args.threads)
    if args.eval_only:
        model = TonesModel.from_pretrained(args.eval_only)
        start = time.time()
        metrics = evaluate(model, eval_prompts(), args.eval_seeds, args.eval_steps, args.guidance)
        print(json.dumps({"model": args.eval_only, **metrics, "seconds": round(time.time() - start, 1)}))
        return
    rng, out, log = start_run(args)
    tokenizer = tones_tokenizer()
    text_encoder, unet, vae = build_models(tokenizer)
    train_sched, _ = schedulers()
    log({"params": {name: sum(p.numel() for p in m.parameters())
                    for name, m in (("text_encoder", text_encoder), ("unet", unet), ("vae", vae))}})

    # (1) VAE on log-mels
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    vae.train()
    for step in range(args.vae_steps):
        for group in opt.param_groups:
            group["lr"] = args.vae_lr * lr_factor(step, args.vae_steps, warmup=min(20, args.vae_steps))
        x = mels([sample_clip(rng) for _ in range(args.batch_size)])
        posterior = vae.encode(x).latent_dist
        mse = torch.nn.functional.mse_loss(vae.decode(posterior.sample()).sample, x)
        loss = mse + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == args.vae_steps - 1:
            log({"phase": "vae", "step": step, "mse": round(float(mse.detach()), 4)})
    vae.eval().requires_grad_(False)

    # (2) cache latents
    allowed = set(train_captions())
    clips = [sample_clip(rng) for _ in range(args.dataset_size)]
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(clips), 64):
            dist = vae.encode(mels(clips[i:i + 64])).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    latent_mean, latent_std = torch.cat(means), torch.cat(stds)
    scaling = float(1.0 / latent_mean.std())
    vae.register_to_config(scaling_factor=scaling)
    log({"phase": "cache", "clips": len(clips), "scaling_factor": round(scaling, 4)})
    near = {}

    def text_for(clip):
        draw = rng.random()
        if draw < args.drop:
            return ""
        if draw < args.drop + args.corrupt:
            key = caption(clip)
            if key not in near:
                near[key] = neighbours(clip, allowed)
            if near[key]:
                return near[key][rng.randrange(len(near[key]))]
        return caption(clip)

    # (3) UNet + text encoder
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    ema = [[p.detach().clone() for p in m.parameters()] for m in (unet, text_encoder)]
    snr = train_sched.alphas_cumprod / (1 - train_sched.alphas_cumprod)
    unet.train()
    text_encoder.train()
    train_start = time.time()
    running, step = 0.0, 0
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_factor(step, args.steps, args.warmup)
        index = torch.randint(0, len(clips), (args.batch_size,))
        latents = (latent_mean[index] + latent_std[index] * torch.randn_like(latent_mean[index])) * scaling
        tokens = tokenizer([text_for(clips[i]) for i in index.tolist()], padding="max_length",
                           max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
        cond = text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, train_sched.config.num_train_timesteps, (args.batch_size,))
        pred = unet(train_sched.add_noise(latents, noise, t), t, encoder_hidden_states=cond,
                    encoder_attention_mask=tokens.attention_mask).sample
        target = train_sched.get_velocity(latents, noise, t)
        weight = (snr[t] + 1).clamp(max=args.min_snr + 1) / (snr[t] + 1)  # min-SNR-gamma on the x0 error (v)
        loss = (((pred - target) ** 2).mean(dim=(1, 2, 3)) * weight).mean()
        optimizer_step_with_ema(loss, opt, params, (unet, text_encoder), ema, step, args.ema)
        running = 0.98 * running + 0.02 * float(loss.detach()) if step else float(loss.detach())
        if step % 50 == 0:
            log({"phase": "unet", "step": step, "loss": round(running, 4)})
        if args.max_minutes and time.time() - train_start > args.max_minutes * 60:
            log({"phase": "unet", "stopped": "max-minutes", "step": step})
            break
    with torch.no_grad():
        for module, shadow in zip((unet, text_encoder), ema):
            for p, e in zip(module.parameters(), shadow):
                p.copy_(e)
    unet.eval()
    text_encoder.eval()
    model = TonesModel(text_encoder, tokenizer, unet, vae, GriffinLimVocoder(n_iter=16), train_sched)
    model.save_pretrained(out / "final")
    metrics = evaluate(model, eval_prompts(), args.eval_seeds, args.eval_steps, args.guidance)
    log({"phase": "save", "tag": "final", "step": step + 1, **metrics})


if __name__ == "__main__":
    main()
