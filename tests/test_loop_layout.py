"""The training loop stays readable: ``_loop.py`` is ``train()`` and its parts, the rest lives in named modules.

``TrainingLoop`` inherits its other parts as mixins (``_accelerator_setup``, ``_data_order``,
``_model_io``, ``_optimization``, ``_run_log``, ``_evaluation``). These tests fail when code piles
back into one file, when a part imports ``_loop`` (a circular import), or when the split changes
what plugins and users can call on the loop.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pathlib

import posttrain
from posttrain._loop import CallbackList, TrainingLoop, TrainingState, TrainOutput

PACKAGE = pathlib.Path(posttrain.__file__).resolve().parent
PARTS = ("_accelerator_setup", "_data_order", "_model_io", "_optimization", "_run_log", "_evaluation")

# TrainingLoop's public members before the split (plugin API 1.5, core 1.5.0): the split moves code, it adds or drops none.
PUBLIC_MEMBERS = {
    "add_trainable_model", "data_seed", "device", "evaluate", "evaluate_and_record", "is_deepspeed", "is_main_process",
    "load_model", "load_model_weights", "log", "prepare_frozen", "prompt_source", "push_to_hub", "record_evaluation",
    "save_model", "setup", "to_device", "train", "trainable_model", "trainable_model_names", "unwrapped_model", "zero_stage",
} | {"add_policy_module", "policy_module"}  # added in plugin API 1.7 (core 1.7.0)
# the parts of train(), in order: they stay in _loop.py, where a newcomer reads the loop
TRAIN_PARTS = ("__init__", "setup", "train", "_begin_run", "_draw_step", "_draw_produced_step", "_collated_by_workers", "_optimizer_step",
               "_backward_auxiliaries", "_step_auxiliaries", "_after_step", "_end_epoch", "_end_run")


def _line_count(module: str) -> int:
    return len((PACKAGE / f"{module}.py").read_text().splitlines())


def test_loop_module_stays_under_800_lines():
    assert _line_count("_loop") < 800, "posttrain/_loop.py keeps train() and its parts; move other code to the part it belongs to"


def test_each_part_of_the_loop_stays_under_700_lines():
    too_long = {part: _line_count(part) for part in PARTS if _line_count(part) >= 700}
    assert not too_long, f"split these parts of the loop further: {too_long}"


def test_training_loop_public_members_are_unchanged_by_the_split():
    assert {name for name in dir(TrainingLoop) if not name.startswith("_")} == PUBLIC_MEMBERS


def test_training_loop_inherits_every_part_as_a_mixin():
    bases = {base.__module__.rsplit(".", 1)[-1] for base in TrainingLoop.__mro__[1:-1]}
    assert bases == set(PARTS)


def test_the_parts_of_train_are_defined_in_the_loop_module():
    elsewhere = [name for name in TRAIN_PARTS if name not in vars(TrainingLoop)]
    assert not elsewhere, f"{elsewhere} moved out of posttrain/_loop.py"


def test_no_part_of_the_loop_imports_the_loop_module():
    offenders = []
    for part in PARTS:
        tree = ast.parse((PACKAGE / f"{part}.py").read_text())
        for node in ast.walk(tree):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names] if isinstance(node, ast.Import) else []
            offenders += [f"{part}: {name}" for name in names if name == "posttrain._loop" or name.endswith("._loop")]
    assert not offenders, f"a part of the loop imports posttrain._loop (circular import): {offenders}"


def test_every_part_says_what_part_of_the_loop_it_is():
    for part in PARTS:
        module = importlib.import_module(f"posttrain.{part}")
        assert module.__doc__ and "loop" in module.__doc__, f"posttrain/{part}.py needs a module docstring naming its part of the loop"


def test_loop_module_still_exports_its_public_classes():
    assert posttrain.TrainingLoop is TrainingLoop and posttrain.TrainingState is TrainingState
    assert posttrain.TrainOutput is TrainOutput and posttrain.CallbackList is CallbackList
    assert inspect.getmodule(CallbackList).__name__ == "posttrain._run_log"  # re-exported by _loop
