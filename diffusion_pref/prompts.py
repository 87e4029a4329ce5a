"""Prompt readers shared by generation and evaluation: one call turns a file, folder or hub dataset into prompts.

``read_prompts(source, column=None, split="train")`` returns a list of :class:`PromptRecord` (``prompt`` plus an
optional ``category``), in file order; a prompt's position in that list is its identity for seeds and resuming.
The layout is chosen from what ``source`` is:

- ``*.txt``: one prompt per line (blank lines are skipped; whitespace at the ends of a line is stripped).
- ``*.json``: a JSON list of strings, or a list of objects with a ``prompt`` key (or ``column``) and an optional
  ``category`` key (the ImageReward benchmark layout ``{id, prompt}`` reads as is). A file named after an HPDv2
  benchmark style (``anime.json``, ``concept-art.json``, ``paintings.json``, ``photo.json``, ``drawbench.json``)
  gets that style as its category.
- ``*.jsonl``: one JSON object (or string) per line, keys as for ``*.json``.
- ``*.tsv`` / ``*.csv``: a header row; the PartiPrompts layout (``Prompt, Category, Challenge, Note``) reads as is,
  with ``Category`` as the category.
- ``*.parquet``, or a folder of ``*.parquet`` files: column ``column`` (default: the first of ``prompt``,
  ``Prompt``, ``caption``, ``prompts``, ``text`` present); a ``category``/``Category`` column, if any, is kept.
- A folder holding the HPDv2 benchmark (``anime.json`` ... ``photo.json``): the four styles, 800 prompts each,
  style as category.
- A named prompt set from :data:`PROMPT_SETS`, which plugins fill through :func:`register_prompt_set` (the shapes
  world registers ``toy`` / ``toy-train``: its held-out evaluation prompts / pretraining captions, with the shape
  as category).
- Anything else that is not a local path is taken as a hub dataset id: ``datasets.load_dataset(source, split=split)``.

Bad input (a missing or empty file, bytes that are not UTF-8, a missing column, a row without a prompt) raises
:class:`PromptFileError` naming the file, the row or column, and what to do.

Example::

    from diffusion_pref.prompts import read_prompts
    records = read_prompts("PartiPrompts.tsv")
    records[0].prompt, records[0].category   # ('bond', 'Abstract')
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

from diffusion_pref.suggest import did_you_mean

# The four HPDv2 benchmark styles in the order hpsv2.benchmark_prompts('all') lists them; drawbench.json sits in the
# same folder but is not one of the styles.
HPDV2_STYLES = ("anime", "concept-art", "paintings", "photo")
_HPDV2_FILE_CATEGORIES = HPDV2_STYLES + ("drawbench",)
_DEFAULT_PROMPT_COLUMNS = ("prompt", "Prompt", "caption", "prompts", "text")
_CATEGORY_COLUMNS = ("category", "Category")


@dataclass(frozen=True)
class PromptRecord:
    prompt: str
    category: Optional[str] = None


class PromptFileError(ValueError):
    """A prompt source that cannot be read; the message names the file and what to do."""


def read_prompts(source: str | Path, column: Optional[str] = None, split: str = "train") -> List[PromptRecord]:
    """Every prompt of ``source`` in order; see the module docstring for the layouts understood."""
    path = Path(source)
    if path.is_dir():
        records = _read_folder(path, column)
    elif path.is_file():
        records = _read_file(path, column)
    elif str(source) in PROMPT_SETS:
        records = PROMPT_SETS[str(source)]()
    elif path.suffix.lower() in _READERS or str(source).startswith((".", "/", "~")):
        raise PromptFileError(f"prompt file {source} does not exist; set generate.prompts to an existing file")
    else:
        records = _read_hub_dataset(str(source), column, split)
    if not records:
        raise PromptFileError(f"{source} holds no prompts; give a file with at least one prompt")
    return records


def _read_file(path: Path, column: Optional[str]) -> List[PromptRecord]:
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise PromptFileError(
            f"{path}: unknown prompt file type '{path.suffix}'; use .txt, .json, .jsonl, .tsv, .csv or .parquet"
        )
    return reader(path, column)


def _read_folder(path: Path, column: Optional[str]) -> List[PromptRecord]:
    styles = [path / f"{style}.json" for style in HPDV2_STYLES if (path / f"{style}.json").is_file()]
    if styles:
        return [record for file in styles for record in _read_json(file, column)]
    shards = sorted(path.glob("*.parquet"))
    if shards:
        return [record for file in shards for record in _read_parquet(file, column)]
    raise PromptFileError(
        f"folder {path} holds neither the HPDv2 benchmark files ({', '.join(s + '.json' for s in HPDV2_STYLES)}) "
        "nor *.parquet files; point generate.prompts at a prompt file instead"
    )


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        # utf-8-sig: files saved by spreadsheet programs often start with a byte-order mark.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise PromptFileError(
            f"{path} is not UTF-8 text (invalid byte 0x{data[err.start]:02x} at byte {err.start}, line {line}); "
            "re-save it as UTF-8"
        ) from None


def _read_txt(path: Path, column: Optional[str]) -> List[PromptRecord]:
    _no_column(path, column)
    return [PromptRecord(line.strip()) for line in _read_text(path).splitlines() if line.strip()]


def _parse_json(path: Path, text: str, what: str = "") -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise PromptFileError(f"{path}{what} is not valid JSON: {err}") from None


def _read_json(path: Path, column: Optional[str]) -> List[PromptRecord]:
    items = _parse_json(path, _read_text(path))
    if not isinstance(items, list):
        raise PromptFileError(
            f"{path} holds a JSON {type(items).__name__}; expected a list of prompt strings or of objects with a "
            "'prompt' key"
        )
    category = path.stem if path.stem in _HPDV2_FILE_CATEGORIES else None
    return [_json_item(item, path, f"item {i}", column, category) for i, item in enumerate(items)]


def _read_jsonl(path: Path, column: Optional[str]) -> List[PromptRecord]:
    records = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if line.strip():
            item = _parse_json(path, line, f" (line {number})")
            records.append(_json_item(item, path, f"line {number}", column, None))
    return records


def _json_item(item: Any, path: Path, where: str, column: Optional[str], category: Optional[str]) -> PromptRecord:
    if isinstance(item, str) and column is None:
        return PromptRecord(_check_prompt(item, path, where), category)
    if isinstance(item, dict):
        key = column or next((k for k in _DEFAULT_PROMPT_COLUMNS if k in item), None)
        if key is None or key not in item:
            raise PromptFileError(
                f"{path} {where} has no {repr(column) if column else 'prompt'} key (keys: {', '.join(map(str, item))}); "
                "set generate.prompt_column to the key that holds the prompt"
            )
        found = next((item[k] for k in _CATEGORY_COLUMNS if k in item), category)
        return PromptRecord(_check_prompt(item[key], path, where), None if found is None else str(found))
    expected = "an object" if column else "a string or an object"
    raise PromptFileError(f"{path} {where} is a JSON {type(item).__name__}; expected {expected} with the prompt")


def _read_table_text(path: Path, column: Optional[str]) -> List[PromptRecord]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    # Quoting off for TSV: PartiPrompts has prompts with unbalanced double quotes.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.DictReader(io.StringIO(_read_text(path)), delimiter=delimiter, quoting=quoting)
    header = reader.fieldnames or []
    key = _pick_column(header, column, path)
    category_key = next((k for k in _CATEGORY_COLUMNS if k in header), None)
    records = []
    for number, row in enumerate(reader, start=2):  # line 1 is the header
        category = row.get(category_key) if category_key else None
        records.append(PromptRecord(_check_prompt(row[key], path, f"line {number}"), category or None))
    return records


def _read_parquet(path: Path, column: Optional[str]) -> List[PromptRecord]:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as err:  # pyarrow raises several types for a file that is not parquet
        raise PromptFileError(f"{path} could not be read as parquet ({err})") from None
    key = _pick_column(schema.names, column, path)
    category_key = next((k for k in _CATEGORY_COLUMNS if k in schema.names), None)
    table = pq.read_table(path, columns=[key] + ([category_key] if category_key else []))
    categories = table.column(category_key).to_pylist() if category_key else None
    return _records_from_columns(table.column(key).to_pylist(), categories, path)


def _read_hub_dataset(source: str, column: Optional[str], split: str) -> List[PromptRecord]:
    import datasets

    try:
        dataset = datasets.load_dataset(source, split=split)
    except Exception as err:  # offline, unknown id, unknown split: all end here
        hint = did_you_mean(source, PROMPT_SETS)
        raise PromptFileError(
            f"'{source}' is not a local file or folder{', nor a named prompt set (' + hint + ')' if hint else ''}, "
            f"and loading it as hub dataset (split '{split}') failed: {err}; "
            "check the path, or the dataset id, its split and your network"
        ) from None
    key = _pick_column(dataset.column_names, column, source)
    category_key = next((k for k in _CATEGORY_COLUMNS if k in dataset.column_names), None)
    categories = dataset[category_key] if category_key else None
    if categories is not None and hasattr(dataset.features[category_key], "int2str"):
        categories = dataset.features[category_key].int2str(categories)  # ClassLabel columns (DrawBench)
    return _records_from_columns(dataset[key], categories, source)


def _records_from_columns(
    prompts: Sequence[Any], categories: Optional[Sequence[Any]], where: Any
) -> List[PromptRecord]:
    return [
        PromptRecord(
            _check_prompt(prompt, where, f"row {i}"),
            None if categories is None or categories[i] is None else str(categories[i]),
        )
        for i, prompt in enumerate(prompts)
    ]


def _pick_column(names: Iterable[str], column: Optional[str], where: Any) -> str:
    names = list(names)
    if column is not None:
        if column not in names:
            raise PromptFileError(
                f"{where} has no column '{column}' (columns: {', '.join(names)}); set generate.prompt_column to one of them"
            )
        return column
    for name in _DEFAULT_PROMPT_COLUMNS:
        if name in names:
            return name
    raise PromptFileError(
        f"{where} has none of the prompt columns {', '.join(_DEFAULT_PROMPT_COLUMNS)} (columns: {', '.join(names)}); "
        "set generate.prompt_column to the column that holds the prompts"
    )


def _check_prompt(value: Any, where: Any, position: str) -> str:
    if not isinstance(value, str):
        raise PromptFileError(
            f"{where} {position}: the prompt is {type(value).__name__}, not text; fix or remove that row"
        )
    if not value.strip():
        raise PromptFileError(f"{where} {position}: the prompt is empty; fix or remove that row")
    return value


def _no_column(path: Path, column: Optional[str]) -> None:
    if column is not None:
        raise PromptFileError(
            f"{path} is plain text with one prompt per line; it has no columns (unset generate.prompt_column)"
        )


# name -> a function returning the set's records; filled by plugins (see diffusion_pref.plugins).
PROMPT_SETS: Dict[str, Callable[[], List[PromptRecord]]] = {}


def register_prompt_set(name: str, load: Callable[[], List[PromptRecord]]) -> None:
    """Make ``read_prompts(name)`` return ``load()`` (checked before the hub, after local paths)."""
    PROMPT_SETS[name] = load


_READERS = {
    ".txt": _read_txt,
    ".json": _read_json,
    ".jsonl": _read_jsonl,
    ".tsv": _read_table_text,
    ".csv": _read_table_text,
    ".parquet": _read_parquet,
}

__all__ = ["HPDV2_STYLES", "PROMPT_SETS", "PromptFileError", "PromptRecord", "read_prompts", "register_prompt_set"]

from diffusion_pref.plugins import load_plugins  # noqa: E402  (after the registry it fills)

load_plugins()
