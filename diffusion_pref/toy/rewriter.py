"""The shapes world's prompt rewriter: a tiny GPT-2-style LM, its rewrite grammar, and a reward for rewrites.

The rewriter reads a shapes-world caption and writes a rewrite of it. Its pretraining text comes from a small
grammar, so its samples are varied in a known way:

- most rewrites keep the caption's colour and shape words and add 0-4 descriptive words ("a bright red circle on
  a plain blue background, centered, high contrast");
- about a third **drift**: one of the shape colour, the shape or the background colour is changed (with or without
  added words). A drifted rewrite no longer asks for what the user asked for.

Every rewrite the grammar makes parses back with :func:`parse_rewrite` into (colour, shape, colour, added words).

The reward (:class:`ToyRewriteReward`, a programmatic text-side proxy, scored against the ORIGINAL caption):

    reward = fidelity_weight * fidelity + detail_weight * min(#distinct added words, 4) + vivid_bonus * [shape colour is vivid]

``fidelity`` is the share of (shape colour, shape, background colour) kept from the original. Added words raise it;
the ``vivid`` term is a rater's bias (as aesthetic models have) towards yellow and white shapes, so changing the
shape colour to one of them can raise the reward while drifting: the case Sem-DPO's semantic weight is for. A
rewrite that does not parse scores 0. :func:`drift` says whether a rewrite changed a colour or shape word.

Why text-side: rendering a rewrite with the shipped shapes-world diffusion model instead (toy-fidelity against the
original caption) also works through ``prompt-opt generate``, but the toy text encoder knows none of the added
words: they reach it as byte pieces it never saw, and its tokenizer cuts the text at 16 tokens. Measured (10
held-out captions x 8 grammar texts x 4 seeds, DDIM 20 steps, guidance 1; 0.26 s per image on the shared 2-core
machine under load): mean toy-fidelity against the original 0.78 for the unchanged caption, 0.26 with added words,
0.30 for drifted rewrites. Added words only lower that reward, so it cannot show "better prompts"; the text-side
reward above is the one that can be raised by adding words, at no rendering cost.

Rebuild the shipped weights (``diffusion_pref/toy/rewriter_weights``; about a minute on one core)::

    python -m diffusion_pref.toy.rewriter --out diffusion_pref/toy/rewriter_weights

Use::

    from diffusion_pref.prompt_opt.model import CausalLMPolicy
    from diffusion_pref.toy.rewriter import WEIGHTS, ToyRewriteReward
    policy = CausalLMPolicy.load(WEIGHTS, lora={"rank": 8})
    rewrites = policy.sample("a red circle on a blue background", k=4, seed=0)
    ToyRewriteReward().score(["a red circle on a blue background"] * 4, rewrites)
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path
from typing import Optional, Sequence

from diffusion_pref.toy.render import COLOURS, SHAPES, parse_caption, train_triples

WEIGHTS = Path(__file__).parent / "rewriter_weights"
SEPARATOR = " ->"
SHAPE_WORDS = ("bright", "solid", "bold", "large", "sharp")
BACKGROUND_WORDS = ("plain", "flat", "smooth", "pale")
SUFFIXES = ("centered", "high contrast", "simple", "minimal", "vivid colors")
VIVID = ("yellow", "white")
MAX_POSITIONS = 40
EOS = "<|endoftext|>"
# The prompt is the caption then the separator; the completion is the rewrite and the end-of-text token.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }} ->"
    "{% else %} {{ m['content'] }}<|endoftext|>{% endif %}{% endfor %}"
)

_C, _S = "|".join(COLOURS), "|".join(SHAPES)
_REWRITE_RE = re.compile(
    rf"^a (?:({'|'.join(SHAPE_WORDS)}) )?({_C}) ({_S}) on a (?:({'|'.join(BACKGROUND_WORDS)}) )?({_C}) background"
    rf"((?:, (?:{'|'.join(SUFFIXES)}))*)$"
)


# ----------------------------------------------------------------------------------------------------------------
# Grammar


def parse_rewrite(text: str) -> Optional[tuple[str, str, str, tuple[str, ...]]]:
    """``(shape colour, shape, background colour, added words)`` of a rewrite, or None when it does not parse."""
    match = _REWRITE_RE.match(text.strip())
    if match is None:
        return None
    suffixes = tuple(s for s in match[6].split(", ") if s)
    added = tuple(w for w in (match[1], match[4]) if w) + suffixes
    return match[2], match[3], match[5], added


def drift(original: str, rewrite: str) -> bool:
    """Whether the rewrite changed the shape colour, the shape or the background colour (or does not parse)."""
    parsed = parse_rewrite(rewrite)
    return parsed is None or parsed[:3] != parse_caption(original)


def sample_rewrite(caption: str, rng: random.Random, drift_rate: float = 0.3) -> str:
    """One rewrite of ``caption`` from the grammar (the pretraining distribution)."""
    fg, shape, bg = parse_caption(caption)
    if rng.random() < drift_rate:
        slot = rng.randrange(3)
        if slot == 0:
            fg = rng.choice([c for c in COLOURS if c not in (fg, bg)])
        elif slot == 1:
            shape = rng.choice([s for s in SHAPES if s != shape])
        else:
            bg = rng.choice([c for c in COLOURS if c not in (fg, bg)])
    count = rng.randrange(5)  # 0..4 added words, spread over the three places words can go
    places = [rng.randrange(3) for _ in range(count)]
    shape_word = rng.choice(SHAPE_WORDS) + " " if 0 in places else ""
    bg_word = rng.choice(BACKGROUND_WORDS) + " " if 1 in places else ""
    suffixes = rng.sample(SUFFIXES, min(places.count(2), len(SUFFIXES)))
    text = f"a {shape_word}{fg} {shape} on a {bg_word}{bg} background"
    return "".join([text, *(f", {s}" for s in suffixes)])


# ----------------------------------------------------------------------------------------------------------------
# Reward


class ToyRewriteReward:
    """The text-side shapes-world rewrite reward (module docstring); ``score(originals, rewrites) -> [n]``.

    ``text_side = True`` tells ``prompt-opt generate`` that it scores the rewrite's text, not rendered images."""

    name = "toy-rewrite"
    text_side = True

    def __init__(self, fidelity_weight: float = 0.5, detail_weight: float = 0.1, vivid_bonus: float = 0.3):
        self.fidelity_weight, self.detail_weight, self.vivid_bonus = fidelity_weight, detail_weight, vivid_bonus

    def one(self, original: str, rewrite: str) -> float:
        parsed = parse_rewrite(rewrite)
        if parsed is None:
            return 0.0
        fg, shape, bg, added = parsed
        kept = sum(a == b for a, b in zip((fg, shape, bg), parse_caption(original))) / 3
        return (self.fidelity_weight * kept + self.detail_weight * min(len(set(added)), 4)
                + self.vivid_bonus * (fg in VIVID))

    def score(self, originals: Sequence[str], rewrites: Sequence[str]):
        import torch

        if len(originals) != len(rewrites):
            raise ValueError(f"{self.name}: {len(originals)} prompts but {len(rewrites)} rewrites.")
        return torch.tensor([self.one(o, r) for o, r in zip(originals, rewrites)], dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer and model


def rewriter_tokenizer():
    """A ``GPT2Tokenizer`` (byte-level BPE, every byte covered) with one token per grammar word, and the chat
    template that lays out ``caption -> rewrite<|endoftext|>``."""
    from transformers import GPT2Tokenizer

    from diffusion_pref.testing import _bpe_vocab, _byte_alphabet, _word_merges

    words = ["a", "on", "background", *COLOURS, *SHAPES, *SHAPE_WORDS, *BACKGROUND_WORDS, "->",
             *(w for s in SUFFIXES for w in s.split())]
    words = list(dict.fromkeys(words))
    # Words after a space (GPT-2 marks the space as "Ġ") first, then bare words (the caption's first "a").
    merges = _word_merges([["\u0120", *w] for w in words] + [[*w] for w in words if len(w) > 1])
    vocab = _bpe_vocab(_byte_alphabet(), merges, [EOS])
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges, model_max_length=MAX_POSITIONS)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(tokenizer, seed: int = 0, width: int = 64, layers: int = 2):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=len(tokenizer), n_positions=MAX_POSITIONS, n_embd=width, n_layer=layers, n_head=4,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def pretrain(out: str | Path, *, steps: int = 600, batch_size: int = 32, lr: float = 3e-3, seed: int = 0,
             drift_rate: float = 0.3, threads: int = 1, measure: bool = True, log=print) -> dict:
    """Train the rewriter on (caption -> grammar rewrite) text, completion tokens only; save it to ``out``.

    Captions are the shapes-world training triples (the held-out ``eval_prompts`` stay unseen). Returns a summary
    with the wall time and (``measure``) the share of samples (seeded, temperature 1) that parse, on held-out
    captions. The same arguments give the same weights (one torch thread; dropout seeded).
    """
    import torch

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # Dropout draws from torch's global RNG: seed it for the run (same seed, same weights), and give the
        # caller's RNG state back afterwards.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return _pretrain(Path(out), steps, batch_size, lr, seed, drift_rate, measure, log)
    finally:
        torch.set_num_threads(previous_threads)


def _pretrain(out: Path, steps: int, batch_size: int, lr: float, seed: int, drift_rate: float, measure: bool,
              log) -> dict:
    import torch

    from diffusion_pref.prompt_opt.logprobs import encode_completions, token_logprobs
    from diffusion_pref.toy.pretrain import lr_factor
    from diffusion_pref.toy.render import CAPTION_TEMPLATE

    start = time.time()
    rng = random.Random(seed)
    tokenizer = rewriter_tokenizer()
    model = build_model(tokenizer, seed=seed)
    model.train()
    captions = [CAPTION_TEMPLATE.format(fg=f, shape=s, bg=b) for f, s, b in train_triples()]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    running = None
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(step, steps, warmup=min(100, steps))
        prompts = [rng.choice(captions) for _ in range(batch_size)]
        batch = encode_completions(tokenizer, prompts, [sample_rewrite(p, rng, drift_rate) for p in prompts])
        logprobs, mask = token_logprobs(model, batch)
        loss = -(logprobs * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        value = float(loss.detach())
        running = value if running is None else 0.95 * running + 0.05 * value
        if step % 200 == 0 or step == steps - 1:
            log(json.dumps({"step": step, "loss": round(running, 4), "t": round(time.time() - start, 1)}))
    model.eval()
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    summary = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "pretrain_drift_rate": drift_rate,
               "final_loss": round(running, 4), "train_seconds": round(time.time() - start, 1),
               "params": sum(p.numel() for p in model.parameters())}
    if measure:
        summary.update(sample_stats(out))
    (out / "pretrain_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(json.dumps(summary))
    return summary


def sample_stats(folder: str | Path, k: int = 8, seed: int = 0) -> dict:
    """Parse rate, drift rate and mean added words of ``k`` samples per held-out caption."""
    from diffusion_pref.prompt_opt.model import CausalLMPolicy
    from diffusion_pref.toy.render import eval_prompts

    policy = CausalLMPolicy.load(folder, with_reference=False)
    parsed = drifted = added = total = 0
    for i, prompt in enumerate(eval_prompts()):
        for rewrite in policy.sample(prompt, k, seed=seed + i, max_new_tokens=MAX_POSITIONS):
            total += 1
            result = parse_rewrite(rewrite)
            parsed += result is not None
            drifted += drift(prompt, rewrite)
            added += len(result[3]) if result else 0
    return {"samples": total, "parse_rate": round(parsed / total, 3), "drift_rate": round(drifted / total, 3),
            "mean_added_words": round(added / max(parsed, 1), 2)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Pretrain the shapes-world prompt rewriter LM.")
    parser.add_argument("--out", default=str(WEIGHTS), help="output folder (default: the shipped weights' folder)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--drift-rate", type=float, default=0.3, help="share of pretraining rewrites that drift")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    pretrain(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
             drift_rate=args.drift_rate, threads=args.threads)


if __name__ == "__main__":
    main()
