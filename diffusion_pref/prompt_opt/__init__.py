"""The prompt optimizer's building blocks: a small causal LM that rewrites prompts, trained with Sem-DPO.

What exists so far (the pieces that do not depend on the shared training loop):

- :mod:`diffusion_pref.prompt_opt.logprobs`: tokenise (prompt, completion) pairs with the chat template where the
  tokenizer has one, and compute the completion's log-probability under any ``AutoModelForCausalLM`` (prompt and
  padding masked; summed or length-normalised; optional per-token weights).
- :mod:`diffusion_pref.prompt_opt.semantic`: the Sem-DPO weight ``exp(-alpha (1 - cos(e(x), e(y_w))))`` with a
  frozen embedder, computed once for a pair file and stored beside it.

The per-pair weight reaches every loss through ``LOSSES[name](..., weight=w)``.
"""
