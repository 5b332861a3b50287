"""The plugin contract: :class:`MethodSpec` and :class:`Preset` (light: imports no torch)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping

from posttrain._diagnostic_codes import CODES as _DIAGNOSTIC_CODES

__all__ = ["MethodSpec", "Preset", "SpecError", "MATURITIES", "DATA_FORMATS", "SignalRole", "SIGNAL_ROLES"]

#: The two maturity levels a method can declare.
MATURITIES = ("stable", "experimental")

#: TRL's dataset formats, by the names ``posttrain.testing.make_tiny_datasets`` uses; a method's
#: :attr:`MethodSpec.data_format` is one of them (plugin API 1.2; ``triple_preference`` 1.3).
DATA_FORMATS = (
    "text",
    "messages",
    "prompt_completion",
    "conversational_prompt_completion",
    "preference",
    "conversational_preference",
    "unpaired_preference",
    "prompt_only",
    "triple_preference",  # plugin API 1.3: prompt/chosen/rejected plus a gold "reference" response (TRL's TPO data)
)

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_API_RE = re.compile(r"^\d+\.\d+$")
_DOTTED_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class SignalRole(str, Enum):
    """What a logged metric means, so the diagnostics can reason about it (*contract*, see STABILITY.md).

    A spec maps roles to its own metric names (``signals={SignalRole.REWARD: "reward"}``, or plain
    strings ``{"reward": "reward"}``); :mod:`posttrain.diagnostics` reads only roles, never a
    method's metric names. The evaluation counterpart of a role's metric is ``eval_<metric>``.
    New roles may be added in a minor release; a role is never renamed.
    """

    REWARD = "reward"  #: mean training reward of the step's completions (higher is better)
    GROUP_REWARD_ZERO_STD = "group_reward_zero_std"  #: fraction of prompt groups whose rewards are all equal
    KL = "kl"  #: KL divergence of the policy to the reference model (nats/token)
    ENTROPY = "entropy"  #: policy entropy over sampled completion tokens (nats/token)
    CLIP_FRACTION = "clip_fraction"  #: fraction of tokens outside the PPO-style clip region
    COMPLETION_LENGTH = "completion_length"  #: mean completion length (tokens)
    TRUNCATION = "truncation"  #: fraction of completions that hit max_completion_length
    PREFERENCE_MARGIN = "preference_margin"  #: mean (chosen - rejected) reward margin
    PREFERENCE_ACCURACY = "preference_accuracy"  #: fraction of pairs ranked correctly
    TEACHER_DIVERGENCE = "teacher_divergence"  #: divergence of the student to a teacher (distillation; lower is better)
    TEACHER_ENTROPY = "teacher_entropy"  #: the teacher's entropy at the student's completion tokens (nats/token; distillation)
    TOKEN_ACCURACY = "token_accuracy"  #: fraction of target tokens predicted correctly (SFT)
    GENERATION_TIME_FRACTION = "generation_time_fraction"  #: fraction of a step's wall time spent generating
    VALUE_LOSS = "value_loss"  #: the critic's (value model's) regression loss (plugin API 1.7; PPO-style methods)
    EXPLAINED_VARIANCE = "explained_variance"  #: 1 - Var(returns - values) / Var(returns): how much of the return the critic predicts (1 = all, <= 0 = nothing)
    TOOL_CALL_RATE = "tool_call_rate"  #: tool calls per episode (plugin API 1.8; tools / environments)
    TOOL_FAILURE_RATE = "tool_failure_rate"  #: fraction of tool calls that failed (exception, unknown tool, bad arguments, timeout)
    TURNS_PER_EPISODE = "turns_per_episode"  #: mean model turns per episode
    TURN_LIMIT_RATE = "turn_limit_rate"  #: fraction of episodes cut by the tool-calling turn limit (max_tool_calling_iterations)


#: The role names, in declaration order.
SIGNAL_ROLES = tuple(role.value for role in SignalRole)


class SpecError(ValueError):
    """A :class:`MethodSpec` (or :class:`Preset`) is invalid; the message says which field and why."""


@dataclass(frozen=True, kw_only=True)
class Preset:
    """Named config overrides that reproduce a paper (``posttrain train dpo --preset ipo``).

    Args:
        summary: One line saying what the preset is.
        overrides: Config field -> value, applied over the defaults and under YAML/CLI values.
        paper: Citation or URL of the paper the preset reproduces.
    """

    summary: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    paper: str = ""


@dataclass(frozen=True, kw_only=True)
class MethodSpec:
    """Describe a post-training method to the posttrain registry (*contract*, see STABILITY.md).

    A plugin exposes one ``MethodSpec`` per method through the entry-point group
    ``posttrain.methods``; the entry point's name must equal :attr:`name`. The module that holds
    the spec must not import torch, transformers, datasets, accelerate, peft, deepspeed or vllm:
    ``posttrain list`` loads every spec and must stay fast.

    Version, authors and the core requirement come from the distribution's metadata and are
    never repeated here.

    Args:
        name: Method id, lowercase (``"dpo"``); the CLI name and the import name
            ``posttrain.methods.<name>``.
        maturity: ``"stable"`` (semver, distribution version >= 1.0) or ``"experimental"``
            (needs an explicit opt-in, may change in any release).
        plugin_api: The ``posttrain.API_VERSION`` ("MAJOR.MINOR") the plugin was built for.
        summary: One line for ``posttrain list``.
        family: Method family (``"sft"``, ``"preference"``, ``"online-rl"``, ``"reward"``, ...).
        trainer: Lazy path to the trainer class, ``"package.module:ClassName"``.
        config: Lazy path to the config dataclass, ``"package.module:ClassName"``. The config
            module must stay light (it is imported by ``posttrain info``).
        papers: Citations (title, arXiv id or URL), one string each.
        presets: Preset name -> :class:`Preset` (a plain mapping of overrides is accepted too).
        requires: Import names the method needs beyond the core (checked by ``posttrain doctor``).
        data_format: The dataset format the method trains on, one of :data:`DATA_FORMATS`
            (``"preference"`` for DPO); the conformance suite trains on a tiny dataset of this
            format and ``posttrain info`` shows it. Empty: the suite cannot train the method
            (plugin API 1.2).
        tiny_run: Config overrides that make a few-step run on a tiny model meaningful and fast
            (e.g. ``{"reward_funcs": ["accuracy"], "max_completion_length": 8}``); the
            conformance suite applies them over its own small defaults (plugin API 1.2).
        signals: :class:`SignalRole` (or its string value) -> the method's metric name with that
            meaning; the diagnostics read these roles (optional: a spec without it loads and gets
            the checks of the loop's own metrics: loss, grad_norm, learning_rate, eval_loss).
        actions: Diagnostic code (one of ``posttrain.diagnostics.CODES``) -> what to try, in
            this method's own config fields, written in backticks (``"raise `num_generations`
            or `temperature`."``); it replaces the core's advice for that code, which names only
            ``TrainingConfig`` fields (optional, plugin API 1.5: a spec without it gets the core's
            advice for every code; ``posttrain.diagnostics.action_fields`` lists the fields a
            text names, for a test that each exists in the config).
    """

    name: str
    maturity: str
    plugin_api: str
    summary: str
    family: str = ""
    trainer: str = ""
    config: str = ""
    papers: tuple[str, ...] = ()
    presets: Mapping[str, Preset] = field(default_factory=dict)
    requires: tuple[str, ...] = ()
    data_format: str = ""
    tiny_run: Mapping[str, Any] = field(default_factory=dict)
    signals: Mapping[str, str] = field(default_factory=dict)
    actions: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Coerce friendly inputs (lists, plain override dicts) into the frozen forms.
        object.__setattr__(self, "papers", tuple(self.papers))
        object.__setattr__(self, "requires", tuple(self.requires))
        presets = {}
        for key, value in dict(self.presets).items():
            if isinstance(value, Mapping):
                value = Preset(summary="", overrides=dict(value))
            presets[key] = value
        object.__setattr__(self, "presets", presets)
        object.__setattr__(self, "tiny_run", dict(self.tiny_run))
        if isinstance(self.signals, Mapping):
            signals = {(key.value if isinstance(key, SignalRole) else key): value for key, value in self.signals.items()}
            object.__setattr__(self, "signals", signals)
        if isinstance(self.actions, Mapping):
            object.__setattr__(self, "actions", dict(self.actions))
        self.validate()

    def validate(self) -> None:
        """Raise :class:`SpecError` naming the first invalid field and how to fix it."""
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise SpecError(
                f"MethodSpec.name={self.name!r} is invalid: use lowercase letters, digits and "
                "underscores, starting with a letter (e.g. 'dpo')."
            )
        if self.maturity not in MATURITIES:
            raise SpecError(
                f"MethodSpec(name={self.name!r}).maturity={self.maturity!r} is invalid: "
                f"use one of {', '.join(MATURITIES)}."
            )
        if not isinstance(self.plugin_api, str) or not _API_RE.match(self.plugin_api):
            raise SpecError(
                f"MethodSpec(name={self.name!r}).plugin_api={self.plugin_api!r} is invalid: "
                "use 'MAJOR.MINOR', e.g. posttrain.API_VERSION."
            )
        if not isinstance(self.summary, str) or not self.summary.strip():
            raise SpecError(f"MethodSpec(name={self.name!r}).summary is empty: give one line.")
        for attr in ("trainer", "config"):
            value = getattr(self, attr)
            if not isinstance(value, str) or not _DOTTED_RE.match(value):
                raise SpecError(
                    f"MethodSpec(name={self.name!r}).{attr}={value!r} is invalid: use a lazy "
                    "path 'package.module:ClassName'."
                )
        if self.data_format and self.data_format not in DATA_FORMATS:
            raise SpecError(
                f"MethodSpec(name={self.name!r}).data_format={self.data_format!r} is invalid: use one of "
                f"{', '.join(DATA_FORMATS)} (or leave it empty)."
            )
        if not isinstance(self.tiny_run, Mapping) or not all(isinstance(k, str) for k in self.tiny_run):
            raise SpecError(f"MethodSpec(name={self.name!r}).tiny_run must map config field names to values.")
        for key, preset in self.presets.items():
            if not isinstance(preset, Preset):
                raise SpecError(
                    f"MethodSpec(name={self.name!r}).presets[{key!r}] is a "
                    f"{type(preset).__name__}: use posttrain.Preset(...) or a dict of overrides."
                )
            if not _NAME_RE.match(key):
                raise SpecError(
                    f"MethodSpec(name={self.name!r}) preset name {key!r} is invalid: use "
                    "lowercase letters, digits and underscores."
                )

        if not isinstance(self.signals, Mapping):
            raise SpecError(f"MethodSpec(name={self.name!r}).signals is a {type(self.signals).__name__}: use a dict {{role: metric_name}}.")
        for role, metric in self.signals.items():
            if role not in SIGNAL_ROLES:
                raise SpecError(
                    f"MethodSpec(name={self.name!r}).signals has unknown role {role!r}: use one of {', '.join(SIGNAL_ROLES)} (posttrain.SignalRole)."
                )
            if not isinstance(metric, str) or not metric:
                raise SpecError(f"MethodSpec(name={self.name!r}).signals[{role!r}]={metric!r} is invalid: give the logged metric's name.")

        if not isinstance(self.actions, Mapping):
            raise SpecError(f"MethodSpec(name={self.name!r}).actions is a {type(self.actions).__name__}: use a dict {{diagnostic_code: action_text}}.")
        for code, text in self.actions.items():
            if code not in _DIAGNOSTIC_CODES:
                raise SpecError(
                    f"MethodSpec(name={self.name!r}).actions has unknown code {code!r}: use one of {', '.join(_DIAGNOSTIC_CODES)} (posttrain.diagnostics.CODES)."
                )
            if not isinstance(text, str) or not text.strip():
                raise SpecError(f"MethodSpec(name={self.name!r}).actions[{code!r}]={text!r} is invalid: say what to change, naming this method's config fields.")

    @property
    def api_major_minor(self) -> tuple[int, int]:
        """Return :attr:`plugin_api` as a ``(major, minor)`` tuple."""
        major, minor = self.plugin_api.split(".")
        return int(major), int(minor)
