"""Configs: strict keys, typed values, choices, YAML recipes, and the saved config reproducing a run."""

from pathlib import Path

import pytest

from diffusion_pref.config import (
    RENAMED,
    Config,
    ConfigError,
    check_loss,
    choices,
    load_config,
    resolve_runtime,
    save_config,
    to_yaml,
    validate,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("**/*.yaml"))
RECIPES = [p for p in CONFIGS if "accelerate" not in p.parts]  # accelerate's own files are not our recipes
PACKAGED = [ROOT / "diffusion_pref" / "quickstart.yaml"]  # recipes shipped inside the package


def test_defaults_and_overrides_are_typed():
    cfg = load_config(None, ["train.max_steps=7", "loss.beta=5000", "loss.params.gamma=3", "data.columns.caption=text"])
    assert isinstance(cfg, Config)
    assert cfg.train.max_steps == 7 and isinstance(cfg.train.max_steps, int)
    assert cfg.loss.beta == 5000.0 and isinstance(cfg.loss.beta, float)
    assert cfg.loss.params == {"gamma": 3}
    assert cfg.data.columns == {"caption": "text"}


def test_overrides_win_over_the_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  max_steps: 50\n  batch_size: 2\n")
    cfg = load_config(recipe, ["train.max_steps=3"])
    assert (cfg.train.max_steps, cfg.train.batch_size) == (3, 2)


@pytest.mark.parametrize(
    "override, nearest",
    [("train.max_step=1", "train.max_steps"), ("loss.bta=1", "loss.beta"), ("data.resolutoin=64", "data.resolution")],
)
def test_unknown_key_names_the_nearest(override, nearest):
    with pytest.raises(ConfigError, match=f"did you mean '{nearest}'"):
        load_config(None, [override])


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  learning_rat: 1.0e-4\n")
    with pytest.raises(ConfigError, match=r"train\.learning_rat.*r\.yaml.*train\.learning_rate"):
        load_config(recipe)


def test_wrong_type_names_key_and_type():
    with pytest.raises(ConfigError, match=r"train\.batch_size.*int"):
        load_config(None, ["train.batch_size=lots"])


def test_choices_are_checked():
    with pytest.raises(ConfigError, match="adamw, adamw8bit, adafactor"):
        load_config(None, ["train.optimizer=adam"])
    from diffusion_pref.config import _choice_keys

    keys = _choice_keys()
    assert {"runtime.dtype", "model.family", "trajectory.kind", "train.logger", "iterate.reference"} <= set(keys)
    for dotted in keys:  # every default is itself a valid choice
        section, key = dotted.split(".")
        assert getattr(getattr(Config(), section), key) in choices(dotted), dotted


@pytest.mark.parametrize("override, message", [
    ("runtime.dtype=fp61", r"runtime\.dtype='fp61' is not one of auto, fp32, fp16, bf16; did you mean 'fp16'\? \(command line\)"),
    ("model.family=sdx", r"model\.family='sdx' .* not one of auto, sd, sdxl, sd3, tango, tangoflux; did you mean 'sdxl'\?"),
    ("trajectory.kind=renoice", r"did you mean 'renoise'\?"),
    ("generate.strategy=best_vs_wrost", r"did you mean 'best_vs_worst'\?"),
])
def test_a_value_outside_the_choices_names_the_nearest(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_a_choice_in_a_file_is_checked_naming_the_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("runtime:\n  dtype: fp8\n")
    with pytest.raises(ConfigError, match=r"runtime\.dtype='fp8' is not one of .* \(.*r\.yaml\)$"):
        load_config(recipe)


def test_sd3_is_a_model_family():
    assert load_config(None, ["model.family=sd3"]).model.family == "sd3"


def test_choice_lists_elsewhere_come_from_the_config_types():
    from diffusion_pref import soft_labels, trajectories

    assert trajectories.KINDS == choices("trajectory.kind") == ("forward", "ddim", "renoise")
    assert trajectories.T_MODES == choices("trajectory.t_mode")
    assert soft_labels.WINNER_MODES == choices("loss.soft_label_winner")
    assert soft_labels.SCORE_SOURCES == choices("loss.soft_label_scores")


def test_malformed_override():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["train.max_steps"])


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_saved_config_reproduces_the_run(tmp_path):
    cfg = load_config(None, ["train.max_steps=11", "loss.name=ipo", "reward.models.clip=0.5", "output.dir=x"])
    path = save_config(cfg, tmp_path)
    again = load_config(path)
    assert again == cfg
    assert to_yaml(again) == to_yaml(cfg)


def test_loss_params_are_checked_against_the_loss():
    check_loss(load_config(None, ["loss.name=smpo", "loss.params.gamma=5"]))  # valid: no error
    with pytest.raises(ConfigError, match="gamma"):
        check_loss(load_config(None, ["loss.name=smpo", "loss.params.gama=5"]))
    with pytest.raises(ConfigError, match="dpo"):
        check_loss(load_config(None, ["loss.name=dpoo"]))


def test_there_are_recipes():
    assert RECIPES, "configs/ holds no YAML recipes"


@pytest.mark.parametrize("path", RECIPES + PACKAGED, ids=lambda p: p.name)
def test_every_recipe_loads(path):
    cfg = load_config(path)
    check_loss(cfg)


def test_a_mapping_in_a_file_replaces_the_default_and_overrides_update_it(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("reward:\n  models:\n    toy-fidelity: 1.0\nloss:\n  params:\n    gamma: 3\n")
    cfg = load_config(recipe)
    assert cfg.reward.models == {"toy-fidelity": 1.0}  # the default pickscore is gone
    cfg = load_config(recipe, ["reward.models.clip=0.5", "loss.params.extra=1"])
    assert cfg.reward.models == {"toy-fidelity": 1.0, "clip": 0.5}
    assert cfg.loss.params == {"gamma": 3, "extra": 1}
    cfg = load_config(recipe, ["reward.models={clip: 0.5}"])  # a whole mapping on the command line replaces
    assert cfg.reward.models == {"clip": 0.5}


@pytest.mark.parametrize("old, value, new", [
    ("train.mixed_precision", "fp16", "runtime.dtype=fp16"),
    ("train.mixed_precision", "no", "runtime.dtype=fp32"),  # YAML reads a bare `no` as false: still accelerate's "no"
    ("train.mixed_precision", "bf16", "runtime.dtype=bf16"),
    ("train.seed", "3", "runtime.seed=3"),
    ("generate.seed", "3", "runtime.seed=3"),
    ("generate.steps", "20", "sample.steps=20"),
    ("generate.guidance_scale", "1.0", "sample.guidance_scale=1.0"),
    ("generate.resolution", "64", "sample.resolution=64"),
    ("generate.scheduler", "DDIMScheduler", "sample.scheduler=DDIMScheduler"),
    ("generate.batch_size", "4", "sample.batch_size=4"),
    ("generate.dtype", "bf16", "runtime.dtype=bf16"),
    ("eval.steps", "20", "sample.steps=20"),
    ("eval.guidance_scale", "3", "sample.guidance_scale=3"),
    ("eval.resolution", "64", "sample.resolution=64"),
    ("eval.batch_size", "4", "sample.batch_size=4"),
    ("eval.device", "cpu", "runtime.device=cpu"),
    ("eval.dtype", "fp32", "runtime.dtype=fp32"),
    ("reward.device", "cpu", "runtime.device=cpu"),
    ("trajectory.invert_image", "x.png", "invert.image=x.png"),
    ("trajectory.invert_prompt", "a cat", "invert.prompt=a cat"),
])
def test_a_renamed_key_names_its_new_key(tmp_path, old, value, new):
    with pytest.raises(ConfigError, match=f"^{old} was renamed: use {new} \\(command line\\)$"):
        load_config(None, [f"{old}={value}"])
    section, key = old.split(".")
    recipe = tmp_path / "old.yaml"
    recipe.write_text(f"{section}:\n  {key}: {value}\n")
    with pytest.raises(ConfigError, match=f"^{old} was renamed: use {new} \\(.*old\\.yaml\\)$"):
        load_config(recipe)


def test_every_renamed_key_is_gone_and_its_new_key_exists():
    from diffusion_pref.config import _valid_keys

    valid = _valid_keys()
    for old, new in RENAMED.items():
        assert old not in valid and valid.get(new, "missing") is None, (old, new)


def test_runtime_resolution_on_a_cpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    auto = load_config().runtime
    for sampling in (False, True):  # auto on a CPU: fp32 for training and for sampling
        assert resolve_runtime(auto, sampling=sampling) == (torch.device("cpu"), torch.float32, "no")
    assert resolve_runtime(auto).precision == "fp32"
    bf16 = resolve_runtime(load_config(None, ["runtime.dtype=bf16", "runtime.device=cpu"]).runtime)
    assert bf16 == (torch.device("cpu"), torch.bfloat16, "bf16") and bf16.precision == "bf16"
    with pytest.raises(ConfigError, match=r"runtime\.device=cuda: PyTorch sees 0 CUDA device"):
        resolve_runtime(load_config(None, ["runtime.device=cuda"]).runtime)


def test_runtime_resolution_on_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    auto = load_config().runtime
    # training keeps fp32 on a GPU (accelerate's "no"); sampling is fp16 there
    assert resolve_runtime(auto) == (torch.device("cuda"), torch.float32, "no")
    assert resolve_runtime(auto, sampling=True) == (torch.device("cuda"), torch.float16, "fp16")
    fp16 = resolve_runtime(load_config(None, ["runtime.dtype=fp16", "runtime.device=cuda:1"]).runtime)
    assert fp16 == (torch.device("cuda", 1), torch.float16, "fp16")
    with pytest.raises(ConfigError, match=r"runtime\.device=cuda:2: .* or cuda:0\.\.1"):
        resolve_runtime(load_config(None, ["runtime.device=cuda:2"]).runtime)


@pytest.mark.parametrize("device", ["gpu", "cuda:-1", "cuda:x", "mps"])
def test_a_device_that_is_not_auto_cpu_or_cuda_is_refused(device):
    with pytest.raises(ConfigError, match=f"runtime.device='{device}' is not one of auto, cpu, cuda, cuda:N"):
        load_config(None, [f"runtime.device={device}"])


@pytest.mark.parametrize("overrides, message", [
    (["model.finetune=full", "model.reference=adapter"], r"model\.reference=adapter needs model\.finetune=lora"),
    (["model.reference=none"], r"model\.reference=none but this loss compares against a reference"),
    (["model.finetune=full", "train.init_lora=/some/lora"], r"train\.init_lora=/some/lora .* needs model\.finetune=lora"),
    (["trajectory.cache_inverted=true"], r"trajectory\.cache_inverted=true .* needs data\.cache=true"),
    (["trajectory.cache_inverted=true", "data.cache=true", "trajectory.kind=ddim"],
     r"trajectory\.cache_inverted=true .*invert_with=policy\)"),
    (["trajectory.invert_with=reference", "loss.name=sft"], r"trajectory\.invert_with=reference needs a reference model"),
    (["generate.min_gap=0.5", "generate.max_gap=0.1"], r"generate\.min_gap=0\.5 is above generate\.max_gap=0\.1"),
    (["generate.rso_beta=1.0", "generate.rso_keep=1"], r"generate\.rso_keep=1: pairs need at least 2"),
    (["eval.images_dir=/imgs", "eval.variants.dpo=/lora"], r"set either eval\.images_dir .* or eval\.variants"),
])
def test_validate_rules_between_keys(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_validate_accepts_the_combinations_that_work():
    load_config(None, ["trajectory.cache_inverted=true", "data.cache=true", "trajectory.kind=renoise",
                       "trajectory.invert_with=reference", "loss.name=smpo"])
    load_config(None, ["model.reference=none", "loss.name=sft"])  # a reference-free loss needs none
    load_config(None, ["model.finetune=full", "model.reference=copy", "trajectory.invert_with=reference"])
    load_config(None, ["eval.images_dir=/imgs"])


def test_validate_checks_the_loss_for_training_only():
    cfg = load_config(None, ["loss.name=smpo", "loss.params.gama=5"])  # a recipe may carry another loss's params
    with pytest.raises(ConfigError, match=r"loss config: .*gamma"):
        validate(cfg, loss=True)


def test_validate_checks_a_config_built_in_code():
    cfg = Config()
    validate(cfg)
    cfg.runtime.dtype = "fp8"
    with pytest.raises(ConfigError, match=r"runtime\.dtype='fp8' is not one of"):
        validate(cfg)
    cfg = Config()
    cfg.sample.steps = 0
    with pytest.raises(ConfigError, match=r"sample\.steps=0 is out of range"):
        validate(cfg)


@pytest.mark.parametrize("override, shown", [
    ("loss.beta=0", r"loss\.beta=0\.0 is out of range: it must be > 0"),
    ("loss.beta=-2500", r"loss\.beta=-2500\.0 .* > 0"),
    ("loss.beta=.nan", r"loss\.beta=nan .* > 0"),
    ("train.learning_rate=-1e-5", r"train\.learning_rate=-1e-05 .* > 0"),
    ("train.batch_size=0", r"train\.batch_size=0 .* >= 1"),
    ("train.max_steps=0", r"train\.max_steps=0 .* >= 1"),
    ("train.grad_accum=0", r"train\.grad_accum=0 .* >= 1"),
    ("train.warmup_steps=-1", r"train\.warmup_steps=-1 .* >= 0"),
    ("train.log_every=0", r"train\.log_every=0 .* >= 1"),
    ("train.adam_beta2=1.0", r"train\.adam_beta2=1\.0 .* in \[0, 1\)"),
    ("data.caption_dropout=1.5", r"data\.caption_dropout=1\.5 .* in \[0, 1\]"),
    ("model.lora_rank=0", r"model\.lora_rank=0 .* >= 1"),
])
def test_numbers_out_of_range_name_the_key_and_the_range(override, shown):
    with pytest.raises(ConfigError, match=shown):
        load_config(None, [override])


def test_range_edges_and_unset_optionals_are_accepted():
    cfg = load_config(None, ["data.caption_dropout=0", "train.warmup_steps=0", "train.max_grad_norm=0",
                             "train.adam_beta1=0", "train.checkpoint_every=0", "model.lora_alpha=null"])
    assert (cfg.train.max_grad_norm, cfg.model.lora_alpha) == (0.0, None)
    assert load_config(None, ["data.caption_dropout=1"]).data.caption_dropout == 1.0
    assert load_config(None, ["loss.beta=1e-9"]).loss.beta == 1e-9


def test_every_range_names_a_numeric_key_whose_default_is_in_range():
    from diffusion_pref.config import RANGES

    defaults = Config()
    for dotted, allowed in RANGES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(defaults, section), key)  # AttributeError on a misspelt key
        assert value is None or value in allowed, dotted


def test_the_command_line_rejects_a_range_before_reading_data_or_model(tmp_path, capsys):
    from diffusion_pref.cli import main

    out = tmp_path / "run"
    code = main(["train", "model.pretrained=/nonexistent/model", "data.source=/nonexistent/pairs.parquet",
                 "train.learning_rate=-0.001", f"output.dir={out}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "train.learning_rate=-0.001 is out of range: it must be > 0" in err
    assert not out.exists()  # stopped before the config was even saved
