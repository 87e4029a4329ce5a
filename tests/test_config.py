"""Configs: strict keys, typed values, choices, YAML recipes, and the saved config reproducing a run."""

from pathlib import Path

import pytest

from diffusion_pref.config import CHOICES, Config, ConfigError, check_loss, load_config, save_config, to_yaml

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
    for dotted, choices in CHOICES.items():  # every default is itself a valid choice
        section, key = dotted.split(".")
        assert getattr(getattr(Config(), section), key) in choices, dotted


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


def test_a_bare_no_is_the_word_not_a_boolean(tmp_path):
    # YAML parses `no` as false; mixed_precision's choices are accelerate's words, so "no" must survive.
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  mixed_precision: no\n")
    assert load_config(recipe).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="mixed_precision"):
        load_config(None, ["train.mixed_precision=yes"])  # a word that is not a choice is still an error


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
