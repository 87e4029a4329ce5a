"""A word-level vocabulary for the shapes world, written as a real ``transformers.CLIPTokenizer``.

CLIP's tokenizer is byte-pair encoding over ``vocab.json`` + ``merges.txt``. We write a vocabulary holding the
256 byte symbols (alone and word-final, as CLIP does, so any text still encodes) plus one token per shapes-world
word, and the merges that build each word from its characters into that single token. The result loads with
``CLIPTokenizer.from_pretrained(folder)`` offline, like any Stable Diffusion tokenizer.

Example::

    from diffusion_pref.toy.tokenizer import save_tokenizer
    save_tokenizer("out/tokenizer")
    from transformers import CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained("out/tokenizer")
    tok.tokenize("a red circle on a blue background")   # ['a</w>', 'red</w>', 'circle</w>', ...]
"""

from __future__ import annotations

import json
from pathlib import Path

from diffusion_pref.toy.render import COLOURS, SHAPES

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Captions are 7 words; 16 positions leave room for BOS/EOS and slightly longer user prompts.
MODEL_MAX_LENGTH = 16
WORDS: tuple[str, ...] = ("a", "on", "background", *COLOURS, *SHAPES)


def _byte_symbols() -> list[str]:
    # The same printable stand-in for each byte that GPT-2 / CLIP byte-level BPE use.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def _apply_merges(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: characters, the last marked word-final, merged lowest rank first."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == float("inf"):
            break
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2 :]
    return parts


def build_vocab_and_merges(words=WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merge list such that each word in ``words`` encodes to exactly one token."""
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    # Appending merges left to right per word never changes words already merged: every step of their
    # merge sequence had a lower-ranked pair available than any merge added later.
    for word in words:
        parts = _apply_merges(word, ranks)
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            # BPE needs every merge result in the vocabulary, intermediate pieces included.
            if pair[0] + pair[1] not in tokens:
                tokens.append(pair[0] + pair[1])
            parts = _apply_merges(word, ranks)
    tokens += [BOS, EOS]
    return {token: index for index, token in enumerate(tokens)}, merges


def write_vocab_files(folder: str | Path) -> None:
    """Write ``vocab.json`` and ``merges.txt`` (what older, pure-Python ``CLIPTokenizer`` versions read)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")


def save_tokenizer(folder: str | Path):
    """Write the tokenizer (``vocab.json``, ``merges.txt``, ``tokenizer.json``, config) to ``folder`` and
    return it loaded back with ``CLIPTokenizer.from_pretrained``."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    vocab, merges = build_vocab_and_merges()
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=list(merges),
        model_max_length=MODEL_MAX_LENGTH,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,  # as in Stable Diffusion 1.x
    )
    tokenizer.save_pretrained(folder)
    write_vocab_files(folder)
    return CLIPTokenizer.from_pretrained(folder)
