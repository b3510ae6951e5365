"""Prompts from a dataset on disk, read through Hugging Face `datasets` without holding them in memory.

`data.prompts` / `data.eval_prompts` may name what `datasets` reads locally:
a .parquet, .arrow, .csv or .json file, a folder of such files (its splits
named from the file names, as `datasets.load_dataset(folder)` names them), or
a directory written by `save_to_disk` (a Dataset or a DatasetDict). The rows
stay in `datasets`' memory-mapped Arrow files: `DatasetPrompts` is a
read-only sequence over one column (`data.prompt_field`) that PromptStream
indexes row by row, so millions of prompts cost no Python list of them.

A prompt is a non-empty string, or a list of chat messages ({"role",
"content"} records) passed on as it is, for the chat template to render.
Every row is checked when the set is opened, vectorized over the Arrow
column: a missing, empty or non-text prompt is one line naming the dataset,
the row (counted from 0, as `dataset[i]` counts) and the key.

Nothing heavy is imported at the top: the config asks `is_dataset` before
torch or `datasets` load, and `datasets` is an optional extra.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fastbond.errors import FastbondError

# a file's suffix → the `datasets` builder that reads it (.jsonl and .txt stay fastbond's prompt files)
BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json"}
# what Dataset.save_to_disk / DatasetDict.save_to_disk write beside the data
SAVED_MARKERS = ("state.json", "dataset_dict.json")
# the split taken where a dataset holds several and the config names none
DEFAULT_SPLITS = {"train": ("train",), "eval": ("test", "validation")}
# the config keys that name a role's prompts and their split
KEYS = {"train": ("data.prompts", "data.prompts_split"), "eval": ("data.eval_prompts", "data.eval_prompts_split")}
# rows per Arrow read when a whole column is checked
ROWS_PER_READ = 65_536


def is_dataset(path: str | Path) -> bool:
    """A folder, or a file of a format only `datasets` reads; anything else is a prompt file."""
    path = Path(path)
    return path.is_dir() or path.suffix.lower() in BUILDERS


def missing_package(key: str, path: str | Path) -> str:
    return f"{key}={path} is a dataset: pip install 'fastbond[datasets]'"


def open_prompts(path: str | Path, split: str, field: str, dataset_split: str = "auto") -> DatasetPrompts:
    """The prompts of a dataset, for data.prompts (split "train") or data.eval_prompts (split "eval")."""
    key, split_key = KEYS[split]
    try:
        import datasets
    except ImportError:
        raise FastbondError(missing_package(key, path)) from None
    path = Path(path)
    if not path.exists():
        raise FastbondError(f"{key}: dataset not found: {path}")
    splits = _read_splits(datasets, path, key)
    name = _choose_split(splits, dataset_split, split, f"{key}={path}")
    source = f"{key}={path}" + (f" (split {name})" if len(splits) > 1 else "")
    return DatasetPrompts(splits[name], field, source)


def _read_splits(datasets, path: Path, key: str) -> dict:
    try:
        if path.is_dir() and any((path / marker).is_file() for marker in SAVED_MARKERS):
            loaded = datasets.load_from_disk(str(path))
        elif path.is_dir():
            loaded = datasets.load_dataset(str(path))
        else:
            loaded = datasets.load_dataset(BUILDERS[path.suffix.lower()], data_files=str(path))
    except Exception as error:  # a malformed file, a folder without data files: datasets' reason, on one line
        raise FastbondError(f"{key}={path}: datasets cannot read it ({_reason(error)})") from None
    # a saved Dataset is one split, named as datasets names a single file's rows
    return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}


def _reason(error: BaseException) -> str:
    """The innermost error's first line: datasets wraps a parser's error in its own generic one."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__


def _choose_split(splits: dict, wanted: str, split: str, source: str) -> str:
    split_key = KEYS[split][1]
    names = ", ".join(splits)
    if wanted != "auto":
        if wanted not in splits:
            raise FastbondError(f"config key '{split_key}': {source} has no split '{wanted}' (it holds {names})")
        return wanted
    if len(splits) == 1:
        return next(iter(splits))
    for name in DEFAULT_SPLITS[split]:
        if name in splits:
            return name
    raise FastbondError(f"{source} holds the splits {names}: name the one to use with {split_key}")


class DatasetPrompts(Sequence):
    """One column of a dataset as a read-only sequence: its length, a row, a slice (as a list).

    Reads go to the memory-mapped Arrow table; nothing is copied into Python
    until a row is asked for."""

    def __init__(self, dataset, field: str, source: str):
        self.source = source  # how errors name the set: "data.prompts=/path (split test)"
        self.field = field
        if field not in dataset.column_names:
            raise FastbondError(f"{source}: no column '{field}' (data.prompt_field); "
                                f"its columns: {', '.join(dataset.column_names)}")
        if dataset.num_rows == 0:
            raise FastbondError(f"{source} holds no prompts")
        self._rows = dataset.select_columns([field])
        check_rows(self._rows, field, source)

    def __len__(self) -> int:
        return self._rows.num_rows

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            rows = self._rows[start:stop] if step == 1 else self._rows[list(range(start, stop, step))]
            return rows[self.field]
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self.source}: row {index} of {len(self)}")
        return self._rows[index % len(self)][self.field]


def check_rows(rows, field: str, source: str) -> None:
    """Every row's prompt is text or chat messages, present and not empty; else one line naming the first bad row."""
    arrow_rows = rows.with_format("arrow")
    for start in range(0, rows.num_rows, ROWS_PER_READ):
        column = arrow_rows[start : start + ROWS_PER_READ][field].combine_chunks()
        found = _first_bad_row(column)
        if found is not None:
            row, why = found
            raise FastbondError(f"{source} row {start + row}: data.prompt_field '{field}' {why}")


def _first_bad_row(column) -> tuple[int, str] | None:
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0)
        return _earliest((_first(pc.is_null(column)), "is missing"), (_first(blank), "is empty"))
    if _is_messages(kind):
        flat = pc.list_flatten(column)
        bad_message = pc.or_(pc.or_(pc.is_null(flat), pc.is_null(pc.struct_field(flat, "role"))),
                             pc.is_null(pc.struct_field(flat, "content")))
        holding_bad = pc.min(pc.filter(pc.list_parent_indices(column), bad_message)).as_py()
        return _earliest((_first(pc.is_null(column)), "is missing"),
                         (_first(pc.equal(pc.list_value_length(column), 0)), "is empty"),
                         (holding_bad, "holds a message without a role or content"))
    return 0, f"holds {kind}, not a string or a list of chat messages ({{role, content}} records)"


def _is_messages(kind) -> bool:
    import pyarrow as pa

    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)) or not pa.types.is_struct(kind.value_type):
        return False
    fields = {field.name: field.type for field in kind.value_type}
    return all(name in fields and pa.types.is_string(fields[name]) for name in ("role", "content"))


def _first(mask) -> int | None:
    """The first row a boolean mask flags (a null counts as not flagged)."""
    import pyarrow.compute as pc

    row = pc.index(mask.fill_null(False), True).as_py()
    return row if row >= 0 else None


def _earliest(*found: tuple[int | None, str]) -> tuple[int, str] | None:
    rows = [(row, why) for row, why in found if row is not None]
    return min(rows) if rows else None
