"""Resume and bad input (issue 13): a resume from another run's checkpoint, config.yaml of a finished run, an
unwritable output.dir, a full disk while checkpointing, Ctrl-C, and a LoRA or checkpoint of another base model.

Tiny random-weight SD from ``diffusion_pref.testing`` and a few Pick-a-Pic pairs written on the fly; 1-4
optimizer steps per run.
"""

from __future__ import annotations

import errno
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import torch

from diffusion_pref import cli
from diffusion_pref.config import load_config

sys.path.insert(0, str(Path(__file__).parent))
from test_data import write_pairs  # noqa: E402
from test_train import make_cfg, read_metrics  # noqa: E402


# The tiny UNet has 4 transformer blocks (down 1, mid 1, up 2) with 8 adapted layers each (to_q/k/v/out.0 of self-
# and cross-attention), A and B for each: 64 tensors. On the wider UNet all change shape except A of cross-attention's
# to_k and to_v, which read the text encoder's unchanged width: 64 - 4 * 2.
ADAPTER_TENSORS_OF_ANOTHER_SHAPE = 64 - 4 * 2


@pytest.fixture(scope="module")
def pairs_path(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("pairs") / "pairs.parquet", n=8)


@pytest.fixture(scope="module")
def other_base_dir(tiny_sd_dir, tmp_path_factory):
    """The tiny SD with a wider UNet (channels 16, 32 instead of 8, 16): "another base model"."""
    from diffusers import UNet2DConditionModel

    path = tmp_path_factory.mktemp("other-base") / "model"
    shutil.copytree(tiny_sd_dir, path)
    config = dict(UNet2DConditionModel.load_config(tiny_sd_dir, subfolder="unet"))
    config["block_out_channels"] = (16, 32)
    shutil.rmtree(path / "unet")
    torch.manual_seed(0)
    UNet2DConditionModel.from_config(config).save_pretrained(path / "unet")
    return path


@pytest.fixture(scope="module")
def checkpointed_run(tiny_sd_dir, pairs_path, tmp_path_factory):
    """A finished 1-step LoRA run with its checkpoint at step 1, copied fresh for each test."""
    from diffusion_pref.commands.train import run

    out = tmp_path_factory.mktemp("run") / "run"
    run(make_cfg(tiny_sd_dir, pairs_path, out, "train.max_steps=2", "train.checkpoint_every=1"))
    return out


@pytest.fixture
def run_dir(checkpointed_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(checkpointed_run, out)
    return out


# ------------------------------------------------------------------------------------- 2: resume compatibility


def test_resume_with_another_loss_batch_or_data_is_refused_naming_the_keys(tiny_sd_dir, pairs_path, run_dir, tmp_path):
    from diffusion_pref.training.setup import Trainer

    other_data = write_pairs(tmp_path / "other.parquet", n=6)
    with pytest.raises(ValueError) as caught:
        Trainer(make_cfg(tiny_sd_dir, other_data, run_dir, "train.resume=latest", "loss.name=ipo",
                         "train.batch_size=1", "train.max_steps=3", "runtime.seed=5"))
    message = str(caught.value)
    assert "step-00000001" in message and "train.resume_force=true" in message
    for key in ("loss.name ('dpo' -> 'ipo')", "train.batch_size (2 -> 1)", "data.source", "runtime.seed (0 -> 5)"):
        assert key in message
    assert "train.max_steps" not in message and "\n" not in message


def test_keys_that_may_change_do_not_block_a_resume(tiny_sd_dir, pairs_path, run_dir):
    from diffusion_pref.training.setup import Trainer

    trainer = Trainer(make_cfg(tiny_sd_dir, pairs_path, run_dir, "train.resume=latest", "train.max_steps=3",
                               "train.checkpoint_every=5", "train.log_every=2", "train.logger=none",
                               "train.validate_every=7", "data.num_workers=1", "train.keep_checkpoints=1",
                               "sample.steps=3", "sample.guidance_scale=4", "reward.batch_size=3"))
    assert trainer.step == 1


def test_forced_resume_with_another_loss_continues(tiny_sd_dir, pairs_path, run_dir, caplog):
    from diffusion_pref.training.setup import Trainer

    with caplog.at_level("WARNING"):
        trainer = Trainer(make_cfg(tiny_sd_dir, pairs_path, run_dir, "train.resume=latest", "loss.name=ipo",
                                   "train.resume_force=true", "train.max_steps=2"))
    assert trainer.step == 1 and "loss.name ('dpo' -> 'ipo')" in caplog.text
    trainer.train()
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2]


@pytest.mark.parametrize("change, expect", [
    ("model.lora_rank=4", "tensors differ in shape"),
    ("model.lora_targets=[to_q,to_k]", "not in this model"),
])
def test_an_adapter_of_another_shape_is_refused_even_when_forced(tiny_sd_dir, pairs_path, run_dir, change, expect):
    from diffusion_pref.training.setup import Trainer

    key = change.split("=")[0]
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        Trainer(make_cfg(tiny_sd_dir, pairs_path, run_dir, "train.resume=latest", change))
    with pytest.raises(ValueError) as caught:  # not a raw size-mismatch RuntimeError or KeyError
        Trainer(make_cfg(tiny_sd_dir, pairs_path, run_dir, "train.resume=latest", change, "train.resume_force=true"))
    message = str(caught.value)
    assert type(caught.value) is ValueError and expect in message and "lora_rank" in message
    assert len(message) < 600


# -------------------------------------------------------------------- 15: weights of another base model, summarised


def test_resume_on_another_base_model_is_summarised(other_base_dir, pairs_path, run_dir):
    from diffusion_pref.training.setup import Trainer

    with pytest.raises(ValueError, match="model.pretrained"):
        Trainer(make_cfg(other_base_dir, pairs_path, run_dir, "train.resume=latest"))
    with pytest.raises(ValueError) as caught:
        Trainer(make_cfg(other_base_dir, pairs_path, run_dir, "train.resume=latest", "train.resume_force=true"))
    message = str(caught.value)
    assert f"{ADAPTER_TENSORS_OF_ANOTHER_SHAPE} tensors differ in shape (e.g. " in message and len(message) < 600


def test_resume_of_a_full_finetune_on_another_base_model_is_summarised(tiny_sd_dir, other_base_dir, pairs_path,
                                                                      tmp_path):
    from diffusion_pref.commands.train import run
    from diffusion_pref.training.setup import Trainer

    args = ("model.finetune=full", "train.checkpoint_every=1", "train.max_steps=2")
    run(make_cfg(tiny_sd_dir, pairs_path, tmp_path, *args))
    with pytest.raises(ValueError) as caught:  # accelerate's load_state: a RuntimeError of several hundred lines
        Trainer(make_cfg(other_base_dir, pairs_path, tmp_path, *args, "train.resume=latest",
                         "train.resume_force=true"))
    message = str(caught.value)
    assert "tensors differ in shape" in message and "model.pretrained" in message and len(message) < 600


def test_a_lora_of_another_base_model_gives_a_short_error_in_evaluate(tiny_sd_dir, other_base_dir, checkpointed_run):
    from diffusion_pref.commands.evaluate import Variant, load_variant

    cfg = load_config(None, [f"model.pretrained={other_base_dir}", "runtime.device=cpu", "runtime.dtype=fp32"])
    variant = Variant("dpo", str(checkpointed_run), "lora", checkpointed_run)
    with pytest.raises(ValueError) as caught:
        load_variant(cfg, variant)
    message = str(caught.value)
    assert message.startswith(f"eval.variants.dpo={checkpointed_run}: the LoRA does not fit")
    assert f"{ADAPTER_TENSORS_OF_ANOTHER_SHAPE} tensors differ in shape (e.g. " in message
    assert "another base model" in message
    assert len(message) < 600 and "\n" not in message
    load_variant(load_config(None, [f"model.pretrained={tiny_sd_dir}", "runtime.device=cpu"]), variant)  # its own base


def test_summarize_mismatch_counts_missing_and_unexpected_keys():
    from diffusion_pref.pipelines import summarize_mismatch

    module = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    state = {"0.weight": torch.zeros(4, 2), "0.bias": torch.zeros(4), "2.weight": torch.zeros(1)}
    with pytest.raises(RuntimeError) as caught:
        module.load_state_dict(state)
    summary = summarize_mismatch(str(caught.value))
    assert summary == ("2 tensors differ in shape (e.g. 0.weight: [4, 2] saved, [3, 2] in this model); "
                       "2 missing (e.g. 1.weight); 1 unexpected (e.g. 2.weight)")
    assert summarize_mismatch("some other error") is None


# ------------------------------------------------------------------------------ 3: config.yaml of a finished run


def test_a_failing_command_leaves_a_finished_runs_config_alone(tiny_sd_dir, run_dir, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    record = (run_dir / "config.yaml").read_text()
    # train: fails on its data, after the CLI's config checks
    assert cli.main(["train", f"model.pretrained={tiny_sd_dir}", f"data.source={run_dir / 'missing.parquet'}",
                     f"output.dir={run_dir}"]) == 1
    # generate: fails on its prompts
    assert cli.main(["generate", f"model.pretrained={tiny_sd_dir}", f"generate.prompts={run_dir / 'none.txt'}",
                     f"output.dir={run_dir}"]) == 1
    capsys.readouterr()
    assert (run_dir / "config.yaml").read_text() == record
    assert sorted(p.name for p in run_dir.glob("config*.yaml")) == ["config.yaml"]


def test_a_new_run_in_a_finished_runs_folder_keeps_the_old_config(tiny_sd_dir, pairs_path, run_dir, capsys,
                                                                   monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    record = (run_dir / "config.yaml").read_text()
    args = [f"model.pretrained={tiny_sd_dir}", f"data.source={pairs_path}", "data.resolution=32",
            "train.batch_size=2", "train.max_steps=1", "train.logger=none", "train.checkpoint_every=0",
            "model.lora_rank=2", f"output.dir={run_dir}"]
    assert cli.main(["train", *args]) == 0
    assert "kept it as config." in capsys.readouterr().err
    [kept] = [p for p in run_dir.glob("config.*.yaml")]
    assert kept.read_text() == record
    assert "max_steps: 1\n" in (run_dir / "config.yaml").read_text()
    assert load_config(run_dir / "config.yaml").train.max_steps == 1
    assert cli.main(["train", *args]) == 0  # the same config again: nothing more to keep
    assert len(list(run_dir.glob("config.*.yaml"))) == 1


# ---------------------------------------------------------------------------------- 7: output.dir not writable


def test_output_dir_that_is_a_file_or_read_only_gives_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert cli.main(["train", f"output.dir={a_file}"]) == 2
    err = capsys.readouterr().err
    assert f"output.dir={a_file} is a file, not a folder" in err and len(err.strip().splitlines()) == 1

    assert cli.main(["train", f"output.dir={a_file / 'below'}"]) == 2  # a file in the path
    err = capsys.readouterr().err
    assert f"output.dir={a_file / 'below'}: cannot write there (" in err and "Traceback" not in err

    read_only = tmp_path / "read_only"
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self == read_only:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    assert cli.main(["generate", f"output.dir={read_only}"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"diffusion-pref generate: config error: output.dir={read_only}: cannot write there "
                           f"(Read-only file system: {read_only})")


def test_an_os_error_during_a_command_is_one_line_naming_the_path(tmp_path, capsys, monkeypatch):
    import diffusion_pref.commands.generate

    def fail(cfg):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "out" / "shard-00000.parquet"))

    monkeypatch.setattr(diffusion_pref.commands.generate, "run", fail)
    assert cli.main(["generate", f"output.dir={tmp_path / 'out'}"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == f"diffusion-pref generate: error: Permission denied: {tmp_path / 'out' / 'shard-00000.parquet'}"
    assert not (tmp_path / "out" / "config.yaml").exists()  # the command stopped on it: no record of a run


# ------------------------------------------------------------------------------------ 8: disk full in a checkpoint


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4352 vs 4246"),
    OSError(errno.ENOSPC, "No space left on device"),
])
def test_a_full_disk_while_checkpointing_says_so_and_keeps_the_last_checkpoint(tiny_sd_dir, pairs_path, tmp_path,
                                                                                error):
    from diffusion_pref.training.setup import Trainer

    args = ("train.max_steps=3", "train.checkpoint_every=1")
    trainer = Trainer(make_cfg(tiny_sd_dir, pairs_path, tmp_path, *args))
    save_state = trainer.accelerator.save_state

    def save_state_until_full(output_dir):
        if output_dir.endswith("step-00000002"):
            (Path(output_dir) / "optimizer.bin").write_bytes(b"half")
            raise error
        return save_state(output_dir)

    trainer.accelerator.save_state = save_state_until_full
    with pytest.raises(OSError) as caught:
        trainer.train()
    message = str(caught.value)
    assert caught.value.errno == errno.ENOSPC and "the disk is full" in message
    assert f"under {tmp_path / 'checkpoints'}" in message
    assert f"the last complete checkpoint {tmp_path / 'checkpoints' / 'step-00000001'} is intact" in message
    assert "train.resume=latest" in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000001"]  # no half-written one
    resumed = Trainer(make_cfg(tiny_sd_dir, pairs_path, tmp_path, *args, "train.resume=latest"))
    assert resumed.step == 1
    resumed.train()
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3]


# ---------------------------------------------------------------------------------------------------- 12: Ctrl-C


def main_without_escaping_interrupt(argv):
    """cli.main, with a KeyboardInterrupt that escapes it failing this test instead of stopping the whole session."""
    try:
        return cli.main(argv)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped cli.main as a KeyboardInterrupt (a traceback for the user)")


def test_ctrl_c_in_train_prints_where_the_checkpoint_is_and_the_resume_command(tiny_sd_dir, pairs_path, tmp_path,
                                                                               capsys, monkeypatch):
    from diffusion_pref.training.checkpoint import Checkpointer

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "run"
    argv = ["train", f"model.pretrained={tiny_sd_dir}", f"data.source={pairs_path}", "data.resolution=32",
            "train.batch_size=2", "train.max_steps=4", "train.learning_rate=1e-3", "train.logger=none",
            "train.checkpoint_every=2", "model.lora_rank=2", f"output.dir={out}"]
    save = Checkpointer.save

    def save_then_interrupt(self, step, state):
        save(self, step, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(Checkpointer, "save", save_then_interrupt)
    assert main_without_escaping_interrupt(argv) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    [line] = [x for x in err.splitlines() if x.startswith("diffusion-pref train:")]
    assert f"the last checkpoint is {out / 'checkpoints' / 'step-00000002'}; resume with: diffusion-pref " in line
    command = shlex.split(line.split("resume with: ")[1])
    assert command[0] == "diffusion-pref" and command[-1] == "train.resume=latest"
    monkeypatch.setattr(Checkpointer, "save", save)
    assert cli.main(command[1:]) == 0
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4]


def test_ctrl_c_before_a_checkpoint_and_in_generate_prints_one_line(tmp_path, capsys, monkeypatch):
    import diffusion_pref.commands.generate
    import diffusion_pref.commands.train

    def interrupt(cfg):
        raise KeyboardInterrupt

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(diffusion_pref.commands.train, "run", interrupt)
    assert main_without_escaping_interrupt(["train", f"output.dir={tmp_path}", "train.checkpoint_every=50"]) == 130
    assert capsys.readouterr().err == ("\ndiffusion-pref train: interrupted before the first checkpoint "
                                       "(train.checkpoint_every=50); nothing to resume: run the same command again\n")
    monkeypatch.setattr(diffusion_pref.commands.generate, "run", interrupt)
    assert main_without_escaping_interrupt(["generate", f"output.dir={tmp_path}"]) == 130
    assert capsys.readouterr().err == (f"\ndiffusion-pref generate: interrupted; the finished shards stay in "
                                       f"{tmp_path}: the same command continues from them\n")
