"""Load datasets named on the command line: a Hub id, or local .json/.jsonl/.parquet files."""

from __future__ import annotations

import os

__all__ = ["load_dataset_from_config", "load_dataset_by_name"]

_LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


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
            raise ValueError(f"dataset_name={name!r}: unsupported file type {ext!r}; use one of {', '.join(_LOCAL_BUILDERS)}.")
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
                split_name = stem.split("-")[0] if stem.split("-")[0] in ("train", "test", "validation", "eval") else "train"
                files.setdefault(split_name, []).append(os.path.join(name, fname))
            if not files:
                raise ValueError(f"dataset_name={name!r} is a directory with no .json/.jsonl/.parquet/.csv files and no saved dataset.")
            dd = datasets.load_dataset(builder, data_files=files)
    elif name.startswith((".", "/", "~")) or name.endswith(tuple(_LOCAL_BUILDERS)):
        raise FileNotFoundError(f"dataset_name={name!r} looks like a local path but does not exist.")
    else:
        return datasets.load_dataset(name, split=split)
    if split not in dd:
        raise ValueError(f"dataset_name={name!r} has no split {split!r}; available splits: {', '.join(dd)}. Set --dataset_split.")
    return dd[split]


def load_dataset_from_config(config):
    """Return ``(train_dataset, eval_dataset or None)`` from ``config.dataset_name`` and its split fields.

    Raises:
        ValueError: ``dataset_name`` is not set.
    """
    if not config.dataset_name:
        raise ValueError("dataset_name is not set: pass --dataset_name (a Hub id or a local .json/.jsonl/.parquet file or directory).")
    train = load_dataset_by_name(config.dataset_name, config.dataset_split)
    evaluation = load_dataset_by_name(config.dataset_name, config.eval_dataset_split) if config.eval_dataset_split else None
    return train, evaluation
