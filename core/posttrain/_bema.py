"""Bias-corrected exponential moving average of model weights (BEMA), as plain plumbing (*contract*, plugin API 1.2).

Block and Zhang 2025, "EMA Without the Lag: Bias-Corrected Iterate Averaging Schemes",
arXiv:2508.00180. With t the optimizer step, theta_t the trained weights and theta_0 a snapshot at the
burn-in step ``update_after``::

    beta_t  = max((lag + multiplier * t) ** -ema_power, min_ema_multiplier)
    alpha_t = (lag + multiplier * t) ** -bias_power
    EMA_t   = (1 - beta_t) * EMA_{t-1} + beta_t * theta_t
    BEMA_t  = EMA_t + alpha_t * (theta_t - theta_0)

updated every ``update_freq`` steps after ``update_after``, exactly as TRL 1.16's ``BEMACallback``
(``trl.trainer.callbacks``): t is the global step, and before the first update the BEMA weights are
the weights at the start of training. Used by SFT (the averaged model, saved to ``output_dir/bema``)
and DPO (a BEMA-updated reference model). Only trainable parameters are averaged.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BEMA"]


class BEMA:
    """Track the BEMA of a model's trainable parameters; resumable through :meth:`state_dict`.

    Args:
        model: The (unwrapped) model being trained; its trainable parameters are tracked by name.
        update_freq: Update the average every this many steps (the paper's phi).
        ema_power: kappa, the power of the EMA decay (0 disables the EMA: EMA stays theta_0).
        bias_power: eta, the power of the bias-correction scale.
        lag: rho, the virtual starting age of the schedule.
        update_after: tau, the burn-in step at which theta_0 and the EMA are snapshotted.
        multiplier: gamma, the step multiplier of both schedules.
        min_ema_multiplier: Lower bound of beta_t.
        device: Where the buffers live ("cpu" keeps them off the accelerator).
    """

    def __init__(
        self,
        model: Any,
        *,
        update_freq: int = 400,
        ema_power: float = 0.5,
        bias_power: float = 0.2,
        lag: int = 10,
        update_after: int = 0,
        multiplier: float = 1.0,
        min_ema_multiplier: float = 0.0,
        device: str = "cpu",
    ) -> None:
        import torch

        from posttrain.config import ConfigError

        if update_freq < 1:
            raise ConfigError(f"bema_update_freq={update_freq} is invalid: use a number of steps >= 1 (the paper uses 400).")
        if lag + multiplier <= 0:
            raise ConfigError(f"bema_lag={lag} with bema_multiplier={multiplier} makes lag + multiplier * t <= 0: use a positive lag (e.g. 10).")
        self.update_freq, self.ema_power, self.bias_power, self.lag = update_freq, ema_power, bias_power, lag
        self.update_after, self.multiplier, self.min_ema_multiplier, self.device = update_after, multiplier, min_ema_multiplier, device
        with torch.no_grad():
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            self.names = [n for n, _ in named]
            self.theta0 = [p.detach().clone().to(device) for _, p in named]
            self.ema = [t.clone() for t in self.theta0]
            self.current = [t.clone() for t in self.theta0]  # the BEMA weights (the start weights until the first update)
        self.last_update = 0

    def _schedule(self, step: int) -> tuple[float, float]:
        base = self.lag + self.multiplier * step
        return max(base ** (-self.ema_power), self.min_ema_multiplier), base ** (-self.bias_power)

    def step(self, model: Any, global_step: int) -> bool:
        """Call after optimizer step ``global_step``; return whether the BEMA weights changed."""
        import torch

        if global_step < self.update_after:
            return False
        params = dict(model.named_parameters())
        with torch.no_grad():
            if global_step == self.update_after:
                for name, theta0, ema in zip(self.names, self.theta0, self.ema):
                    theta0.copy_(params[name].detach())
                    ema.copy_(params[name].detach())
                return False
            if (global_step - self.update_after) % self.update_freq:
                return False
            beta, alpha = self._schedule(global_step)
            for name, theta0, ema, current in zip(self.names, self.theta0, self.ema, self.current):
                theta = params[name].detach().to(self.device)
                ema.mul_(1 - beta).add_(theta, alpha=beta)
                current.copy_(ema + alpha * (theta - theta0))
        self.last_update = global_step
        return True

    def weights(self) -> dict[str, Any]:
        """Return ``{parameter name: BEMA weight}`` (the tracked trainable parameters)."""
        return dict(zip(self.names, self.current))

    def copy_to(self, target: Any, *, rename: Any = None) -> None:
        """Write the BEMA weights into ``target``'s parameters of the same names (``rename(name)`` maps names first).

        Raises:
            KeyError: a tracked parameter has no counterpart in ``target``.
        """
        import torch

        params = dict(target.named_parameters())
        with torch.no_grad():
            for name, value in zip(self.names, self.current):
                key = rename(name) if rename is not None else name
                if key not in params:
                    raise KeyError(f"BEMA: the target model has no parameter {key!r} (tracked as {name!r})")
                params[key].copy_(value.to(params[key].device, params[key].dtype))

    def averaged_model(self, model: Any) -> Any:
        """Return a CPU deep copy of ``model`` carrying the BEMA weights (for ``save_pretrained``)."""
        import copy

        clone = copy.deepcopy(model).to("cpu")
        self.copy_to(clone)
        return clone

    def state_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "theta0": list(self.theta0), "ema": list(self.ema), "current": list(self.current), "last_update": self.last_update}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["names"]) != self.names:
            raise ValueError("BEMA state was saved for other parameters (the model's trainable parameters changed); start a fresh run.")
        for key in ("theta0", "ema", "current"):
            for mine, saved in zip(getattr(self, key), state[key]):
                mine.copy_(saved)
        self.last_update = int(state["last_update"])


class BEMASaver:
    """A ``transformers.TrainerCallback``-shaped object that saves a :class:`BEMA` average at the end of training.

    Add it with ``loop.callbacks.add(BEMASaver(bema, loop, processing_class))``: on ``on_train_end``
    the main process writes ``output_dir/<subdir>`` (weights + tokenizer, loadable with ``from_pretrained``).
    """

    def __init__(self, bema: BEMA, loop: Any, processing_class: Any = None, subdir: str = "bema") -> None:
        self.bema, self.loop, self.processing_class, self.subdir = bema, loop, processing_class, subdir

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        import os

        if not self.loop.is_main_process:
            return
        directory = os.path.join(args.output_dir, self.subdir)
        self.bema.averaged_model(self.loop.unwrapped_model()).save_pretrained(directory)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(directory)
