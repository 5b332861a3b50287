"""Load datasets named on the command line: a Hub id, or local .json/.jsonl/.parquet files."""

from __future__ import annotations

import os

from posttrain._errors import DataError, DataNotFoundError

__all__ = ["load_dataset_from_config", "load_dataset_by_name", "check_data_file"]

_LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def check_data_file(path: str) -> None:
    """Raise ``ValueError`` naming the file and line when a local JSON/JSONL file is empty or a row is not an object.

    ``datasets``/pyarrow crash (StopIteration, even a segmentation fault) on such files instead
    of saying what is wrong, so JSON files are read once here first. Other formats pass through.
    """
    import json

    ext = os.path.splitext(path)[1].lower()
    if ext == ".jsonl" or (ext == ".json" and not _is_one_json_document(path)):
        rows = 0
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path} line {lineno}: invalid JSON ({exc.msg}): fix or delete the line.") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path} line {lineno}: a row must be a JSON object of column: value, got {line.strip()[:60]!r}: fix or delete the line.")
                rows += 1
        if rows == 0:
            raise DataError(f"{path} has no rows: it is empty. Give one JSON object per line, e.g. {{\"text\": \"...\"}}.")
    elif ext == ".json":
        if os.path.getsize(path) == 0 or not _first_line(path):
            raise DataError(f"{path} has no rows: the file is empty.")
        with open(path, encoding="utf-8") as fh:
            try:
                data = json.load(fh)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {exc.lineno}: invalid JSON ({exc.msg}).") from None
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))  # {"data": [rows]}, which datasets reads with field=
        if isinstance(data, list):
            if not data:
                raise DataError(f"{path} has no rows: the list is empty.")
            for index, row in enumerate(data):
                if not isinstance(row, dict):
                    raise DataError(f"{path} row {index}: a row must be a JSON object of column: value, got {json.dumps(row)[:60]}: fix or delete the row.")
    elif os.path.getsize(path) == 0:
        raise DataError(f"{path} has no rows: the file is empty.")


def _first_line(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                return line.strip()
    return ""


def _is_one_json_document(path: str) -> bool:
    """Whether a .json file holds one JSON document (a list or a dict), not JSON lines."""
    import json

    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    if not text.strip():
        return True  # reported as empty below
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        return exc.msg != "Extra data"
    return True


def load_dataset_by_name(name: str, split: str):
    """Return split ``split`` of a Hub dataset or a local file/directory.

    A local file is loaded by its extension (.json, .jsonl, .parquet, .csv) and has one split,
    ``train``. A local directory is either a saved ``Dataset``/``DatasetDict``
    (``save_to_disk``) or holds data files; files named like ``<split>.jsonl`` map to that split.

    Raises:
        FileNotFoundError: a path-like name that does not exist.
        ValueError: an unsupported extension or a missing split (the message lists the splits).
    """
    import datasets

    if os.path.isfile(name):
        ext = os.path.splitext(name)[1].lower()
        if ext not in _LOCAL_BUILDERS:
            raise DataError(f"dataset_name={name!r}: unsupported file type {ext!r}; use one of {', '.join(_LOCAL_BUILDERS)}.")
        check_data_file(name)
        dd = datasets.load_dataset(_LOCAL_BUILDERS[ext], data_files={"train": name})
    elif os.path.isdir(name):
        if os.path.exists(os.path.join(name, "dataset_info.json")) or os.path.exists(os.path.join(name, "dataset_dict.json")):
            loaded = datasets.load_from_disk(name)
            dd = loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})
        else:
            files: dict[str, list[str]] = {}
            builder = None
            for fname in sorted(os.listdir(name)):
                stem, ext = os.path.splitext(fname)
                if ext.lower() not in _LOCAL_BUILDERS:
                    continue
                builder = builder or _LOCAL_BUILDERS[ext.lower()]
                check_data_file(os.path.join(name, fname))
                split_name = stem.split("-")[0] if stem.split("-")[0] in ("train", "test", "validation", "eval") else "train"
                files.setdefault(split_name, []).append(os.path.join(name, fname))
            if not files:
                raise DataError(f"dataset_name={name!r} is a directory with no .json/.jsonl/.parquet/.csv files and no saved dataset.")
            dd = datasets.load_dataset(builder, data_files=files)
    elif name.startswith((".", "/", "~")) or name.endswith(tuple(_LOCAL_BUILDERS)):
        raise DataNotFoundError(f"dataset_name={name!r} looks like a local path but does not exist: check the path, or give a Hub dataset id.")
    else:
        return datasets.load_dataset(name, split=split)
    if split not in dd:
        raise DataError(f"dataset_name={name!r} has no split {split!r}; available splits: {', '.join(dd)}. Set --dataset_split.")
    return dd[split]


def load_dataset_from_config(config):
    """Return ``(train_dataset, eval_dataset or None)`` from ``config.dataset_name`` and its split fields.

    Raises:
        ValueError: ``dataset_name`` is not set.
    """
    if not config.dataset_name:
        raise DataError("dataset_name is not set: pass --dataset_name (a Hub id or a local .json/.jsonl/.parquet file or directory).")
    train = load_dataset_by_name(config.dataset_name, config.dataset_split)
    evaluation = load_dataset_by_name(config.dataset_name, config.eval_dataset_split) if config.eval_dataset_split else None
    return train, evaluation
