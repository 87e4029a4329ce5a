"""``python -m diffusion_pref.tones.quickstart``: an alias of ``diffusion-pref quickstart model.pretrained=tones``.

    python -m diffusion_pref.tones.quickstart --out outputs/tones_quickstart            # Diffusion-DPO
    python -m diffusion_pref.tones.quickstart --out /tmp/qs loss.name=smpo runtime.seed=1

is ``diffusion-pref quickstart model.pretrained=tones output.dir=DIR [key=value ...]``: generate -> train -> evaluate
through the standard commands with the tones recipe (``diffusion_pref/tones/quickstart.yaml``; its measured runs are
in ``diffusion_pref/tones/weights/README.md``).
"""

from __future__ import annotations

import argparse


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("``", ""))
    parser.add_argument("--out", default="outputs/tones_quickstart", help="output.dir")
    parser.add_argument("overrides", nargs="*", help="config key=value, e.g. loss.name=smpo runtime.seed=1")
    args = parser.parse_args(argv)

    from diffusion_pref.cli import main as cli_main

    return cli_main(["quickstart", "model.pretrained=tones", f"output.dir={args.out}", *args.overrides])


if __name__ == "__main__":
    raise SystemExit(main())
