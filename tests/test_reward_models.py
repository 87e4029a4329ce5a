"""Reward models: tiny random-weight models in each scorer's real architecture, saved in the official checkpoint
layout, loaded back through the public loader, and checked against independent computations."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_pref.reward_models import REWARD_MODELS, load_reward, load_reward_model
from diffusion_pref.reward_models.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from diffusion_pref.testing.rewards import (
    TINY_OPEN_CLIP,
    save_tiny_clap,
    save_tiny_clip,
    save_tiny_hps,
    save_tiny_imagereward,
    tiny_imagereward_modules,
)



@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread while these tests run (scores compared across batch sizes reduce in the same order), restored
    afterwards: a module-level set_num_threads would leak into every test collected after this file."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


MEAN = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
STD = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
PROMPTS = ["a red cube", "two blue spheres on grass", "a red cube", "an astronaut riding a horse"]


def _random_images(n, seed, size=(48, 40)):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def _official_clip_pixels(images):
    """Independent re-statement of the OpenAI/CLIP processor on PIL: shortest side -> 224 bicubic, centre crop."""
    out = []
    for im in images:
        w, h = im.size
        if w <= h:
            nw, nh = 224, int(224 * h / w)
        else:
            nw, nh = int(224 * w / h), 224
        r = im.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - 224) // 2, (nh - 224) // 2
        r = r.crop((left, top, left + 224, top + 224))
        x = torch.from_numpy(np.asarray(r, dtype=np.float32) / 255.0).permute(2, 0, 1)
        out.append((x - MEAN) / STD)
    return torch.stack(out)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    # seed 1: a model whose cosines on test_clip_score_conventions' prompts and images take both signs
    return str(save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=1))


# ---------------------------------------------------------------- registry and combination


def test_unknown_name_lists_choices_and_nearest():
    with pytest.raises(ValueError) as err:
        load_reward_model("pickscor")
    msg = str(err.value)
    assert "'pickscore'" in msg and "did you mean" in msg
    for name in REWARD_MODELS:
        assert name in msg
    with pytest.raises(ValueError, match="unknown reward model 'nope'"):
        load_reward({"pickscore": 1.0, "nope": 2.0})


def test_registry_entries_resolve_to_classes_with_protocol():
    from diffusion_pref.reward_models import reward_model_class

    for name in REWARD_MODELS:
        cls = reward_model_class(name)
        assert cls.name == name, f"{name}: class attribute name is {cls.name!r}"
        assert isinstance(cls.scale, str) and callable(cls.score)


# ---------------------------------------------------------------- PickScore


def test_pickscore_matches_direct_embedding_computation(clip_folder):
    pick = load_reward_model("pickscore", pretrained=clip_folder, device="cpu", batch_size=3)
    images = _random_images(4, seed=1, size=(60, 40))
    scores = pick.score(PROMPTS, images)
    assert scores.dtype == torch.float32 and scores.shape == (4,)

    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(clip_folder).eval()
    tok = CLIPTokenizer.from_pretrained(clip_folder)
    pixels = _official_clip_pixels(images)
    with torch.no_grad():
        # Independent of the scorer's batching: one prompt at a time, no padding.
        t = torch.cat([model.get_text_features(**tok([p], return_tensors="pt")).pooler_output for p in PROMPTS])
        i = model.get_image_features(pixel_values=pixels).pooler_output
    t = t / t.norm(dim=-1, keepdim=True)
    i = i / i.norm(dim=-1, keepdim=True)
    expected = 50.0 * (t * i).sum(-1)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)
    assert abs(float(scores[0] - scores[2])) > 1e-3, "same prompt, different images: the image must matter"

    one_batch = load_reward_model("pickscore", pretrained=clip_folder, device="cpu", batch_size=16)
    one_batch = one_batch.score(PROMPTS, images)
    torch.testing.assert_close(one_batch, scores, atol=1e-5, rtol=1e-5)

    probs = pick.probabilities("a red cube", images)
    expected_probs = torch.softmax(pick.score(["a red cube"] * 4, images), 0)
    torch.testing.assert_close(probs, expected_probs)
    assert abs(float(probs.sum()) - 1) < 1e-6


def test_pickscore_tensor_input_equals_pil_input(clip_folder):
    pick = load_reward_model("pickscore", pretrained=clip_folder, device="cpu")
    images = _random_images(2, seed=2)
    tensor = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 for im in images])
    torch.testing.assert_close(pick.score(PROMPTS[:2], tensor), pick.score(PROMPTS[:2], images))
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        pick.score(PROMPTS[:2], tensor * 2 - 1)
    with pytest.raises(ValueError, match="one prompt per item"):
        pick.score(PROMPTS[:1], images)


# ---------------------------------------------------------------- HPS v2 / v2.1

def _independent_letterbox(image, antialias):
    """[3, H, W] -> [3, 224, 224] with torch.nn.functional only (no torchvision), per the HPS description."""
    _, h, w = image.shape
    s = 224 / max(h, w)
    nh, nw = round(h * s), round(w * s)
    content = torch.nn.functional.interpolate(
        image[None], size=(nh, nw), mode="bicubic", align_corners=False, antialias=antialias
    )[0]
    canvas = torch.zeros(3, 224, 224)
    top, left = (224 - nh) // 2, (224 - nw) // 2
    canvas[:, top : top + nh, left : left + nw] = content
    return (canvas - MEAN) / STD


def test_hps_letterbox_of_512x256_image():
    from diffusion_pref.reward_models.hps import hps_letterbox

    image = torch.rand(3, 256, 512)  # H=256, W=512 -> content 112 x 224, 56 padding rows above and below
    out = hps_letterbox(image, antialias=False)
    assert out.shape == (3, 224, 224)
    pad_value = (-MEAN / STD).expand(3, 56, 224)
    torch.testing.assert_close(out[:, :56], pad_value)
    torch.testing.assert_close(out[:, 168:], pad_value)
    content = torch.nn.functional.interpolate(image[None], size=(112, 224), mode="bicubic", align_corners=False)[0]
    torch.testing.assert_close(out[:, 56:168], (content - MEAN) / STD, atol=1e-5, rtol=1e-5)
    # antialias is pinned, not left to torchvision's default: the two settings differ when downsampling.
    aa = hps_letterbox(image, antialias=True)
    torch.testing.assert_close(aa, _independent_letterbox(image, antialias=True), atol=1e-5, rtol=1e-5)
    assert (aa - out).abs().max() > 1e-2


def test_hps_letterbox_odd_padding_and_untouched_224():
    from diffusion_pref.reward_models.hps import hps_letterbox

    image = torch.rand(3, 300, 200)  # W=200 -> round(200 * 224 / 300) = 149 columns; pad 75 = 37 left + 38 right
    out = hps_letterbox(image)
    torch.testing.assert_close(out, _independent_letterbox(image, antialias=False), atol=1e-5, rtol=1e-5)
    pad = -MEAN[:, 0] / STD[:, 0]
    assert torch.allclose(out[:, :, 36], pad) and not torch.allclose(out[:, :, 37], out[:, :, 36])
    assert torch.allclose(out[:, :, 186], pad) and not torch.allclose(out[:, :, 185], out[:, :, 186])
    square = torch.rand(3, 224, 224)
    torch.testing.assert_close(hps_letterbox(square), (square - MEAN) / STD)


@pytest.fixture(scope="module")
def hps_checkpoint(tmp_path_factory):
    """The official release layout: {'state_dict': fp16 tensors} in HPS_v2.1_compressed.pt."""
    import open_clip

    folder = save_tiny_hps(tmp_path_factory.mktemp("hps"))
    model = open_clip.CLIP(**TINY_OPEN_CLIP)  # what the scorer must end up with: the fp16 weights, in fp32
    state = torch.load(folder / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"]
    assert {v.dtype for v in state.values()} == {torch.float16}
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return str(folder), model.eval()


def test_hps_scores_equal_cosine_of_model_embeddings(hps_checkpoint):
    import open_clip

    folder, model = hps_checkpoint
    hps = load_reward_model("hpsv21", pretrained=folder, architecture=TINY_OPEN_CLIP, device="cpu", batch_size=3)
    images = _random_images(1, seed=4, size=(512, 256)) + _random_images(3, seed=5, size=(64, 96))
    scores = hps.score(PROMPTS, images)
    assert scores.shape == (4,) and scores.dtype == torch.float32

    pixels = torch.stack(
        [_independent_letterbox(torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255, False) for im in images]
    )
    with torch.no_grad():
        i = model.encode_image(pixels)
        t = model.encode_text(open_clip.tokenize(PROMPTS))
    expected = torch.nn.functional.cosine_similarity(i, t, dim=-1)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)
    assert abs(float(scores[0] - scores[2])) > 1e-3, "same prompt, different images: the image must matter"

    single = load_reward_model(
        "hpsv21", pretrained=os.path.join(folder, "HPS_v2.1_compressed.pt"), architecture=TINY_OPEN_CLIP,
        device="cpu", batch_size=1,
    )
    torch.testing.assert_close(single.score(PROMPTS, images), scores, atol=1e-5, rtol=1e-5)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device"):
            load_reward_model("hpsv21", pretrained=folder, architecture=TINY_OPEN_CLIP, amp=True, device="cpu")
    # v2.0 looks for its own file name in the folder.
    with pytest.raises(FileNotFoundError, match="HPS_v2_compressed.pt"):
        load_reward_model("hpsv2", pretrained=folder, architecture=TINY_OPEN_CLIP, device="cpu")


# ---------------------------------------------------------------- CLIP score


CLIP_PROMPTS = ["a photo of a dog", "a red cube", "qqqq wwww", "an astronaut riding a horse"]


def test_clip_score_conventions(clip_folder):
    # Prompts chosen so the tiny random model gives cosines of both signs, exercising the clamp.
    images = _random_images(4, seed=6, size=(40, 64))
    cos_model = load_reward_model("clip", pretrained=clip_folder, device="cpu", batch_size=3)
    cos = cos_model.score(CLIP_PROMPTS, images)

    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(clip_folder).eval()
    tok = CLIPTokenizer.from_pretrained(clip_folder)
    with torch.no_grad():
        t = torch.cat([model.get_text_features(**tok([p], return_tensors="pt")).pooler_output for p in CLIP_PROMPTS])
        i = model.get_image_features(pixel_values=_official_clip_pixels(images)).pooler_output
    expected = torch.nn.functional.cosine_similarity(t, i, dim=-1)
    torch.testing.assert_close(cos, expected, atol=1e-5, rtol=1e-4)
    assert (expected < 0).any() and (expected > 0).any(), "random weights should give both signs, to test the clamp"

    tm = load_reward_model("clip", pretrained=clip_folder, convention="torchmetrics", device="cpu", batch_size=16)
    torch.testing.assert_close(tm.score(CLIP_PROMPTS, images), 100 * expected.clamp(min=0), atol=1e-3, rtol=1e-4)
    assert "100" in tm.scale
    cs = load_reward_model("clip", pretrained=clip_folder, convention="clip-s", device="cpu")
    torch.testing.assert_close(cs.score(CLIP_PROMPTS, images), 2.5 * expected.clamp(min=0), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="torchmetrics"):
        load_reward_model("clip", pretrained=clip_folder, convention="percent")


def test_weighted_reward_is_weighted_sum_of_components(clip_folder):
    images = _random_images(4, seed=7)
    reward = load_reward(
        {
            "pickscore": {"weight": 2.0, "pretrained": clip_folder},
            "clip": {"weight": -0.5, "pretrained": clip_folder, "convention": "torchmetrics"},
        },
        device="cpu",
    )
    parts = reward.score_components(PROMPTS, images)
    pick = load_reward_model("pickscore", pretrained=clip_folder, device="cpu").score(PROMPTS, images)
    clip = load_reward_model("clip", pretrained=clip_folder, convention="torchmetrics", device="cpu").score(
        PROMPTS, images
    )
    torch.testing.assert_close(parts["pickscore"], pick)
    torch.testing.assert_close(parts["clip"], clip)
    torch.testing.assert_close(reward.score(PROMPTS, images), 2.0 * pick - 0.5 * clip)
    assert "pickscore" in reward.name and "clip" in reward.name
    single = load_reward("pickscore", pretrained=clip_folder, device="cpu")
    assert single.name == "pickscore"
    torch.testing.assert_close(single.score(PROMPTS, images), pick)
    with pytest.raises(ValueError, match="must be a number"):
        load_reward({"pickscore": "heavy"}, pretrained=clip_folder, device="cpu")


def test_reward_from_config_uses_weights_paths_and_device(clip_folder):
    from diffusion_pref.config import ConfigError, load_config
    from diffusion_pref.reward_models import load_reward_from_config, reward_spec

    cfg = load_config(None, ["reward.models.pickscore=2.0", f"reward.pretrained.pickscore={clip_folder}"])
    assert reward_spec(cfg.reward) == {"pickscore": {"weight": 2.0, "pretrained": clip_folder}}
    reward = load_reward_from_config(cfg.reward, "cpu")  # the command passes runtime.device
    images = _random_images(2, seed=8)
    pick = load_reward_model("pickscore", pretrained=clip_folder, device="cpu").score(PROMPTS[:2], images)
    torch.testing.assert_close(reward.score(PROMPTS[:2], images), 2.0 * pick)
    assert reward.components["pickscore"][0].device == torch.device("cpu")

    missing = load_config(None, [f"reward.pretrained.pickscore={clip_folder}/missing"])
    with pytest.raises(ConfigError, match=r"could not load reward model 'pickscore'.*set reward\.pretrained\.pickscore"):
        load_reward_from_config(missing.reward, "cpu")


# ---------------------------------------------------------------- LAION aesthetic v2


def _torchvision_clip_pixels(images):
    from torchvision import transforms as T

    tf = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor()])
    return torch.stack([(tf(im) - MEAN) / STD for im in images])


@pytest.mark.parametrize("relu", [False, True])
def test_aesthetic_mlp_on_normalised_embedding(clip_folder, tmp_path, relu):
    from torch import nn

    torch.manual_seed(8)
    d = 16  # the tiny CLIP's projection dim (768 for ViT-L/14)
    if relu:  # ava+logos-l14-reluMSE layout: layers.{0,3,6,9,11}
        layers = [nn.Linear(d, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.2),
                  nn.Linear(32, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 1)]
    else:  # sac+logos+ava1-l14-linearMSE layout: layers.{0,2,4,6,7}
        layers = [nn.Linear(d, 64), nn.Dropout(0.2), nn.Linear(64, 32), nn.Dropout(0.2), nn.Linear(32, 16),
                  nn.Dropout(0.1), nn.Linear(16, 8), nn.Linear(8, 1)]
    mlp = nn.Sequential(*layers)
    state = {f"layers.{k}": v for k, v in mlp.state_dict().items()}
    path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(state, path)

    aes = load_reward_model("aesthetic", pretrained=str(tmp_path), clip_model=clip_folder, device="cpu", batch_size=2)
    # 75x74 -> 227x224: a 3-pixel margin, which torchvision's crop rounds to 2 and the HF processor floors to 1.
    images = _random_images(3, seed=9, size=(75, 74))
    assert not torch.allclose(_torchvision_clip_pixels(images), _official_clip_pixels(images))
    scores = aes.score(["ignored"] * 3, images)

    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(clip_folder).eval()
    with torch.no_grad():
        emb = model.get_image_features(pixel_values=_torchvision_clip_pixels(images)).pooler_output
        emb = emb / emb.norm(dim=-1, keepdim=True)
        expected = mlp.eval()(emb)[:, 0]
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-4)
    one_batch = load_reward_model("aesthetic", pretrained=str(path), clip_model=clip_folder, device="cpu", batch_size=8)
    # Another batch size splits the matrix products another way: rounding only, bounded as for the other scorers.
    torch.testing.assert_close(one_batch.score(["x"] * 3, images), scores, atol=1e-5, rtol=1e-5)


def test_aesthetic_rejects_unknown_layout(clip_folder, tmp_path):
    torch.save({"layers.0.weight": torch.zeros(4, 16), "layers.0.bias": torch.zeros(4)}, tmp_path / "m.pth")
    with pytest.raises(ValueError, match="unrecognised MLP checkpoint layout"):
        load_reward_model("aesthetic", pretrained=str(tmp_path / "m.pth"), clip_model=clip_folder, device="cpu")


# ---------------------------------------------------------------- CLAP (audio)


@pytest.fixture(scope="module")
def clap_folder(tmp_path_factory):
    """A random ClapModel (HTSAT with 2 stages, 2-layer RoBERTa) + RoBERTa BPE tokenizer + feature extractor
    configured like laion/clap-htsat-unfused (48 kHz, 10 s, rand_trunc, repeatpad, 50-14000 Hz)."""
    return str(save_tiny_clap(tmp_path_factory.mktemp("tiny_clap")))


def test_clap_scores_equal_cosine_of_model_embeddings(clap_folder):
    from transformers import AutoTokenizer, ClapFeatureExtractor, ClapModel

    rng = np.random.default_rng(11)
    # 1 s, 11 s (longer than the 10 s window: must be cut, not randomly cropped), 0.5 s (repeat-padded)
    audio = [(rng.standard_normal(n) * 0.4).astype(np.float32) for n in (48_000, 528_000, 24_000)]
    audio[0][:10] = 1.7  # beyond [-1, 1]: clipped by the int16 round trip
    prompts = ["a dog barks", "rain on a roof", "a car passes"]
    clap = load_reward_model("clap", pretrained=clap_folder, device="cpu", batch_size=2)
    scores = clap.score(prompts, audio, sample_rate=48_000)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    torch.testing.assert_close(clap.score(prompts, audio, sample_rate=48_000), scores)  # deterministic

    model = ClapModel.from_pretrained(clap_folder).eval()
    extractor = ClapFeatureExtractor.from_pretrained(clap_folder)
    tok = AutoTokenizer.from_pretrained(clap_folder)
    expected = []
    with torch.no_grad():
        for a, p in zip(audio, prompts):
            q = np.trunc(np.clip(a[:480_000], -1, 1) * 32767) / 32767  # laion_clap's int16 round trip
            feats = extractor([q.astype(np.float32)], sampling_rate=48_000, return_tensors="pt")
            ae = model.get_audio_features(input_features=feats["input_features"], is_longer=feats["is_longer"])
            te = model.get_text_features(**tok([p], return_tensors="pt"))
            expected.append(torch.nn.functional.cosine_similarity(ae.pooler_output, te.pooler_output, dim=-1))
    torch.testing.assert_close(scores, torch.cat(expected), atol=1e-5, rtol=1e-4)

    as_tensors = [torch.from_numpy(a) for a in audio]
    one_batch = load_reward_model("clap", pretrained=clap_folder, device="cpu", batch_size=8)
    torch.testing.assert_close(one_batch.score(prompts, as_tensors, sample_rate=48_000), scores, atol=1e-5, rtol=1e-5)


def test_clap_rejects_bad_audio(clap_folder):
    import importlib.util

    clap = load_reward_model("clap", pretrained=clap_folder, device="cpu")
    audio = [np.zeros(16_000, dtype=np.float32)]
    if importlib.util.find_spec("soxr") is None and importlib.util.find_spec("scipy") is None:
        with pytest.raises(ValueError, match="16000 Hz but the model expects 48000 Hz"):
            clap.score(["x"], audio, sample_rate=16_000)
    with pytest.raises(ValueError, match="sample_rate"):
        clap.score(["x"], audio)
    with pytest.raises(ValueError, match="1-D mono"):
        clap.score(["x"], [np.zeros((2, 48_000), dtype=np.float32)], sample_rate=48_000)


# ---------------------------------------------------------------- ImageReward


@pytest.fixture(scope="module")
def imagereward_folder(tmp_path_factory):
    """ImageReward.pt in the release's key names, and the very modules it was saved from (same seed)."""
    from transformers import BertTokenizer

    folder = save_tiny_imagereward(tmp_path_factory.mktemp("imagereward"))
    vocab_size = len(BertTokenizer(str(folder / "vocab.txt"))) + 2  # + BLIP's [DEC], [ENC]
    assert json.loads((folder / "med_config.json").read_text())["vocab_size"] == vocab_size
    vision, text, mlp = tiny_imagereward_modules(vocab_size)
    return str(folder), vision, text, mlp


def test_imagereward_matches_blip_forward_and_official_normalisation(imagereward_folder):
    from transformers import BertTokenizer

    folder, vision, text, mlp = imagereward_folder
    ir = load_reward_model("imagereward", pretrained=folder, vision_heads=2, device="cpu", batch_size=3)
    prompts = ["a red cube", "two blue cubes on a red cube", "cube", "blue"]
    images = _random_images(4, seed=13, size=(75, 74))
    scores = ir.score(prompts, images)
    assert scores.shape == (4,) and scores.dtype == torch.float32

    tok = BertTokenizer(os.path.join(folder, "vocab.txt"))
    expected = []
    with torch.no_grad():
        for p, px in zip(prompts, _torchvision_clip_pixels(images)):
            t = tok([p], padding="max_length", truncation=True, max_length=35, return_tensors="pt")
            assert t["input_ids"].shape == (1, 35) and t["input_ids"][0, 0] == tok.cls_token_id
            emb = vision(pixel_values=px[None]).last_hidden_state
            h = text(input_ids=t["input_ids"], attention_mask=t["attention_mask"], encoder_hidden_states=emb,
                     is_decoder=False).last_hidden_state[:, 0]
            expected.append((mlp(h)[:, 0] - 0.16717362830052426) / 1.0333394966054072)
    torch.testing.assert_close(scores, torch.cat(expected), atol=1e-4, rtol=1e-4)
    black_white = [Image.new("RGB", (64, 64), (0, 0, 0)), Image.new("RGB", (64, 64), (255, 255, 255))]
    same_prompt = ir.score(["a red cube"] * 2, black_white)
    assert abs(float(same_prompt[0] - same_prompt[1])) > 1e-4, "the text encoder must cross-attend to the image"

    from_file = load_reward_model(
        "imagereward", pretrained=os.path.join(folder, "ImageReward.pt"), tokenizer=folder, vision_heads=2,
        device="cpu", batch_size=16,
    )
    torch.testing.assert_close(from_file.score(prompts, images), scores, atol=1e-5, rtol=1e-5)


def test_imagereward_rejects_incomplete_checkpoint(imagereward_folder, tmp_path):
    import shutil

    folder = imagereward_folder[0]
    state = torch.load(os.path.join(folder, "ImageReward.pt"), weights_only=True)
    del state["blip.text_encoder.encoder.layer.0.crossattention.self.key.weight"]
    torch.save(state, tmp_path / "ImageReward.pt")
    for name in ("med_config.json", "vocab.txt"):
        shutil.copy(os.path.join(folder, name), tmp_path / name)
    with pytest.raises(RuntimeError, match="crossattention.self.key.weight"):
        load_reward_model("imagereward", pretrained=str(tmp_path), vision_heads=2, device="cpu")
    state = torch.load(os.path.join(folder, "ImageReward.pt"), weights_only=True)
    state["blip.visual_encoder.blocks.0.ls1.gamma"] = torch.ones(48)  # a ViT variant the mapping does not know
    torch.save(state, tmp_path / "ImageReward.pt")
    with pytest.raises(RuntimeError, match="unmapped ViT keys.*ls1.gamma"):
        load_reward_model("imagereward", pretrained=str(tmp_path), vision_heads=2, device="cpu")


def test_clap_resamples_with_an_installed_resampler(clap_folder, monkeypatch):
    import sys
    import types

    calls = []

    def fake_resample(audio, orig, target):  # stands in for soxr: nearest-sample upsampling by an integer factor
        calls.append((orig, target))
        return np.repeat(audio, target // orig)

    monkeypatch.setitem(sys.modules, "soxr", types.SimpleNamespace(resample=fake_resample))
    clap = load_reward_model("clap", pretrained=clap_folder, device="cpu")
    audio = (np.random.default_rng(14).standard_normal(24_000) * 0.3).astype(np.float32)
    with pytest.warns(UserWarning, match="resampling audio from 24000 Hz to 48000 Hz with soxr"):
        at_24k = clap.score(["rain"], [audio], sample_rate=24_000)
    assert calls == [(24_000, 48_000)]
    torch.testing.assert_close(at_24k, clap.score(["rain"], [np.repeat(audio, 2)], sample_rate=48_000))


def test_tiny_reward_kwargs_load_and_score_every_registered_scorer(tmp_path):
    from diffusion_pref.testing.rewards import tiny_reward_kwargs

    images = _random_images(2, seed=21, size=(64, 64))
    audio = [np.random.default_rng(0).standard_normal(48_000).astype(np.float32) * 0.1 for _ in range(2)]
    for name in sorted(REWARD_MODELS):
        scorer = load_reward_model(name, device="cpu", **tiny_reward_kwargs(name, tmp_path))
        media, extra = (audio, {"sample_rate": 48_000}) if name in ("clap", "tones-fidelity") else (images, {})
        prompts = ["a red circle on a blue background", "a green square on a white background"]  # toy-* parse them
        if name == "tones-fidelity":  # the tones world's own captions and rate
            prompts, media, extra = ["two high beeps then a low hum", "a hiss"], [a[:16_000] for a in audio], {
                "sample_rate": 16_000}
        scores = scorer.score(prompts, media, **extra)
        assert scores.shape == (2,) and torch.isfinite(scores).all(), name
    with pytest.raises(ValueError, match="no tiny model"):
        tiny_reward_kwargs("nope", tmp_path)
