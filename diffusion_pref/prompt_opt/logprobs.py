"""Log-probabilities of completions under a causal language model: the LM side of the loss convention.

A preference loss reads one log-likelihood estimate per (prompt, completion); for a language model it is the
log-probability of the completion's tokens given the prompt, the prompt's own tokens and the padding masked out.

    from diffusion_pref.prompt_opt.logprobs import completion_logprobs, encode_completions, model_context_length
    batch = encode_completions(tokenizer, prompts, completions, max_length=model_context_length(model))
    policy = completion_logprobs(model, batch)                  # [N], summed over completion tokens
    policy_norm = completion_logprobs(model, batch, average=True)   # per-token mean (IPO, ASFT, REDI)

Tokenisation. With a chat template (the tokenizer has one, or ``chat_template=True``) the prompt is the user turn
rendered with the generation prompt, and the completion is what the template adds after it for the assistant
turn (its end-of-turn tokens included). Without one the two texts are concatenated as given and the completion
ends with the eos token, so the model learns to stop. Prompt and completion are tokenised **separately** and the
ids concatenated (as TRL's DPO tokenisation does), so the prompt tokens are exactly those a sampler would be given
and the completion mask needs no alignment of offsets; BPE merges across the boundary are never formed.

Per-token weights (``token_weight``, ``[N, T]`` aligned with ``input_ids``) multiply each completion token's
log-probability: a 0/1 mask keeps a segment only (sentence-level DPO), real weights give token-weighted DPO.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch

__all__ = ["completion_logprobs", "encode_completions", "model_context_length", "token_logprobs"]

# Tokenizers without a real limit report this sentinel (transformers' VERY_LARGE_INTEGER is 1e30).
_NO_LIMIT = 10**9


def model_context_length(model) -> int | None:
    """The number of positions the model can attend over, from its config (None when the config does not say).

    A wrapper without a config (DDP, FSDP: the model is its ``.module``) is looked through."""
    while getattr(model, "config", None) is None and hasattr(model, "module"):
        model = model.module
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _split_chat(tokenizer, prompt: str, completion: str, row: int) -> tuple[str, str]:
    """The chat-rendered prompt and the text the template adds for the assistant turn."""
    user = [{"role": "user", "content": prompt}]
    prompt_text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(
        [*user, {"role": "assistant", "content": completion}], tokenize=False
    )
    if not full_text.startswith(prompt_text):
        raise ValueError(
            f"row {row}: the tokenizer's chat template renders the prompt differently once an answer follows, so "
            "the completion cannot be split off it; pass chat_template=False to concatenate prompt and completion."
        )
    return prompt_text, full_text[len(prompt_text):]


def encode_completions(
    tokenizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    max_length: int | None = None,
    chat_template: bool | None = None,
    add_eos: bool = True,
) -> dict[str, torch.Tensor]:
    """Tokenise (prompt, completion) rows into a right-padded batch.

    Returns ``input_ids``, ``attention_mask`` (1 on real tokens) and ``completion_mask`` (1 on completion tokens),
    each ``[N, T]`` (long). ``chat_template``: None uses the tokenizer's template when it has one. ``add_eos``
    appends the eos token to plain (no template) completions. ``max_length`` (default: the tokenizer's
    ``model_max_length`` when it is a real limit) bounds prompt + completion; a longer row, an empty completion,
    or a prompt with no tokens raises ``ValueError`` naming the row.
    """
    import torch

    if len(prompts) != len(completions):
        raise ValueError(f"encode_completions: {len(prompts)} prompts but {len(completions)} completions.")
    if not prompts:
        raise ValueError("encode_completions: no rows to encode.")
    use_chat = getattr(tokenizer, "chat_template", None) is not None if chat_template is None else chat_template
    if use_chat and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("encode_completions: chat_template=True but the tokenizer has no chat template.")
    if max_length is None and tokenizer.model_max_length < _NO_LIMIT:
        max_length = int(tokenizer.model_max_length)

    rows = []
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        for name, text in (("prompt", prompt), ("completion", completion)):
            if not isinstance(text, str):
                raise ValueError(f"row {row}: the {name} must be a string, got {type(text).__name__}.")
        if not completion.strip():
            raise ValueError(f"row {row}: the completion is empty (or only whitespace); there is nothing to score.")
        if use_chat:
            prompt_text, completion_text = _split_chat(tokenizer, prompt, completion, row)
            # The template writes its special tokens (bos, turn markers) as text; adding them again would double them.
            prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        else:
            completion_text = completion
            prompt_ids = tokenizer(prompt)["input_ids"]
        completion_ids = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
        if add_eos and not use_chat and tokenizer.eos_token_id is not None:
            completion_ids = [*completion_ids, tokenizer.eos_token_id]
        if not prompt_ids:
            raise ValueError(
                f"row {row}: the prompt has no tokens, so the first completion token has no context to be "
                "predicted from; give a non-empty prompt or a tokenizer that adds a bos token."
            )
        length = len(prompt_ids) + len(completion_ids)
        if max_length is not None and length > max_length:
            raise ValueError(
                f"row {row}: prompt + completion is {length} tokens ({len(prompt_ids)} + {len(completion_ids)}), "
                f"longer than the model's context of {max_length}; shorten or drop this row."
            )
        rows.append((prompt_ids, completion_ids))

    width = max(len(p) + len(c) for p, c in rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked either way
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt_ids, completion_ids) in enumerate(rows):
        n_prompt, n = len(prompt_ids), len(prompt_ids) + len(completion_ids)
        input_ids[i, :n] = torch.tensor(prompt_ids + completion_ids, dtype=torch.long)
        attention_mask[i, :n] = 1
        completion_mask[i, n_prompt:n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def token_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities ``[N, T - 1]`` of ``input_ids[:, 1:]`` and the completion mask aligned with them.

    Computed in float32 (the log-softmax of bfloat16 logits would round away the small differences DPO reads).
    Raises ``ValueError`` naming the first row longer than the model's context.
    """
    import torch

    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    context = model_context_length(model)
    if context is not None and input_ids.shape[1] > context:
        lengths = attention_mask.sum(dim=1)
        row = int((lengths > context).nonzero()[0, 0]) if bool((lengths > context).any()) else 0
        raise ValueError(
            f"row {row}: prompt + completion is {int(lengths[row])} tokens, longer than the model's context of "
            f"{context}; encode with max_length=model_context_length(model) to catch it when tokenising."
        )
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()  # [N, T-1, V]
    labels = input_ids[:, 1:].unsqueeze(-1)
    # gather minus logsumexp: the same as log_softmax then gather, without a second [N, T-1, V] tensor
    logprobs = logits.gather(-1, labels).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    mask = (batch["completion_mask"][:, 1:] * attention_mask[:, 1:]).float()
    return logprobs, mask


def completion_logprobs(
    model,
    batch: dict[str, torch.Tensor],
    *,
    average: bool = False,
    token_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log-probability of each row's completion, ``[N]`` float32: the sum over completion tokens, or their mean.

    ``token_weight`` (``[N, T]``, aligned with ``batch["input_ids"]``; prompt and padding positions are ignored)
    multiplies each token's log-probability. ``average=True`` divides by the sum of the weights over the
    completion (the token count when unweighted). A row whose completion weights sum to 0 raises ``ValueError``
    when averaging, naming the row.
    """
    logprobs, mask = token_logprobs(model, batch)
    if token_weight is not None:
        if tuple(token_weight.shape) != tuple(batch["input_ids"].shape):
            raise ValueError(
                f"completion_logprobs: token_weight has shape {tuple(token_weight.shape)} but input_ids has "
                f"{tuple(batch['input_ids'].shape)}; give one weight per token."
            )
        mask = mask * token_weight[:, 1:].to(device=mask.device, dtype=mask.dtype)
    total = (logprobs * mask).sum(dim=1)
    if not average:
        return total
    norm = mask.sum(dim=1)
    if bool((norm == 0).any()):
        row = int((norm == 0).nonzero()[0, 0])
        raise ValueError(
            f"row {row}: the completion's token weights sum to 0, so its mean log-probability is undefined."
        )
    return total / norm
