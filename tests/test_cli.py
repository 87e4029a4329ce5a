"""The command line: help without heavy imports, strict overrides, print-config, unavailable commands."""

import subprocess
import sys

import pytest

from diffusion_pref import cli


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "diffusion_pref.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_command():
    result = run_cli("--help")
    assert result.returncode == 0
    for name in ("generate", "cache", "train", "evaluate", "invert", "prompt-opt", "quickstart", "iterate"):
        assert name in result.stdout


def test_help_imports_nothing_heavy():
    code = (
        "import sys; from diffusion_pref import cli; cli.build_parser().format_help(); "
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'open_clip') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_unknown_key_fails_naming_the_nearest():
    result = run_cli("train", "--print-config", "train.max_stepz=1")
    assert result.returncode != 0
    assert "train.max_steps" in result.stderr


def test_print_config_prints_the_resolved_values():
    result = run_cli("train", "--print-config", "train.max_steps=123", "loss.name=ipo")
    assert result.returncode == 0, result.stderr
    assert "max_steps: 123" in result.stdout and "name: ipo" in result.stdout


def test_a_command_that_has_not_landed_says_so(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(cli.COMMANDS, "future", cli.Command("diffusion_pref.no_such_module", "later", 99))
    code = cli.main(["future", f"output.dir={tmp_path}"])
    assert code != 0
    assert "issue #99" in capsys.readouterr().err


def test_bad_loss_param_fails_before_any_model_loads(monkeypatch, capsys, tmp_path):
    loaded = []
    monkeypatch.setitem(cli.COMMANDS, "train", cli.Command("diffusion_pref.no_such_module", "t", 3, trains=True))
    monkeypatch.setattr(cli, "_command_available", lambda c: True)
    monkeypatch.setattr(cli.importlib, "import_module", lambda name: loaded.append(name))
    code = cli.main(["train", "loss.name=robust", "loss.params.flip=0.1", f"output.dir={tmp_path}"])
    assert code == 2 and loaded == []
    assert "flip" in capsys.readouterr().err


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_command_has_a_subparser(command):
    args = cli.build_parser().parse_args([command, "--print-config"])
    assert args.command == command and args.print_config


def test_short_flags_are_spellings_of_config_keys():
    result = run_cli("invert", "--print-config", "--image", "/tmp/x.png", "--prompt", "it's a: red # circle",
                     "--method", "renoise")
    assert result.returncode == 0, result.stderr
    assert "invert_image: /tmp/x.png" in result.stdout and "kind: renoise" in result.stdout
    from omegaconf import OmegaConf

    assert OmegaConf.create(result.stdout).trajectory.invert_prompt == "it's a: red # circle"
    assert "no_cache: true" in run_cli("evaluate", "--print-config", "--no-cache").stdout
    assert "no_cache: false" in run_cli("evaluate", "--print-config").stdout
    assert run_cli("invert", "--method", "magic").returncode != 0  # argparse rejects a method that is not a choice


@pytest.mark.parametrize("threads, cpus, load, hint", [
    (2, 2, 1.2, True),    # one core busy, two threads: the case that slowed the toy training 40-fold
    (2, 2, 0.3, False),   # both cores idle enough
    (1, 2, 2.0, False),   # one thread cannot wait on itself
    (4, 16, 6.0, False),  # plenty of idle cores
    (2, None, 1.5, False),
])
def test_busy_cpu_hint(threads, cpus, load, hint):
    message = cli.busy_cpu_hint(threads, cpus, load)
    assert (message is not None) == hint
    if hint:
        assert "OMP_NUM_THREADS=1" in message and f"{load:.1f}" in message


def test_a_command_on_a_busy_cpu_prints_the_hint_unless_threads_were_chosen(monkeypatch, capsys, tmp_path):
    import torch

    ran = []
    monkeypatch.setitem(cli.COMMANDS, "train", cli.Command("fake_train", "t", 3))
    monkeypatch.setattr(cli, "_command_available", lambda c: True)
    monkeypatch.setattr(cli.importlib, "import_module", lambda name: type("M", (), {"run": staticmethod(ran.append)}))
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (float(cli.os.cpu_count()), 0.0, 0.0), raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cli.main(["train", f"output.dir={tmp_path}"]) == 0 and len(ran) == 1
    assert "OMP_NUM_THREADS=1" in capsys.readouterr().err
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cli.main(["train", f"output.dir={tmp_path}"]) == 0 and len(ran) == 2
    assert "OMP_NUM_THREADS" not in capsys.readouterr().err
