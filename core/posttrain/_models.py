"""Loading a model and its tokenizer for any role of a method (*contract*, plugin API 1.5).

One function, :func:`load_pretrained`, is the rule every trainer and plugin uses to turn a Hub id,
a local directory or a model object into ``(model, tokenizer)``: the policy
(:meth:`posttrain.TrainingLoop.load_model`), the frozen reference
(:func:`posttrain.build_reference_model`), reward models (:func:`posttrain.load_reward_model`),
a distillation teacher, a PPO critic or a judge. Before it, five copies had five slightly different
rules for the dtype, the tokenizer's revision, ``trust_remote_code`` and ``quantization_config``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from posttrain.config import ConfigError

__all__ = ["MODEL_ROLES", "load_pretrained"]

#: The roles a model plays in a method; each picks a default auto class (see :func:`load_pretrained`).
MODEL_ROLES = ("policy", "reference", "reward", "teacher", "critic", "judge")

# A reward model and a PPO critic (TRL's PPO ``value_model``) are sequence classifiers with one output:
# the reward scores the last token, the critic applies its ``score`` head at every position.
_SCALAR_ROLES = ("reward", "critic")

# ``from_pretrained`` keyword arguments that say *where* to read from; the tokenizer is read from the same place.
_LOCATION_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "proxies", "force_download")


def load_pretrained(
    name_or_model: Any,
    *,
    role: str = "policy",
    auto_class: Any = None,
    model_init_kwargs: Mapping[str, Any] | None = None,
    trust_remote_code: bool = False,
    quantization_config: Any = None,
    default_dtype: torch.dtype | str = torch.float32,
    tokenizer: Any = None,
    load_tokenizer: bool = True,
) -> tuple[Any, Any]:
    """Return ``(model, tokenizer)`` for a model of the given role, loading it by name when needed.

    The rules, the same for every role:

    * **auto class**: ``auto_class`` when given, else ``AutoModelForCausalLM`` for the policy,
      reference, teacher and judge (``AutoModelForImageTextToText`` when the config has a
      ``vision_config``; for the policy, its processor, ``AutoProcessor``, is then the tokenizer, while
      the other roles keep the text tokenizer their methods compare and decode with), and ``AutoModelForSequenceClassification`` with
      ``num_labels=1`` (unless ``model_init_kwargs`` names ``num_labels``) for the reward model and
      the critic (TRL's PPO value model is that class with one label).
    * **dtype**: ``model_init_kwargs["dtype"]`` (or its old name ``torch_dtype``): a ``torch.dtype``,
      its name (``"bfloat16"``) or ``"auto"``; when neither is set, ``default_dtype``.
    * **where from**: ``revision`` (and ``cache_dir``, ``token``, ``local_files_only``, ``proxies``,
      ``force_download``) of ``model_init_kwargs`` apply to the tokenizer too, so both come from the
      same commit; ``trust_remote_code`` (this argument, or ``True`` in ``model_init_kwargs``)
      applies to both.
    * **quantization_config** is passed to ``from_pretrained``; it needs a model given by name.
    * **a model object** is returned as it is (``model_init_kwargs`` do not apply to it); its tokenizer
      is loaded from ``model.config._name_or_path`` when ``tokenizer`` is None and
      ``load_tokenizer``.
    * **the tokenizer**: ``tokenizer`` when given, else loaded as above (None when not
      ``load_tokenizer``). A tokenizer without a pad token gets its EOS token as pad token. For the
      reward model and the critic, a model config without ``pad_token_id`` gets the tokenizer's
      (sequence classifiers find each row's last token with it).
    * **errors** are one :class:`posttrain.ConfigError` line naming the role and the path: a local
      path that is not a directory, a Hub id that cannot be reached (saying so when
      ``HF_HUB_OFFLINE=1``), files that do not load.

    PEFT adapters and gradient checkpointing of a trained model are the trainer's part
    (:meth:`posttrain.TrainingLoop.load_model` applies them after this function); a directory that
    holds a saved PEFT adapter loads as its base model with the adapter (transformers' own rule).

    Args:
        name_or_model: A Hub id (``"Qwen/Qwen2.5-0.5B"``), a local directory, or a model object.
        role: One of :data:`MODEL_ROLES`: ``"policy"``, ``"reference"``, ``"reward"``,
            ``"teacher"``, ``"critic"``, ``"judge"``.
        auto_class: The transformers auto class to load with (default: chosen by ``role``).
        model_init_kwargs: ``from_pretrained`` keyword arguments for a model given by name (not
            modified).
        trust_remote_code: Allow the model's and the tokenizer's own code from the Hub.
        quantization_config: A transformers quantization config (e.g. ``BitsAndBytesConfig``) for a
            model given by name.
        default_dtype: The dtype when ``model_init_kwargs`` names none (e.g. the policy's dtype for a
            reference model).
        tokenizer: The tokenizer to return (then none is loaded); its pad token is still set.
        load_tokenizer: Load the tokenizer when ``tokenizer`` is None; False returns None for it.

    Returns:
        ``(model, tokenizer)``; ``tokenizer`` is None when not given and not ``load_tokenizer``.

    Raises:
        posttrain.ConfigError: an unknown ``role``; no model; ``model_init_kwargs`` not a mapping; a
            dtype that is not one; ``dtype`` and ``torch_dtype`` that disagree;
            ``quantization_config`` with a model object, or both here and in ``model_init_kwargs``;
            a model or tokenizer that cannot be loaded; a model object without ``_name_or_path``
            when its tokenizer is to be loaded; a tokenizer with neither a pad nor an EOS token.
    """
    if role not in MODEL_ROLES:
        raise ConfigError(f"role={role!r} is not a model role: use one of {', '.join(map(repr, MODEL_ROLES))}.")
    if name_or_model is None:
        raise ConfigError(f"no {role} model given: pass a model object, a Hub id such as 'Qwen/Qwen2.5-0.5B', or a local directory.")
    if model_init_kwargs is not None and not isinstance(model_init_kwargs, Mapping):
        raise ConfigError(
            f"model_init_kwargs of the {role} model must be a dict of from_pretrained arguments (e.g. {{'dtype': 'bfloat16'}}), "
            f"got {type(model_init_kwargs).__name__}."
        )
    import transformers

    if isinstance(name_or_model, (str, os.PathLike)):
        name = os.fspath(name_or_model)
        kwargs = dict(model_init_kwargs or {})
        dtype = _pop_dtype(kwargs, role, name, default_dtype)
        in_kwargs = kwargs.pop("trust_remote_code", False)  # popped first: `or` would skip it when the argument is True
        trust_remote_code = bool(trust_remote_code or in_kwargs)
        if quantization_config is not None:
            if "quantization_config" in kwargs:
                raise ConfigError(
                    f"quantization_config is set both as a trainer argument and in args.model_init_kwargs (the {role} model {name!r}): "
                    "set it in one place (preferably the trainer argument)."
                )
            kwargs["quantization_config"] = quantization_config
        if auto_class is None:
            if role in _SCALAR_ROLES:
                auto_class = transformers.AutoModelForSequenceClassification
                kwargs.setdefault("num_labels", 1)
            elif _declares_vision(name, trust_remote_code, kwargs):
                auto_class = transformers.AutoModelForImageTextToText  # a vision-language model (plugin API 1.9)
            else:
                auto_class = transformers.AutoModelForCausalLM
        model = _from_pretrained(auto_class, name, "model", role, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
        if tokenizer is None and load_tokenizer:
            location = {key: kwargs[key] for key in _LOCATION_KWARGS if key in kwargs}
            tokenizer = _load_tokenizer(name, role, trust_remote_code=trust_remote_code, vision=role == "policy" and _model_is_vision(model), **location)
    else:
        model = name_or_model
        if quantization_config is not None:
            raise ConfigError(
                f"quantization_config= applies only to a model given by name (it is used when loading), but the {role} model is "
                "already built: pass it as a Hub id or directory, or quantize it yourself and omit quantization_config."
            )
        if tokenizer is None and load_tokenizer:
            name = getattr(getattr(model, "config", None), "_name_or_path", None)
            if not name:
                raise ConfigError(
                    f"the {role} model object has no config._name_or_path to load its tokenizer from: pass its tokenizer "
                    "(the trainer's processing_class=..., or tokenizer=...)."
                )
            tokenizer = _load_tokenizer(name, role, trust_remote_code=trust_remote_code, vision=role == "policy" and _model_is_vision(model))
    if tokenizer is not None:
        _ensure_pad_token(getattr(tokenizer, "tokenizer", None) if _is_processor(tokenizer) else tokenizer, model, role)
        config = getattr(model, "config", None)
        if role in _SCALAR_ROLES and config is not None and getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = getattr(tokenizer, "pad_token_id", None)
    return model, tokenizer


def _pop_dtype(kwargs: dict, role: str, name: str, default: torch.dtype | str) -> torch.dtype | str:
    """Remove ``dtype`` / ``torch_dtype`` from ``kwargs`` and return the dtype to load in (``default`` when neither is set)."""
    given = {key: _as_dtype(kwargs.pop(key), key, role, name) for key in ("dtype", "torch_dtype") if key in kwargs}
    given = {key: value for key, value in given.items() if value is not None}
    if len(set(given.values())) > 1:
        raise ConfigError(
            f"model_init_kwargs of the {role} model {name!r} set dtype={given['dtype']!r} and torch_dtype={given['torch_dtype']!r}: "
            "keep one (dtype; torch_dtype is its old name)."
        )
    return next(iter(given.values()), default)


def _as_dtype(value: Any, key: str, role: str, name: str) -> torch.dtype | str | None:
    """``value`` as a ``torch.dtype`` (or ``"auto"``, or None); anything else is one ConfigError line naming the field."""
    if value is None or value == "auto" or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and isinstance(getattr(torch, value.removeprefix("torch."), None), torch.dtype):
        return getattr(torch, value.removeprefix("torch."))
    raise ConfigError(
        f"model_init_kwargs[{key!r}]={value!r} of the {role} model {name!r} is not a torch dtype: "
        "use 'float32', 'bfloat16', 'float16' or 'auto'."
    )


def _from_pretrained(auto_class: Any, name: str, what: str, role: str, **kwargs: Any) -> Any:
    """``auto_class.from_pretrained(name, **kwargs)``, with a missing directory or a file that cannot be read as one ConfigError line."""
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1  # a Hub id is "name" or "org/name"
    if looks_local and not os.path.isdir(os.path.expanduser(name)):
        raise ConfigError(f"the {role} model {name!r} is not a directory: pass an existing local model directory, or a Hub id such as 'Qwen/Qwen2.5-0.5B'.")
    hint = "pass the tokenizer yourself (the trainer's processing_class=...)" if what == "tokenizer" else "pass a local directory"
    of = "of" if what == "tokenizer" else "as"
    try:
        return auto_class.from_pretrained(name, **kwargs)
    except OSError as exc:  # missing files, an unknown Hub id, no network
        offline = " (HF_HUB_OFFLINE=1 is set: only models already in the local cache can load)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise ConfigError(f"cannot load the {what} {name!r} {of} the {role} model{offline}: {_first_line(exc)} Check the name, your network or cache, or {hint}.") from None
    except ValueError as exc:  # transformers' own: an architecture this auto class lacks, remote code not trusted, ...
        if isinstance(exc, ConfigError):
            raise
        fix = " Set trust_remote_code=True if you trust that code." if "trust_remote_code" in str(exc) else ""
        raise ConfigError(f"cannot load the {what} {name!r} {of} the {role} model: {_first_line(exc)}{fix}") from exc


def _is_processor(obj: Any) -> bool:
    return getattr(obj, "image_processor", None) is not None and getattr(obj, "tokenizer", None) is not None


def _model_is_vision(model: Any) -> bool:
    return getattr(getattr(model, "config", None), "vision_config", None) is not None


def _declares_vision(name: str, trust_remote_code: bool, kwargs: dict) -> bool:
    """Whether the config at ``name`` is a vision-language model's (it has a ``vision_config``); False when it cannot be read."""
    import transformers

    location = {key: kwargs[key] for key in _LOCATION_KWARGS if key in kwargs}
    try:
        config = transformers.AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code, **location)
    except Exception:  # the model load below reports a missing or unreadable model in its own words
        return False
    return getattr(config, "vision_config", None) is not None


def _load_tokenizer(name: str, role: str, *, vision: bool = False, **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained(name)`` (``AutoProcessor`` for a vision-language model); an empty tokenizer
    (transformers 5 builds one from a directory without tokenizer files) is refused."""
    import transformers

    if vision:
        return _from_pretrained(transformers.AutoProcessor, name, "tokenizer", role, **kwargs)
    tokenizer = _from_pretrained(transformers.AutoTokenizer, name, "tokenizer", role, **kwargs)
    if hasattr(tokenizer, "__len__") and len(tokenizer) <= 1:
        raise ConfigError(
            f"the tokenizer of the {role} model {name!r} is empty ({len(tokenizer)} token): {name!r} holds no tokenizer files. "
            "Save the tokenizer there (tokenizer.save_pretrained), or pass it yourself (the trainer's processing_class=...)."
        )
    return tokenizer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _ensure_pad_token(tokenizer: Any, model: Any, role: str) -> None:
    """Give ``tokenizer`` its EOS token as pad token when it has no usable one (a processor without ``eos_token`` is left as is)."""
    if not hasattr(tokenizer, "eos_token") or getattr(tokenizer, "pad_token_id", None) is not None:
        return
    if tokenizer.eos_token is None:
        name = getattr(getattr(model, "config", None), "_name_or_path", None) or f"the {role} model"
        raise ConfigError(
            f"the tokenizer of {name!r} ({role}) has neither a pad_token nor an eos_token: set tokenizer.pad_token "
            "(e.g. tokenizer.add_special_tokens({'pad_token': '<pad>'}) and resize the embeddings) and pass processing_class=tokenizer."
        )
    tokenizer.pad_token = tokenizer.eos_token
