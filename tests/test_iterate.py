"""``diffusion-pref iterate``: rounds of generate -> train -> evaluate on the shapes-world model, with tiny budgets.

One two-round run is shared by the tests (module fixture). Its first attempt is stopped in round 2's training, as a
killed run would be; the second attempt must finish without redoing anything that was done.
"""

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import diffusion_pref
from diffusion_pref.commands import evaluate, generate, iterate
from diffusion_pref.config import ConfigError, load_config
from diffusion_pref.commands import train as train_command
from diffusion_pref.training.setup import Trainer

RECIPE = Path(diffusion_pref.__file__).parent / "quickstart.yaml"
SMALL = [
    "iterate.rounds=2", "iterate.prompts_per_round=4", "generate.samples_per_prompt=4", "sample.steps=3",
    "generate.min_gap=null", "train.max_steps=3", "train.checkpoint_every=2", "train.logger=none",
    "eval.max_prompts=2", "eval.seeds=[0,1]", "eval.bootstrap_samples=20",
]


def small_config(out, *overrides):
    return load_config(RECIPE, [*SMALL, f"output.dir={out}", *overrides])


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished two-round run, plus the stages each attempt called."""
    out = tmp_path_factory.mktemp("iterate")
    calls = {"first": [], "second": []}
    real = {"generate": generate.generate, "train": train_command.run, "evaluate": evaluate.run}

    def spy(attempt, stage, folder_of):
        def call(cfg, *args, **kwargs):
            folder = folder_of(cfg)
            calls[attempt].append((stage, folder))
            if attempt == "first" and stage == "train" and folder == "round_2":
                raise Killed("stopped in round 2's training")
            return real[stage](cfg, *args, **kwargs)
        return call

    def round_of(cfg):
        return Path(cfg.output.dir).parent.name

    def evaluated(cfg):
        return sorted(cfg.eval.variants)[-1]  # the newest round being evaluated

    for attempt in ("first", "second"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(generate, "generate", spy(attempt, "generate", round_of))
            mp.setattr(train_command, "run", spy(attempt, "train", round_of))
            mp.setattr(evaluate, "run", spy(attempt, "evaluate", evaluated))
            if attempt == "first":
                with pytest.raises(Killed):
                    iterate.run(small_config(out))
            else:
                summary = iterate.run(small_config(out))
    return out, calls, summary


def test_two_rounds_run_and_a_stopped_run_resumes_at_the_stage_it_stopped(run_dir):
    out, calls, summary = run_dir
    assert calls["first"] == [("generate", "round_1"), ("train", "round_1"), ("evaluate", "round_1"),
                              ("generate", "round_2"), ("train", "round_2")]
    # Round 1 and round 2's pairs are not made again; round 2 trains and is evaluated.
    assert calls["second"] == [("train", "round_2"), ("evaluate", "round_2")]

    # One report with every round: evaluate's metrics and the iterate summary.
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["variants"] == ["base", "round_1", "round_2"]
    assert set(metrics["win_rates"]["toy-fidelity"]) >= {"round_1", "round_2"}
    assert [row["round"] for row in summary["rounds"]] == [1, 2]
    on_disk = json.loads((out / iterate.SUMMARY_FILE).read_text())
    for row in on_disk["rounds"]:
        name = f"round_{row['round']}"
        assert row["reward_mean"]["toy-fidelity"] == metrics["scores"]["toy-fidelity"][name]["mean"]
        assert row["win_rate_over_base"]["toy-fidelity"] == metrics["win_rates"]["toy-fidelity"][name]
        assert row["train_steps"] == 3 and row["pairs"] >= 1
        assert set(row["seconds"]) == {"generate", "train", "evaluate"}

    # Round r samples prompts [(r-1)N, rN) with seed runtime.seed + r - 1; every round trains with runtime.seed.
    records = [r.prompt for r in diffusion_pref.prompts.read_prompts("toy-train")]
    for r in (1, 2):
        cfg = load_config(out / f"round_{r}" / "pairs" / "config.yaml")
        assert cfg.runtime.seed == r - 1
        assert load_config(out / f"round_{r}" / "train" / "config.yaml").runtime.seed == 0
        assert [p["prompt"] for p in json.loads(Path(cfg.generate.prompts).read_text())] == records[4 * (r - 1):4 * r]


def test_a_finished_run_is_not_redone_and_other_settings_are_refused(run_dir, monkeypatch, tmp_path):
    out, _, _ = run_dir

    def fail(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    for module, name in ((generate, "generate"), (train_command, "run"), (evaluate, "run")):
        monkeypatch.setattr(module, name, fail)
    again = iterate.run(small_config(out))
    assert [row["round"] for row in again["rounds"]] == [1, 2]
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)  # a run folder moved elsewhere resumes there
    assert [row["round"] for row in iterate.run(small_config(moved))["rounds"]] == [1, 2]
    beta = small_config(out).loss.beta  # the recipe's, whatever it is; any other value must be refused
    with pytest.raises(ConfigError, match=rf"other settings \(loss.beta: {beta} -> {2 * beta}\)"):
        iterate.run(small_config(out, f"loss.beta={2 * beta}"))


def _pair_images(pairs_dir):
    import pyarrow.parquet as pq

    table = pq.read_table(sorted(pairs_dir.glob("*.parquet"))).to_pylist()
    images = {}
    for row in table:
        for side in (0, 1):
            images[(row["caption"], row[f"seed_{side}"])] = row[f"jpg_{side}"]
    return images


def test_round_2_samples_the_model_round_1_trained(run_dir):
    from PIL import Image

    out, _, _ = run_dir
    cfg = load_config(out / "round_2" / "pairs" / "config.yaml")
    assert cfg.generate.lora == str(out / "round_1" / "train")
    stored = _pair_images(out / "round_2" / "pairs")
    captions, seeds = zip(*stored)
    pixels = {}
    for name, lora in (("round_1", cfg.generate.lora), ("base", None)):
        cfg.generate.lora = lora
        backbone = generate._load_backbone(cfg, "cpu")
        images = generate._sample(backbone, list(captions), list(seeds), cfg.sample)
        pixels[name] = [np.asarray(im, dtype=np.int16) for im in images]
    saved = [np.asarray(Image.open(io.BytesIO(stored[key])), dtype=np.int16) for key in zip(captions, seeds)]
    # The stored samples are what base + round 1's LoRA draws at their seeds, and the base draws other images
    # there. generate sampled them in its own batches; here they are one batch, and another batch size or thread
    # count may round a pixel to the next level (a reordered sum in the UNet, carried through 20 steps), so each
    # stored image must be far nearer round 1's sample than the base's (mean |diff| in 8-bit levels).
    near_round_1 = [float(np.abs(a - b).mean()) for a, b in zip(saved, pixels["round_1"])]
    near_base = [float(np.abs(a - b).mean()) for a, b in zip(saved, pixels["base"])]
    assert sum(near_base) > 0
    assert all(r1 == 0 or r1 < 0.1 * b for r1, b in zip(near_round_1, near_base)), (near_round_1, near_base)


def _lora_state(folder):
    from diffusers.utils import convert_unet_state_dict_to_peft
    from safetensors.torch import load_file

    saved = load_file(str(Path(folder) / "pytorch_lora_weights.safetensors"))
    return convert_unet_state_dict_to_peft({k[len("unet."):]: v for k, v in saved.items()})


def _round_2_trainer(out, tmp_path, reference):
    cfg = load_config(out / "round_2" / "train" / "config.yaml",
                      [f"output.dir={tmp_path / reference}", "train.resume=null", f"model.reference={reference}"])
    return Trainer(cfg)


def test_training_continues_from_the_previous_rounds_adapter(run_dir, tmp_path):
    from peft.utils import get_peft_model_state_dict

    out, _, _ = run_dir
    round_1 = _lora_state(out / "round_1" / "train")
    start = get_peft_model_state_dict(_round_2_trainer(out, tmp_path, "adapter").unet)
    assert set(start) == set(round_1)
    assert all(torch.equal(start[k].float(), round_1[k].float()) for k in round_1)
    # round 1 really moved away from the zero-initialised adapter, so this is not a comparison of zeros
    assert any(k.endswith("lora_B.weight") and round_1[k].abs().max() > 0 for k in round_1)


@pytest.fixture(scope="module")
def probe(run_dir):
    """A UNet input and the outputs of the base and of round 1's model (diffusers' own LoRA loader) on it."""
    from diffusers import StableDiffusionPipeline

    from diffusion_pref.toy import WEIGHTS as TOY_WEIGHTS

    out, _, _ = run_dir
    outputs = {}
    for name in ("base", "round_1"):
        pipe = StableDiffusionPipeline.from_pretrained(TOY_WEIGHTS, safety_checker=None)
        if name == "round_1":
            pipe.load_lora_weights(out / "round_1" / "train")
        unet_cfg = pipe.unet.config
        x = torch.randn(2, unet_cfg.in_channels, unet_cfg.sample_size, unet_cfg.sample_size,
                        generator=torch.Generator().manual_seed(0))
        t = torch.tensor([100, 700])
        ids = pipe.tokenizer(["a red square on a green background"] * 2, padding="max_length",
                             max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            text = pipe.text_encoder(ids)[0]
            outputs[name] = pipe.unet(x, t, encoder_hidden_states=text).sample
    return x, t, text, outputs


@pytest.mark.parametrize("option", ["fixed", "moved"])
def test_the_reference_option(run_dir, probe, tmp_path, option):
    """fixed: round 2's reference is the base model; moved: it is round 1's model (base + its LoRA)."""
    out, _, _ = run_dir
    x, t, text, expected = probe
    cfg = small_config(out, f"iterate.reference={option}")
    reference = iterate._reference(cfg, 2)
    assert reference == {"fixed": "adapter", "moved": "copy"}[option]
    assert iterate._reference(cfg, 1) == "auto"  # round 1 has no earlier model: the base, as in train
    run = _round_2_trainer(out, tmp_path, reference)
    with torch.no_grad():
        got = run.reference_predict(x, t, {"encoder_hidden_states": text})
    want, other = ("base", "round_1") if option == "fixed" else ("round_1", "base")
    # float32 on both sides; only the order of the LoRA's small additions may differ
    torch.testing.assert_close(got, expected[want], rtol=1e-5, atol=1e-5)
    assert (got - expected[other]).abs().max() > 1e-3


def test_a_saved_lora_of_another_rank_is_refused_in_one_line(run_dir, tmp_path):
    out, _, _ = run_dir
    cfg = load_config(out / "round_2" / "train" / "config.yaml",
                      [f"output.dir={tmp_path}", "train.resume=null", "model.lora_rank=4"])
    with pytest.raises(ConfigError, match=r"train.init_lora=.*model.lora_rank=4") as err:
        Trainer(cfg)
    assert "\n" not in str(err.value)


def test_settings_iterate_cannot_honour_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"iterate.prompts_per_round=50 for iterate.rounds=2 needs 100 prompts"):
        iterate.run(small_config(tmp_path, "iterate.prompts_per_round=50"))
    with pytest.raises(ConfigError, match="train.init_lora is set by iterate"):
        iterate.run(small_config(tmp_path, f"train.init_lora={tmp_path}"))
    with pytest.raises(ConfigError, match="iterate.reference='sideways' is not one of fixed, moved"):
        small_config(tmp_path, "iterate.reference=sideways")
