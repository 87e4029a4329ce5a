"""Tiny random-weight reward models saved in each scorer's official checkpoint layout, for offline tests and demos.

Each ``save_tiny_*`` writes what the real release ships (a transformers CLIP folder for PickScore / CLIP, the
aesthetic predictor's ``.pth``, open_clip's ``HPS_v2.1_compressed.pt``, ``ImageReward.pt`` with
``med_config.json`` and ``vocab.txt``, a CLAP folder) with models two layers deep and 16-48 wide, so that
``load_reward_model(name, **tiny_reward_kwargs(name, root))`` runs the real loading and preprocessing code with no
download. Weights come from fixed seeds: the same call gives the same files, and the ``tiny_*_modules`` builders
give the very modules that were saved, for computing expected scores independently of the loaders.

Example::

    from diffusion_pref.reward_models import load_reward_model
    from diffusion_pref.testing.rewards import tiny_reward_kwargs
    scorer = load_reward_model("imagereward", device="cpu", **tiny_reward_kwargs("imagereward", "/tmp/rewards"))
    scorer.score(["a red cube"], [image])          # float32 [1]
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from diffusion_pref.testing import _seeded

__all__ = [
    "TINY_OPEN_CLIP",
    "save_tiny_aesthetic_mlp",
    "save_tiny_clap",
    "save_tiny_clip",
    "save_tiny_hps",
    "save_tiny_imagereward",
    "tiny_imagereward_modules",
    "tiny_reward_kwargs",
]

# HPS's tiny architecture as an open_clip config; vocab 49408 because open_clip's tokenizer is the real one.
TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def save_tiny_clip(folder: str | Path, seed: int = 0, projection_dim: int = 16) -> Path:
    """A 2-layer ``CLIPModel`` (224 px, patch 32) + CLIP tokenizer + OpenAI image processor settings.

    ``logit_scale`` is exp(log 50) = 50, not CLIP's 100, so code that hard-codes 100 gives other numbers.
    """
    import torch
    import transformers
    from transformers import CLIPConfig, CLIPModel

    from diffusion_pref.reward_models.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from diffusion_pref.testing import tiny_clip_tokenizer

    folder = Path(folder)
    tokenizer = tiny_clip_tokenizer(folder, model_max_length=77)  # the scorers tokenise to CLIP's 77 positions
    tokenizer.save_pretrained(folder)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, **ids),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=224, patch_size=32),
        projection_dim=projection_dim,
    )
    with _seeded(seed):
        model = CLIPModel(config)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(50.0))
    model.save_pretrained(folder)
    # The official processor: shortest side 224 bicubic, centre crop 224, OpenAI mean/std.
    processor_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    processor_cls(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3,
                  image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD)).save_pretrained(folder)
    return folder


def save_tiny_aesthetic_mlp(path: str | Path, embed_dim: int = 16, seed: int = 1) -> Path:
    """The LAION aesthetic predictor's layout (``layers.{0,2,4,6,7}``, as in sac+logos+ava1-l14-linearMSE.pth) on
    ``embed_dim``-wide CLIP embeddings."""
    import torch
    from torch import nn

    with _seeded(seed):
        mlp = nn.Sequential(nn.Linear(embed_dim, 64), nn.Dropout(0.2), nn.Linear(64, 32), nn.Dropout(0.2),
                            nn.Linear(32, 16), nn.Dropout(0.1), nn.Linear(16, 8), nn.Linear(8, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({f"layers.{k}": v for k, v in mlp.state_dict().items()}, path)
    return path


def save_tiny_hps(folder: str | Path, seed: int = 2, filename: str = "HPS_v2.1_compressed.pt") -> Path:
    """``HPS_v2.1_compressed.pt`` (``HPS_v2_compressed.pt`` for v2) as released: ``{"state_dict": fp16 tensors}``
    of an open_clip ``CLIP`` built from :data:`TINY_OPEN_CLIP` (pass that as the scorer's ``architecture``).
    Returns the folder."""
    import open_clip
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with _seeded(seed):
        model = open_clip.CLIP(**TINY_OPEN_CLIP)
    torch.save({"state_dict": {k: v.half() for k, v in model.state_dict().items()}}, folder / filename)
    return folder


IMAGEREWARD_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "of", "on", "the", "two", "red", "blue",
                     "cube", "photo", "cat", "dog", "car"]


def tiny_imagereward_modules(vocab_size: int, seed: int = 3):
    """(BLIP vision tower, BLIP text tower, reward MLP), the modules :func:`save_tiny_imagereward` saves.

    The LayerNorms are perturbed away from identity and the MLP's layers get a gain above 1, so that a wrong key
    mapping or a flattened head would change the scores (random init would hide both).
    """
    import torch
    from torch import nn
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    with _seeded(seed):
        vision = BlipVisionModel(BlipVisionConfig(
            hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, image_size=224,
            patch_size=32, layer_norm_eps=1e-6,
            initializer_range=0.02,  # BlipVisionConfig's default 1e-10 would make the pixels irrelevant
        )).eval()
        text = BlipTextModel(BlipTextConfig(
            vocab_size=vocab_size, hidden_size=32, encoder_hidden_size=48, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=40, is_decoder=True, layer_norm_eps=1e-12, pad_token_id=0,
        ), add_pooling_layer=False).eval()
        mlp = nn.Sequential(nn.Linear(32, 64), nn.Dropout(0.2), nn.Linear(64, 16), nn.Dropout(0.2), nn.Linear(16, 8),
                            nn.Dropout(0.1), nn.Linear(8, 4), nn.Linear(4, 1)).eval()
        with torch.no_grad():
            for name, p in list(vision.named_parameters()) + list(text.named_parameters()):
                if "norm" in name.lower():
                    p.add_(0.1 * torch.randn_like(p))
            for layer in mlp:
                if isinstance(layer, nn.Linear):
                    layer.weight.normal_(0, 2 / layer.in_features**0.5)
    return vision, text, mlp


# transformers' BLIP ViT names -> the release's timm-style names (the inverse of the loader's mapping).
_VIT_RENAMES = [("embeddings.class_embedding", "cls_token"), ("embeddings.position_embedding", "pos_embed"),
                ("embeddings.patch_embedding.", "patch_embed.proj."), ("post_layernorm.", "norm."),
                ("encoder.layers.", "blocks."), ("layer_norm1.", "norm1."), ("layer_norm2.", "norm2."),
                ("self_attn.qkv.", "attn.qkv."), ("self_attn.projection.", "attn.proj.")]


def save_tiny_imagereward(folder: str | Path, seed: int = 3) -> Path:
    """``ImageReward.pt`` (BLIP's timm ViT and med-BERT names, ``mlp.layers.*``) + ``med_config.json`` (BERT,
    ``encoder_width`` 768 as released: the official code overrides it with the ViT width) + ``vocab.txt``.
    The scorer needs ``vision_heads=2``. Returns the folder."""
    import torch
    from transformers import BertTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    (folder / "vocab.txt").write_text("\n".join(IMAGEREWARD_WORDS + letters + ["##" + c for c in letters]) + "\n")
    vocab_size = len(BertTokenizer(str(folder / "vocab.txt"))) + 2  # + BLIP's [DEC] and [ENC]
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
           "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert", "num_attention_heads": 2,
           "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": vocab_size,
           "encoder_width": 768, "add_cross_attention": True}
    (folder / "med_config.json").write_text(json.dumps(med))
    vision, text, mlp = tiny_imagereward_modules(vocab_size, seed)
    state = {}
    for key, value in vision.state_dict().items():
        for old, new in _VIT_RENAMES:
            key = key.replace(old, new)
        state["blip.visual_encoder." + key] = value
    state.update({"blip.text_encoder." + k: v for k, v in text.state_dict().items()})
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(40)[None]
    state.update({f"mlp.layers.{k}": v for k, v in mlp.state_dict().items()})
    state["blip.vision_proj.weight"] = torch.zeros(8, 32)  # in the release, unused by the score
    state["blip.text_proj.weight"] = torch.zeros(8, 32)
    torch.save(state, folder / "ImageReward.pt")
    return folder


def save_tiny_clap(folder: str | Path, seed: int = 4) -> Path:
    """A ``ClapModel`` (2-stage HTSAT, 2-layer RoBERTa) + byte-level RoBERTa tokenizer + the feature extractor
    settings of laion/clap-htsat-unfused (48 kHz, 10 s, rand_trunc, repeatpad, 50-14000 Hz)."""
    from tokenizers import pre_tokenizers
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, RobertaTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):  # every byte: no text falls back to <unk>
        vocab[symbol] = len(vocab)
    vocab["<mask>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    RobertaTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)
    config = ClapConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=80, projection_dim=16),
        audio_config=dict(depths=[1, 1], num_attention_heads=[2, 2], patch_embeds_hidden_size=16, hidden_size=32,
                          projection_dim=16),
        projection_dim=16,
    )
    with _seeded(seed):
        ClapModel(config).save_pretrained(folder)
    ClapFeatureExtractor(truncation="rand_trunc", padding="repeatpad", frequency_min=50,
                         frequency_max=14000).save_pretrained(folder)
    return folder


def tiny_reward_kwargs(name: str, root: str | Path) -> dict:
    """Keyword arguments of ``load_reward_model(name, ...)`` for a tiny model of that scorer, written under
    ``root`` on first use (later calls with the same root reuse the files)."""
    root = Path(root)

    def once(sub: str, save) -> str:
        path = root / sub
        if not path.exists():
            save(path)
        return str(path)

    if name in ("pickscore", "clip"):
        return {"pretrained": once("clip", save_tiny_clip)}
    if name == "aesthetic":
        return {"pretrained": once("sac+logos+ava1-l14-linearMSE.pth", save_tiny_aesthetic_mlp),
                "clip_model": once("clip", save_tiny_clip)}
    if name == "hpsv21":
        return {"pretrained": once("hpsv21", save_tiny_hps), "architecture": TINY_OPEN_CLIP}
    if name == "hpsv2":
        return {"pretrained": once("hpsv2", lambda p: save_tiny_hps(p, filename="HPS_v2_compressed.pt")),
                "architecture": TINY_OPEN_CLIP}
    if name == "imagereward":
        return {"pretrained": once("imagereward", save_tiny_imagereward), "vision_heads": 2}
    if name == "clap":
        return {"pretrained": once("clap", save_tiny_clap)}
    if name in ("toy-fidelity", "toy-size", "tones-fidelity"):  # programmatic: no weights
        return {}
    raise ValueError(f"no tiny model for reward model {name!r}; choose one of pickscore, clip, aesthetic, hpsv2, "
                     "hpsv21, imagereward, clap, toy-fidelity, toy-size, tones-fidelity")
