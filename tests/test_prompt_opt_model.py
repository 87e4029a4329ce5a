"""The LM policy adapter: log-likelihoods against a direct computation, the reference, LoRA and full saving."""

from __future__ import annotations

import pytest
import torch

from diffusion_pref.losses import LOSSES
from diffusion_pref.prompt_opt.model import CausalLMPolicy
from diffusion_pref.prompt_opt.pairs import collate_pairs

ROWS = [
    {"prompt": "a photo of a cat", "chosen": " on a blue sofa", "rejected": " dog"},
    {"prompt": "red car", "chosen": " in the rain at night", "rejected": " painting of the city"},
    {"prompt": "the dog in the city", "chosen": " at night", "rejected": " with a man"},
]


def direct(model, tokenizer, prompt: str, completion: str) -> tuple[float, int]:
    """Sum of the completion tokens' log-probs (eos appended) from one unpadded forward pass, and their count."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    completion_ids = tokenizer(completion)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    values = [logp[p - 1, ids[0, p]].item() for p in range(len(prompt_ids), ids.shape[1])]
    return sum(values), len(values)


def perturb_lora(policy, seed=1):
    # peft starts lora_B at zero (policy == reference) and lora_A from torch's global RNG; set both from a seed
    # so the two differ by the same amount in every run.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.module.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


@pytest.fixture()
def lora_policy(tiny_causal_lm_dir):
    return CausalLMPolicy.load(tiny_causal_lm_dir, lora={"rank": 4, "alpha": 8})


@pytest.mark.parametrize("average", [False, True])
def test_log_likelihoods_equal_a_direct_computation_with_the_prompt_masked(tiny_causal_lm_dir, average):
    from transformers import AutoModelForCausalLM

    policy = CausalLMPolicy.load(tiny_causal_lm_dir, lora={"rank": 4}, average=average)
    perturb_lora(policy)
    batch = collate_pairs(policy.tokenizer, ROWS)
    with torch.no_grad():
        w, l = policy.log_likelihoods(batch)
    ref_w, ref_l = policy.log_likelihoods(batch, reference=True)
    base = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir).eval()
    for i, row in enumerate(ROWS):
        for side, got, ref in (("chosen", w, ref_w), ("rejected", l, ref_l)):
            total, count = direct(policy.module, policy.tokenizer, row["prompt"], row[side])
            ref_total, _ = direct(base, policy.tokenizer, row["prompt"], row[side])
            scale = count if average else 1
            # float32 log-softmax over a 300-token vocabulary, summed over <= 8 tokens
            assert got[i].item() == pytest.approx(total / scale, abs=1e-4)
            assert ref[i].item() == pytest.approx(ref_total / scale, abs=1e-4)
            assert abs(got[i].item() - ref[i].item()) > 1e-3  # the adapter matters, the reference ignores it


def test_reference_has_no_gradient_and_policy_does(lora_policy):
    batch = collate_pairs(lora_policy.tokenizer, ROWS)
    w, _ = lora_policy.log_likelihoods(batch)
    ref_w, _ = lora_policy.log_likelihoods(batch, reference=True)
    assert w.requires_grad and not ref_w.requires_grad
    assert lora_policy.module.training  # scoring the reference leaves the train/eval mode as it was


def test_untrained_policy_equals_reference_dropout_disabled(tiny_causal_lm_dir):
    for kwargs in ({}, {"lora": {"rank": 4, "dropout": 0.1}}):
        policy = CausalLMPolicy.load(tiny_causal_lm_dir, **kwargs)
        assert policy.module.training
        batch = collate_pairs(policy.tokenizer, ROWS)
        with torch.no_grad():
            w, l = policy.log_likelihoods(batch)
        ref_w, ref_l = policy.log_likelihoods(batch, reference=True)
        torch.testing.assert_close(torch.cat([w, l]), torch.cat([ref_w, ref_l]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("lora", [None, {"rank": 4}])
def test_a_short_run_changes_the_policy_and_not_the_reference(tiny_causal_lm_dir, lora):
    policy = CausalLMPolicy.load(tiny_causal_lm_dir, lora=lora)
    batch = collate_pairs(policy.tokenizer, ROWS)
    ref_before = torch.cat(policy.log_likelihoods(batch, reference=True))
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    for _ in range(5):
        w, l = policy.log_likelihoods(batch)
        ref_w, ref_l = policy.log_likelihoods(batch, reference=True)
        loss, _ = LOSSES["dpo"](w, l, ref_w, ref_l, beta=0.1, weight=torch.full((3,), 0.5))
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    with torch.no_grad():
        w, l = policy.log_likelihoods(batch)
    ref_after = torch.cat(policy.log_likelihoods(batch, reference=True))
    torch.testing.assert_close(ref_after, ref_before, rtol=0, atol=0)
    assert float((w - l).mean()) > float((ref_after[:3] - ref_after[3:]).mean()) + 0.01  # margin grew


def test_lora_saves_and_loads_with_peft(tmp_path, tiny_causal_lm_dir, lora_policy):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    perturb_lora(lora_policy)
    batch = collate_pairs(lora_policy.tokenizer, ROWS)
    with torch.no_grad():
        expected = torch.cat(lora_policy.log_likelihoods(batch))
    lora_policy.save_lora(tmp_path / "lora")
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "lora")).eval()
    reloaded = CausalLMPolicy(loaded, lora_policy.tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(reloaded.log_likelihoods(batch)), expected, rtol=0, atol=1e-5)
    # and through the adapter's own loader, trainable again
    resumed = CausalLMPolicy.load(tiny_causal_lm_dir, adapter=tmp_path / "lora")
    assert resumed.is_lora and resumed.trainable_parameters()
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(resumed.log_likelihoods(batch)), expected, rtol=0, atol=1e-5)

    lora_policy.save_full(tmp_path / "full")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "full").eval()
    full = CausalLMPolicy(merged, lora_policy.tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(full.log_likelihoods(batch)), expected, rtol=0, atol=1e-4)
    assert lora_policy.is_lora  # merging worked on a copy


def test_full_policy_saves_loadable_folder(tmp_path, tiny_causal_lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy = CausalLMPolicy.load(tiny_causal_lm_dir)
    with pytest.raises(ValueError, match="no LoRA"):
        policy.save_lora(tmp_path / "x")
    policy.save_full(tmp_path / "full")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    assert AutoTokenizer.from_pretrained(tmp_path / "full").eos_token == policy.tokenizer.eos_token
    for a, b in zip(model.state_dict().values(), policy.module.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_sampling_is_reproducible_from_the_seed(lora_policy):
    a = lora_policy.sample("a red cat", 3, seed=7, max_new_tokens=6)
    b = lora_policy.sample("a red cat", 3, seed=7, max_new_tokens=6)
    c = lora_policy.sample("a red cat", 3, seed=8, max_new_tokens=6)
    assert a == b and len(a) == 3 and a != c


def test_prompt_template_and_errors(tiny_causal_lm_dir):
    with pytest.raises(ValueError, match="prompt_template"):
        CausalLMPolicy.load(tiny_causal_lm_dir, prompt_template="no slot")
    with pytest.raises(ValueError, match="could not load"):
        CausalLMPolicy.load(tiny_causal_lm_dir / "missing")
    policy = CausalLMPolicy.load(tiny_causal_lm_dir, prompt_template="photo: {prompt}")
    batch = policy.encode(["cat"], [" dog"])
    assert policy.tokenizer.decode(batch["input_ids"][0]).startswith("photo: cat dog")
    with pytest.raises(ValueError, match="chosen rows then rejected"):
        policy.log_likelihoods(batch)
    sampler = CausalLMPolicy.load(tiny_causal_lm_dir, with_reference=False)
    assert sampler.reference_module is None
    with pytest.raises(ValueError, match="with_reference=False"):
        sampler.log_likelihoods(collate_pairs(sampler.tokenizer, ROWS), reference=True)


class Wrapper(torch.nn.Module):
    """Stands in for DDP: no config, the model in ``.module``, the forward passed through."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.calls = 0

    def forward(self, **kwargs):
        self.calls += 1
        return self.module(**kwargs)


@pytest.mark.parametrize("lora", [None, {"rank": 4}])
def test_a_wrapped_module_is_used_for_the_policy_and_looked_through_for_the_reference(tiny_causal_lm_dir, lora):
    policy = CausalLMPolicy.load(tiny_causal_lm_dir, lora=lora)
    if lora:
        perturb_lora(policy)
    batch = collate_pairs(policy.tokenizer, ROWS)
    wrapped = Wrapper(policy.module)
    with torch.no_grad():
        expected = torch.cat(policy.log_likelihoods(batch))
        got = torch.cat(policy.log_likelihoods(batch, model=wrapped))
    ref = torch.cat(policy.log_likelihoods(batch, reference=True, model=wrapped))
    assert wrapped.calls == 1  # the policy forward went through the wrapper, the reference did not
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(ref, torch.cat(policy.log_likelihoods(batch, reference=True)), rtol=0, atol=0)


def test_chat_template_policy_masks_the_rendered_prompt():
    from diffusion_pref.toy.rewriter import WEIGHTS

    policy = CausalLMPolicy.load(WEIGHTS)  # its tokenizer's template: "<caption> -> <rewrite><|endoftext|>"
    tok = policy.tokenizer
    rows = [{"prompt": "a red circle on a blue background", "chosen": "a bright red circle on a blue background",
             "rejected": "a red square on a blue background, simple"}]
    with torch.no_grad():
        w, l = policy.log_likelihoods(collate_pairs(tok, rows))
    for side, got in (("chosen", w), ("rejected", l)):
        prompt_ids = tok(rows[0]["prompt"] + " ->")["input_ids"]
        completion_ids = tok(" " + rows[0][side])["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([prompt_ids + completion_ids])
        with torch.no_grad():
            logp = torch.log_softmax(policy.module(input_ids=ids).logits[0].double(), dim=-1)
        expected = sum(logp[p - 1, ids[0, p]].item() for p in range(len(prompt_ids), ids.shape[1]))
        assert got[0].item() == pytest.approx(expected, abs=1e-4)
