"""A rollout backend that writes fixed model turns, for tests of tool-calling plumbing (heavy: imports torch via posttrain).

A random tiny model never writes a tool call, so tests of the tool path (parsing, execution, token
accounting, masks, rewards) drive the real ``ToolCallingRollout`` and trainers with this backend:
the tools, chat template and losses stay real, only the sampler is scripted.
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["ScriptedToolTurns"]


class ScriptedToolTurns:
    """A ``posttrain.RolloutBackend`` whose k-th model turn of every episode is ``turns[k]`` (the last one repeats).

    The turn number is read from the context: a chat-template prompt with tools has ``prompt_headers``
    ``<|im_start|>`` headers (system, user, assistant) and each tool round adds two (the tool turn's and
    the next assistant's), as :data:`posttrain.testing.tiny_model.TOOL_CHATML_TEMPLATE` renders them.

    Args:
        tokenizer: The tokenizer (its ``<|im_start|>`` id is read).
        turns: Token ids of each model turn (end each with the EOS to make it a finished turn).
        logprob: The sampling log-prob reported for every written token.
        prompt_headers: Headers in a rendered prompt.
    """

    samples_from_policy = False

    def __init__(self, tokenizer: Any, turns: Sequence[Sequence[int]], *, logprob: float = -0.5, prompt_headers: int = 3):
        self.turns = [list(t) for t in turns]
        self.header_id = tokenizer.convert_tokens_to_ids("<|im_start|>")
        self.logprob, self.prompt_headers = float(logprob), int(prompt_headers)
        self.policy_version = 0

    def turn_of(self, context: Sequence[int]) -> int:
        """The 0-based model turn a context asks for."""
        return (list(context).count(self.header_id) - self.prompt_headers) // 2

    def generate(self, prompt_ids, sampling, model_inputs=None):
        from posttrain import RolloutBatch

        out = [self.turns[min(self.turn_of(p), len(self.turns) - 1)][: sampling.max_tokens] for p in prompt_ids]
        return RolloutBatch([list(p) for p in prompt_ids], out, [[self.logprob] * len(c) for c in out], [False] * len(out),
                            policy_version=self.policy_version)

    def update_weights(self, model) -> None:
        self.policy_version += 1
