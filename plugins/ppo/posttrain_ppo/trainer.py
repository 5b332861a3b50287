"""PPO for language models on the posttrain loop (heavy: imports torch).

The method of TRL's ``PPOTrainer`` (TRL 1.12.0, the last release that shipped it; Ziegler et al. 2019,
with the implementation details of Huang et al. 2024), on the core's online steps and producer. One
rollout per process, then ``num_ppo_epochs * num_mini_batches`` optimizer steps on it::

    prompts (local_batch_size = per_device_train_batch_size * gradient_accumulation_steps * num_mini_batches)
      -> rollout: one completion per prompt (RolloutEngine, seeded by the step), stopping at the stop token
      -> score s: reward model and/or reward functions (weighted sum); - missing_eos_penalty without EOS
      -> no-grad: log pi_old (the sampler's, or a forward), log pi_ref, critic values V_t     (N, C)
      -> per-token reward r_t = -kl_coef * KL_t (k1 / k3); r_{T+1} += s                          (N, C)
         (T = the last completion token; position T+1 is the state after it, see "padding" below)
      -> whiten_rewards (optional); GAE(gamma, lam): advantages A_t, returns R_t = A_t + V_t
      -> advantages whitened over the completion tokens
      -> each PPO epoch: a seeded shuffle, num_mini_batches mini-batches, one optimizer step each
         (gradient_accumulation_steps micro-batches of per_device_train_batch_size completions)
    policy loss  = masked mean_t max(-A_t * rho_t, -A_t * clip(rho_t, 1 - cliprange, 1 + cliprange))
    critic loss  = vf_coef * 0.5 * masked mean_t max((V'_t - R_t)^2, (clip(V'_t, V_t +- cliprange_value) - R_t)^2)

Padding (TRL's convention, kept for parity): the policy terms cover completion positions 0..T; the
value terms cover 0..T+1 (the critic's value of the state after the last token, which receives the
score). Means are per micro-batch and averaged over the step's micro-batches, as TRL's accelerate
accumulation does.

The critic is, by default, a separate model (a one-label sequence classifier whose ``score`` head is
applied at every position, as TRL's value model) registered with ``TrainingLoop.add_trainable_model``:
its own optimizer and schedule, saved in ``checkpoint-N/critic`` and ``output_dir/critic`` (loadable
with ``AutoModelForSequenceClassification.from_pretrained``) and resumed exactly.

With ``value_head=True`` (the design of TRL <= 0.11's ``AutoModelForCausalLMWithValueHead``) the
critic is instead a ``Linear(hidden, 1)`` named ``value_head`` on the policy's last hidden states at
the same positions, registered with ``TrainingLoop.add_policy_module``: one forward gives the
log-probs and the values, the loss is ``pg_loss + vf_coef * vf_loss`` through the policy's one
optimizer (so the value loss also trains the trunk), and the head is saved as
``value_head.safetensors`` beside the policy's ``model.safetensors`` (which stays a plain
transformers checkpoint) in every checkpoint and ``output_dir``.

Tools and environments (``tools=`` / ``environment_factory=``, GRPO's contract through the core's
``ToolCallingRollout``; TRL's PPOTrainer had none): each prompt is one multi-turn episode whose
completion holds model-written tokens (``tool_mask`` 1) and inserted tool tokens (0). GAE runs over
the model's own tokens only (as multi-turn PPO in veRL): :func:`compute_tool_advantages` compresses
each row's model tokens into a prefix, runs :func:`compute_advantages` on it (the score lands on the
state after the last model token) and scatters the results back; tool positions are padding for
:func:`ppo_losses` (no policy, value or KL term). The forwards still read the full sequences.
"""

from __future__ import annotations

import logging

import torch

from posttrain import (
    ConfigError, RolloutEngine, RolloutProducer, TrainerSurface, TrainingLoop, add_old_and_ref_logps, as_config, attach_rollout_metrics,
    build_reference_model, causal_lm_states, check_online_arguments, completion_logps, disable_dropout, evaluate_online, expand_prompts,
    generate_rollout, load_online_policy, load_pretrained, prepare_prompt_dataset, prompt_token_ids, resolve_online_rewards,
    reward_and_length_metrics, rollout_micro_batches, sampler_is_old_policy, score_rollout, SamplingParams, ToolCallingRollout,
)

from posttrain_ppo.config import PPOConfig

__all__ = ["PPOTrainer", "PPOProducer", "INVALID_LOGPROB", "VALUE_HEAD_FILE", "compute_advantages", "compute_tool_advantages", "explained_variance", "masked_mean",
           "masked_var", "masked_whiten", "penalize_missing_eos", "policy_logps_and_values", "ppo_losses", "token_values"]

logger = logging.getLogger(__name__)

#: The log-prob written at padded positions (TRL's value): equal on both sides of every difference, so padding adds 0.
INVALID_LOGPROB = 1.0

#: The value head's file beside the policy's ``model.safetensors`` (``TrainingLoop.add_policy_module("value_head", ...)``).
VALUE_HEAD_FILE = "value_head.safetensors"


# ----------------------------------------------------------------------------- math (pure functions)
def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is true."""
    return (values * mask).sum() / mask.sum()


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``values`` where ``mask`` is true (Bessel-corrected by default)."""
    centered = values - masked_mean(values, mask)
    var = masked_mean(centered * centered, mask)
    if unbiased:
        count = mask.sum()
        if count <= 1:
            raise ValueError(f"masked_var: {int(count)} valued position(s): a variance needs at least 2; raise per_device_train_batch_size or response_length.")
        var = var * (count / (count - 1))
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Standardize ``values`` over ``mask`` (``shift_mean=False`` keeps their mean)."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var(returns - values) / Var(returns)`` over ``mask``: 1 = the critic predicts the returns, <= 0 = nothing."""
    var_returns = masked_var(returns, mask, unbiased=False)
    return 1.0 - masked_var(returns - values, mask, unbiased=False) / var_returns.clamp(min=1e-12)


def compute_advantages(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, values: torch.Tensor, scores: torch.Tensor,
                       completion_mask: torch.Tensor, *, kl_coef: float, kl_estimator: str = "k1", whiten_rewards: bool = False,
                       gamma: float = 1.0, lam: float = 0.95) -> dict[str, torch.Tensor]:
    """Per-token rewards, GAE advantages and returns of a rollout (TRL 1.12's PPO conventions).

    Args:
        logprobs: ``(N, C)`` log pi_old of the completion tokens (any value on padding).
        ref_logprobs: ``(N, C)`` log pi_ref.
        values: ``(N, C)`` the critic's values of the states before each completion token.
        scores: ``(N,)`` sequence scores (reward model / functions, after ``missing_eos_penalty``).
        completion_mask: ``(N, C)`` 1 on completion tokens (a prefix of each row).
        kl_coef, kl_estimator, whiten_rewards, gamma, lam: As in :class:`PPOConfig`.

    Returns:
        ``padding_mask`` (positions after the last token), ``padding_mask_p1`` (after the state that
        follows it), ``logprobs`` (INVALID_LOGPROB on padding), ``values`` (0 after T+1), ``kl``
        (per token), ``non_score_reward``, ``rewards``, ``advantages`` (whitened, 0 on padding) and
        ``returns``; all ``(N, C)``.
    """
    n, width = logprobs.shape
    last = completion_mask.sum(1).long() - 1  # (N,) index T of the last completion token
    position = torch.arange(width, device=logprobs.device).expand(n, width)
    padding_mask = position > last.unsqueeze(1)  # (N, C)
    padding_mask_p1 = position > (last + 1).unsqueeze(1)  # (N, C): the value terms keep T+1
    logprobs = logprobs.masked_fill(padding_mask, INVALID_LOGPROB)
    ref_logprobs = ref_logprobs.masked_fill(padding_mask, INVALID_LOGPROB)
    values = values.masked_fill(padding_mask_p1, 0.0)

    log_ratio = ref_logprobs - logprobs  # log(pi_ref / pi_old)
    kl = -log_ratio if kl_estimator == "k1" else torch.expm1(log_ratio) - log_ratio
    non_score_reward = -kl_coef * kl
    rewards = non_score_reward.clone()
    end = torch.where(last + 1 < width, last + 1, last)  # the score lands on T+1 (T when the row fills the width)
    rewards[torch.arange(n, device=rewards.device), end] += scores.to(rewards.dtype)
    if whiten_rewards:
        rewards = masked_whiten(rewards, ~padding_mask_p1, shift_mean=False).masked_fill(padding_mask_p1, 0.0)

    # GAE, backwards over every position (values and rewards are 0 past T+1)
    running = torch.zeros(n, dtype=rewards.dtype, device=rewards.device)
    reversed_advantages = []
    for t in range(width - 1, -1, -1):
        next_value = values[:, t + 1] if t + 1 < width else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        reversed_advantages.append(running)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)  # (N, C)
    returns = advantages + values
    advantages = masked_whiten(advantages, ~padding_mask).masked_fill(padding_mask, 0.0)
    return {"padding_mask": padding_mask, "padding_mask_p1": padding_mask_p1, "logprobs": logprobs, "values": values, "kl": kl,
            "non_score_reward": non_score_reward, "rewards": rewards, "advantages": advantages, "returns": returns}


def compute_tool_advantages(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, values: torch.Tensor, scores: torch.Tensor,
                            completion_mask: torch.Tensor, tool_mask: torch.Tensor, **kwargs) -> dict[str, torch.Tensor]:
    """:func:`compute_advantages` of tool-calling episodes: GAE over the model-written tokens only (multi-turn PPO as in veRL).

    Each row's model-written positions (``completion_mask * tool_mask``) are compressed into a prefix
    of an ``(N, C')`` batch (``C'`` = the most model tokens of a row), followed by one more slot, the
    state after the row's last model token (full column ``last + 1``: the critic's value at the hidden
    state of that token); :func:`compute_advantages` runs on it unchanged (so the score lands on that
    slot, or on the last token of a row that fills ``C'``), and every output is scattered back to the
    full columns. Tool / environment positions (and padding) get padding semantics: ``padding_mask``
    and ``padding_mask_p1`` true, ``advantages`` / ``returns`` / ``values`` / ``kl`` / ``rewards`` 0,
    ``logprobs`` ``INVALID_LOGPROB``; the column after a row's last model token keeps its value terms
    (TRL's T+1 rule in compressed coordinates). With ``tool_mask`` all ones it equals
    :func:`compute_advantages`.

    Args:
        logprobs, ref_logprobs, values: ``(N, W)`` as for :func:`compute_advantages`, over the full completions.
        scores: ``(N,)``.
        completion_mask: ``(N, W)`` 1 on completion tokens (model-written and inserted; a prefix of each row).
        tool_mask: ``(N, W)`` 1 on model-written tokens.
        **kwargs: ``kl_coef``, ``kl_estimator``, ``whiten_rewards``, ``gamma``, ``lam`` of :func:`compute_advantages`.

    Returns:
        :func:`compute_advantages`' keys, ``(N, W)`` each, in full coordinates.

    Raises:
        ValueError: A row needs the state after its last model token but that token is in the last
            column (append one padding column to the completions before the forwards: the trainer does).
    """
    n, width = logprobs.shape
    device = logprobs.device
    model = completion_mask.bool() & tool_mask.bool()  # (N, W)
    count = model.sum(1)  # (N,) model-written tokens per row
    compressed_width = max(int(count.max()), 1) if n else 1
    last = torch.where(model, torch.arange(width, device=device).expand(n, width), -1).max(1).values  # (N,) column of the last model token
    index = torch.zeros(n, compressed_width, dtype=torch.long, device=device)  # (N, C'): the full column of each compressed slot
    rows, cols = model.nonzero(as_tuple=True)
    index[rows, (model.long().cumsum(1) - 1)[rows, cols]] = cols
    has_next = count < compressed_width  # the slot after the last model token is inside C'
    after = last + 1
    outside = has_next & (after >= width)
    if bool(outside.any()):
        raise ValueError(f"compute_tool_advantages: row {int(outside.nonzero()[0])}'s last model token is in the last of the {width} columns, so "
                         "the state after it has no value; append one padding column to the completions before the forwards.")
    index[has_next, count[has_next]] = after[has_next]
    slot = torch.arange(compressed_width, device=device).expand(n, compressed_width)
    prefix = (slot < count.unsqueeze(1)).to(completion_mask.dtype)  # (N, C')
    out = compute_advantages(logprobs.gather(1, index), ref_logprobs.gather(1, index), values.gather(1, index), scores, prefix, **kwargs)
    kept = slot <= count.unsqueeze(1)  # (N, C'): the model tokens and the slot after them
    target_rows = torch.arange(n, device=device).unsqueeze(1).expand(n, compressed_width)[kept]
    target_cols = index[kept]
    fills = {"padding_mask": True, "padding_mask_p1": True, "logprobs": INVALID_LOGPROB}
    full = {}
    for key, value in out.items():
        scattered = torch.full((n, width), fills.get(key, 0), dtype=value.dtype, device=value.device)
        scattered[target_rows, target_cols] = value[kept]
        full[key] = scattered
    return full


def ppo_losses(new_logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, vpred: torch.Tensor, old_values: torch.Tensor,
               returns: torch.Tensor, padding_mask: torch.Tensor, padding_mask_p1: torch.Tensor, *, cliprange: float,
               cliprange_value: float) -> dict[str, torch.Tensor]:
    """The clipped policy loss and the clipped value loss of one micro-batch, with their statistics.

    Args:
        new_logprobs, old_logprobs: ``(B, C)`` log pi_theta / log pi_old (padding: any equal values).
        advantages, returns, old_values: ``(B, C)`` from :func:`compute_advantages`.
        vpred: ``(B, C)`` the critic's current values.
        padding_mask, padding_mask_p1: ``(B, C)`` bool, from :func:`compute_advantages`.
        cliprange, cliprange_value: As in :class:`PPOConfig`.

    Returns:
        ``pg_loss`` and ``vf_loss`` (0.5 * clipped squared error, before ``vf_coef``), and detached
        ``pg_clipfrac``, ``vf_clipfrac``, ``approxkl``, ``ratio``.
    """
    policy_tokens, value_tokens = ~padding_mask, ~padding_mask_p1
    new_logprobs = new_logprobs.masked_fill(padding_mask, INVALID_LOGPROB)
    old_logprobs = old_logprobs.masked_fill(padding_mask, INVALID_LOGPROB)
    vpred = vpred.masked_fill(padding_mask_p1, 0.0)
    vpred_clipped = torch.clamp(vpred, old_values - cliprange_value, old_values + cliprange_value)
    vf_unclipped = (vpred - returns) ** 2
    vf_clipped = (vpred_clipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.maximum(vf_unclipped, vf_clipped), value_tokens)

    log_ratio = new_logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.maximum(pg_unclipped, pg_clipped), policy_tokens)
    with torch.no_grad():
        stats = {
            "pg_clipfrac": masked_mean((pg_clipped > pg_unclipped).float(), policy_tokens),
            "vf_clipfrac": masked_mean((vf_clipped > vf_unclipped).float(), value_tokens),
            "approxkl": 0.5 * (log_ratio**2).mean(),  # TRL's: over every position (padding adds 0)
            "ratio": ratio.mean(),
        }
    return {"pg_loss": pg_loss, "vf_loss": vf_loss, **stats}


def penalize_missing_eos(scores: torch.Tensor, completion_ids: torch.Tensor, completion_mask: torch.Tensor, eos_token_id: int | None,
                         penalty: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(scores - penalty where a completion holds no EOS token, contains_eos (N,))`` (``penalty=None``: unchanged)."""
    if eos_token_id is None:
        contains_eos = torch.zeros(completion_ids.shape[0], dtype=torch.bool)
    else:
        contains_eos = ((completion_ids == eos_token_id) & completion_mask.bool()).any(dim=1)
    if penalty is not None:
        scores = torch.where(contains_eos, scores, scores - penalty)
    return scores, contains_eos


def token_values(critic, batch: dict) -> torch.Tensor:
    """The critic's value of the state before each completion token, ``(B, C)``: its ``score`` head on every position.

    ``critic`` is a one-label ``AutoModelForSequenceClassification`` (possibly wrapped by DDP): its own
    forward runs (so a distributed wrapper sees it) and its head is applied to the last hidden states.
    """
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)  # (B, P+C)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    outputs = critic(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
    start, width = batch["prompt_ids"].shape[1] - 1, batch["completion_ids"].shape[1]
    head = getattr(critic, "module", critic).score
    return head(outputs.hidden_states[-1][:, start : start + width]).squeeze(-1)  # (B, C)


def policy_logps_and_values(model, value_head, batch: dict, temperature: float, *, compute_entropy: bool = True,
                            chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One policy forward: the completion log-probs (as :func:`posttrain.completion_logps`) and the value head's values.

    The values are ``value_head`` on the policy's last hidden states at the positions the separate
    critic scores (:func:`token_values`): the state before each completion token. Differentiable:
    the value loss reaches the head and the trunk.

    Returns:
        ``(logps (B, C), entropies (B, C) or None, values (B, C))``.
    """
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)  # (B, P+C)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    start, width = batch["prompt_ids"].shape[1] - 1, batch["completion_ids"].shape[1]
    outputs, states = causal_lm_states(model, chunk_size=chunk_size, input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=width + 1,
                                       output_hidden_states=True, use_cache=False)
    scores = states[:, :-1].score(batch["completion_ids"], temperature=temperature, return_entropy=compute_entropy)  # position t predicts token t
    values = value_head(outputs.hidden_states[-1][:, start : start + width]).squeeze(-1)  # (B, C)
    return scores.logps, scores.entropy, values


def _rows_of(batch: dict, index: torch.Tensor) -> dict:
    """The rows ``index`` of every per-row tensor of a rollout (same widths)."""
    return {k: v[index] for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == batch["completion_ids"].shape[0]}


# ----------------------------------------------------------------------------- the producer: one rollout, many mini-batches
class PPOProducer(RolloutProducer):
    """A :class:`posttrain.RolloutProducer` whose production (one rollout) is trained ``num_ppo_epochs * num_mini_batches`` times.

    Each use returns the micro-batches of one mini-batch: use ``u`` of the rollout first consumed at
    step ``s`` is PPO epoch ``u // num_mini_batches``, mini-batch ``u % num_mini_batches`` of a shuffle
    seeded by ``(seed, s, epoch, rank)``. ``u = state.global_step - s`` comes from the loop's state, so a
    run resumed mid-rollout continues with the same mini-batches.
    """

    def __init__(self, source, dataset, produce, *, args: PPOConfig, rank: int):
        super().__init__(source, dataset, produce, reuse=args.updates_per_rollout)
        self.args, self.rank = args, rank

    def next_step(self, state) -> list[dict]:
        rollout = super().next_step(state)[0]
        args = self.args
        first_step = int(rollout["first_step"])
        use = int(getattr(state, "global_step", 0)) - first_step
        ppo_epoch, mini_batch = divmod(use, args.num_mini_batches)
        generator = torch.Generator().manual_seed(int(args.seed) * 1_000_003 + first_step * 7919 + ppo_epoch * 104_729 + self.rank)
        rows = rollout["completion_ids"].shape[0]  # local_batch_size, or fewer at the end of an epoch of prompts
        chosen = torch.tensor_split(torch.randperm(rows, generator=generator), args.num_mini_batches)[mini_batch]
        size = args.per_device_train_batch_size
        micro = [_rows_of(rollout, chosen[i : i + size]) for i in range(0, len(chosen), size)]
        for batch in micro:
            batch["share_divisor"] = torch.tensor(float(len(micro) * rollout["world"]))
            batch["rollout_metric_names"], batch["rollout_metric_values"] = rollout["rollout_metric_names"], rollout["rollout_metric_values"]
        return micro


# ----------------------------------------------------------------------------- trainer
class PPOTrainer(TrainerSurface):
    """Train a causal LM with PPO: a policy, a critic, a frozen reference and a reward model or reward functions (TRL 1.12's ``PPOTrainer`` API).

    Args:
        args: A :class:`PPOConfig` (or a ``TrainingArguments`` / dict of fields).
        processing_class: The tokenizer (default: loaded with the policy).
        model: The policy: a model object or a directory / Hub id (default ``args.model_name_or_path``, then ``args.sft_model_path``).
        ref_model: The frozen reference: an object or a path (default: a copy of the initial policy; the
            adapter-disabled policy with PEFT).
        reward_model: A one-label sequence classifier (object or path) scoring the completions.
        train_dataset: Prompt rows: ``prompt`` (string or messages), ``prompt_ids``, or TRL's pre-tokenized ``input_ids``.
        value_model: The critic: a one-label sequence classifier (object or path); default
            ``args.value_model_path``, else the reward model's path, else the policy's path. Must be
            None with ``args.value_head`` (the head on the policy is the critic then).
        data_collator: Accepted for TRL compatibility; must be None (prompts are tokenized by the rollout).
        eval_dataset: Same format, or a dict of them.
        optimizers: Only ``(None, None)``: the loop builds both optimizers from ``args``.
        callbacks: ``transformers.TrainerCallback`` objects.
        peft_config: A ``peft.PeftConfig`` for the policy.
        reward_funcs: Reward functions (callables or names, as GRPO's), instead of or beside ``reward_model``.
        rollout_engine: A ``posttrain.RolloutEngine`` (default: the transformers backend sampling from the policy).
        allow_experimental: Python opt-in for this experimental method.
        tools: Tool functions (sync or ``async def``, with type hints and a Google-style docstring), a
            posttrain extension (GRPO's contract): each prompt becomes a multi-turn episode in which the
            policy may call them; their results are inserted as tokens, up to ``max_tool_calling_iterations``
            rounds and ``response_length`` tokens in all (``posttrain.ToolCallingRollout``). Needs
            conversational prompts and a chat template that renders tools. GAE, the losses and the KL
            cover the model-written tokens only (:func:`compute_tool_advantages`).
        environment_factory: An environment class (instantiated without arguments, pooled), or a dict
            of them selected per row by an ``environment`` column: ``reset(**row)`` starts each episode
            (a returned string is appended to the prompt), its other public methods are tools, an
            optional ``get_reward()`` is a reward (weight 1, after the reward model and functions);
            reward functions receive ``environments=``. Without a ``train_dataset`` a single class writes
            each prompt in ``reset()`` (empty user prompts, ``max_steps`` steps).

    Raises:
        posttrain.ConfigError: no reward, no dataset, a dataset without prompts, ``ref_model is model``,
            a critic that cannot be found, ``value_model`` with ``value_head=True``, a saved value head that
            does not fit the policy, or an argument that cannot be honoured.
    """

    _tag_names = ["trl", "ppo"]

    def __init__(self, args: PPOConfig | None = None, processing_class=None, model=None, ref_model=None, reward_model=None, train_dataset=None,
                 value_model=None, data_collator=None, eval_dataset=None, optimizers=(None, None), callbacks=None, peft_config=None,
                 reward_funcs=None, rollout_engine=None, allow_experimental=False, tools=None, environment_factory=None):
        self.args = args = as_config(args, PPOConfig)
        self.loop = TrainingLoop(args, method="ppo", allow_experimental=allow_experimental, callbacks=callbacks)  # the maturity gate first
        if ref_model is not None and ref_model is model:
            raise ConfigError("model and ref_model are the same object: pass ref_model=None (a frozen copy is made) or a separate copy.")
        if data_collator is not None:
            raise ConfigError("data_collator is not used by PPO here: prompts are tokenized by the rollout; pass data_collator=None.")
        if train_dataset is None and environment_factory is not None:
            train_dataset = self._placeholder_prompts(args, environment_factory)
        elif environment_factory is not None:
            train_dataset = self._with_default_prompts(train_dataset)
        # no reward model nor functions beside an environment: its get_reward() is the reward (checked once the tools are set up)
        environment_only = environment_factory is not None and reward_model is None and not reward_funcs and not args.reward_funcs
        reward_spec = [] if environment_only else self._reward_spec(reward_model, reward_funcs)
        check_online_arguments("PPO", train_dataset=train_dataset, reward_funcs=reward_spec or environment_only, optimizers=optimizers)
        policy = model if model is not None else (args.model_name_or_path or args.sft_model_path)
        self.model, self.processing_class = load_online_policy(policy, args, loop=self.loop, processing_class=processing_class,
                                                               peft_config=peft_config, tags=self._tag_names)
        tok = self.processing_class
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.stop_token_id = tok.eos_token_id if args.stop_token == "eos" else args.stop_token_id
        # a reward model given as an object shares the policy's tokenizer (as in TRL); named ones load their own
        processing_classes = [tok] + [None] * (len(reward_spec) - 1) if reward_model is not None and not isinstance(reward_model, str) else None
        self.tool_rollout = self._setup_tools(tools, environment_factory)
        self.tools = self.tool_rollout.all_tools() if self.tool_rollout is not None else []  # TRL's: tools= plus the environments' methods
        if reward_spec:
            rewards = resolve_online_rewards(reward_spec, args, loop=self.loop, reward_processing_classes=processing_classes)
            self.reward_funcs, self.reward_func_names, self.reward_weights = rewards.funcs, rewards.names, rewards.weights
            self.reward_processing_classes = rewards.processing_classes
        else:  # an environment's get_reward() is the only reward
            self.reward_funcs, self.reward_func_names, self.reward_weights, self.reward_processing_classes = [], [], torch.zeros(0), []
        self._add_environment_rewards()
        self.ref_model = build_reference_model(self.model, ref_model, loop=self.loop, model_init_kwargs=args.model_init_kwargs, needed=True)
        if args.value_head and value_model is not None:
            raise ConfigError("value_model is given but value_head=True: the value head on the policy replaces the separate critic; pass "
                              "value_model=None (or set value_head=False to train that critic).")
        self.critic = None if args.value_head else self._load_critic(value_model, policy, reward_spec)
        self.train_dataset = self.process_dataset(train_dataset, "train_dataset")
        if isinstance(eval_dataset, dict):
            self.eval_dataset = {key: self.process_dataset(part, f"eval_dataset[{key!r}]") for key, part in eval_dataset.items()}
        else:
            self.eval_dataset = self.process_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        self.loop.setup(self.model, method=self)
        if args.value_head:
            self.loop.add_policy_module("value_head", self._build_value_head(policy))
        else:
            self.loop.add_trainable_model("critic", self.critic, learning_rate=args.critic_learning_rate if args.critic_learning_rate is not None else args.learning_rate)
        world = self.loop.accelerator.num_processes
        args.world_size, args.micro_batch_size = world, args.per_device_train_batch_size * world
        args.batch_size, args.mini_batch_size = args.local_batch_size * world, args.local_mini_batch_size * world
        if args.total_episodes is not None and args.max_steps <= 0:
            args.max_steps = args.steps_for_episodes(world)
        self.temperature = args.temperature + 1e-7  # TRL divides every logit by temperature + 1e-7
        stop = (self.stop_token_id,) if self.stop_token_id is not None else ()
        self.sampling = dict(max_tokens=args.response_length, temperature=self.temperature, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0,
                             **({"stop_token_ids": stop} if stop else {}))
        self.engine = rollout_engine or RolloutEngine("transformers", model=self.model, tokenizer=tok, accelerator=self.loop.accelerator,
                                                      generation_batch_size=args.local_rollout_forward_batch_size)
        self.old_from_sampler = sampler_is_old_policy(self.sampling, self.temperature, self.engine.samples_from_policy)
        rank = self.loop.accelerator.process_index
        self.producer = PPOProducer(self.loop.prompt_source(len(self.train_dataset), args.local_batch_size), self.train_dataset, self._produce,
                                    args=args, rank=rank)

    # -------------------------------------------------------------------------- setup
    @staticmethod
    def _placeholder_prompts(args, environment_factory) -> list[dict]:
        """Without a ``train_dataset`` the environment writes the task in ``reset()`` (TRL 1.16's GRPO rule): one rollout's rows
        (``local_batch_size``) of empty user prompts, cycled ``max_steps`` steps."""
        if isinstance(environment_factory, dict):
            raise ConfigError("A dict environment_factory (several environments) requires a `train_dataset` with an 'environment' column "
                              "routing each row; pass one, or a single environment class.")
        if args.max_steps <= 0 and args.total_episodes is None:
            raise ConfigError("Without a train_dataset (the environment writes each prompt in reset()), set max_steps > 0 (or total_episodes): "
                              "it is the training length.")
        return [{"prompt": [{"role": "user", "content": ""}]} for _ in range(args.local_batch_size)]

    # Copied from posttrain_grpo.trainer.GRPOTrainer._with_default_prompts
    @staticmethod
    def _with_default_prompts(dataset):
        """With an environment, rows may omit ``prompt`` (TRL 1.16): ``reset()`` then writes it into an empty user message."""
        empty = [{"role": "user", "content": ""}]
        names = getattr(dataset, "column_names", None)
        if isinstance(names, list):  # a datasets.Dataset
            return dataset if "prompt" in names else dataset.add_column("prompt", [empty] * len(dataset))
        if isinstance(dataset, (list, tuple)):
            return [row if "prompt" in row else {**row, "prompt": empty} for row in dataset]
        return dataset

    # Copied from posttrain_grpo.trainer.GRPOTrainer._setup_tools
    def _setup_tools(self, tools, environment_factory) -> ToolCallingRollout | None:
        """The core's tool-calling rollout for ``tools=`` / ``environment_factory=`` (None without them)."""
        if not tools and environment_factory is None:
            return None
        args = self.args
        try:
            return ToolCallingRollout(self.processing_class, tools=tools, environment_factory=environment_factory,
                                      max_tool_calling_iterations=args.max_tool_calling_iterations, max_completion_length=args.max_completion_length,
                                      tool_timeout=args.tool_call_timeout, chat_template_kwargs=args.chat_template_kwargs)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    # Copied from posttrain_grpo.trainer.GRPOTrainer._add_environment_rewards
    def _add_environment_rewards(self) -> None:
        """Append one reward function per environment class with ``get_reward()``, named after the class, weight 1 (TRL's rule:
        ``reward_weights`` covers ``reward_funcs``); refuse a run with no reward source at all."""
        for name, func in self.tool_rollout.reward_functions() if self.tool_rollout is not None else []:
            self.reward_funcs = [*self.reward_funcs, func]
            self.reward_func_names = [*self.reward_func_names, name]
            self.reward_processing_classes = [*self.reward_processing_classes, None]
            self.reward_weights = torch.cat([self.reward_weights, torch.ones(1)])
        if not self.reward_funcs:
            raise ConfigError("No reward source provided: pass reward_funcs=[...], or an environment_factory whose environment defines get_reward().")

    def _reward_spec(self, reward_model, reward_funcs) -> list | None:
        """The reward functions in scoring order: the reward model first, then the functions (or the config's)."""
        funcs = reward_funcs if reward_funcs is not None else self.args.reward_funcs
        funcs = list(funcs) if isinstance(funcs, (list, tuple)) else ([funcs] if funcs is not None else [])
        if reward_model is not None:
            return [reward_model, *funcs]
        return funcs or [self.args.reward_model_path]

    def _load_critic(self, value_model, policy, reward_spec):
        """The critic: ``value_model``, else ``value_model_path``, else the reward model's path, else the policy's path."""
        args = self.args
        source = value_model if value_model is not None else args.value_model_path
        if source is None:
            paths = [s for s in reward_spec if isinstance(s, str) and ":" not in s and s not in ("accuracy", "format") and not s.isidentifier()]
            source = paths[0] if paths else (policy if isinstance(policy, str) else getattr(getattr(policy, "config", None), "_name_or_path", None) or None)
        if source is None:
            raise ConfigError("PPO needs a critic: pass value_model= (a one-label AutoModelForSequenceClassification) or set value_model_path; "
                              "the policy was given as an object without a path to initialize one from.")
        if isinstance(source, str) or not hasattr(source, "score"):
            if not isinstance(source, str):
                raise ConfigError(f"value_model is a {type(source).__name__} without a `score` head: give a one-label AutoModelForSequenceClassification or its path.")
            source, _ = load_pretrained(source, role="critic", model_init_kwargs=args.model_init_kwargs, trust_remote_code=args.trust_remote_code,
                                        tokenizer=self.processing_class, load_tokenizer=False)
        if args.disable_dropout:
            disable_dropout(source)
        return source

    def _build_value_head(self, policy) -> torch.nn.Linear:
        """``Linear(hidden, 1)`` in the policy's dtype and device: loaded from ``<policy dir>/value_head.safetensors`` when the
        policy's directory has one (a run continued from an earlier output_dir), else seeded ``N(0, value_head_init_std)``, bias 0."""
        import os

        from safetensors.torch import load_file

        model = self.loop.unwrapped_model()
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        hidden = config.hidden_size
        ref = next(model.parameters())
        head = torch.nn.Linear(hidden, 1, dtype=ref.dtype, device=ref.device)
        directory = policy if isinstance(policy, str) else getattr(getattr(policy, "config", None), "_name_or_path", None)
        path = os.path.join(directory, VALUE_HEAD_FILE) if directory and os.path.isdir(directory) else None
        with torch.no_grad():
            if path is not None and os.path.isfile(path):
                saved = load_file(path)
                shapes = {k: tuple(v.shape) for k, v in saved.items()}
                if shapes != {"weight": (1, hidden), "bias": (1,)}:
                    raise ConfigError(f"{path} holds {shapes}, not a value head of this policy (weight (1, {hidden}), bias (1,)): "
                                      f"remove it to start a fresh head, or load the policy it was trained with.")
                head.load_state_dict({k: v.to(ref.dtype) for k, v in saved.items()})
                logger.info("PPO value head loaded from %s", path)
            else:
                generator = torch.Generator().manual_seed(int(self.args.seed))
                head.weight.copy_(torch.randn(head.weight.shape, generator=generator, dtype=torch.float64) * self.args.value_head_init_std)
                head.bias.zero_()
        return head

    def process_dataset(self, dataset, name: str):
        """Return ``dataset`` as prompt rows; TRL's pre-tokenized ``input_ids`` column is read as ``prompt_ids``."""
        if dataset is not None and not isinstance(dataset, dict):
            columns = getattr(dataset, "column_names", None)
            if columns is not None and "input_ids" in columns and "prompt" not in columns and "prompt_ids" not in columns:
                dataset = dataset.rename_column("input_ids", "prompt_ids")
            elif columns is None and isinstance(dataset, list) and dataset and isinstance(dataset[0], dict) and "input_ids" in dataset[0] and "prompt" not in dataset[0]:
                dataset = [{("prompt_ids" if k == "input_ids" else k): v for k, v in row.items()} for row in dataset]
        return prepare_prompt_dataset(dataset, name, method="PPO", prompt_ids=self._prompt_ids)

    def _prompt_ids(self, row: dict) -> list[int]:
        return prompt_token_ids(row, self.processing_class, chat_template_kwargs=self.args.chat_template_kwargs)

    # -------------------------------------------------------------------------- loop protocol
    def collate(self, rows: list[dict]) -> dict:
        return {"rows": [dict(row) for row in rows]}  # prompts stay raw: the rollout tokenizes them

    @property
    def data_collator(self):
        return self.collate

    def count_items(self, batch: dict) -> int:
        return batch["completion_ids"].shape[0]

    def _produce(self, request) -> list[dict]:
        """The producer's callback: one rollout with its advantages (the producer serves its mini-batches)."""
        rollout = self._rollout(request.rows, seed=self.args.seed + request.step + 1_000_003 * request.rank)
        rollout["first_step"] = request.step
        rollout["world"] = self.loop.accelerator.num_processes
        return [rollout]

    def _rollout_and_rewards(self, rows: list[dict], seed: int) -> tuple:
        """Return ``(rollout, rewards_per_func (N, F))``: one completion per row, or one tool-calling episode per row."""
        tok = self.processing_class
        if self.tool_rollout is not None:  # multi-turn episodes with tools / environments
            result = self.tool_rollout.rollout(self.engine, rows, SamplingParams(n=1, seed=seed, **self.sampling))
            rewards_per_func = score_rollout(rows, result.prompts, result.rollout, 1, reward_funcs=self.reward_funcs,
                                             reward_func_names=self.reward_func_names, tokenizer=tok, trainer_state=self.loop.state,
                                             completions=result.completions,
                                             reward_kwargs={"environments": result.environments} if result.environments is not None else None)
            return result.rollout, rewards_per_func
        prompts, prompt_ids = expand_prompts(rows, 1, self._prompt_ids, tok)
        rollout = generate_rollout(prompts, prompt_ids, engine=self.engine, sampling=self.sampling, num_generations=1, seed=seed)
        rewards_per_func = score_rollout(rows, prompts, rollout, 1, reward_funcs=self.reward_funcs, reward_func_names=self.reward_func_names,
                                         tokenizer=tok, trainer_state=self.loop.state)  # (N, F)
        return rollout, rewards_per_func

    def _rollout_forwards(self, batch: dict, sampling_logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rollout's no-grad forwards over the full sequences: ``(log pi_old, log pi_ref, critic values)``, ``(N, C)`` each (CPU)."""
        args = self.args
        n = batch["completion_ids"].shape[0]
        chunk = self.args.local_rollout_forward_batch_size
        old, ref, values = [], [], []
        head = self.loop.policy_module("value_head") if args.value_head else None
        for start in range(0, n, chunk):
            index = torch.arange(start, min(start + chunk, n))
            part = _rows_of(batch, index)
            # with the value head, one policy forward gives pi_old (unless the sampler's log-probs are pi_old) and the values
            add_old_and_ref_logps(part, sampling_logps[index], model=self.model, temperature=self.temperature,
                                  need_old=head is None or self.old_from_sampler, need_ref=True, ref_model=self.ref_model,
                                  old_from_sampler=self.old_from_sampler, device=self.loop.device, accelerator=self.loop.accelerator,
                                  chunk_size=args.logprob_chunk_size)
            inputs = self.loop.to_device({k: v for k, v in part.items() if k.startswith(("prompt_", "completion_"))})
            if head is None:
                values.append(token_values(self.loop.trainable_model("critic"), inputs).float().cpu())
            else:
                logps, _, head_values = policy_logps_and_values(self.model, head, inputs, self.temperature, compute_entropy=False,
                                                                chunk_size=args.logprob_chunk_size)
                part.setdefault("old_per_token_logps", logps.float().cpu())
                values.append(head_values.float().cpu())
            old.append(part["old_per_token_logps"])
            ref.append(part["ref_per_token_logps"])
        return torch.cat(old), torch.cat(ref), torch.cat(values)  # (N, C)

    @torch.no_grad()
    def _rollout(self, rows: list[dict], seed: int) -> dict:
        """Generate, score, and compute values, rewards, advantages and returns of one rollout (CPU tensors)."""
        args, tok = self.args, self.processing_class
        rollout, rewards_per_func = self._rollout_and_rewards(rows, seed)
        batch = rollout_micro_batches(rollout, len(rollout), self.pad_token_id)[0]  # one (N, .) batch
        tool_mask = batch.pop("tool_mask", None)  # (N, C) 1 at model-written tokens: tool-calling episodes only
        if tool_mask is not None:  # one padding column more, so the state after a last model token in the last column has a value
            for key, fill in (("completion_ids", self.pad_token_id), ("completion_mask", 0), ("sampling_logprobs", 0.0)):
                batch[key] = torch.cat([batch[key], torch.full((len(rollout), 1), fill, dtype=batch[key].dtype)], dim=1)
            tool_mask = torch.cat([tool_mask, torch.zeros(len(rollout), 1, dtype=tool_mask.dtype)], dim=1)
        sampling_logps = batch.pop("sampling_logprobs")
        old, ref, values = self._rollout_forwards(batch, sampling_logps)  # (N, C): the forwards read the full sequences
        mask = batch["completion_mask"]
        scores = (rewards_per_func * self.reward_weights.unsqueeze(0)).nansum(dim=1)  # (N,); unscorable rows score 0
        gae = dict(kl_coef=args.kl_coef, kl_estimator=args.kl_estimator, whiten_rewards=args.whiten_rewards, gamma=args.gamma, lam=args.lam)
        if tool_mask is None:
            scores, contains_eos = penalize_missing_eos(scores, batch["completion_ids"], mask, tok.eos_token_id, args.missing_eos_penalty)
            out = compute_advantages(old, ref, values, scores, mask, **gae)
        else:  # an episode holds its EOS when its last model-written token is the EOS (its last turn was not cut)
            model = mask.bool() & tool_mask.bool()  # (N, C)
            last = torch.where(model, torch.arange(model.shape[1]).expand_as(model), 0).max(1).values  # (N,)
            last_token = batch["completion_ids"].gather(1, last.unsqueeze(1))  # (N, 1)
            scores, contains_eos = penalize_missing_eos(scores, last_token, model.any(1, keepdim=True), tok.eos_token_id, args.missing_eos_penalty)
            out = compute_tool_advantages(old, ref, values, scores, mask, tool_mask, **gae)  # tool positions: padding semantics
        value_tokens = ~out["padding_mask_p1"]
        tokens = ~out["padding_mask"]
        metrics = reward_and_length_metrics(rollout, rewards_per_func, self.reward_weights, self.reward_func_names,
                                            torch.zeros(len(rollout), dtype=torch.bool), 1)
        for key in ("reward_std", "frac_reward_zero_std"):  # one completion per prompt: no groups
            metrics.pop(key, None)
        metrics.update({
            "objective/kl": float(out["kl"].masked_fill(~tokens, 0.0).sum(1).mean()),
            "kl": float(masked_mean(out["kl"], tokens)),
            "objective/entropy": float((-out["logprobs"].masked_fill(~tokens, 0.0)).sum(1).mean()),
            "objective/non_score_reward": float(out["non_score_reward"].masked_fill(~tokens, 0.0).sum(1).mean()),
            "objective/rlhf_reward": float((scores + out["non_score_reward"].masked_fill(~tokens, 0.0).sum(1)).mean()),
            "objective/scores": float(scores.mean()),
            "val/num_eos_tokens": float(contains_eos.sum()),
            "val/explained_variance": float(explained_variance(out["values"], out["returns"], value_tokens)),
            "val/mean": float(masked_mean(out["values"], value_tokens)),
            "returns/mean": float(masked_mean(out["returns"], value_tokens)),
        })
        result = {k: batch[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")}
        result.update({k: out[k] for k in ("padding_mask", "padding_mask_p1", "advantages", "returns")})
        result["old_logprobs"], result["old_values"] = out["logprobs"], out["values"]
        attach_rollout_metrics([result], metrics)
        return result

    def _losses(self, model, batch: dict) -> tuple[dict, dict]:
        """``({"model": pg_loss, "critic" or "value_head": vf_coef * vf_loss}, metrics)`` of one micro-batch."""
        args = self.args
        if args.value_head:  # one forward of the policy: log-probs and the head's values
            logps, entropies, vpred = policy_logps_and_values(model, self.loop.policy_module("value_head"), batch, self.temperature,
                                                              chunk_size=args.logprob_chunk_size)
        else:
            logps, entropies, _ = completion_logps(model, batch, self.temperature, chunk_size=args.logprob_chunk_size)  # (B, C)
            vpred = token_values(self.loop.trainable_model("critic"), batch)  # (B, C)
        out = ppo_losses(logps, batch["old_logprobs"], batch["advantages"], vpred, batch["old_values"], batch["returns"], batch["padding_mask"],
                         batch["padding_mask_p1"], cliprange=args.cliprange, cliprange_value=args.cliprange_value)
        tokens = (~batch["padding_mask"]).float()
        metrics = {
            "policy/approxkl_avg": out["approxkl"], "policy/clipfrac_avg": out["pg_clipfrac"], "loss/policy_avg": out["pg_loss"].detach(),
            "loss/value_avg": out["vf_loss"].detach(), "val/clipfrac_avg": out["vf_clipfrac"], "val/ratio": out["ratio"],
            "policy/entropy_avg": (entropies * tokens).sum() / tokens.sum().clamp(min=1.0),
        }
        if "rollout_metric_values" in batch:
            metrics.update(zip(batch["rollout_metric_names"], batch["rollout_metric_values"]))
        return {"model": out["pg_loss"], ("value_head" if args.value_head else "critic"): args.vf_coef * out["vf_loss"]}, metrics

    def compute_loss(self, model, batch: dict, num_items_in_batch):
        """Return one micro-batch's loss share and its metrics (no host syncs): ``{"model": policy loss, "critic": value loss}``
        with the separate critic (two optimizers); ``policy loss + value loss`` with the value head (the policy's one optimizer)."""
        losses, metrics = self._losses(model, batch)
        share = batch.get("share_divisor", torch.ones(())).to(losses["model"].device)
        if self.args.value_head:
            return (losses["model"] + losses["value_head"]) / share, metrics
        return {name: loss / share for name, loss in losses.items()}, metrics

    def on_step_end(self, model, state) -> None:
        self.engine.update_weights(model)  # the next rollout samples from the updated policy

    def evaluate_batches(self, model, batches) -> dict[str, float]:
        """Roll out each eval batch (seeded by ``seed``), compute its advantages and its loss ``pg_loss + vf_coef * vf_loss`` as in training."""
        def produce(rows, seed):
            return [self._rollout(rows, seed)]

        def loss_of(model, batch, n):
            losses, metrics = self._losses(model, batch)
            return sum(losses.values()), metrics

        return evaluate_online(model, batches, produce=produce, compute_loss=loss_of, count_items=self.count_items, loop=self.loop, seed=self.args.seed)

    def state_dict(self) -> dict:
        return {"policy_version": self.engine.policy_version}

    def load_state_dict(self, state: dict) -> None:
        self.engine.set_policy_version(int(state.get("policy_version", 0)))
