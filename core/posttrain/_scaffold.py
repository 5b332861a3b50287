"""``posttrain new``: write a complete, installable method plugin that passes the conformance suite.

The generated distribution is what an outside lab starts from: a pyproject with the entry point and
the core requirement, a light spec and config, a working trainer on the public API only, the
conformance tests, a learning test, a docs page stub and a README. Two families:

* ``sft`` (default): supervised fine-tuning on prompt/completion rows, loss on completion tokens.
* ``preference``: a reference-free pairwise logistic loss on length-normalized log-probabilities
  (chosen vs rejected), the shape of SimPO/CPO-style methods.
"""

from __future__ import annotations

import os
import re
from typing import Any

__all__ = ["FAMILIES", "write_plugin"]

#: family -> (dataset format the template trains on, one line describing it)
FAMILIES = {
    "sft": ("prompt_completion", "supervised fine-tuning on prompt/completion rows (loss on completion tokens)"),
    "preference": ("preference", "reference-free pairwise logistic loss on length-normalized log-probs (chosen vs rejected)"),
}

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


_CLASS_PREFIX_RE = re.compile(r"^[A-Z][A-Za-z0-9]*$")


def write_plugin(name: str, *, family: str = "sft", directory: str = ".", class_prefix: str | None = None) -> str:
    """Write the plugin ``posttrain-<name>`` into ``directory`` and return its folder.

    Args:
        name: Method id (lowercase letters, digits, underscores), e.g. ``"my_method"``.
        family: ``"sft"`` or ``"preference"`` (see :data:`FAMILIES`).
        directory: The parent folder; ``<directory>/posttrain-<name>`` must not exist or be empty.
        class_prefix: The classes are ``<prefix>Config`` and ``<prefix>Trainer``; default: the name
            in CamelCase (``my_method`` -> ``MyMethod``). TRL spells acronyms in capitals
            (``class_prefix="BCO"`` -> ``BCOConfig``, ``BCOTrainer``).

    Raises:
        ValueError: an invalid name, class prefix or family, or a non-empty target folder.
    """
    import posttrain

    if not _NAME_RE.match(name or ""):
        raise ValueError(f"method name {name!r} is invalid: use lowercase letters, digits and underscores, starting with a letter (e.g. 'my_method').")
    if class_prefix is not None and not _CLASS_PREFIX_RE.match(class_prefix):
        raise ValueError(f"--class-prefix {class_prefix!r} is invalid: use a Python class name start, a capital letter then letters or digits (e.g. 'BCO').")
    if family not in FAMILIES:
        raise ValueError(f"--family {family!r} is unknown: use one of {', '.join(FAMILIES)}.")
    dist = "posttrain-" + name.replace("_", "-")
    root = os.path.join(directory, dist)
    if os.path.exists(root) and os.listdir(root):
        raise ValueError(f"{root} exists and is not empty: choose another --dir or remove it.")
    major, minor = posttrain.API_VERSION.split(".")
    values = {
        "name": name,
        "dist": dist,
        "package": f"posttrain_{name}",
        "Camel": class_prefix or _camel(name),
        "family": family,
        "data_format": FAMILIES[family][0],
        "family_line": FAMILIES[family][1],
        "requirement": f"posttrain>={major}.{minor},<{int(major) + 1}",
        "plugin_api": f"{major}.{minor}",
        "signals": '{"preference_margin": "rewards/margins", "preference_accuracy": "rewards/accuracies"}' if family == "preference" else "{}",
    }
    files = {
        "pyproject.toml": _PYPROJECT,
        "README.md": _README,
        f"docs/{name}.md": _DOCS,
        f"{values['package']}/__init__.py": _INIT,
        f"{values['package']}/_spec.py": _SPEC,
        f"{values['package']}/config.py": _CONFIG_SFT if family == "sft" else _CONFIG_PREF,
        f"{values['package']}/trainer.py": _TRAINER_SFT if family == "sft" else _TRAINER_PREF,
        f"tests/test_{name}_conformance.py": _TEST_CONFORMANCE,
        f"tests/test_{name}_learning.py": _TEST_LEARNING_SFT if family == "sft" else _TEST_LEARNING_PREF,
    }
    for rel, template in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(_render(template, values))
    return root


def _render(template: str, values: dict[str, Any]) -> str:
    out = template
    for key, value in values.items():
        out = out.replace("{{" + key + "}}", str(value))
    leftover = re.findall(r"\{\{\w+\}\}", out)
    assert not leftover, f"unrendered template keys {leftover}"
    return out.lstrip("\n")


_PYPROJECT = '''
[build-system]
requires = ["setuptools>=68", "wheel"]
build-backend = "setuptools.build_meta"

[project]
name = "{{dist}}"
version = "0.1.0"
description = "posttrain method plugin {{name}}: {{family_line}}."
readme = "README.md"
requires-python = ">=3.10"
license = { text = "Apache-2.0" }
# The plugin API this plugin is built for, and the next major that may break it.
dependencies = ["{{requirement}}"]

[project.optional-dependencies]
test = ["pytest>=8"]

# The method id is the entry point's name; it must equal SPEC.name.
[project.entry-points."posttrain.methods"]
{{name}} = "{{package}}._spec:SPEC"

[tool.setuptools.packages.find]
include = ["{{package}}*"]

[tool.setuptools.package-data]
{{package}} = ["api_snapshot.json"]

[tool.pytest.ini_options]
addopts = "-p posttrain.testing"
'''

_README = '''
# {{dist}}

A [posttrain](https://github.com/posttrain/posttrain) method plugin: **{{name}}**, {{family_line}}.

Generated by `posttrain new {{name}} --family {{family}}`; experimental (0.x) until you release 1.0.

```bash
pip install -e .                      # registers the method: `posttrain list` shows {{name}}
pytest tests                          # the conformance suite and the learning test
posttrain train {{name}} --allow-experimental {{name}} --model_name_or_path MODEL --dataset_name DATA.jsonl --output_dir out
```

In Python:

```python
from posttrain.experimental.{{name}} import {{Camel}}Config, {{Camel}}Trainer
```

- `{{package}}/_spec.py`: the method's spec (light: imports nothing heavy).
- `{{package}}/config.py`: `{{Camel}}Config`, a `posttrain.TrainingConfig` subclass.
- `{{package}}/trainer.py`: `{{Camel}}Trainer`, on posttrain's public API only.
- `tests/test_{{name}}_conformance.py`: posttrain's conformance suite against this method
  (same as `pytest -p posttrain.conformance --posttrain-method {{name}}`).
- `docs/{{name}}.md`: the method page (formulas, paper -> config table, departures).

Before a 1.0 release: set `maturity="stable"` in the spec, version `1.0.0` in pyproject.toml, run
`posttrain snapshot {{name}} --write` and commit `{{package}}/api_snapshot.json`; from then on the
conformance suite fails on a change to the public surface without the semver bump it needs.
'''

_DOCS = '''
# {{name}}

{{family_line}}.

## Objective

Write the loss here, with the symbols the code uses.

## Paper -> config

| paper | symbol / hyperparameter | config field | default |
|---|---|---|---|
| (Authors, year, title, arXiv id) | | | |

## Data

Dataset format `{{data_format}}` (TRL's names): see `posttrain info {{name}}`.

## Departures

None yet.
'''

_INIT = '''
"""{{dist}}: {{family_line}}.

Keep this file light: ``posttrain list`` imports ``{{package}}._spec``, which imports this package
first. Use the method through the gate::

    from posttrain.experimental.{{name}} import {{Camel}}Config, {{Camel}}Trainer
"""

from __future__ import annotations

__all__ = ["{{Camel}}Config", "{{Camel}}Trainer"]


def __getattr__(name: str):
    if name == "{{Camel}}Config":
        from {{package}}.config import {{Camel}}Config

        return {{Camel}}Config
    if name == "{{Camel}}Trainer":
        from {{package}}.trainer import {{Camel}}Trainer

        return {{Camel}}Trainer
    raise AttributeError(f"module '{{package}}' has no attribute {name!r}")
'''

_SPEC = '''
"""The {{name}} method spec (light: imports nothing but posttrain)."""

from posttrain import MethodSpec

SPEC = MethodSpec(
    name="{{name}}",
    maturity="experimental",  # "stable" needs version >= 1.0 and a committed api_snapshot.json
    plugin_api="{{plugin_api}}",  # the plugin API it is written against (a literal; raise it with the pyproject requirement)
    summary="{{family_line}}",
    family="{{family}}",
    trainer="{{package}}.trainer:{{Camel}}Trainer",
    config="{{package}}.config:{{Camel}}Config",
    data_format="{{data_format}}",
    tiny_run={"max_length": 64},  # config overrides for the conformance suite's few-step tiny run
    signals={{signals}},  # posttrain.SignalRole -> your metric name: what the diagnostics may read
    papers=(),  # "Authors year, Title, arXiv:XXXX.XXXXX" (check the id)
    presets={},  # name -> posttrain.Preset(summary=..., overrides={...}, paper="arXiv:...")
)
'''

_CONFIG_SFT = '''
"""Config of {{name}} (light: imports only posttrain)."""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain import ConfigError, TrainingConfig

__all__ = ["{{Camel}}Config"]


@dataclass(kw_only=True)
class {{Camel}}Config(TrainingConfig):
    """Settings of {{name}}: every field has help text (the conformance suite checks it)."""

    max_length: int = field(default=512, metadata={"help": "Truncate prompt + completion to this many tokens (the prompt keeps at least one)."})
    prompt_field: str = field(default="prompt", metadata={"help": "Dataset column holding the prompt (a string)."})
    completion_field: str = field(default="completion", metadata={"help": "Dataset column holding the completion (a string)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_length < 2:
            raise ConfigError(f"max_length={self.max_length} is invalid: a next-token loss needs at least 2 tokens.")
'''

_CONFIG_PREF = '''
"""Config of {{name}} (light: imports only posttrain)."""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain import ConfigError, TrainingConfig

__all__ = ["{{Camel}}Config"]


@dataclass(kw_only=True)
class {{Camel}}Config(TrainingConfig):
    """Settings of {{name}}: every field has help text (the conformance suite checks it)."""

    beta: float = field(default=2.0, metadata={"help": "Scale of the length-normalized log-prob margin inside the logistic loss."})
    margin: float = field(default=0.5, metadata={"help": "Target margin subtracted from the scaled difference (0 disables it)."})
    max_length: int = field(default=512, metadata={"help": "Truncate prompt + response to this many tokens."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta <= 0:
            raise ConfigError(f"beta={self.beta} is invalid: use a positive scale (e.g. 2.0).")
        if self.max_length < 2:
            raise ConfigError(f"max_length={self.max_length} is invalid: a next-token loss needs at least 2 tokens.")
'''

_TRAINER_SFT = '''
"""{{name}}: {{family_line}} (heavy: imports torch).

Loss: the sum of next-token negative log-likelihoods of completion tokens, divided by the number of
completion tokens in the optimizer step (``num_items_in_batch``), so per-device batch 8 x
accumulation 1 equals 1 x 8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from posttrain import ConfigError, TrainerSurface, TrainingLoop, as_config, prompt_completion_boundary

from {{package}}.config import {{Camel}}Config

__all__ = ["{{Camel}}Trainer"]


class {{Camel}}Trainer(TrainerSurface):
    """Train a causal LM with {{name}}.

    Args:
        model: A model or a Hub id / local directory.
        args: A :class:`{{Camel}}Config` (or a dict / TRL-style config object).
        train_dataset: Rows with ``prompt`` and ``completion`` strings.
        eval_dataset: Optional rows of the same shape.
        processing_class: The tokenizer (loaded with the model when omitted).
        callbacks: ``transformers.TrainerCallback`` objects.
        peft_config: Optional PEFT config.
        allow_experimental: Python opt-in for this experimental method.
    """

    def __init__(self, model=None, args=None, train_dataset=None, eval_dataset=None, processing_class=None, callbacks=None,
                 peft_config=None, allow_experimental=False):
        self.args = as_config(args, {{Camel}}Config)
        # The maturity gate runs here, before anything else: TrainingLoop checks the opt-in.
        self.loop = TrainingLoop(self.args, method="{{name}}", allow_experimental=allow_experimental, callbacks=callbacks)
        self.model, self.processing_class = self.loop.load_model(model, processing_class=processing_class, peft_config=peft_config)
        tok = self.processing_class
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.train_dataset = self.process_dataset(train_dataset or [], "train_dataset")
        self.eval_dataset = self.process_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        self.loop.setup(self.model, method=self)  # checks this object against posttrain.MethodProtocol

    # train(), evaluate(), save_model(), state, callbacks: posttrain.TrainerSurface, delegated to self.loop.

    def process_dataset(self, rows, name: str) -> list[dict]:
        """Tokenize prompt + completion; the labels mask the prompt. Bad rows fail naming the row and column."""
        out = []
        for i, row in enumerate(rows):
            for column in (self.args.prompt_field, self.args.completion_field):
                if not isinstance(row.get(column), str):
                    raise ConfigError(f"{name} row {i}: column {column!r} must be a string, got {type(row.get(column)).__name__}; "
                                      f"set prompt_field / completion_field to your column names.")
            prompt = list(self.processing_class(row[self.args.prompt_field])["input_ids"])
            full = list(self.processing_class(row[self.args.prompt_field] + row[self.args.completion_field])["input_ids"])
            full = full[: self.args.max_length]
            start = max(1, prompt_completion_boundary(prompt, full))
            if start < len(full):
                out.append({"input_ids": full, "completion_start": start})
        return out

    def collate(self, rows: list[dict]) -> dict:
        longest = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(rows), longest), -100, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)  # (B, T)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, r["completion_start"] : n] = ids[i, r["completion_start"] : n]
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def count_items(self, batch: dict) -> int:
        return int((batch["labels"][:, 1:] != -100).sum())

    def compute_loss(self, model, batch: dict, num_items_in_batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
        labels = batch["labels"][:, 1:]  # (B, T-1): token t+1 is predicted at position t
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
        tokens = (labels != -100).sum().clamp(min=1)
        return nll / num_items_in_batch, {"completion_nll": (nll / tokens).detach()}
'''

_TRAINER_PREF = '''
"""{{name}}: {{family_line}} (heavy: imports torch).

For a pair (chosen y_w, rejected y_l) of prompt x, with avg log-prob
``r(y) = (1/|y|) sum_t log pi(y_t | x, y_<t)``, the loss is
``-log sigmoid(beta * (r(y_w) - r(y_l)) - margin)``, averaged over the pairs of the optimizer step
(``num_items_in_batch`` counts pairs). No reference model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from posttrain import ConfigError, TrainerSurface, TrainingLoop, as_config, prompt_completion_boundary

from {{package}}.config import {{Camel}}Config

__all__ = ["{{Camel}}Trainer"]


class {{Camel}}Trainer(TrainerSurface):
    """Train a causal LM with {{name}} on preference pairs.

    Args:
        model: A model or a Hub id / local directory.
        args: A :class:`{{Camel}}Config` (or a dict / TRL-style config object).
        train_dataset: Rows with ``prompt``, ``chosen`` and ``rejected`` strings.
        eval_dataset: Optional rows of the same shape.
        processing_class: The tokenizer (loaded with the model when omitted).
        callbacks: ``transformers.TrainerCallback`` objects.
        peft_config: Optional PEFT config.
        allow_experimental: Python opt-in for this experimental method.
    """

    def __init__(self, model=None, args=None, train_dataset=None, eval_dataset=None, processing_class=None, callbacks=None,
                 peft_config=None, allow_experimental=False):
        self.args = as_config(args, {{Camel}}Config)
        # The maturity gate runs here, before anything else: TrainingLoop checks the opt-in.
        self.loop = TrainingLoop(self.args, method="{{name}}", allow_experimental=allow_experimental, callbacks=callbacks)
        self.model, self.processing_class = self.loop.load_model(model, processing_class=processing_class, peft_config=peft_config)
        tok = self.processing_class
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.train_dataset = self.process_dataset(train_dataset or [], "train_dataset")
        self.eval_dataset = self.process_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        self.loop.setup(self.model, method=self)  # checks this object against posttrain.MethodProtocol

    # train(), evaluate(), save_model(), state, callbacks: posttrain.TrainerSurface, delegated to self.loop.

    def _encode(self, prompt: str, response: str) -> tuple[list[int], int]:
        prompt_ids = list(self.processing_class(prompt)["input_ids"])
        full = list(self.processing_class(prompt + response)["input_ids"])[: self.args.max_length]
        return full, max(1, prompt_completion_boundary(prompt_ids, full))

    def process_dataset(self, rows, name: str) -> list[dict]:
        """Tokenize each pair; bad rows fail naming the row and the column."""
        out = []
        for i, row in enumerate(rows):
            for column in ("prompt", "chosen", "rejected"):
                if not isinstance(row.get(column), str):
                    raise ConfigError(f"{name} row {i}: column {column!r} must be a string, got {type(row.get(column)).__name__}; "
                                      "this method needs prompt / chosen / rejected string columns.")
            chosen, chosen_start = self._encode(row["prompt"], row["chosen"])
            rejected, rejected_start = self._encode(row["prompt"], row["rejected"])
            if chosen_start < len(chosen) and rejected_start < len(rejected):
                out.append({"chosen": chosen, "chosen_start": chosen_start, "rejected": rejected, "rejected_start": rejected_start})
        return out

    def collate(self, rows: list[dict]) -> dict:
        """Stack chosen rows then rejected rows: (2B, T)."""
        seqs = [(r["chosen"], r["chosen_start"]) for r in rows] + [(r["rejected"], r["rejected_start"]) for r in rows]
        longest = max(len(s) for s, _ in seqs)
        ids = torch.full((len(seqs), longest), self.pad_id, dtype=torch.long)  # (2B, T)
        labels = torch.full((len(seqs), longest), -100, dtype=torch.long)  # (2B, T)
        mask = torch.zeros((len(seqs), longest), dtype=torch.long)  # (2B, T)
        for i, (s, start) in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            labels[i, start : len(s)] = ids[i, start : len(s)]
            mask[i, : len(s)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def count_items(self, batch: dict) -> int:
        return batch["input_ids"].shape[0] // 2  # pairs

    def average_logps(self, model, batch: dict) -> torch.Tensor:
        """Return each sequence's mean log-prob over its response tokens: (2B,)."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]  # (2B, T-1, V)
        labels = batch["labels"][:, 1:]  # (2B, T-1)
        keep = labels != -100
        token_logps = -F.cross_entropy(logits.transpose(1, 2).float(), labels.clamp(min=0), reduction="none")  # (2B, T-1)
        return (token_logps * keep).sum(-1) / keep.sum(-1).clamp(min=1)

    def compute_loss(self, model, batch: dict, num_items_in_batch):
        logps = self.average_logps(model, batch)  # (2B,)
        chosen, rejected = logps.chunk(2)  # (B,), (B,)
        z = self.args.beta * (chosen - rejected) - self.args.margin  # (B,)
        losses = -F.logsigmoid(z)  # (B,)
        metrics = {
            "rewards/margins": (self.args.beta * (chosen - rejected)).mean().detach(),
            "rewards/accuracies": (chosen > rejected).float().mean().detach(),
            "logps/chosen": chosen.mean().detach(),
            "logps/rejected": rejected.mean().detach(),
        }
        return losses.sum() / num_items_in_batch, metrics
'''

_TEST_CONFORMANCE = '''
"""posttrain's conformance suite against this plugin (the same as `pytest -p posttrain.conformance --posttrain-method {{name}}`)."""

from posttrain.conformance.suite import *  # noqa: F401,F403  (the tests, their fixtures and the parametrization)

POSTTRAIN_METHODS = ["{{name}}"]
'''

_TEST_LEARNING_SFT = '''
"""The method learns: held-out completion NLL falls on a tiny arithmetic task."""

import posttrain
from posttrain.testing import make_tiny_datasets


def test_heldout_completion_nll_falls(tiny_model, tiny_tokenizer, tmp_path):
    posttrain.activate("{{name}}", allow_experimental=True)
    from {{package}} import {{Camel}}Config, {{Camel}}Trainer

    data = make_tiny_datasets(n=48, seed=1)["prompt_completion"]
    train, heldout = data.select(range(40)), data.select(range(40, 48))
    args = {{Camel}}Config(output_dir=str(tmp_path), max_steps=40, per_device_train_batch_size=8, learning_rate=1e-2,
                       logging_steps=10, save_strategy="no", report_to="none", disable_tqdm=True, gradient_checkpointing=False)
    trainer = {{Camel}}Trainer(model=tiny_model, args=args, train_dataset=train, eval_dataset=heldout, processing_class=tiny_tokenizer)
    before = trainer.evaluate()["eval_completion_nll"]
    trainer.train()
    after = trainer.evaluate()["eval_completion_nll"]
    assert after < 0.7 * before, f"held-out completion NLL {before:.3f} -> {after:.3f}"
'''

_TEST_LEARNING_PREF = '''
"""The method learns: on held-out prompts the pairwise loss falls and the preference accuracy rises.

Task: for an arithmetic prompt prefer a number (the right sum) over a word; a tiny model can learn
that rule from 40 pairs and apply it to unseen prompts.
"""

import posttrain
from datasets import Dataset
from posttrain.testing import make_tiny_datasets

WORDS = ["cat", "dog", "tree", "blue", "house", "river", "green", "stone"]


def test_heldout_preference_loss_falls(tiny_model, tiny_tokenizer, tmp_path):
    posttrain.activate("{{name}}", allow_experimental=True)
    from {{package}} import {{Camel}}Config, {{Camel}}Trainer

    pairs = make_tiny_datasets(n=48, seed=1)["preference"]
    data = Dataset.from_dict({"prompt": pairs["prompt"], "chosen": pairs["chosen"], "rejected": [" " + WORDS[i % len(WORDS)] for i in range(48)]})
    train, heldout = data.select(range(40)), data.select(range(40, 48))
    args = {{Camel}}Config(output_dir=str(tmp_path), max_steps=40, per_device_train_batch_size=8, learning_rate=1e-2,
                       logging_steps=10, save_strategy="no", report_to="none", disable_tqdm=True, gradient_checkpointing=False)
    trainer = {{Camel}}Trainer(model=tiny_model, args=args, train_dataset=train, eval_dataset=heldout, processing_class=tiny_tokenizer)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss"] < 0.5 * before["eval_loss"], f"held-out loss {before['eval_loss']:.3f} -> {after['eval_loss']:.3f}"
    assert after["eval_rewards/accuracies"] == 1.0, f"held-out accuracy {before['eval_rewards/accuracies']} -> {after['eval_rewards/accuracies']}"
'''
