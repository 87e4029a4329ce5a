"""The ``diffusion-pref`` command line.

Every command reads one config: the defaults of :mod:`diffusion_pref.config`, then a YAML recipe, then
``section.key=value`` overrides. The resolved config is printed with ``--print-config`` and saved as
``config.yaml`` in ``output.dir`` (by ``train`` once its checks have passed; by the other commands before they
run, taken back if they stop on bad input; a different one already there is kept, see ``save_config``), so the
run can be repeated from that file::

    diffusion-pref train --config configs/sd15_dpo_lora.yaml model.pretrained=runwayml/stable-diffusion-v1-5
    diffusion-pref train --config outputs/run/config.yaml          # the same run again
    accelerate launch -m diffusion_pref.cli train --config configs/sdxl_dpo_lora.yaml

Each command lives in its own module with a ``run(cfg)`` function and is imported only when called, so
``diffusion-pref --help`` does not import torch.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence


@dataclass(frozen=True)
class Command:
    module: str
    help: str
    issue: Optional[int]  # the issue that builds it, named when it has not landed yet (None: not filed yet)
    trains: bool = False  # loss settings are checked before the module (and any model) is loaded
    saves_config: bool = False  # the module writes config.yaml itself, once its own checks have passed
    defaults: Optional[str] = None  # a recipe inside the package, applied before --config (path from the package)
    # "module:function" taking model.pretrained and returning more recipe files for that model, layered after
    # `defaults` and before --config (the quickstart: an audio world's own recipe)
    model_defaults: Optional[str] = None
    # Short flags for the settings a command is mostly run with: (flag, config key, help, choices or None).
    # A flag is only a spelling of its key=value override; a flag with no value key (store_true) sets it to true.
    flags: tuple = ()
    own_args: bool = False  # reads its own arguments (module.main(argv)): no config, e.g. convert
    # A command with modes takes the mode as its first argument, a spelling of mode_key=<mode>.
    modes: tuple = ()
    mode_key: str = ""


_INVERT_FLAGS = (
    ("--image", "invert.image", "the image to invert (invert.image)", None),
    ("--prompt", "invert.prompt", "its caption (invert.prompt)", None),
    ("--method", "trajectory.kind", "inversion method (trajectory.kind)", ("ddim", "renoise")),
)
_EVALUATE_FLAGS = (("--no-cache", "eval.no_cache", "generate every sample again (eval.no_cache=true)", "switch"),)


COMMANDS = {
    "generate": Command("diffusion_pref.commands.generate", "sample a model and write reward-ranked preference pairs (parquet)", 4),
    "cache": Command("diffusion_pref.commands.cache", "precompute VAE latents and text embeddings of a pair dataset", 3),
    "train": Command("diffusion_pref.commands.train", "fine-tune on preference pairs (DPO, SmPO, IPO, KTO, ...)", 3, trains=True,
                     saves_config=True),
    "evaluate": Command("diffusion_pref.commands.evaluate", "compare base and tuned models: reward scores, win rates, HTML report", 5,
                        flags=_EVALUATE_FLAGS),
    "invert": Command("diffusion_pref.commands.invert", "DDIM / ReNoise inversion and reconstruction of an image", 6,
                      flags=_INVERT_FLAGS),
    "prompt-opt": Command("diffusion_pref.commands.prompt_opt",
                          "a prompt-rewriting language model: generate pairs, train (DPO / Sem-DPO), evaluate", 16,
                          trains=True, defaults="prompt_opt/defaults.yaml",
                          modes=("generate", "train", "evaluate", "iterate", "quickstart"), mode_key="prompt_opt.mode"),
    "quickstart": Command(
        "diffusion_pref.commands.quickstart", "the whole loop (generate, train, evaluate) on a built-in model", 7,
        trains=True, defaults="quickstart.yaml", model_defaults="diffusion_pref.commands.quickstart:model_recipes",
    ),
    "convert": Command("diffusion_pref.commands.convert", "convert a checkpoint into this toolkit's layout "
                       "(convert tango --src DIR --dst DIR: declare-lab Tango / Tango 2)", 15, own_args=True),
    "iterate": Command("diffusion_pref.commands.iterate", "online rounds: generate from the tuned model, train on, evaluate",
                       17, trains=True),
}


def _command_available(command: Command) -> bool:
    try:
        return importlib.util.find_spec(command.module) is not None
    except ModuleNotFoundError:  # its parent package does not exist yet
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusion-pref",
        description="Align diffusion models with preferences: generate pairs, train, evaluate.",
        epilog="Run 'diffusion-pref <command> --help' for a command's options. "
        "Overrides are section.key=value, e.g. train.max_steps=100 loss.name=smpo.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, command in COMMANDS.items():
        if command.own_args:  # listed here; main() hands its arguments to the command's own parser
            sub.add_parser(name, help=command.help, add_help=False)
            continue
        p = sub.add_parser(name, help=command.help, description=command.help)
        if command.modes:
            p.add_argument("mode", nargs="?", metavar="{" + ",".join(command.modes) + "}",
                           help=f"what to run ({command.mode_key}; default: the config's)")
        p.add_argument("--config", help="a YAML recipe, e.g. configs/toy_train_dpo.yaml (default: built-in defaults)")
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
        for flag, key, text, choices in command.flags:
            if choices == "switch":
                p.add_argument(flag, dest=key, action="store_true", help=text)
            else:
                p.add_argument(flag, dest=key, choices=choices, help=text)
    return parser


def _flag_overrides(command: Command, args: argparse.Namespace) -> list:
    """The command's short flags as key=value overrides (after the positional ones, so a flag wins)."""
    overrides = []
    mode = getattr(args, "mode", None)
    if command.modes and mode is not None:
        if "=" in mode:  # no mode given: the first override took its place
            overrides.append(mode)
        elif mode in command.modes:
            overrides.append(f"{command.mode_key}={mode}")
        else:
            from diffusion_pref.config import ConfigError

            raise ConfigError(f"{mode!r} is not a mode; use one of {', '.join(command.modes)} ({command.mode_key})")
    for flag, key, _, choices in command.flags:
        value = getattr(args, key)
        if choices == "switch" and value:
            overrides.append(f"{key}=true")
        elif choices != "switch" and value is not None:
            quoted = value.replace("'", "''")  # a YAML single-quoted string: a caption may hold ':' or '#'
            overrides.append(f"{key}='{quoted}'")
    return overrides


CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_cpu_limit(root: Optional[Path] = None, proc_cgroup: Optional[Path] = None) -> Optional[float]:
    """The CPUs' worth of time this process's cgroup may use (quota / period), or None when there is no quota.

    cgroup v2 (``0::/path`` in /proc/self/cgroup) keeps ``cpu.max`` ("max 100000" or "150000 100000"); v1 keeps
    ``cpu.cfs_quota_us`` (-1: none) and ``cpu.cfs_period_us`` under the ``cpu`` controller's mount. A limit on any
    ancestor applies too, so the smallest along the path counts. Folders missing from this mount namespace (a
    container shows its own cgroup as the root) are skipped.
    """
    root = CGROUP_ROOT if root is None else root
    text = _read(PROC_SELF_CGROUP if proc_cgroup is None else proc_cgroup)
    if text is None:
        return None
    limits = []
    for line in text.splitlines():
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            mounts, v2 = [root], True
        elif "cpu" in controllers.split(","):
            mounts, v2 = [root / controllers, root / "cpu"], False
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for mount in mounts:
            for depth in range(len(parts), -1, -1):
                folder = mount.joinpath(*parts[:depth])
                if v2:
                    fields = (_read(folder / "cpu.max") or "").split()
                    quota, period = (fields + ["", ""])[:2]
                else:
                    quota, period = _read(folder / "cpu.cfs_quota_us") or "", _read(folder / "cpu.cfs_period_us") or ""
                try:
                    quota_us, period_us = int(quota), int(period)
                except ValueError:  # "max", a missing file
                    continue
                if quota_us > 0 and period_us > 0:
                    limits.append(quota_us / period_us)
    return min(limits, default=None)


def usable_cpus(affinity: Optional[int], quota: Optional[float]) -> Optional[int]:
    """CPUs this process may run on (its affinity mask) within its cgroup's quota, rounded up: the threads of a
    throttled cgroup stop and restart together, so a part of a CPU still gives a thread time to run."""
    counts = [n for n in (affinity, math.ceil(quota) if quota is not None else None) if n]
    return max(1, min(counts)) if counts else None


def choose_cpu_threads(
    environ, torch_threads: int, torch_preloaded: bool, affinity: Optional[int], quota: Optional[float],
    host_cpus: Optional[int], load: Optional[float], processes: int = 1,
) -> tuple:
    """(threads to set, or None to keep torch's; the one log line saying why).

    torch sizes its pool from the host's cores, not from the affinity mask or the cgroup quota (SLURM, containers
    with --cpus), and threads that outnumber the CPUs free for them make the tiny models' many small parallel
    regions wait on each other (many-fold slower: two threads on one free core made the shapes-world generate 16
    times slower). So: the usable CPUs, shared by the processes of this launch, and no more than the cores the
    1-minute load average leaves idle. A choice the user made (OMP_NUM_THREADS, MKL_NUM_THREADS, or torch imported
    and possibly set before the command ran) is kept.
    """
    def uses(n: int) -> str:
        return f"torch uses {n} CPU thread{'' if n == 1 else 's'}"

    chosen = [k for k in _THREAD_ENV if environ.get(k)]
    if chosen:
        return None, f"{uses(torch_threads)} ({chosen[0]}={environ[chosen[0]]} is set)"
    if torch_preloaded:
        return None, f"{uses(torch_threads)} (set before diffusion-pref started)"
    usable = usable_cpus(affinity, quota)
    if usable is None:
        return None, f"{uses(torch_threads)} (usable CPUs unknown)"
    why = [f"{affinity} CPUs in the affinity mask"] if affinity else []
    if quota is not None:
        why.append(f"cgroup quota {quota:g} CPUs")
    threads = max(1, usable // max(1, processes))
    if processes > 1:
        why.append(f"{processes} processes")
    if host_cpus and load is not None and threads > max(1, round(host_cpus - load)):
        threads = max(1, round(host_cpus - load))
        why.append(f"load {load:.1f} on {host_cpus} cores")
    return threads, f"{uses(threads)} ({', '.join(why)}; set OMP_NUM_THREADS to choose)"


def _size_cpu_threads(torch_preloaded: bool) -> None:
    import torch

    if torch.cuda.is_available() or torch.backends.mps.is_available():  # CPU runs only
        return
    try:
        affinity: Optional[int] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on every platform
        affinity = os.cpu_count()
    try:
        load: Optional[float] = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = None
    threads, line = choose_cpu_threads(
        os.environ, torch.get_num_threads(), torch_preloaded, affinity, cgroup_cpu_limit(), os.cpu_count(), load,
        processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
    )
    if threads is not None:
        torch.set_num_threads(threads)
    # A caller that imported torch first (a script, the tests) owns its threads: nothing was chosen, so no line
    # joins the one-line errors such a caller reads.
    if not torch_preloaded and os.environ.get("RANK", "0") == "0":
        print(f"diffusion-pref: {line}", file=sys.stderr)


def _check_output_dir(directory: str) -> None:
    """output.dir must be a folder this process can write: say so with the key, before anything runs."""
    import tempfile

    from diffusion_pref.config import ConfigError

    path = Path(directory).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output.dir={directory} is a file, not a folder; give a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ConfigError(f"output.dir={directory}: cannot write there ({_os_error_line(err)})") from None


def _os_error_line(err: OSError) -> str:
    """An OSError as one line naming its path(s): 'Read-only file system: /data/out'."""
    if err.strerror and err.filename:
        paths = f"{err.filename} -> {err.filename2}" if err.filename2 else f"{err.filename}"
        return f"{err.strerror}: {paths}"
    return err.strerror or str(err)


class _ConfigRecord:
    """config.yaml written before a command runs, and taken back if the command stops on bad input."""

    def __init__(self, cfg):
        from diffusion_pref.config import save_config

        self.path = Path(cfg.output.dir) / "config.yaml"
        self.before = set(self.path.parent.glob("config.*.yaml"))
        self.previous = self.path.read_text() if self.path.is_file() else None
        save_config(cfg, cfg.output.dir)

    def undo(self) -> None:
        if self.previous is None:
            self.path.unlink(missing_ok=True)
            return
        for kept in set(self.path.parent.glob("config.*.yaml")) - self.before:
            if kept.read_text() == self.previous:
                os.replace(kept, self.path)
                return


def _interrupted(command: str, cfg, argv: Sequence[str]) -> str:
    """The line printed for Ctrl-C: for train, where the last checkpoint is and the command that resumes."""
    import shlex

    if cfg is None:
        return "interrupted"
    out = Path(cfg.output.dir)
    if command == "train":
        from diffusion_pref.training.checkpoint import list_checkpoints

        found = list_checkpoints(out / "checkpoints")
        if not found:
            return (f"interrupted before the first checkpoint (train.checkpoint_every={cfg.train.checkpoint_every}); "
                    "nothing to resume: run the same command again")
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        launcher = "accelerate launch -m diffusion_pref.cli" if distributed else "diffusion-pref"
        kept = [a for a in argv if not a.startswith(("train.resume=", "train.resume_force="))]
        return (f"interrupted; the last checkpoint is {found[-1]}; resume with: "
                f"{launcher} {shlex.join([*kept, 'train.resume=latest'])}")
    if command == "generate":
        return f"interrupted; the finished shards stay in {out}: the same command continues from them"
    if command == "evaluate":
        return f"interrupted; the samples made so far are kept in {out / 'media'}: the same command reuses them"
    return "interrupted"


def _run_own_args(name: str, argv: Sequence[str]) -> int:
    """A command that parses its own arguments (``convert``): ``module.main(argv)``, errors as one line."""
    try:
        return importlib.import_module(COMMANDS[name].module).main(list(argv))
    except (ValueError, OSError) as err:
        if os.environ.get("DIFFUSION_PREF_TRACEBACK"):
            raise
        print(f"diffusion-pref {name}: error: {err}", file=sys.stderr)
        return 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    if given and given[0] in COMMANDS and COMMANDS[given[0]].own_args:
        return _run_own_args(given[0], given[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    command = COMMANDS[args.command]

    from diffusion_pref.config import ConfigError, check_loss, load_config, to_yaml

    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = record = None
    try:
        defaults = Path(__file__).parent / command.defaults if command.defaults else None
        overrides = [*args.overrides, *_flag_overrides(command, args)]
        cfg = load_config(args.config, overrides, defaults=defaults)
        if command.model_defaults:
            module_name, function = command.model_defaults.split(":")
            more = getattr(importlib.import_module(module_name), function)(cfg.model.pretrained)
            if more:  # the same layers with the model's recipe under --config and the command line
                cfg = load_config(args.config, overrides, defaults=[d for d in (defaults, *more) if d is not None])
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        if not _command_available(command):
            when = f"it lands with issue #{command.issue}" if command.issue else "no issue builds it yet"
            print(f"diffusion-pref {args.command}: not available yet; {when}.", file=sys.stderr)
            return 3
        if command.trains:
            check_loss(cfg)
        torch_preloaded = "torch" in sys.modules  # then the caller may have set torch's threads
        module = importlib.import_module(command.module)
        if os.environ.get("RANK", "0") == "0":  # under accelerate/torchrun only the main process writes it
            _check_output_dir(cfg.output.dir)
            if not command.saves_config:
                record = _ConfigRecord(cfg)
        _size_cpu_threads(torch_preloaded)
        module.run(cfg)
    except ConfigError as err:
        if record is not None:
            record.undo()
        print(f"diffusion-pref {args.command}: config error: {err}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as err:
        # Our own input checks raise these with a message meant for the user, and an OSError names its path
        # (output.dir on a read-only disk, a full disk); a traceback would bury either.
        if record is not None:
            record.undo()
        if os.environ.get("DIFFUSION_PREF_TRACEBACK"):
            raise
        print(f"diffusion-pref {args.command}: error: {_os_error_line(err) if isinstance(err, OSError) else err}",
              file=sys.stderr)
        print("(set DIFFUSION_PREF_TRACEBACK=1 to see the full traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if os.environ.get("DIFFUSION_PREF_TRACEBACK"):
            raise
        if os.environ.get("RANK", "0") == "0":
            # on a line of its own: a progress bar interrupted mid-line has left the cursor after it
            print(f"\ndiffusion-pref {args.command}: {_interrupted(args.command, cfg, argv)}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
