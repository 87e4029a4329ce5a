"""Pretrain the tiny shapes-world text-to-image model and save it as a Stable Diffusion pipeline folder.

Two phases on a CPU: (1) an ``AutoencoderKL`` (32x32 RGB <-> 16x16x4 latents) learns to reconstruct renders;
(2) a ``UNet2DConditionModel`` and a 2-layer ``CLIPTextModel`` learn text-to-latent denoising on cached latents
of rendered scenes. A fraction of captions gets a wrong colour word on purpose (``--corrupt``), so the model
follows its prompt only part of the time and preference alignment has something to fix; some captions are
dropped to "" for classifier-free guidance. EMA weights are saved every ``--save-every`` steps as a complete
pipeline (``OUT/step_NNNNN``) with its held-out fidelity logged, and the last one as ``OUT/final``.

Run::

    python -m diffusion_pref.toy.pretrain --out runs/toy_pretrain     # the shipped weights' recipe (~40 min, 1 core)
    python -m diffusion_pref.toy.pretrain --eval-only diffusion_pref/toy/weights --eval-seeds 10   # fidelity

Load::

    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained("runs/toy_pretrain/final")
    pipe("a red circle on a blue background", num_inference_steps=20, guidance_scale=1.0).images[0]  # 32x32

Guidance: with classifier-free guidance the model follows its caption almost always (CFG sharpens towards
the majority colour even with corrupted captions); without it (``guidance_scale=1``) it shows the corrupted
training signal, which is where preference alignment has room to help.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time

from diffusion_pref.pretraining import optimizer_step_with_ema, start_run
from diffusion_pref.toy.render import (
    CAPTION_TEMPLATE,
    COLOURS,
    RESOLUTION,
    eval_prompts,
    render,
    sample_scene,
    train_triples,
)


def build_models(vocab_size: int, bos_id: int, eos_id: int, pad_id: int, max_length: int,
                 vae_channels=(16, 32), unet_channels=(16, 32)):
    """Fresh VAE, text encoder, UNet: the smallest SD-shaped stack that still learns colours and shapes.

    Sized for a shared 2-core CPU: wider (32, 64) blocks ran 3-4x slower per sample there."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=tuple(vae_channels),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=RESOLUTION,
        mid_block_add_attention=False,  # flat-colour scenes need no global attention; it is CPU time
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=max_length,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
        )
    )
    # Colour binding was the slow part in the feasibility probe, so the text reaches the UNet two ways:
    # cross-attention at 16x16 as well as 8x8, and a pooled text embedding added to the timestep embedding
    # (diffusers' addition_embed_type="text"; it reads encoder_hidden_states, so the standard pipeline runs it).
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(unet_channels),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=8,
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
    )
    return vae, text_encoder, unet


def make_schedulers(prediction_type: str = "v_prediction"):
    """Training (DDPM) and sampling (DDIM) schedulers with SD 1.x betas.

    With ``v_prediction`` the betas are rescaled to zero terminal SNR (Lin et al. 2024). Why it matters here:
    a flat-colour image is almost all "mean colour", and SD's schedule leaves ~7% of the signal at t=999, so a
    model trained with it reads the colour off the leaked mean and, at sampling time, off the random starting
    noise instead of the caption. Zero terminal SNR forces the colour to come from the text.
    """
    from diffusers import DDIMScheduler, DDPMScheduler

    if prediction_type not in ("v_prediction", "epsilon"):
        raise ValueError(f"prediction_type={prediction_type!r}; use 'v_prediction' or 'epsilon'")
    zero_snr = prediction_type == "v_prediction"  # epsilon cannot be predicted at SNR 0
    common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  prediction_type=prediction_type, rescale_betas_zero_snr=zero_snr)
    train = DDPMScheduler(**common)
    if zero_snr:
        # "trailing" spacing makes the first sampling step start at t=999, where the SNR is zero.
        # (steps_offset only matters for "leading" spacing; 1 keeps StableDiffusionPipeline from warning.)
        sample = DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing",
                               steps_offset=1)
    else:
        # Stable Diffusion 1.x's shipped DDIM config.
        sample = DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return train, sample


def loss_weight(snr, prediction_type: str, gamma: float):
    """Per-timestep weight that caps the emphasis on nearly clean timesteps (min-SNR-gamma, Hang et al. 2023).

    Expressed on the x0 error, epsilon-MSE = snr * x0-MSE and v-MSE = (snr + 1) * x0-MSE; we cap that factor
    at gamma (epsilon) or gamma + 1 (v). For v this keeps full weight at the noisiest timesteps, where the
    colours are decided, unlike the min(snr, gamma) / (snr + 1) form that sends them to zero.
    """
    if gamma <= 0:
        return snr * 0 + 1
    if prediction_type == "epsilon":
        return snr.clamp(max=gamma) / snr
    return (snr + 1).clamp(max=gamma + 1) / (snr + 1)


def render_tensor(scenes):
    """Scenes -> float tensor [n, 3, H, W] in [-1, 1]."""
    import numpy as np
    import torch

    arrays = np.stack([np.asarray(render(s)) for s in scenes])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def lr_factor(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Linear warmup, then cosine decay to ``floor`` of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def corrupt_caption(fg: str, shape: str, bg: str, rng: random.Random, allowed: set) -> str:
    """The caption with one colour word (shape or background, equally often) replaced by a wrong colour.

    The wrong caption is always a training triple, so held-out prompts never appear in pretraining.
    """
    options = []
    for colour in COLOURS:
        if colour not in (fg, bg):
            if (colour, shape, bg) in allowed:
                options.append((colour, shape, bg))
            if (fg, shape, colour) in allowed:
                options.append((fg, shape, colour))
    new_fg, new_shape, new_bg = options[rng.randrange(len(options))]
    return CAPTION_TEMPLATE.format(fg=new_fg, shape=new_shape, bg=new_bg)


def train_vae(vae, steps: int, batch_size: int, lr: float, rng: random.Random, log):
    import torch

    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(step, steps, warmup=min(50, steps))
        images = render_tensor([sample_scene(rng) for _ in range(batch_size)])  # [B, 3, 32, 32]
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = torch.nn.functional.mse_loss(recon, images)
        loss = mse + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log({"phase": "vae", "step": step, "mse": round(float(mse.detach()), 5)})
    vae.eval()
    vae.requires_grad_(False)


@__import__("contextlib").contextmanager
def _swapped_in(modules_and_ema):
    """Temporarily load EMA weights into the modules (for saving and evaluating), then restore them."""
    import torch

    backups = []
    for module, ema in modules_and_ema:
        backups.append([p.detach().clone() for p in module.parameters()])
        with torch.no_grad():
            for p, e in zip(module.parameters(), ema):
                p.copy_(e)
    try:
        yield
    finally:
        with torch.no_grad():
            for (module, _), saved in zip(modules_and_ema, backups):
                for p, s in zip(module.parameters(), saved):
                    p.copy_(s)


def evaluate_fidelity(pipe, prompts, seeds_per_prompt: int, steps: int, guidance: float) -> dict:
    """Mean ToyFidelity and fraction with both colours right on ``prompts`` x seeds 0..k-1."""
    import torch

    from diffusion_pref.toy.rewards import ToyFidelity

    all_prompts = [p for p in prompts for _ in range(seeds_per_prompt)]
    generators = [torch.Generator().manual_seed(s) for _ in prompts for s in range(seeds_per_prompt)]
    images = pipe(
        all_prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generators, output_type="pt"
    ).images  # [n, 3, 32, 32] in [0, 1]
    scores = ToyFidelity().score(all_prompts, images)
    return {
        "fidelity": round(float(scores.mean()), 4),
        "both_right": round(float((scores > 0.75).float().mean()), 4),
        "n": len(all_prompts),
        "steps": steps,
        "guidance": guidance,
    }


def _widths(text: str, flag: str) -> tuple[int, int]:
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        widths = ()
    if len(widths) != 2 or any(w <= 0 or w % 8 for w in widths):
        raise SystemExit(f"{flag}={text!r}: give two comma-separated widths that are multiples of 8, e.g. 16,32")
    return widths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="output folder (checkpoints, log.jsonl, final/)")
    parser.add_argument("--eval-only", metavar="PIPELINE_DIR",
                        help="only measure a saved pipeline's fidelity on the held-out prompts, then exit")
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance for evaluation")
    parser.add_argument("--eval-steps", type=int, default=20, help="DDIM steps for evaluation")
    parser.add_argument("--steps", type=int, default=10000, help="UNet/text-encoder steps (sets the LR schedule)")
    parser.add_argument("--vae-channels", default="16,32", help="AutoencoderKL block widths (two blocks)")
    parser.add_argument("--unet-channels", default="16,32", help="UNet block widths (two blocks)")
    parser.add_argument("--vae-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--vae-lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--ema", type=float, default=0.995, help="EMA decay of the saved weights")
    parser.add_argument("--corrupt", type=float, default=0.25, help="fraction of captions with a wrong colour")
    parser.add_argument("--drop", type=float, default=0.1, help="fraction of captions dropped to '' (CFG)")
    parser.add_argument("--min-snr", type=float, default=5.0, help="min-SNR-gamma loss weighting (0 = off)")
    parser.add_argument("--prediction", default="v_prediction", choices=["v_prediction", "epsilon"],
                        help="UNet target; v_prediction also rescales the schedule to zero terminal SNR")
    parser.add_argument("--dataset-size", type=int, default=4000, help="rendered scenes cached as latents")
    parser.add_argument("--save-every", type=int, default=1000)
    parser.add_argument("--eval-seeds", type=int, default=4, help="seeds per held-out prompt at each save")
    parser.add_argument("--max-minutes", type=float, default=0.0, help="stop UNet training after this (0 = off)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads; on a shared CPU 1 beat 2 by 6x")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.out and not args.eval_only:
        parser.error("give --out DIR to pretrain, or --eval-only PIPELINE_DIR to measure a saved model")

    import torch
    from diffusers import StableDiffusionPipeline

    from diffusion_pref.toy.tokenizer import save_tokenizer, write_vocab_files

    torch.set_num_threads(args.threads)
    if args.eval_only:
        pipe = StableDiffusionPipeline.from_pretrained(args.eval_only, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        start = time.time()
        metrics = evaluate_fidelity(pipe, eval_prompts(), args.eval_seeds, args.eval_steps, args.guidance)
        print(json.dumps({"pipeline": args.eval_only, **metrics, "seconds": round(time.time() - start, 1)}))
        return
    rng, out, log = start_run(args)
    start = time.time()
    tokenizer = save_tokenizer(out / "tokenizer_src")
    vae, text_encoder, unet = build_models(
        len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.model_max_length,
        vae_channels=_widths(args.vae_channels, "--vae-channels"), unet_channels=_widths(args.unet_channels, "--unet-channels"),
    )
    train_sched, sample_sched = make_schedulers(args.prediction)
    log({"params": {"vae": sum(p.numel() for p in vae.parameters()),
                    "text_encoder": sum(p.numel() for p in text_encoder.parameters()),
                    "unet": sum(p.numel() for p in unet.parameters())}})

    train_vae(vae, args.vae_steps, args.batch_size, args.vae_lr, rng, log)

    # Cache latents once: the UNet phase then never runs the VAE encoder.
    allowed = set(train_triples())
    scenes = [sample_scene(rng) for _ in range(args.dataset_size)]
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(scenes), 64):
            dist = vae.encode(render_tensor(scenes[i : i + 64])).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    latent_mean, latent_std = torch.cat(means), torch.cat(stds)  # [N, 4, 16, 16]
    scaling = float(1.0 / latent_mean.std())
    vae.register_to_config(scaling_factor=scaling)
    log({"phase": "cache", "scenes": len(scenes), "scaling_factor": round(scaling, 4)})

    caption_ids: dict[str, torch.Tensor] = {}

    def ids_for(texts):
        missing = [t for t in set(texts) if t not in caption_ids]
        if missing:
            encoded = tokenizer(missing, padding="max_length", max_length=tokenizer.model_max_length,
                                truncation=True, return_tensors="pt").input_ids
            caption_ids.update(zip(missing, encoded))
        return torch.stack([caption_ids[t] for t in texts])

    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    ema = [[p.detach().clone() for p in m.parameters()] for m in (unet, text_encoder)]
    alphas_cumprod = train_sched.alphas_cumprod  # [1000]
    snr = alphas_cumprod / (1 - alphas_cumprod)

    def save_and_eval(tag: str, step: int):
        with _swapped_in([(unet, ema[0]), (text_encoder, ema[1])]):
            pipe = StableDiffusionPipeline(
                vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=sample_sched,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )
            pipe.set_progress_bar_config(disable=True)
            unet.eval()
            text_encoder.eval()
            pipe.save_pretrained(out / tag, safe_serialization=True)
            write_vocab_files(out / tag / "tokenizer")  # save_pretrained writes only tokenizer.json
            metrics = evaluate_fidelity(pipe, eval_prompts(), args.eval_seeds, args.eval_steps, args.guidance)
            unet.train()
            text_encoder.train()
        log({"phase": "save", "tag": tag, "step": step, **metrics})

    unet.train()
    text_encoder.train()
    train_start = time.time()
    step = 0
    running = 0.0
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_factor(step, args.steps, args.warmup)
        index = torch.randint(0, len(scenes), (args.batch_size,))
        latents = (latent_mean[index] + latent_std[index] * torch.randn_like(latent_mean[index])) * scaling
        texts = []
        for i in index.tolist():
            s = scenes[i]
            draw = rng.random()
            if draw < args.drop:
                texts.append("")
            elif draw < args.drop + args.corrupt:
                texts.append(corrupt_caption(s.fg, s.shape, s.bg, rng, allowed))
            else:
                texts.append(CAPTION_TEMPLATE.format(fg=s.fg, shape=s.shape, bg=s.bg))
        cond = text_encoder(ids_for(texts))[0]  # [B, L, 64]
        noise = torch.randn_like(latents)
        t = torch.randint(0, train_sched.config.num_train_timesteps, (args.batch_size,))
        noisy = train_sched.add_noise(latents, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=cond).sample
        target = noise if args.prediction == "epsilon" else train_sched.get_velocity(latents, noise, t)
        per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))  # [B]
        loss = (per_sample * loss_weight(snr[t], args.prediction, args.min_snr)).mean()
        optimizer_step_with_ema(loss, opt, params, (unet, text_encoder), ema, step, args.ema)
        running = 0.98 * running + 0.02 * float(loss.detach()) if step else float(loss.detach())
        if step % 50 == 0:
            elapsed = time.time() - train_start
            log({"phase": "unet", "step": step, "loss": round(running, 5), "lr": round(opt.param_groups[0]["lr"], 6),
                 "s_per_step": round(elapsed / (step + 1), 3)})
        if (step + 1) % args.save_every == 0:
            save_and_eval(f"step_{step + 1:05d}", step + 1)
        if args.max_minutes and time.time() - train_start > args.max_minutes * 60:
            log({"phase": "unet", "stopped": "max-minutes", "step": step + 1})
            break
    save_and_eval("final", step + 1)
    log({"phase": "done", "train_minutes": round((time.time() - train_start) / 60, 2),
         "total_minutes": round((time.time() - start) / 60, 2)})


if __name__ == "__main__":
    main()
