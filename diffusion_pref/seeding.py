"""The one way a seed is derived from parts: numpy's ``SeedSequence`` of the parts.

``derive_seed(seed, step)`` is a 32-bit seed for ``torch.Generator().manual_seed`` / ``random.Random``; ``derive_rng(
seed, epoch)`` is the numpy generator on the same sequence (what ``np.random.default_rng([seed, epoch])`` gives).
Both keep the parts apart (``(1, 23)`` and ``(12, 3)`` give unrelated streams), unlike ``seed + step``.

Example::

    from diffusion_pref.seeding import derive_rng, derive_seed
    generator = torch.Generator().manual_seed(derive_seed(cfg.runtime.seed, micro_step))
    order = derive_rng(seed, epoch).permutation(n)

Schemes left outside on purpose (changing them would change stored results): ``pairing.sample_seed``
(a blake2b hash of "seed/prompt/sample", whose sample index may be -1) and the toy world's
``random.Random(f"place:{seed}")`` (the shipped weights were trained on those scenes).
"""

from __future__ import annotations


def _sequence(parts):
    import numpy as np

    values = []
    for part in parts:
        value = int(part)
        if value != part or value < 0:
            raise ValueError(f"seed parts must be whole numbers >= 0, got {part!r} in {tuple(parts)}")
        values.append(value)
    if not values:
        raise ValueError("derive_seed needs at least one part")
    return np.random.SeedSequence(values)


def derive_seed(*parts: int) -> int:
    """A seed in [0, 2**32) from whole numbers >= 0: ``SeedSequence(list(parts)).generate_state(1)[0]``."""
    return int(_sequence(parts).generate_state(1)[0])


def derive_rng(*parts: int):
    """The numpy ``Generator`` seeded by ``parts``; the same stream as ``np.random.default_rng(list(parts))``."""
    import numpy as np

    return np.random.default_rng(_sequence(parts))


__all__ = ["derive_rng", "derive_seed"]
