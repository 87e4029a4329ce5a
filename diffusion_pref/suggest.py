"""Spelling suggestions for unknown names: one rule for config keys, choices, losses, reward models, prompt sets.

``did_you_mean(word, choices)`` -> ``"did you mean 'x'?"`` for the closest choice (difflib's similarity ratio at
least :data:`CUTOFF`), or ``""`` when nothing is that close; the caller puts it into its one-line message.

Example::

    from diffusion_pref.suggest import did_you_mean
    did_you_mean("pickscor", ["pickscore", "clip"])   # "did you mean 'pickscore'?"
    did_you_mean("zzz", ["pickscore", "clip"])        # ""
"""

from __future__ import annotations

import difflib
from typing import Iterable

# difflib's ratio: 2 * matched characters / total characters. 0.5 keeps one- and two-letter slips in short names
# ("dpp" -> "dpo": 0.67) and drops unrelated words, which a suggestion would only mislead on.
CUTOFF = 0.5


def did_you_mean(word: object, choices: Iterable[object]) -> str:
    """``"did you mean '<closest choice>'?"``, or ``""`` when no choice is close to ``word``."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=CUTOFF)
    return f"did you mean '{close[0]}'?" if close else ""


__all__ = ["CUTOFF", "did_you_mean"]
