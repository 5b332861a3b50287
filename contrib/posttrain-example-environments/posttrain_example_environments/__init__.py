"""Example environments for posttrain's ``environment_factory=`` (TRL's contract), registered as ``posttrain.environments`` entry points."""

from __future__ import annotations

__all__ = ["CalculatorEnv", "GuessNumberEnv"]


class CalculatorEnv:
    """Pose ``a + b``; the policy may call ``add``. Reward 1 when it called ``add`` with the row's operands."""

    def __init__(self):
        self.a = self.b = None
        self.calls: list[tuple[int, int]] = []

    def reset(self, a: int, b: int, **row) -> None:
        self.a, self.b, self.calls = int(a), int(b), []

    def add(self, a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: The first integer.
            b: The second integer.
        """
        self.calls.append((a, b))
        return a + b

    def get_reward(self) -> float:
        return float((self.a, self.b) in self.calls or (self.b, self.a) in self.calls)


class GuessNumberEnv:
    """A number-guessing game with feedback: ``guess(n)`` answers higher / lower / correct."""

    high = 20

    def __init__(self):
        self.target = None
        self.guesses = 0
        self.solved = False

    def reset(self, target: int, **row) -> str:
        if not 1 <= int(target) <= self.high:
            raise ValueError(f"target={target!r} is outside 1..{self.high}; fix the row's 'target' column.")
        self.target, self.guesses, self.solved = int(target), 0, False
        return f" Guess my number between 1 and {self.high}."

    def guess(self, n: int) -> str:
        """Guess the hidden number.

        Args:
            n: Your guess, between 1 and 20.
        """
        self.guesses += 1
        if self.solved:
            return "already solved"
        if n == self.target:
            self.solved = True
            return "correct"
        return "higher" if n < self.target else "lower"

    def get_reward(self) -> float:
        return max(0.0, 1.0 - 0.1 * (self.guesses - 1)) if self.solved else 0.0
