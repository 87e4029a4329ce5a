"""The ``diffusion-pref`` command line.

Every command reads one config: the defaults of :mod:`diffusion_pref.config`, then a YAML recipe, then
``section.key=value`` overrides. The resolved config is printed with ``--print-config`` and saved as
``config.yaml`` in ``output.dir`` before the command runs, so the run can be repeated from that file::

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
    defaults: Optional[str] = None  # a recipe inside the package, applied before --config (path from the package)
    # Short flags for the settings a command is mostly run with: (flag, config key, help, choices or None).
    # A flag is only a spelling of its key=value override; a flag with no value key (store_true) sets it to true.
    flags: tuple = ()


_INVERT_FLAGS = (
    ("--image", "trajectory.invert_image", "the image to invert (trajectory.invert_image)", None),
    ("--prompt", "trajectory.invert_prompt", "its caption (trajectory.invert_prompt)", None),
    ("--method", "trajectory.kind", "inversion method (trajectory.kind)", ("ddim", "renoise")),
)
_EVALUATE_FLAGS = (("--no-cache", "eval.no_cache", "generate every sample again (eval.no_cache=true)", "switch"),)


COMMANDS = {
    "generate": Command("diffusion_pref.generate", "sample a model and write reward-ranked preference pairs (parquet)", 4),
    "cache": Command("diffusion_pref.data.cache", "precompute VAE latents and text embeddings of a pair dataset", 3),
    "train": Command("diffusion_pref.training.trainer", "fine-tune on preference pairs (DPO, SmPO, IPO, KTO, ...)", 3, trains=True),
    "evaluate": Command("diffusion_pref.evaluate", "compare base and tuned models: reward scores, win rates, HTML report", 5,
                        flags=_EVALUATE_FLAGS),
    "invert": Command("diffusion_pref.invert", "DDIM / ReNoise inversion and reconstruction of an image", 6,
                      flags=_INVERT_FLAGS),
    "prompt-opt": Command("diffusion_pref.prompt_opt.train", "train a prompt-rewriting language model with Sem-DPO", None),
    "quickstart": Command(
        "diffusion_pref.quickstart", "the whole loop (generate, train, evaluate) on a built-in model", 7,
        trains=True, defaults="quickstart.yaml",
    ),
    "iterate": Command("diffusion_pref.iterate", "online rounds: generate from the tuned model, train on, evaluate",
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
        p = sub.add_parser(name, help=command.help, description=command.help)
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
    for flag, key, _, choices in command.flags:
        value = getattr(args, key)
        if choices == "switch" and value:
            overrides.append(f"{key}=true")
        elif choices != "switch" and value is not None:
            quoted = value.replace("'", "''")  # a YAML single-quoted string: a caption may hold ':' or '#'
            overrides.append(f"{key}='{quoted}'")
    return overrides


def busy_cpu_hint(threads: int, cpus: Optional[int], load: Optional[float]) -> Optional[str]:
    """A hint when torch's CPU threads outnumber the idle cores (``load``: the 1-minute load average).

    With two threads and one busy core, the tiny models' many small parallel regions wait on each other: the
    shapes-world training ran about 40 times slower that way (README), and one thread avoids it.
    """
    if threads <= 1 or not cpus or load is None or cpus - load >= threads - 0.5:
        return None
    return (f"the CPU is busy (load {load:.1f} on {cpus} cores) and torch runs {threads} threads; if this run is "
            "slow, rerun it with OMP_NUM_THREADS=1 (small models can slow down many-fold when their threads wait "
            "for busy cores)")


def _warn_if_cpu_busy() -> None:
    if "OMP_NUM_THREADS" in os.environ:  # the user chose
        return
    import torch

    if torch.cuda.is_available():
        return
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return
    hint = busy_cpu_hint(torch.get_num_threads(), os.cpu_count(), load)
    if hint:
        print(f"diffusion-pref: note: {hint}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    command = COMMANDS[args.command]

    from diffusion_pref.config import ConfigError, check_loss, load_config, save_config, to_yaml

    try:
        defaults = Path(__file__).parent / command.defaults if command.defaults else None
        cfg = load_config(args.config, [*args.overrides, *_flag_overrides(command, args)], defaults=defaults)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        if not _command_available(command):
            when = f"it lands with issue #{command.issue}" if command.issue else "no issue builds it yet"
            print(f"diffusion-pref {args.command}: not available yet; {when}.", file=sys.stderr)
            return 3
        if command.trains:
            check_loss(cfg)
        module = importlib.import_module(command.module)
        if os.environ.get("RANK", "0") == "0":  # under accelerate/torchrun only the main process writes it
            save_config(cfg, cfg.output.dir)
            _warn_if_cpu_busy()
        module.run(cfg)
    except ConfigError as err:
        print(f"diffusion-pref {args.command}: config error: {err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as err:
        # Our own input checks raise these with a message meant for the user; a traceback would bury it.
        if os.environ.get("DIFFUSION_PREF_TRACEBACK"):
            raise
        print(f"diffusion-pref {args.command}: error: {err}", file=sys.stderr)
        print("(set DIFFUSION_PREF_TRACEBACK=1 to see the full traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
