"""The backbone protocol (diffusion_pref.pipelines.base.Backbone): SD and SDXL implement every member, and each
member agrees with diffusers' own computation of the same thing (its VAE, encode_prompt, UNet call, pipeline call,
LoRA loader)."""

import numpy as np
import pytest
import torch

from diffusion_pref.config import ConfigError, load_config
from diffusion_pref.pipelines import load_backbone
from diffusion_pref.pipelines.base import Backbone, Samples, repeat_pair

FROZEN = {"sd": {"vae", "text_encoder"}, "sdxl": {"vae", "text_encoder", "text_encoder_2"}}


def _model_cfg(folder, *overrides):
    return load_config(None, [f"model.pretrained={folder}", *overrides]).model


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def family_dir(request, tiny_sd_dir, tiny_sdxl_dir):
    return request.param, {"sd": tiny_sd_dir, "sdxl": tiny_sdxl_dir}[request.param]


@pytest.fixture(scope="module")
def backbone(family_dir):
    """Shared by the read-only tests below: never add an adapter or change a module here."""
    return load_backbone(_model_cfg(family_dir[1]))


def _diffusers_pipe(folder, **kwargs):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pixels(seed=0, size=32):
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_every_member_is_there(backbone, family_dir):
    family, _ = family_dir
    assert isinstance(backbone, Backbone) and backbone.family == family
    assert isinstance(backbone.denoiser, torch.nn.Module)
    assert set(backbone.frozen) == FROZEN[family]
    assert all(isinstance(m, torch.nn.Module) for m in backbone.frozen.values())
    assert backbone.denoiser not in backbone.frozen.values()
    # The SDXL VAE overflows in fp16: training keeps it fp32; SD's modules all take the run's dtype.
    assert backbone.frozen_dtype == ({"vae": torch.float32} if family == "sdxl" else {})
    assert backbone.default_lora_targets == ["to_q", "to_k", "to_v", "to_out.0"]
    assert backbone.sample_rate is None
    for name in ("load", "encode", "decode", "encode_prompts", "prompts_cut", "token_limit", "conditioning",
                 "predict", "sample", "load_lora", "unload_lora", "save_lora", "save_full", "to"):
        assert callable(getattr(backbone, name)), name


def test_sdxl_with_its_own_vae_keeps_no_precision(tiny_sdxl_dir):
    backbone = load_backbone(_model_cfg(tiny_sdxl_dir, f"model.vae={tiny_sdxl_dir / 'vae'}"))
    assert backbone.frozen_dtype == {}


def test_encode_and_decode_are_the_vaes_own_round_trip(backbone):
    vae = backbone.frozen["vae"]
    pixels = _pixels()
    latents = backbone.encode(pixels)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    assert latents.shape == (2, vae.config.latent_channels, 32 // factor, 32 // factor)
    with torch.no_grad():
        mode = vae.encode(pixels).latent_dist.mode()
        torch.testing.assert_close(latents, mode * vae.config.scaling_factor)  # the posterior mode, scaled
        decoded = backbone.decode(latents)
        # decode inverts the scaling: the VAE's own round trip, up to the rounding of x * s / s (a few ulps)
        torch.testing.assert_close(decoded, vae.decode(mode).sample, rtol=1e-5, atol=1e-5)
    assert decoded.shape == pixels.shape


def test_encode_prompts_matches_the_pipelines_encode_prompt(backbone, family_dir):
    family, folder = family_dir
    prompts = ["a red cat", "a blue dog on a mat"]
    text = backbone.encode_prompts(prompts)
    pipe = _diffusers_pipe(folder)
    with torch.no_grad():
        expected = pipe.encode_prompt(prompt=prompts, device="cpu", num_images_per_prompt=1,
                                      do_classifier_free_guidance=False)
    torch.testing.assert_close(text["encoder_hidden_states"], expected[0])
    if family == "sdxl":
        assert set(text) == {"encoder_hidden_states", "text_embeds"}
        torch.testing.assert_close(text["text_embeds"], expected[2])  # the pooled, projected embedding
    else:
        assert set(text) == {"encoder_hidden_states"}
    assert all(v.shape[0] == len(prompts) for v in text.values())  # per-prompt rows, as the cache stores them


def test_prompts_cut_and_token_limit(backbone):
    limit = backbone.token_limit()
    assert limit == 16  # the tiny CLIP tokenizers' model_max_length
    long = "a red cat on a blue mat with a green hat and a yellow bat"
    assert backbone.prompts_cut(["a red cat", long]) == [False, True]
    assert backbone.prompts_cut([]) == []


def test_conditioning_and_predict(backbone, family_dir):
    family, _ = family_dir
    text = backbone.encode_prompts(["a red cat", "a blue dog"])
    batch = {"original_size": torch.tensor([[40, 48], [32, 32]]), "crop_top_left": torch.tensor([[4, 8], [0, 0]]),
             "target_size": 32}
    cond = backbone.conditioning(text, batch)
    if family == "sdxl":
        assert set(cond) == {"encoder_hidden_states", "text_embeds", "time_ids"}
        assert cond["time_ids"].tolist() == [[40, 48, 4, 8, 32, 32], [32, 32, 0, 0, 32, 32]]
        default = backbone.conditioning(text)["time_ids"]  # no metadata: the UNet's default size, uncropped
        assert default.tolist() == [[32, 32, 0, 0, 32, 32]] * 2
    else:
        assert set(cond) == {"encoder_hidden_states"}
    pair = repeat_pair(cond)  # [w; l]
    assert all(v.shape[0] == 4 for v in pair.values())
    x_t = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 500, 10, 999])
    with torch.no_grad():
        out = backbone.predict(x_t, t, pair)
        extra = {} if family == "sd" else {"added_cond_kwargs": {"text_embeds": pair["text_embeds"],
                                                                  "time_ids": pair["time_ids"]}}
        direct = backbone.denoiser(x_t, t, encoder_hidden_states=pair["encoder_hidden_states"], **extra).sample
        assert out.shape == x_t.shape
        torch.testing.assert_close(out, direct)
        import copy

        other = copy.deepcopy(backbone.denoiser)
        for p in other.parameters():
            p.add_(0.1)
        assert not torch.allclose(backbone.predict(x_t, t, pair, denoiser=other), out)  # the override is used


def test_sample_gives_each_seed_its_own_image_whatever_the_batch(backbone):
    kwargs = dict(steps=2, guidance_scale=3.0, output_type="np")
    batch = backbone.sample(["a red cat", "a blue dog", "a green tree"], [7, 8, 9], **kwargs)
    alone = backbone.sample(["a blue dog"], [8], **kwargs)
    assert isinstance(batch, Samples) and len(batch) == 3 and batch.blocked == [False] * 3
    assert batch[0].shape == (32, 32, 3)
    # Same noise and prompt: the same image; another batch composition may only reorder float sums.
    assert np.abs(batch[1] - alone[0]).max() < 1e-3
    assert np.abs(batch[0] - batch[1]).max() > 0.05 and np.abs(batch[1] - batch[2]).max() > 0.05
    images = backbone.sample(["a red cat"], [7], steps=2, guidance_scale=3.0)
    assert images[0].size == (32, 32) and images[0].mode == "RGB"  # PIL by default
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        backbone.sample(["a", "b"], [1], steps=2, guidance_scale=1.0)


@pytest.mark.parametrize("settings", [dict(), dict(scheduler="EulerDiscreteScheduler", resolution=48),
                                      dict(scheduler="DPMSolverMultistepScheduler", dtype=torch.bfloat16)])
def test_sample_is_the_diffusers_pipeline_call(family_dir, settings):
    """backbone.sample = what generate sampled before the protocol: the pipeline loaded in the dtype, the scheduler
    class built from the model's scheduler config, one CPU generator per seed."""
    import diffusers

    _, folder = family_dir
    dtype = settings.get("dtype")
    backbone = load_backbone(_model_cfg(folder), dtype=dtype)
    prompts, seeds = ["a red cat", "a blue dog"], [3, 11]
    got = backbone.sample(prompts, seeds, steps=3, guidance_scale=5.0, resolution=settings.get("resolution"),
                          scheduler=settings.get("scheduler"), output_type="np")
    pipe = _diffusers_pipe(folder, **({} if dtype is None else {"torch_dtype": dtype}))
    if settings.get("scheduler"):
        pipe.scheduler = getattr(diffusers, settings["scheduler"]).from_config(pipe.scheduler.config)
    size = {"height": settings["resolution"], "width": settings["resolution"]} if settings.get("resolution") else {}
    expected = pipe(prompt=prompts, num_inference_steps=3, guidance_scale=5.0, output_type="np",
                    generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], **size).images
    assert np.array_equal(np.stack(got), expected)
    # the model's own scheduler is back for the next call
    assert type(backbone.pipe.scheduler).__name__ == type(_diffusers_pipe(folder).scheduler).__name__
    with pytest.raises(ConfigError, match="sample.scheduler='NoSuch' is not a diffusers scheduler class"):
        backbone.sample(prompts, seeds, steps=1, guidance_scale=1.0, scheduler="NoSuch")


def test_save_lora_loads_into_diffusers_and_load_lora_samples_with_it(family_dir, tmp_path):
    from peft import LoraConfig

    _, folder = family_dir
    backbone = load_backbone(_model_cfg(folder))
    kwargs = dict(steps=2, guidance_scale=3.0, output_type="np")
    base = np.stack(backbone.sample(["a red cat"], [5], **kwargs))
    # init_lora_weights=False: A and B both random, so the adapter changes the output from the start
    backbone.denoiser.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                             target_modules=backbone.default_lora_targets))
    tuned = np.stack(backbone.sample(["a red cat"], [5], **kwargs))
    assert np.abs(tuned - base).max() > 0.01
    backbone.save_lora(tmp_path, backbone.denoiser)

    pipe = _diffusers_pipe(folder)
    pipe.load_lora_weights(str(tmp_path))  # diffusers' own loader, with the alpha stored in the file
    loaded = pipe(["a red cat"], num_inference_steps=2, guidance_scale=3.0, output_type="np",
                  generator=[torch.Generator().manual_seed(5)]).images
    assert np.abs(loaded - tuned).max() < 1e-4

    fresh = load_backbone(_model_cfg(folder))
    fresh.load_lora(tmp_path)
    assert np.abs(np.stack(fresh.sample(["a red cat"], [5], **kwargs)) - tuned).max() < 1e-4
    fresh.unload_lora()
    assert np.abs(np.stack(fresh.sample(["a red cat"], [5], **kwargs)) - base).max() < 1e-5


def test_safety_checker_is_explicit(family_dir):
    _, folder = family_dir
    backbone = load_backbone(_model_cfg(folder))
    with pytest.raises(ValueError, match="ships no safety checker; set sample.safety_checker=false"):
        backbone.sample(["a red cat"], [1], steps=1, guidance_scale=1.0, safety_checker=True)
    # None: run the model's checker if it ships one; the tiny models ship none
    assert backbone.sample(["a red cat"], [1], steps=1, guidance_scale=1.0, safety_checker=None).blocked == [False]


def test_a_shipped_safety_checker_loads_when_asked_and_flags_images(tiny_sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_dir))
    config = CLIPConfig(text_config=dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2),
                        vision_config=dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=16),
                        projection_dim=8)
    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-1.0)  # every image scores above every threshold: all flagged
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pipe.register_modules(safety_checker=checker, feature_extractor=processor)
    pipe.register_to_config(requires_safety_checker=True)
    pipe.save_pretrained(str(tmp_path))

    backbone = load_backbone(_model_cfg(tmp_path))
    assert backbone.pipe.safety_checker is None  # loaded without it
    off = backbone.sample(["a red cat"], [1], steps=1, guidance_scale=1.0, output_type="np")
    assert off.blocked == [False] and backbone._safety_checker is None  # not even loaded
    on = backbone.sample(["a red cat"], [1], steps=1, guidance_scale=1.0, output_type="np", safety_checker=True)
    assert on.blocked == [True] and np.abs(on[0]).max() == 0  # blacked out
    assert backbone.pipe.safety_checker is None  # taken off again after the call
    assert backbone.sample(["a red cat"], [1], steps=1, guidance_scale=1.0, safety_checker=None).blocked == [True]
