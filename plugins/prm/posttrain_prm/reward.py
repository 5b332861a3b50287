"""Score completions step by step with a trained process reward model: a reward function for GRPO, RLOO and the other online methods."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from posttrain import DataError, completion_text, load_pretrained

__all__ = ["ProcessRewardFunction", "AGGREGATIONS"]

#: How the per-step probabilities of a completion become its reward.
AGGREGATIONS = ("min", "prod", "last", "mean")


class ProcessRewardFunction:
    """A reward function ``(prompts, completions, **kwargs) -> list[float]`` from a PRM trained by :class:`PRMTrainer`.

    Each completion is split on ``step_separator`` into steps (empty pieces, e.g. after a final
    separator, are dropped) and tokenized as in training: ``[bos] + prompt``, then every step followed
    by the separator's tokens. The PRM's probability that a step is correct is ``softmax(logits)[1]``
    at the separator's last token; the reward aggregates the steps' probabilities:

    - ``"min"``: the weakest step (Lightman et al. 2023 score a solution by the product; the minimum
      is the common alternative, e.g. Wang et al. 2024, Math-Shepherd),
    - ``"prod"``: the probability that every step is correct (Lightman et al. 2023, Sec. 2.6),
    - ``"last"``: the last step's probability,
    - ``"mean"``: the mean over steps.

    Conversational prompts are rendered with the tokenizer's chat template (with the generation
    prompt), and a conversational completion contributes its last message's text. Scoring runs under
    ``torch.no_grad()`` in eval mode, ``batch_size`` sequences per forward, right-padded, on the
    model's device; the model's training mode is restored afterwards.

    Args:
        model: A directory or Hub id of a saved PRM (``AutoModelForTokenClassification`` with two
            labels, as ``PRMTrainer.save_model`` writes it), or the model object.
        step_separator: The separator the PRM was trained with (``PRMConfig.step_separator``).
        aggregation: One of :data:`AGGREGATIONS`.
        tokenizer: The PRM's tokenizer (default: loaded from ``model``'s directory).
        batch_size: Sequences per forward pass.
        empty_reward: The reward of a completion with no step. None (default): such a completion
            raises :class:`posttrain.DataError`.
        model_init_kwargs: ``from_pretrained`` arguments when ``model`` is a path (e.g. ``{"dtype": "bfloat16"}``).
        name: Name in logs (default ``prm_<aggregation>``).

    Raises:
        posttrain.ConfigError: the model cannot be loaded, or does not have two labels; an unknown
            ``aggregation``; an empty ``step_separator``.
    """

    def __init__(self, model: Any, step_separator: str = "\n", aggregation: str = "min", *, tokenizer: Any = None, batch_size: int = 8,
                 empty_reward: float | None = None, model_init_kwargs: dict | None = None, name: str | None = None) -> None:
        import transformers

        from posttrain import ConfigError

        if aggregation not in AGGREGATIONS:
            raise ConfigError(f"aggregation={aggregation!r} is invalid: use one of {', '.join(map(repr, AGGREGATIONS))}.")
        if not isinstance(step_separator, str) or not step_separator:
            raise ConfigError(f"step_separator={step_separator!r} is invalid: use the non-empty separator the PRM was trained with (PRMConfig.step_separator).")
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} is invalid: use a positive number of sequences per forward pass.")
        kwargs = dict(model_init_kwargs or {})
        if isinstance(model, (str, os.PathLike)):
            kwargs.setdefault("num_labels", 2)
        model, tokenizer = load_pretrained(model, role="reward", auto_class=transformers.AutoModelForTokenClassification,
                                           model_init_kwargs=kwargs if isinstance(model, (str, os.PathLike)) else None, tokenizer=tokenizer)
        num_labels = getattr(getattr(model, "config", None), "num_labels", None)
        if num_labels != 2:
            raise ConfigError(
                f"ProcessRewardFunction: the model has num_labels={num_labels}, but a PRM is a token classifier with two labels "
                "(wrong / correct step): train it with PRMTrainer, or load it with AutoModelForTokenClassification(..., num_labels=2)."
            )
        self.model, self.tokenizer = model, tokenizer
        self.step_separator, self.aggregation = step_separator, aggregation
        self.batch_size, self.empty_reward = batch_size, empty_reward
        self.__name__ = name or f"prm_{aggregation}"

    def __repr__(self) -> str:
        path = getattr(self.model.config, "_name_or_path", "") or type(self.model).__name__
        return f"ProcessRewardFunction({path!r}, step_separator={self.step_separator!r}, aggregation={self.aggregation!r})"

    # ------------------------------------------------------------------ tokenization
    def _prompt_text(self, prompt: Any) -> str:
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, (list, tuple)):
            return self.tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
        raise DataError(f"ProcessRewardFunction: a prompt must be text or a list of {{'role', 'content'}} messages, got {type(prompt).__name__}.")

    def steps_of(self, completion: Any) -> list[str]:
        """The steps of ``completion``: its text split on ``step_separator``, empty (whitespace-only) pieces dropped."""
        return [step for step in completion_text(completion).split(self.step_separator) if step.strip()]

    def encode(self, prompt: Any, steps: list[str]) -> tuple[list[int], list[int]]:
        """Return ``(input_ids, positions)``: the sequence as the PRM was trained on, and the index of each step's scored token."""
        tok = self.tokenizer
        ids = list(tok(self._prompt_text(prompt), add_special_tokens=False)["input_ids"])
        if tok.bos_token_id is not None:
            ids = [tok.bos_token_id] + ids
        separator = list(tok.encode(self.step_separator, add_special_tokens=False))
        positions = []
        for step in steps:
            ids += list(tok(step, add_special_tokens=False)["input_ids"]) + separator
            positions.append(len(ids) - 1)
        return ids, positions

    # ------------------------------------------------------------------ scoring
    def step_probabilities(self, prompts: Sequence[Any], completions: Sequence[Any]) -> list[list[float]]:
        """Return, per completion, the PRM's probability that each step is correct (an empty list for a completion with no step)."""
        if len(prompts) != len(completions):
            raise DataError(f"ProcessRewardFunction: {len(prompts)} prompts but {len(completions)} completions; give one prompt per completion.")
        encoded = [self.encode(prompt, self.steps_of(completion)) for prompt, completion in zip(prompts, completions)]
        todo = [i for i, (_, positions) in enumerate(encoded) if positions]
        out: list[list[float]] = [[] for _ in encoded]
        device = next(self.model.parameters()).device
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(todo), self.batch_size):
                    chunk = todo[start : start + self.batch_size]
                    length = max(len(encoded[i][0]) for i in chunk)
                    input_ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
                    attention_mask = torch.zeros((len(chunk), length), dtype=torch.long)
                    for row, i in enumerate(chunk):
                        ids = encoded[i][0]
                        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                        attention_mask[row, : len(ids)] = 1
                    logits = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False).logits  # (b, T, 2)
                    probs = logits.double().softmax(-1)[..., 1].cpu()  # (b, T): P(step correct)
                    for row, i in enumerate(chunk):
                        out[i] = probs[row, encoded[i][1]].tolist()
        finally:
            self.model.train(was_training)
        return out

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        """Return one reward per completion: its steps' correctness probabilities aggregated by ``aggregation``.

        Raises:
            posttrain.DataError: a completion has no step and ``empty_reward`` is None.
        """
        rewards = []
        for index, probs in enumerate(self.step_probabilities(prompts, completions)):
            if not probs:
                if self.empty_reward is None:
                    raise DataError(
                        f"ProcessRewardFunction: completion {index} has no step (its text {completion_text(completions[index])[:40]!r} has no "
                        f"non-empty piece between separators {self.step_separator!r}); pass empty_reward=<score> to score such completions."
                    )
                rewards.append(float(self.empty_reward))
                continue
            if self.aggregation == "min":
                rewards.append(min(probs))
            elif self.aggregation == "prod":
                value = 1.0
                for p in probs:
                    value *= p
                rewards.append(value)
            elif self.aggregation == "last":
                rewards.append(probs[-1])
            else:
                rewards.append(sum(probs) / len(probs))
        return rewards
