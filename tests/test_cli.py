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


@pytest.mark.parametrize("command, old, new", [
    ("train", "train.mixed_precision=fp16", "runtime.dtype=fp16"),
    ("generate", "generate.steps=20", "sample.steps=20"),
    ("evaluate", "eval.device=cpu", "runtime.device=cpu"),
    ("invert", "trajectory.invert_image=x.png", "invert.image=x.png"),
])
def test_a_renamed_key_fails_in_one_line_naming_the_new_key(capsys, tmp_path, command, old, new):
    code = cli.main([command, old, f"output.dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"{old.split('=')[0]} was renamed: use {new}" in err
    assert not (tmp_path / "out").exists()


def test_print_config_shows_the_runtime_and_sample_sections():
    result = run_cli("generate", "--print-config", "runtime.dtype=bf16", "sample.steps=7")
    assert result.returncode == 0, result.stderr
    from omegaconf import OmegaConf

    printed = OmegaConf.create(result.stdout)
    assert printed.runtime.dtype == "bf16" and printed.sample.steps == 7 and printed.sample.safety_checker is None


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
    if cli.COMMANDS[command].own_args:  # listed in the help; parses its own arguments (convert)
        assert command in cli.build_parser().format_help()
        with pytest.raises(SystemExit) as exit_:
            cli.main([command, "--help"])
        assert exit_.value.code == 0
        return
    args = cli.build_parser().parse_args([command, "--print-config"])
    assert args.command == command and args.print_config


def test_short_flags_are_spellings_of_config_keys():
    result = run_cli("invert", "--print-config", "--image", "/tmp/x.png", "--prompt", "it's a: red # circle",
                     "--method", "renoise")
    assert result.returncode == 0, result.stderr
    from omegaconf import OmegaConf

    printed = OmegaConf.create(result.stdout)
    assert printed.invert.image == "/tmp/x.png" and printed.trajectory.kind == "renoise"
    assert printed.invert.prompt == "it's a: red # circle"
    assert "no_cache: true" in run_cli("evaluate", "--print-config", "--no-cache").stdout
    assert "no_cache: false" in run_cli("evaluate", "--print-config").stdout
    assert run_cli("invert", "--method", "magic").returncode != 0  # argparse rejects a method that is not a choice


def _fake_cgroup(tmp_path, proc_line, files):
    """A cgroup mount in tmp_path: {relative path: content}, and a /proc/self/cgroup with one line."""
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text + "\n")
    (tmp_path / "proc-self-cgroup").write_text(proc_line + "\n")
    return cli.cgroup_cpu_limit(tmp_path, tmp_path / "proc-self-cgroup")


@pytest.mark.parametrize("proc_line, files, limit", [
    ("0::/", {"cpu.max": "max 100000"}, None),  # v2, no quota
    ("0::/", {"cpu.max": "150000 100000"}, 1.5),
    # v2 nested: the job's own folder has no quota, its parent allows half a CPU
    ("0::/slurm/job_7", {"slurm/cpu.max": "50000 100000", "slurm/job_7/cpu.max": "max 100000"}, 0.5),
    ("0::/slurm/job_7", {"slurm/cpu.max": "400000 100000", "slurm/job_7/cpu.max": "200000 100000"}, 2.0),
    ("0::/docker/abc", {"cpu.max": "300000 100000"}, 3.0),  # a container sees its own cgroup as the root
    # v1: the quota under the cpu controller's mount, -1 = none
    ("4:cpu,cpuacct:/", {"cpu,cpuacct/cpu.cfs_quota_us": "-1", "cpu,cpuacct/cpu.cfs_period_us": "100000"}, None),
    ("4:cpu,cpuacct:/job", {"cpu,cpuacct/job/cpu.cfs_quota_us": "250000",
                            "cpu,cpuacct/job/cpu.cfs_period_us": "100000"}, 2.5),
    ("1:cpu:/", {"cpu/cpu.cfs_quota_us": "20000", "cpu/cpu.cfs_period_us": "100000"}, 0.2),
    ("3:memory:/x", {}, None),  # no cpu controller
])
def test_cgroup_cpu_limit_reads_v1_and_v2_quotas(tmp_path, proc_line, files, limit):
    assert _fake_cgroup(tmp_path, proc_line, files) == (None if limit is None else pytest.approx(limit))


@pytest.mark.parametrize("affinity, quota, usable", [
    (8, None, 8), (8, 2.5, 3), (8, 0.2, 1), (2, 4.0, 2), (None, 1.5, 2), (None, None, None),
])
def test_usable_cpus_is_the_affinity_within_the_quota_rounded_up(affinity, quota, usable):
    assert cli.usable_cpus(affinity, quota) == usable


def _choose(environ=None, torch_threads=64, preloaded=False, affinity=64, quota=None, host=64, load=0.0, procs=1):
    return cli.choose_cpu_threads(environ or {}, torch_threads, preloaded, affinity, quota, host, load, procs)


def test_threads_come_from_affinity_quota_processes_and_load_unless_the_user_chose():
    assert _choose(quota=2.0)[0] == 2  # a container with --cpus=2 on a 64-core host
    assert _choose(affinity=4)[0] == 4  # SLURM's cpuset
    assert _choose(affinity=8, procs=4)[0] == 2  # four processes of one launch share the CPUs
    assert _choose(affinity=2, host=2, load=1.2)[0] == 1  # one core busy: the case that slowed generate 16-fold
    assert _choose(affinity=2, host=2, load=0.3)[0] == 2
    assert _choose(affinity=2, host=2, load=5.0)[0] == 1
    for environ in ({"OMP_NUM_THREADS": "3"}, {"MKL_NUM_THREADS": "3"}):
        threads, line = _choose(environ, torch_threads=3, quota=1.0)
        assert threads is None and f"{next(iter(environ))}=3 is set" in line and "3 CPU threads" in line
    threads, line = _choose(torch_threads=5, preloaded=True, quota=1.0)  # torch.set_num_threads may have run
    assert threads is None and "5 CPU threads (set before diffusion-pref started)" in line
    threads, line = _choose(affinity=16, quota=0.5, host=64, load=10.0)
    assert threads == 1 and line == ("torch uses 1 CPU thread (16 CPUs in the affinity mask, cgroup quota 0.5 CPUs; "
                                     "set OMP_NUM_THREADS to choose)")


_THREADS_SCRIPT = """
import sys, types
from pathlib import Path
from diffusion_pref import cli

cli.CGROUP_ROOT, cli.PROC_SELF_CGROUP = Path({root!r}), Path({root!r}) / "proc-self-cgroup"
cli.os.getloadavg = lambda: (0.0, 0.0, 0.0)  # an idle machine: only the quota counts
sys.modules["fake_command"] = types.SimpleNamespace(run=lambda cfg: print("threads", __import__("torch").get_num_threads()))
cli.COMMANDS["fake"] = cli.Command("fake_command", "prints torch's thread count", None)
cli._command_available = lambda command: True
sys.exit(cli.main(["fake", "output.dir={out}"]))
"""


@pytest.mark.parametrize("omp", [None, "2"])
def test_a_command_sizes_torch_threads_from_the_cgroup_quota_and_logs_one_line(tmp_path, omp):
    import os

    _fake_cgroup(tmp_path, "0::/", {"cpu.max": "50000 100000"})  # half a CPU
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update({"CUDA_VISIBLE_DEVICES": "", **({"OMP_NUM_THREADS": omp} if omp else {})})
    script = _THREADS_SCRIPT.format(root=str(tmp_path), out=str(tmp_path / "out"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if "CPU thread" in line]
    if omp:
        assert "threads 2" in result.stdout and lines == ["diffusion-pref: torch uses 2 CPU threads (OMP_NUM_THREADS=2 is set)"]
    else:
        assert "threads 1" in result.stdout and len(lines) == 1 and "cgroup quota 0.5 CPUs" in lines[0]
