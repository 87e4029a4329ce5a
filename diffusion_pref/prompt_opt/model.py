"""The language-model policy adapter: what a diffusion backbone's denoising log-likelihood is to an image model.

A preference loss reads one log-likelihood estimate per side of a pair, under the policy and under the reference.
For a causal LM that estimate is the completion's log-probability given the prompt (:mod:`.logprobs`);
:class:`CausalLMPolicy` wraps any ``transformers.AutoModelForCausalLM`` with its tokenizer, trained in full or
through a peft LoRA, and answers ``log_likelihoods(batch, reference=...) -> (w, l)``.

    from diffusion_pref.prompt_opt.model import CausalLMPolicy
    from diffusion_pref.prompt_opt.pairs import read_pairs, collate_pairs
    policy = CausalLMPolicy.load("Qwen/Qwen2.5-0.5B-Instruct", lora={"rank": 16})   # or a local folder
    pairs = read_pairs("pairs.parquet", tokenizer=policy.tokenizer, max_length=policy.context_length)
    batch = collate_pairs(policy.tokenizer, pairs.rows[:8])             # chosen rows first, then rejected
    policy_w, policy_l = policy.log_likelihoods(batch)                    # [8] each, gradient flows
    ref_w, ref_l = policy.log_likelihoods(batch, reference=True)          # no gradient
    loss, metrics = LOSSES["dpo"](policy_w, policy_l, ref_w, ref_l, beta=0.1, weight=batch.get("weight"))
    policy.save_lora("out/lora")     # PeftModel.from_pretrained(base, "out/lora") / AutoPeftModelForCausalLM
    policy.save_full("out/full")     # AutoModelForCausalLM.from_pretrained("out/full"), LoRA merged in

The reference: with LoRA it is the same network with the adapter disabled (no second copy in memory); in full
fine-tuning it is a frozen copy taken when the policy is built (or one passed in). The trainable module is
``policy.module`` (hand it to the optimizer / ``accelerator.prepare``; pass the wrapped module back as
``model=`` so the forward goes through the wrapper).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from diffusion_pref.prompt_opt.logprobs import completion_logprobs, encode_completions, model_context_length

__all__ = ["CausalLMPolicy", "LoraSettings"]


@dataclass
class LoraSettings:
    """peft LoRA settings for the LM; ``targets=None`` uses peft's default modules for the architecture."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Optional[list[str]] = None

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora.rank must be an integer >= 1, got {self.rank!r}.")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}.")

    def peft_config(self):
        from peft import LoraConfig, TaskType

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.targets, task_type=TaskType.CAUSAL_LM)


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _unwrap(model):
    # DDP / FSDP / accelerate wrappers keep the real module in `.module`.
    while hasattr(model, "module") and not _is_peft(model) and not hasattr(model, "config"):
        model = model.module
    return model


@dataclass
class CausalLMPolicy:
    """A causal LM (full or LoRA) and its tokenizer as a preference-training policy.

    ``average``: length-normalised completion log-probs (mean per token) instead of the sum.
    ``chat_template``: None uses the tokenizer's template when it has one (see :func:`.logprobs.encode_completions`).
    ``prompt_template``: for models without a chat template, a ``str.format`` pattern with ``{prompt}`` that turns
    a user prompt into the model's input (e.g. ``"Rewrite: {prompt}\\nBetter:"``); None = the prompt as given.
    ``disable_dropout`` (default, as TRL's DPO does): set every dropout probability to 0, so the policy's estimate is
    deterministic and equals the reference's before training (dropout would make the margin noise at step 0);
    this includes a LoRA's own dropout.
    ``with_reference=False``: no frozen copy for a fully trained model (sampling only, e.g. ``prompt-opt generate``:
    half the memory); scoring with ``reference=True`` then raises.
    """

    module: Any
    tokenizer: Any
    reference_module: Any = None
    average: bool = False
    chat_template: Optional[bool] = None
    prompt_template: Optional[str] = None
    name: str = ""
    disable_dropout: bool = True
    with_reference: bool = True
    _lora: bool = field(default=False, init=False)

    def __post_init__(self):
        import torch

        self._lora = _is_peft(self.module)
        if self.disable_dropout:
            for module in self.module.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
        if self.prompt_template is not None and "{prompt}" not in self.prompt_template:
            raise ValueError(f"prompt_template={self.prompt_template!r} has no '{{prompt}}' to put the prompt in.")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token  # padding is masked; GPT-2 style models have none
        if self._lora:
            if self.reference_module is not None:
                raise ValueError("CausalLMPolicy: a LoRA policy's reference is its base (adapter disabled); "
                                 "do not pass reference_module.")
        elif self.reference_module is None and self.with_reference:
            self.reference_module = copy.deepcopy(self.module)
        if self.reference_module is not None:
            self.reference_module.eval()
            self.reference_module.requires_grad_(False)

    # -- loading -------------------------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        pretrained: str | Path,
        *,
        lora: LoraSettings | dict | None = None,
        adapter: str | Path | None = None,
        dtype: str = "float32",
        device: str = "cpu",
        revision: Optional[str] = None,
        average: bool = False,
        chat_template: Optional[bool] = None,
        prompt_template: Optional[str] = None,
        disable_dropout: bool = True,
        with_reference: bool = True,
    ) -> "CausalLMPolicy":
        """Load ``pretrained`` (a local folder or a hub id) with ``AutoModelForCausalLM`` and ``AutoTokenizer``.

        ``lora``: train a new LoRA with these settings; ``adapter``: continue a saved LoRA folder (trainable). Without
        either, the whole model trains and the reference is a frozen copy. No remote code is run.
        """
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        except KeyError:
            raise ValueError(f"dtype={dtype!r}; use float32, bfloat16 or float16.") from None
        if lora is not None and adapter is not None:
            raise ValueError("give lora= (a new adapter) or adapter= (a saved one), not both.")
        location = str(pretrained)
        try:
            tokenizer = AutoTokenizer.from_pretrained(location, revision=revision, trust_remote_code=False)
            model = AutoModelForCausalLM.from_pretrained(location, revision=revision, dtype=torch_dtype,
                                                         trust_remote_code=False)
        except OSError as err:
            raise ValueError(f"could not load a causal LM and tokenizer from {location!r}: {err}".splitlines()[0]) from None
        model.to(device)
        if lora is not None or adapter is not None:
            from peft import PeftModel, get_peft_model

            if adapter is not None:
                model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
            else:
                settings = lora if isinstance(lora, LoraSettings) else LoraSettings(**lora)
                model = get_peft_model(model, settings.peft_config())
        model.train()
        return cls(model, tokenizer, average=average, chat_template=chat_template, prompt_template=prompt_template,
                   name=location, disable_dropout=disable_dropout, with_reference=with_reference)

    # -- what the training loop calls ----------------------------------------------------------------------------
    @property
    def is_lora(self) -> bool:
        return self._lora

    @property
    def context_length(self) -> Optional[int]:
        return model_context_length(_unwrap(self.module))

    def trainable_parameters(self) -> list:
        return [p for p in self.module.parameters() if p.requires_grad]

    def format_prompts(self, prompts: Sequence[str]) -> list[str]:
        if self.prompt_template is None:
            return list(prompts)
        return [self.prompt_template.format(prompt=p) for p in prompts]

    def encode(self, prompts: Sequence[str], completions: Sequence[str]) -> dict:
        """Tokenise rows with this policy's prompt format, chat template and context limit (errors name the row)."""
        return encode_completions(self.tokenizer, self.format_prompts(prompts), list(completions),
                                  max_length=self.context_length, chat_template=self.chat_template)

    def log_likelihoods(self, batch: dict, reference: bool = False, model: Any = None):
        """``(w, l)``: completion log-probs ``[N]`` of the chosen rows (first half of the batch) and the rejected
        rows (second half), float32.

        ``reference=True`` scores with the reference (the adapter disabled, or the frozen copy) under ``no_grad``.
        ``model`` replaces ``self.module`` for the policy forward (the module ``accelerator.prepare`` returned).
        ``batch`` may carry ``token_weight`` ``[2N, T]`` (segment masks / token weights, see ``completion_logprobs``).
        """
        import torch

        rows = batch["input_ids"].shape[0]
        if rows % 2:
            raise ValueError(f"log_likelihoods: the batch has {rows} rows; it must hold chosen rows then rejected rows.")
        device = next(self.module.parameters()).device
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "completion_mask")}
        token_weight = batch.get("token_weight")
        if reference:
            with torch.no_grad():
                if self._lora:
                    peft_model = _unwrap(self.module if model is None else model)
                    was_training = peft_model.training
                    peft_model.eval()  # no dropout in the reference
                    try:
                        with peft_model.disable_adapter():
                            values = completion_logprobs(peft_model, inputs, average=self.average,
                                                         token_weight=token_weight)
                    finally:
                        peft_model.train(was_training)
                elif self.reference_module is None:
                    raise ValueError("log_likelihoods(reference=True): this policy was built with_reference=False.")
                else:
                    values = completion_logprobs(self.reference_module, inputs, average=self.average,
                                                 token_weight=token_weight)
        else:
            values = completion_logprobs(self.module if model is None else model, inputs, average=self.average,
                                         token_weight=token_weight)
        return values.chunk(2)

    # -- sampling (prompt-opt generate) --------------------------------------------------------------------------
    def sample(self, prompt: str, k: int, seed: int, *, max_new_tokens: int = 48, temperature: float = 1.0,
               top_p: float = 1.0, top_k: int = 0, with_finished: bool = False):
        """``k`` rewrites of one prompt, from the policy, reproducible from ``seed`` alone (one call per prompt, so
        the result does not depend on how prompts are batched). Returns the decoded completions, stripped; with
        ``with_finished`` also whether each one ended with the eos token (an unfinished one was cut at
        ``max_new_tokens`` or at the model's context, which always leaves room for the eos token)."""
        import torch

        model = _unwrap(self.module)
        if self.chat_template is not False and getattr(self.tokenizer, "chat_template", None) is not None:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
            ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        else:
            ids = self.tokenizer(self.format_prompts([prompt])[0], return_tensors="pt")["input_ids"]
        context = self.context_length
        if context is not None:
            max_new_tokens = min(max_new_tokens, context - ids.shape[1] - 1)  # the eos added when training
            if max_new_tokens < 1:
                raise ValueError(f"prompt {prompt!r} is {ids.shape[1]} tokens: no room left in the model's context "
                                 f"of {context} for a rewrite.")
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
                torch.manual_seed(int(seed))
                out = model.generate(
                    input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device), do_sample=True,
                    num_return_sequences=k, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                    top_k=top_k, pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
                )
        finally:
            model.train(was_training)
        new = out[:, ids.shape[1]:]
        texts = [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
        if not with_finished:
            return texts
        return texts, (new == self.tokenizer.eos_token_id).any(dim=1).tolist()

    # -- saving --------------------------------------------------------------------------------------------------
    def save_lora(self, directory: str | Path) -> Path:
        """The adapter (``adapter_model.safetensors`` + ``adapter_config.json``) and the tokenizer, loadable with
        ``PeftModel.from_pretrained(base, directory)`` or ``AutoPeftModelForCausalLM.from_pretrained(directory)``."""
        if not self._lora:
            raise ValueError("save_lora: this policy trains the whole model (no LoRA); use save_full.")
        directory = Path(directory)
        _unwrap(self.module).save_pretrained(str(directory), safe_serialization=True)
        self.tokenizer.save_pretrained(str(directory))
        return directory

    def save_full(self, directory: str | Path, state_dict: Optional[dict] = None) -> Path:
        """A complete ``AutoModelForCausalLM`` folder (safetensors + tokenizer); a LoRA is merged into a copy of
        the base first, so the live policy keeps training. ``state_dict``: gathered weights of a sharded module."""
        directory = Path(directory)
        model = _unwrap(self.module)
        if self._lora:
            model = copy.deepcopy(model).merge_and_unload()
        if state_dict is not None:
            model.save_pretrained(str(directory), state_dict=state_dict, safe_serialization=True)
        else:
            model.save_pretrained(str(directory), safe_serialization=True)
        self.tokenizer.save_pretrained(str(directory))
        return directory
