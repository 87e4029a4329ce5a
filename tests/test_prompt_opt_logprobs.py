"""Completion log-probabilities of a causal LM against a direct computation, one unpadded row at a time."""

from __future__ import annotations

import pytest
import torch

from diffusion_pref.prompt_opt.logprobs import (
    completion_logprobs,
    encode_completions,
    model_context_length,
    token_logprobs,
)
from diffusion_pref.testing import GPT2_MAX_POSITIONS, tiny_causal_lm

PROMPTS = ["a photo of a cat", "red car", "the dog in the city at night"]
COMPLETIONS = [" on a blue sofa, soft light", " in the rain", " painting"]
# A minimal template in the usual shape: turns wrapped in role markers, the eos token ending each turn.
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<|endoftext|>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def lm():
    return tiny_causal_lm(seed=0)


def direct_logprob(model, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
    """Per-completion-token log-probs from one unpadded forward pass, indexed by hand."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    # the token at position p is predicted by the logits at position p - 1
    return [logp[p - 1, ids[0, p]].item() for p in range(len(prompt_ids), ids.shape[1])]


def plain_ids(tokenizer, prompt, completion):
    return tokenizer(prompt)["input_ids"], tokenizer(completion)["input_ids"] + [tokenizer.eos_token_id]


def test_summed_and_averaged_logprob_equal_a_direct_computation(lm):
    model, tokenizer = lm
    batch = encode_completions(tokenizer, PROMPTS, COMPLETIONS)
    assert len(set(batch["attention_mask"].sum(1).tolist())) == 3  # rows of different lengths: padding is exercised
    with torch.no_grad():
        summed = completion_logprobs(model, batch)
        averaged = completion_logprobs(model, batch, average=True)
    assert summed.shape == (3,) and summed.dtype == torch.float32
    for i, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS)):
        per_token = direct_logprob(model, *plain_ids(tokenizer, prompt, completion))
        assert summed[i].item() == pytest.approx(sum(per_token), abs=1e-4)
        assert averaged[i].item() == pytest.approx(sum(per_token) / len(per_token), abs=1e-5)


def test_masks_mark_exactly_the_completion_tokens(lm):
    _, tokenizer = lm
    batch = encode_completions(tokenizer, PROMPTS, COMPLETIONS)
    for i, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS)):
        prompt_ids, completion_ids = plain_ids(tokenizer, prompt, completion)
        n_prompt, n = len(prompt_ids), len(prompt_ids) + len(completion_ids)
        assert batch["input_ids"][i, :n].tolist() == prompt_ids + completion_ids
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert batch["completion_mask"][i].tolist() == [0] * n_prompt + [1] * (n - n_prompt) + [0] * (
            batch["input_ids"].shape[1] - n
        )
        scored = batch["input_ids"][i][batch["completion_mask"][i].bool()]
        assert tokenizer.decode(scored) == completion + "<|endoftext|>"


def test_padding_and_prompt_do_not_leak_into_the_completion_logprob(lm):
    model, tokenizer = lm
    alone = encode_completions(tokenizer, PROMPTS[2:], COMPLETIONS[2:])
    padded = encode_completions(tokenizer, PROMPTS, COMPLETIONS)
    with torch.no_grad():
        # row 1 ("red car") is the shortest, so it carries the most padding
        row = encode_completions(tokenizer, PROMPTS[1:2], COMPLETIONS[1:2])
        assert completion_logprobs(model, padded)[1].item() == pytest.approx(
            completion_logprobs(model, row)[0].item(), abs=1e-5
        )
        # the prompt conditions the completion but its own tokens are not scored: scoring the prompt too would
        # make this the whole-sequence log-prob
        per_token, mask = token_logprobs(model, alone)
        whole = per_token[0, : alone["attention_mask"][0].sum() - 1].sum().item()
        assert completion_logprobs(model, alone)[0].item() > whole + 1.0


def test_token_weights_and_segment_masks(lm):
    model, tokenizer = lm
    batch = encode_completions(tokenizer, PROMPTS, COMPLETIONS)
    weight = torch.rand(batch["input_ids"].shape, generator=torch.Generator().manual_seed(0)) * 2
    with torch.no_grad():
        weighted = completion_logprobs(model, batch, token_weight=weight)
        weighted_mean = completion_logprobs(model, batch, token_weight=weight, average=True)
    for i, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS)):
        prompt_ids, completion_ids = plain_ids(tokenizer, prompt, completion)
        per_token = direct_logprob(model, prompt_ids, completion_ids)
        w = weight[i, len(prompt_ids) : len(prompt_ids) + len(completion_ids)].tolist()
        assert weighted[i].item() == pytest.approx(sum(a * b for a, b in zip(per_token, w)), abs=1e-4)
        assert weighted_mean[i].item() == pytest.approx(weighted[i].item() / sum(w), rel=1e-5)

    # a 0/1 segment mask keeps only the last completion token (the eos): sentence-level scoring of one segment
    last = torch.zeros_like(batch["input_ids"])
    last[torch.arange(3), batch["attention_mask"].sum(1) - 1] = 1
    with torch.no_grad():
        eos_only = completion_logprobs(model, batch, token_weight=last)
    for i, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS)):
        per_token = direct_logprob(model, *plain_ids(tokenizer, prompt, completion))
        assert eos_only[i].item() == pytest.approx(per_token[-1], abs=1e-5)


def test_gradient_reaches_the_model(lm):
    model, tokenizer = lm
    batch = encode_completions(tokenizer, PROMPTS, COMPLETIONS)
    model.zero_grad()
    completion_logprobs(model, batch).sum().backward()
    assert model.transformer.wte.weight.grad.abs().sum() > 0
    model.zero_grad()


def test_chat_template_prompt_is_the_user_turn_and_completion_the_assistant_turn(lm):
    model, _ = lm
    _, chat_tokenizer = tiny_causal_lm(seed=0)  # a fresh tokenizer: the fixture's stays without a template
    chat_tokenizer.chat_template = CHAT_TEMPLATE
    batch = encode_completions(chat_tokenizer, PROMPTS[:2], COMPLETIONS[:2])
    for i, (prompt, completion) in enumerate(zip(PROMPTS[:2], COMPLETIONS[:2])):
        rendered_prompt = f"<user>{prompt}<|endoftext|><assistant>"
        prompt_ids = chat_tokenizer(rendered_prompt, add_special_tokens=False)["input_ids"]
        completion_ids = chat_tokenizer(completion + "<|endoftext|>", add_special_tokens=False)["input_ids"]
        n_prompt, n = len(prompt_ids), len(prompt_ids) + len(completion_ids)
        assert batch["input_ids"][i, :n].tolist() == prompt_ids + completion_ids
        assert batch["completion_mask"][i, :n].tolist() == [0] * n_prompt + [1] * (n - n_prompt)
        with torch.no_grad():
            ours = completion_logprobs(model, batch)[i].item()
        assert ours == pytest.approx(sum(direct_logprob(model, prompt_ids, completion_ids)), abs=1e-4)
    # chat_template=False falls back to plain concatenation with the same tokenizer
    plain = encode_completions(chat_tokenizer, PROMPTS[:1], COMPLETIONS[:1], chat_template=False)
    assert plain["input_ids"][0].tolist() == sum(plain_ids(chat_tokenizer, PROMPTS[0], COMPLETIONS[0]), [])


def test_chat_template_that_rewrites_the_prompt_is_refused(lm):
    _, tokenizer = tiny_causal_lm(seed=0)  # a fresh tokenizer: the fixture's stays without a template
    # renders the user turn differently when an assistant turn follows
    tokenizer.chat_template = (
        "{% if add_generation_prompt %}<q>{{ messages[0]['content'] }}<a>"
        "{% else %}<Q>{{ messages[0]['content'] }}<A>{{ messages[1]['content'] }}{% endif %}"
    )
    with pytest.raises(ValueError, match="row 0: the tokenizer's chat template renders the prompt differently"):
        encode_completions(tokenizer, PROMPTS[:1], COMPLETIONS[:1])
    with pytest.raises(ValueError, match="chat_template=True but the tokenizer has no chat template"):
        encode_completions(lm[1], PROMPTS, COMPLETIONS, chat_template=True)


@pytest.mark.parametrize(
    "prompts, completions, message",
    [
        (["a cat", "a dog"], [" sleeping", ""], r"^row 1: the completion is empty"),
        (["a cat", "a dog"], [" sleeping", "   "], r"^row 1: the completion is empty"),
        (["", "a dog"], [" sleeping", " barking"], r"^row 0: the prompt has no tokens"),
        (["a cat", "a dog " + "x" * 80], [" one", " two"], r"^row 1: prompt \+ completion is \d+ tokens .*of 64"),
        (["a cat"], [None], r"^row 0: the completion must be a string"),
        (["a cat", "a dog"], [" one"], r"2 prompts but 1 completions"),
    ],
)
def test_bad_rows_are_refused_naming_the_row(lm, prompts, completions, message):
    with pytest.raises(ValueError, match=message):
        encode_completions(lm[1], prompts, completions)


def test_too_long_batch_is_refused_by_the_forward_too(lm):
    model, tokenizer = lm
    assert model_context_length(model) == GPT2_MAX_POSITIONS
    batch = encode_completions(tokenizer, ["a", "a dog " + "x" * 80], [" b", " c"], max_length=1000)
    with pytest.raises(ValueError, match=r"^row 1: prompt \+ completion is \d+ tokens, longer than .* of 64"):
        completion_logprobs(model, batch)


def test_a_row_with_all_token_weights_zero_cannot_be_averaged(lm):
    model, tokenizer = lm
    batch = encode_completions(tokenizer, PROMPTS[:2], COMPLETIONS[:2])
    weight = torch.ones_like(batch["input_ids"])
    weight[1] = 0
    with pytest.raises(ValueError, match="^row 1: the completion's token weights sum to 0"):
        completion_logprobs(model, batch, token_weight=weight, average=True)
    with pytest.raises(ValueError, match="token_weight has shape"):
        completion_logprobs(model, batch, token_weight=weight[:, :-1])


def test_chat_split_matches_trl_preference_formatting(lm):
    # TRL's DPO data formatting renders the prompt with the generation prompt and takes the chosen text as what the
    # full conversation adds after it; our prompt/completion split must be the same texts
    data_utils = pytest.importorskip("trl.data_utils", reason="trl is a test extra")
    from diffusion_pref.prompt_opt.logprobs import _split_chat

    _, tokenizer = tiny_causal_lm(seed=0)  # a fresh tokenizer: the fixture's stays without a template
    tokenizer.chat_template = CHAT_TEMPLATE
    for prompt, completion in zip(PROMPTS, COMPLETIONS):
        example = {
            "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": completion}],
            "rejected": [{"role": "assistant", "content": "x"}],
        }
        trl_texts = data_utils.apply_chat_template(example, tokenizer)
        assert _split_chat(tokenizer, prompt, completion, 0) == (trl_texts["prompt"], trl_texts["chosen"])


def test_lora_policy_trains_only_its_adapters_and_the_disabled_adapter_is_the_reference():
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny_causal_lm(seed=0)
    batch = encode_completions(tokenizer, PROMPTS, COMPLETIONS)
    with torch.no_grad():
        base = completion_logprobs(model, batch)
    policy = get_peft_model(model, LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False  # GPT-2 uses Conv1D
    ))
    policy.train(False)
    logprob = completion_logprobs(policy, batch)
    assert not torch.allclose(logprob, base)  # random (non-zero) adapters change the policy
    logprob.sum().backward()
    changed = {name for name, p in policy.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert changed and all("lora_" in name for name in changed)
    with torch.no_grad(), policy.disable_adapter():
        torch.testing.assert_close(completion_logprobs(policy, batch), base)
