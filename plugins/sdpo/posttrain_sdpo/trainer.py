"""SDPO on the posttrain loop (heavy: imports torch).

SDPO (Hübotter et al. 2026, "Reinforcement Learning via Self-Distillation") is on-policy RL in which the model
is its own teacher: the teacher is the model conditioned on feedback, namely a successful rollout of the same
group (reward >= ``success_reward_threshold``) and/or the row's environment feedback (``privileged_context``).
On the student's completions its next-token distributions are pulled toward that teacher's; a GRPO-style
clipped policy gradient on group-normalized rewards can be blended in (``distillation_weight``). What SDPO
adds over SDFT: reward functions and advantages, the teacher context mined from the group's own successful
rollouts, the per-sample ``self_distillation_mask`` (samples without a demonstration or feedback are not
distilled) and the convex blend with the policy loss. One optimizer step, in order::

    P = per_device_train_batch_size * gradient_accumulation_steps / num_generations prompts
      -> rollout: num_generations completions per prompt, sampled from the student      N = P * G
      -> reward: every reward function on every completion; r = sum_f w_f r_f            (N,)
      -> advantage: (r - mean_group(r)) / (std + 1e-4), std per `scale_rewards`
      -> teacher prompt per completion i: the group's first OTHER completion j with r_j >= threshold
         (solution_template) and/or the row's feedback (feedback_template), in reprompt_template;
         samples with neither keep the student prompt and get self_distillation_mask 0
      -> micro-batches of per_device_train_batch_size completions (+ pi_old when num_iterations > 1)
      -> distillation per token (logits / temperature; teacher under no_grad, in its dtype):
           sampled_token: (log pi_S(y) - log pi_T(y)).detach() * log pi_S(y)   (reverse KL, alpha = 1)
           full_logits / topk_logits: the generalized JSD D_alpha (as SDFT)
         times min(pi / pi_old, distillation_is_clip) when pi_old is kept;
         distillation_loss = mean over sequences of (mean over the sequence's distilled tokens)
      -> policy loss: -min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A), aggregated by `loss_type`
      -> loss = (1 - distillation_weight) * policy_loss + distillation_weight * distillation_loss

The blocks shared with SDFT are marked ``# Copied from posttrain_sdft.trainer.<name>`` (tests/test_copied_blocks.py
diffs them). Departures from TRL: docs/methods/sdpo.md.
"""

from __future__ import annotations

import logging
import re
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from posttrain import (  # the loop and the core's online steps (the online scaffold, plugin API 1.5)
    ConfigError, DataError, ProduceRequest, RolloutProducer, TokenStates, TrainerSurface, TrainingLoop, adapter_disabled, add_old_and_ref_logps,
    as_config, attach_rollout_metrics, build_reference_model, build_rollout_engine, causal_lm_states, check_online_arguments, default_output_dir,
    evaluate_online, expand_prompts, gather_across_processes, generate_rollout, is_peft_model, load_online_policy, pad, prepare_prompt_dataset,
    prompt_token_ids, resolve_online_rewards, rollout_micro_batches, sampler_is_old_policy, sampling_from_config, score_rollout,
    sync_reference_model,
)

from posttrain_sdpo.config import SDPOConfig

__all__ = [
    "SDPOTrainer", "compute_divergence", "add_tail_bucket", "self_distillation_per_token", "chunked_self_distillation_per_token",
    "compute_sdpo_advantages", "build_teacher_prompts", "policy_per_token_loss",
]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- math (pure functions)
# Copied from posttrain_sdft.trainer.compute_divergence
def compute_divergence(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, alpha: float) -> torch.Tensor:
    """Return the per-row generalized JSD ``(...)`` of log-distributions ``(..., K)``: alpha=0 KL(T||S), alpha=1 KL(S||T)."""
    if alpha == 0.0:
        kl = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)  # p_T (log p_T - log p_S)
    elif alpha == 1.0:
        kl = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)  # p_S (log p_S - log p_T)
    else:
        log_alpha = torch.log(torch.tensor(alpha, dtype=student_log_probs.dtype, device=student_log_probs.device))
        log_rest = torch.log1p(-torch.tensor(alpha, dtype=student_log_probs.dtype, device=student_log_probs.device))
        mixture = torch.logsumexp(torch.stack([student_log_probs + log_rest, teacher_log_probs + log_alpha]), dim=0)  # log M
        kl_teacher = F.kl_div(mixture, teacher_log_probs, reduction="none", log_target=True)  # KL(T || M) terms
        kl_student = F.kl_div(mixture, student_log_probs, reduction="none", log_target=True)  # KL(S || M) terms
        kl = (1.0 - alpha) * kl_student + alpha * kl_teacher
    return kl.sum(-1)


# Copied from posttrain_sdft.trainer.add_tail_bucket
def add_tail_bucket(log_probs: torch.Tensor) -> torch.Tensor:
    """Append one category ``log(1 - sum p)`` to top-k log-probs ``(..., K)`` so they sum to 1: ``(..., K + 1)``."""
    log_mass = torch.logsumexp(log_probs, dim=-1, keepdim=True).clamp(max=-1e-7)  # captured mass < 1, so the tail stays finite
    return torch.cat([log_probs, torch.log(-torch.expm1(log_mass))], dim=-1)


# Copied from posttrain_sdft.trainer.self_distillation_per_token
def self_distillation_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *, mode: str, alpha: float,
                                topk: int | None = None, add_tail: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(per-token loss (n,), student log-prob of the label (n,))`` from logits ``(n, V)`` (already divided by the temperature).

    ``mode``: 'topk_logits' (the divergence on the student's top-``topk`` tokens, renormalized or with a tail
    bucket), 'full_logits' (over the vocabulary) or 'sampled_token' (``(log pi_S - log pi_T).detach() * log pi_S``
    on ``labels``). The teacher logits are treated as constants.
    """
    teacher_logits = teacher_logits.detach()
    student_log_probs = torch.log_softmax(student_logits, dim=-1)  # (n, V)
    student_token = student_log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (n,)
    if mode == "sampled_token":
        teacher_token = torch.log_softmax(teacher_logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return (student_token - teacher_token).detach() * student_token, student_token
    teacher_log_probs = torch.log_softmax(teacher_logits, dim=-1)
    if mode == "full_logits":
        return compute_divergence(student_log_probs, teacher_log_probs, alpha), student_token
    if mode != "topk_logits":
        raise ValueError(f"self_distillation_per_token: unknown mode {mode!r}; use 'sampled_token', 'full_logits' or 'topk_logits'.")
    top_student, index = torch.topk(student_log_probs, k=topk, dim=-1)  # the student's support (n, k)
    top_teacher = teacher_log_probs.gather(-1, index)  # the teacher projected on it
    if add_tail:  # one bucket for the mass outside the top-k: approximates the full-vocabulary divergence
        top_student, top_teacher = add_tail_bucket(top_student), add_tail_bucket(top_teacher)
    else:  # the top-k conditional distributions
        top_student = top_student - torch.logsumexp(top_student, dim=-1, keepdim=True)
        top_teacher = top_teacher - torch.logsumexp(top_teacher, dim=-1, keepdim=True)
    return compute_divergence(top_student, top_teacher, alpha), student_token


# Copied from posttrain_sdft.trainer._rows_logits
def _rows_logits(rows: torch.Tensor, states: TokenStates, temperature: float) -> torch.Tensor:
    """Logits ``(n, V) / temperature`` of hidden-state rows through the states' LM head (or the rows themselves when they are logits)."""
    if states.weight is None:
        z = rows
    else:
        dtype = states.compute_dtype or states.weight.dtype
        bias = states.bias.to(dtype) if states.bias is not None else None
        z = F.linear(rows.to(dtype), states.weight.to(dtype), bias)
    z = z if z.dtype == torch.float64 else z.float()  # float32 softmax math (float64 stays float64)
    return z / temperature


# Copied from posttrain_sdft.trainer.chunked_self_distillation_per_token
def chunked_self_distillation_per_token(student: TokenStates, teacher: TokenStates, labels: torch.Tensor, *, temperature: float, mode: str,
                                        alpha: float, topk: int | None = None, add_tail: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`self_distillation_per_token` of rows ``(n, .)`` of student and teacher states, ``student.chunk_size`` rows at a time.

    Each chunk's logits are computed from the hidden states and the LM heads and dropped after use; with
    gradients, the chunk is recomputed in backward (activation checkpointing), so no more than one chunk of
    vocabulary-wide logits per model lives at any time.
    """
    chunk = max(1, int(student.chunk_size or 256))
    teacher_rows = teacher.tensor.detach()

    def one_chunk(s_rows, t_rows, chunk_labels):
        with torch.no_grad():
            t_logits = _rows_logits(t_rows, teacher, temperature)
        return self_distillation_per_token(_rows_logits(s_rows, student, temperature), t_logits, chunk_labels, mode=mode, alpha=alpha,
                                           topk=topk, add_tail=add_tail)

    needs_grad = torch.is_grad_enabled() and (student.tensor.requires_grad or (student.weight is not None and student.weight.requires_grad))
    losses, logps = [], []
    for start in range(0, labels.shape[0], chunk):
        part = slice(start, start + chunk)
        args = (student.tensor[part], teacher_rows[part], labels[part])
        loss, logp = checkpoint(one_chunk, *args, use_reentrant=False) if needs_grad else one_chunk(*args)
        losses.append(loss)
        logps.append(logp)
    if not losses:
        empty = student.tensor.new_zeros(0, dtype=torch.float64 if student.tensor.dtype == torch.float64 else torch.float32)
        return empty, empty
    return torch.cat(losses), torch.cat(logps)


# Copied from posttrain_sdft.trainer._completion_metrics
def _completion_metrics(lengths: list[int], truncated: list[bool]) -> dict[str, float]:
    """TRL's completion-length metrics of one rollout."""
    terminated = [n for n, t in zip(lengths, truncated) if not t] or [0]
    return {
        "completions/mean_length": sum(lengths) / len(lengths), "completions/min_length": float(min(lengths)),
        "completions/max_length": float(max(lengths)), "completions/clipped_ratio": sum(truncated) / len(truncated),
        "completions/mean_terminated_length": sum(terminated) / len(terminated),
        "completions/min_terminated_length": float(min(terminated)), "completions/max_terminated_length": float(max(terminated)),
    }


def chunked_token_logps(states: TokenStates, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probs ``(n,)`` of ``labels`` under rows ``(n, .)`` of states at ``temperature``, one chunk of logits at a time (recomputed in backward)."""
    chunk = max(1, int(states.chunk_size or 256))

    def one_chunk(rows, chunk_labels):
        return torch.log_softmax(_rows_logits(rows, states, temperature), dim=-1).gather(-1, chunk_labels.unsqueeze(-1)).squeeze(-1)

    needs_grad = torch.is_grad_enabled() and (states.tensor.requires_grad or (states.weight is not None and states.weight.requires_grad))
    parts = [checkpoint(one_chunk, states.tensor[s : s + chunk], labels[s : s + chunk], use_reentrant=False) if needs_grad
             else one_chunk(states.tensor[s : s + chunk], labels[s : s + chunk]) for s in range(0, labels.shape[0], chunk)]
    if not parts:
        return states.tensor.new_zeros(0, dtype=torch.float64 if states.tensor.dtype == torch.float64 else torch.float32)
    return torch.cat(parts)


def compute_sdpo_advantages(rewards_per_func: torch.Tensor, reward_weights: torch.Tensor, num_generations: int,
                            scale_rewards: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(rewards (N,), advantages (N,), group std (N/G,))`` as TRL's SDPO: ``(r - group mean) / (std + 1e-4)``.

    ``r = nansum_f w_f r_f`` (NaN where a function returned None counts 0); ``scale_rewards``: 'group' (the
    group's unbiased std), 'batch' (the whole rollout's) or 'none' (1).
    """
    rewards = (rewards_per_func * reward_weights.to(rewards_per_func.dtype).unsqueeze(0)).nansum(dim=1)  # (N,)
    grouped = rewards.view(-1, num_generations)  # (N/G, G)
    mean = grouped.mean(dim=1).repeat_interleave(num_generations)
    if scale_rewards == "none":
        group_std = torch.ones(grouped.shape[0], dtype=rewards.dtype)
        std = torch.ones_like(rewards)
    else:
        group_std = grouped.std(dim=1)
        if scale_rewards == "batch":
            std = rewards.std().expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
        else:
            std = group_std.repeat_interleave(num_generations)
    return rewards, (rewards - mean) / (std + 1e-4), group_std


def _last_user_text(prompt: list) -> str:
    last = prompt[-1] if prompt else {}
    if last.get("role") != "user":
        raise ValueError(f"its prompt ends with a {last.get('role')!r} turn; SDPO's teacher prompt needs a conversation that ends with a user turn")
    content = last.get("content", "")
    return " ".join(p.get("text", "") for p in content if p.get("type") == "text") if isinstance(content, list) else content


def build_teacher_prompts(prompts: list, demonstrations: list[str], rewards: torch.Tensor, feedbacks: list, num_generations: int,
                          args: Any) -> tuple[list, torch.Tensor, dict[str, float]]:
    """Return ``(teacher prompts (N,), self_distillation_mask (N,), metrics)`` of one rollout (TRL's successful-rollout context).

    Completion i's demonstration is the first completion j of its group (j != i with
    ``dont_reprompt_on_self_success``) with ``rewards[j] >= success_reward_threshold``; its feedback is the row's
    non-empty string ``privileged_context`` when ``include_environment_feedback`` (and, with
    ``environment_feedback_only_without_solution``, only without a demonstration). A sample with either gets
    ``reprompt_template`` (messages: in place of the last user turn) and mask 1; else its own prompt and mask 0.

    Args:
        prompts: ``N`` prompts (grouped, each repeated G times).
        demonstrations: ``N`` decoded completions (special tokens skipped).
        rewards: ``(N,)`` weighted rewards.
        feedbacks: ``N`` feedback values (None where a row has none).
        num_generations: G.
        args: An :class:`SDPOConfig`.
    """
    n = len(prompts)
    threshold = args.success_reward_threshold
    success = [float(r) >= threshold for r in rewards.tolist()]
    teacher_prompts, mask = [], torch.zeros(n)
    with_solution = feedback_available = feedback_used = success_groups = 0
    for i in range(n):
        start = (i // num_generations) * num_generations
        group = range(start, start + num_generations)
        if i == start and any(success[j] for j in group):
            success_groups += 1
        demo = None
        if args.use_successful_as_teacher:
            demo = next((j for j in group if success[j] and not (args.dont_reprompt_on_self_success and j == i)), None)
        feedback = feedbacks[i]
        has_feedback = isinstance(feedback, str) and feedback.strip() != ""
        feedback_available += has_feedback
        use_feedback = args.include_environment_feedback and has_feedback and (not args.environment_feedback_only_without_solution or demo is None)
        feedback_used += use_feedback
        with_solution += demo is not None
        if demo is None and not use_feedback:
            teacher_prompts.append(prompts[i])
            continue
        mask[i] = 1.0
        solution = ""
        if demo is not None:
            text = demonstrations[demo]
            if args.remove_thinking_from_demonstration:
                text = re.sub(r"<think>.*?</think>", "", text, flags=re.DOTALL).strip()
            solution = args.solution_template.format(successful_previous_attempt=text)
        feedback_text = args.feedback_template.format(feedback_raw=feedback) if use_feedback else ""
        prompt = prompts[i]
        if isinstance(prompt, list):
            text = args.reprompt_template.format(prompt=_last_user_text(prompt), solution=solution, feedback=feedback_text)
            teacher_prompts.append(list(prompt[:-1]) + [{"role": "user", "content": text}])
        else:
            teacher_prompts.append(args.reprompt_template.format(prompt=prompt, solution=solution, feedback=feedback_text))
    size = max(1, n)
    metrics = {
        "self_distillation/success_group_fraction": success_groups / max(1, n // max(1, num_generations)),
        "self_distillation/success_sample_fraction": with_solution / size,
        "self_distillation/feedback_available_fraction": feedback_available / size,
        "self_distillation/feedback_used_fraction": feedback_used / size,
        "self_distillation/reprompt_sample_fraction": float(mask.mean()) if n else 0.0,
    }
    return teacher_prompts, mask, metrics


def policy_per_token_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *, epsilon_low: float,
                          epsilon_high: float, level: str) -> torch.Tensor:
    """Return the clipped policy-gradient loss ``(B, C)`` (or ``(B, 1)`` per sequence): ``-min(r A, clip(r, 1 - eps, 1 + eps_high) A)``."""
    log_ratio = logps - old_logps
    if level == "sequence":  # GSPO: the mean log-ratio of the sequence's tokens
        log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    coef_1 = torch.exp(log_ratio)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    return -torch.min(coef_1 * advantages, coef_2 * advantages)


# ----------------------------------------------------------------------------- trainer
class SDPOTrainer(TrainerSurface):
    """Train a causal LM with SDPO (RL via self-distillation from feedback); TRL 1.16's ``SDPOTrainer`` API.

    Args:
        model: A model object or Hub id / local directory (default ``args.model_name_or_path``).
        reward_funcs: A callable, a name ('accuracy', 'module:function', a reward-model path), a reward model, or a
            list of these (default ``args.reward_funcs``): they score the rollouts (successes become demonstrations).
        args: An :class:`SDPOConfig`, a ``transformers.TrainingArguments`` or a dict of fields.
        train_dataset: Prompt-only rows: ``prompt`` (a string, or messages ending with a user turn), optional
            ``privileged_context`` (environment feedback, a string) and any columns the rewards read.
        eval_dataset: Same format, or a dict of them.
        processing_class: The tokenizer (default: loaded with the model).
        reward_processing_classes: Tokenizers of reward models (one per reward function).
        callbacks: ``transformers.TrainerCallback`` objects (or classes).
        optimizers: Only ``(None, None)``: the loop builds the optimizer and schedule from ``args``.
        peft_config: A ``peft.PeftConfig``; with teacher_model_kind='base' the teacher is the adapter-disabled model.
        rollout_engine: A ``posttrain.RolloutEngine`` (default: one on ``args.rollout_backend``).
        allow_experimental: Python opt-in for this experimental method.

    Raises:
        posttrain.ConfigError: no reward functions or dataset, an ``optimizers`` pair, or a setting that cannot be honoured.
        posttrain.DataError: a row without ``prompt``, or a conversation that does not end with a user turn.
    """

    _tag_names = ["trl", "sdpo"]
    _name = "SDPO"

    def __init__(self, model=None, reward_funcs=None, args: SDPOConfig | None = None, train_dataset=None, eval_dataset=None, processing_class=None,
                 reward_processing_classes=None, callbacks=None, optimizers=(None, None), peft_config=None, rollout_engine=None,
                 allow_experimental=False):
        self.args = args = as_config(args, SDPOConfig, default_output_dir=default_output_dir(model, "SDPO"))
        # the maturity gate runs first: TrainingLoop checks the opt-in
        self.loop = TrainingLoop(args, method="sdpo", allow_experimental=allow_experimental, callbacks=callbacks)
        check_online_arguments("SDPO", train_dataset=train_dataset, reward_funcs=reward_funcs or args.reward_funcs, optimizers=optimizers)
        self.model, self.processing_class = load_online_policy(model, args, loop=self.loop, processing_class=processing_class, peft_config=peft_config,
                                                               tags=self._tag_names)
        self.pad_token_id = self.processing_class.pad_token_id if self.processing_class.pad_token_id is not None else self.processing_class.eos_token_id
        rewards = resolve_online_rewards(reward_funcs, args, loop=self.loop, reward_processing_classes=reward_processing_classes)
        self.reward_funcs, self.reward_func_names, self.reward_weights = rewards.funcs, rewards.names, rewards.weights
        self.reward_processing_classes = rewards.processing_classes
        self._setup_teacher()
        self.train_dataset = self.process_dataset(train_dataset, "train_dataset")
        if isinstance(eval_dataset, dict):
            self.eval_dataset = {key: self.process_dataset(part, f"eval_dataset[{key!r}]") for key, part in eval_dataset.items()}
        else:
            self.eval_dataset = self.process_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        self.loop.setup(self.model, method=self)
        self.engine = rollout_engine or build_rollout_engine(args, model=self.model, tokenizer=self.processing_class, accelerator=self.loop.accelerator)
        self._sampling = sampling_from_config(args)
        self._diagnostic_counters: dict[str, int] = {}
        self._warned_unused_feedback = False
        prompts_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps // args.num_generations
        self.producer = RolloutProducer(self.loop.prompt_source(len(self.train_dataset), prompts_per_step), self.train_dataset, self._produce,
                                        reuse=args.num_iterations)

    # -------------------------------------------------------------------------- setup
    def _setup_teacher(self) -> None:
        """The teacher of ``teacher_model_kind``: 'live' the student; 'base' a frozen copy (PEFT: the adapter-disabled student); 'ema' a synced copy."""
        kind = self.args.teacher_model_kind
        if kind == "ema" and is_peft_model(self.model):
            raise ConfigError("teacher_model_kind='ema' with a PEFT model is not implemented in posttrain's SDPO (TRL keeps an EMA adapter); use "
                              "teacher_model_kind='base' or 'live', or train without peft_config.")
        if kind == "live" or self.args.distillation_weight == 0.0:
            self.teacher_model = None  # the student itself (or no teacher: pure policy gradient)
            return
        self.teacher_model = build_reference_model(self.model, None, loop=self.loop, model_init_kwargs=self.args.model_init_kwargs,
                                                   disable_dropout_in_ref=self.args.disable_dropout)

    # -------------------------------------------------------------------------- data
    def process_dataset(self, dataset, name: str):
        """Return ``dataset`` as prompt rows; a conversation that the teacher prompt cannot be built from fails here, naming its row."""
        dataset = prepare_prompt_dataset(dataset, name, method="SDPO", prompt_ids=self._prompt_ids)
        columns = dataset.column_names if hasattr(dataset, "column_names") else sorted({k for row in dataset for k in row})
        prompts = (dataset["prompt"] if hasattr(dataset, "column_names") else [row.get("prompt") for row in dataset]) if "prompt" in columns else []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, list):
                try:
                    _last_user_text(prompt)
                except ValueError as exc:
                    raise DataError(f"{name} row {i}: {exc}; end every conversation with the user's turn (no assistant prefill or tool turn).") from None
        if "privileged_context" in columns:
            feedbacks = dataset["privileged_context"] if hasattr(dataset, "column_names") else [row.get("privileged_context") for row in dataset]
            for i, value in enumerate(feedbacks):
                if value is not None and not isinstance(value, str):
                    raise DataError(f"{name} row {i}: its privileged_context is a {type(value).__name__}; SDPO's environment feedback must be a string (or None).")
        return dataset

    def _prompt_ids(self, row: dict, limit: int | None = -1) -> list[int]:
        """Token ids of a prompt (messages through the chat template), keeping the last ``max_prompt_length`` (or ``limit``)."""
        if row.get("prompt") is None and row.get("prompt_ids") is not None:
            raise DataError("SDPO needs a 'prompt' (text or messages), not pre-tokenized 'prompt_ids': the teacher prompt is built from its text.")
        ids = prompt_token_ids(row, self.processing_class, chat_template_kwargs=self.args.chat_template_kwargs)
        limit = self.args.max_prompt_length if limit == -1 else limit
        return ids[-limit:] if limit is not None else ids

    @property
    def data_collator(self):
        """The collator of raw prompt rows (TRL's is the identity): :meth:`collate`."""
        return self.collate

    # -------------------------------------------------------------------------- loop protocol
    def collate(self, rows: list[dict]) -> dict:
        return {"rows": [dict(row) for row in rows]}

    def count_items(self, batch: dict) -> int:
        return batch["completion_ids"].shape[0]  # the distillation loss (and the 'grpo' policy loss) is a mean over sequences

    def _produce(self, request: ProduceRequest) -> list[dict]:
        """The producer's callback: one step's micro-batches, sampled with a seed of the step (a resumed run draws the same)."""
        seed = self.args.seed + request.step + 1_000_003 * request.rank
        return self._rollout_batches(request.rows, seed, self.args.per_device_train_batch_size, mode="train")

    def _rollout_batches(self, rows: list[dict], seed: int, size: int, mode: str) -> list[dict]:
        args = self.args
        group = args.num_generations if mode == "train" else (args.num_generations_eval or args.num_generations)
        prompts, prompt_ids = expand_prompts(rows, group, self._prompt_ids, self.processing_class)  # (N,) each
        rollout = generate_rollout(prompts, prompt_ids, engine=self.engine, sampling=self._sampling, num_generations=group, seed=seed)
        return self.build_batches(rows, prompts, rollout, group, size, mode)

    def build_batches(self, rows: list[dict], prompts: list, rollout, group: int, size: int, mode: str = "train") -> list[dict]:
        """Score a rollout, build its teacher prompts and split it into micro-batches (the part of a step after generation)."""
        args = self.args
        rewards_per_func = score_rollout(rows, prompts, rollout, group, reward_funcs=self.reward_funcs, reward_func_names=self.reward_func_names,
                                         tokenizer=self.processing_class, trainer_state=self.loop.state)  # (N, F)
        if mode == "train":
            (all_rewards,), local = gather_across_processes(self.loop.accelerator, rewards_per_func)
        else:
            all_rewards, local = rewards_per_func, slice(0, len(rollout))
        rewards, advantages, group_std = compute_sdpo_advantages(all_rewards, self.reward_weights, group, args.scale_rewards)
        metrics = self._reward_metrics(rewards, all_rewards, group_std, mode)
        rewards, advantages = rewards[local], advantages[local]

        demonstrations = [self.processing_class.decode([t for t in ids if t != self.pad_token_id], skip_special_tokens=True)
                          for ids in rollout.completion_ids]
        feedbacks = [row.get("privileged_context") for row in rows for _ in range(group)]
        teacher_prompts, sd_mask, context_metrics = build_teacher_prompts(prompts, demonstrations, rewards, feedbacks, group, args)
        metrics.update(context_metrics)
        self._warn_on_inactive_self_distillation(context_metrics, mode)
        if context_metrics["self_distillation/feedback_available_fraction"] > 0 and not args.include_environment_feedback and not self._warned_unused_feedback:
            self._warned_unused_feedback = True
            logger.warning("SDPO received environment feedback (`privileged_context`) but include_environment_feedback=False: it is ignored. "
                           "Set include_environment_feedback=True to reprompt with it.")
        teacher_ids = [self._prompt_ids({"prompt": p}, limit=args.max_reprompt_len) for p in teacher_prompts]  # (N,)

        batches = rollout_micro_batches(rollout, size, self.pad_token_id, mask_truncated=args.mask_truncated_completions)
        need_old = mode == "train" and args.num_iterations > 1
        world = self.loop.accelerator.num_processes if mode == "train" else 1
        step_tokens = float(max(1, sum(b["num_completion_tokens"] for b in batches)))
        for start, batch in zip(range(0, len(rollout), size), batches):
            part = slice(start, start + len(batch["completion_ids"]))
            ids = [torch.tensor(t, dtype=torch.long) for t in teacher_ids[part]]
            batch["teacher_prompt_ids"] = pad(ids, padding_value=self.pad_token_id, padding_side="left")  # (b, P_T)
            batch["teacher_prompt_mask"] = pad([torch.ones_like(t) for t in ids], padding_value=0, padding_side="left")
            batch["self_distillation_mask"] = sd_mask[part]  # (b,)
            batch["advantages"] = advantages[part].float()  # (b,)
            batch["token_normalizer"] = torch.tensor(step_tokens * world)  # 'dapo' / 'bnpo': the step's completion tokens
            sampling_logps = batch.pop("sampling_logprobs")
            if need_old:  # pi_old of the reused rollout: the policy ratio's and the distillation clip's denominator
                add_old_and_ref_logps(batch, sampling_logps, model=self.model, temperature=args.temperature, need_old=True,
                                      old_from_sampler=sampler_is_old_policy(self._sampling, args.temperature, self.engine.samples_from_policy),
                                      device=self.loop.device, accelerator=self.loop.accelerator, chunk_size=args.logprob_chunk_size)
        metrics.update(_completion_metrics([len(c) for c in rollout.completion_ids], list(rollout.truncated)))
        attach_rollout_metrics(batches, metrics)
        return batches

    def _reward_metrics(self, rewards: torch.Tensor, rewards_per_func: torch.Tensor, group_std: torch.Tensor, mode: str) -> dict[str, float]:
        """TRL's reward diagnostics (``self_distillation/reward_*``), with its flat-reward warning."""
        tolerance = self.args.diagnostics_flat_tolerance
        std = float(rewards.std()) if rewards.numel() > 1 else 0.0
        flat = float((group_std <= tolerance).float().mean()) if group_std.numel() else 1.0
        metrics = {
            "self_distillation/reward_mean": float(rewards.mean()), "self_distillation/reward_std": std,
            "self_distillation/reward_min": float(rewards.min()), "self_distillation/reward_max": float(rewards.max()),
            "self_distillation/group_reward_std_mean": float(group_std.mean()) if group_std.numel() else std,
            "self_distillation/flat_group_fraction": flat,
        }
        for name, value in zip(self.reward_func_names, rewards_per_func.nanmean(dim=0).tolist()):
            metrics[f"self_distillation/rewards/{name}"] = value
        self._diagnose(mode, "flat_rewards", std <= tolerance and flat >= 1.0 - tolerance,
                       "Observed flat SDPO rewards across all sampled generations: the policy advantages are zero. Check the reward "
                       "density or shaping, or `success_reward_threshold`.")
        return metrics

    def _warn_on_inactive_self_distillation(self, metrics: dict[str, float], mode: str) -> None:
        tolerance = self.args.diagnostics_flat_tolerance
        self._diagnose(mode, "inactive_self_distillation", metrics["self_distillation/reprompt_sample_fraction"] <= tolerance,
                       "SDPO self-distillation is inactive: no reprompted sample (no rollout reached `success_reward_threshold` and no "
                       "usable `privileged_context` feedback).")
        self._diagnose(mode, "no_successful_rollouts", metrics["self_distillation/success_group_fraction"] <= tolerance,
                       "SDPO found no successful rollout in any group: lower `success_reward_threshold`, make the task easier, or shape the reward.")

    def _diagnose(self, mode: str, key: str, degenerate: bool, message: str) -> None:
        """TRL's degenerate-step warnings: on the first and every ``diagnostics_warning_interval``-th consecutive degenerate step."""
        interval, key = self.args.diagnostics_warning_interval, f"{mode}/{key}"
        if not degenerate:
            self._diagnostic_counters[key] = 0
            return
        if interval == 0:
            return
        count = self._diagnostic_counters[key] = self._diagnostic_counters.get(key, 0) + 1
        if count == 1 or count % interval == 0:
            logger.warning("%s Consecutive degenerate steps: %s.", message, count)

    # -------------------------------------------------------------------------- the loss
    def _teacher_forward(self, model, batch: dict, num_completion: int) -> TokenStates:
        """The teacher's states at the completion positions (no grad): its own (reprompted) prompt + the same completion."""
        kind = self.args.teacher_model_kind
        teacher = model if self.teacher_model is None else self.teacher_model
        context = adapter_disabled(model, self.loop.accelerator) if kind == "base" and self.teacher_model is None else nullcontext()
        with torch.no_grad(), context:
            _, states = causal_lm_states(
                teacher, chunk_size=self.args.logprob_chunk_size, use_cache=False,
                input_ids=torch.cat([batch["teacher_prompt_ids"], batch["completion_ids"]], dim=1),
                attention_mask=torch.cat([batch["teacher_prompt_mask"], batch["completion_mask"]], dim=1), logits_to_keep=num_completion + 1,
            )
        return states

    def compute_loss(self, model, batch: dict, num_items_in_batch):
        """Return the micro-batch's share of the step loss and its metrics.

        Distillation (and the 'grpo' / 'dr_grpo' policy loss): the micro-batch's sum of per-sequence terms / the step's
        sequences; 'dapo' / 'bnpo': its sum of token terms / the step's completion tokens. One micro-batch per step
        gives TRL's loss exactly; any split of a step gives the same update.
        """
        args = self.args
        weight = args.distillation_weight
        completion_ids, completion_mask = batch["completion_ids"], batch["completion_mask"]
        num_completion = completion_ids.shape[1]
        _, student = causal_lm_states(
            model, chunk_size=args.logprob_chunk_size, use_cache=False,
            input_ids=torch.cat([batch["prompt_ids"], completion_ids], dim=1),
            attention_mask=torch.cat([batch["prompt_mask"], completion_mask], dim=1), logits_to_keep=num_completion + 1,
        )
        student = student[:, :-1]  # position t predicts completion token t: (B, C, .)
        metrics: dict[str, Any] = {}
        loss = None
        if weight < 1.0:
            policy, metrics["self_distillation/policy_loss"] = self._policy_loss(student, batch, num_items_in_batch)
            loss = (1.0 - weight) * policy
        if weight > 0.0:
            distill, mean_token_loss = self._distillation_loss(model, student, batch, num_items_in_batch)
            metrics["self_distillation/distillation_loss"] = metrics["sdpo/distillation_loss"] = mean_token_loss
            loss = weight * distill if loss is None else loss + weight * distill
        if "rollout_metric_values" in batch:
            metrics.update(zip(batch["rollout_metric_names"], batch["rollout_metric_values"]))
        return loss, metrics

    def _policy_loss(self, student: TokenStates, batch: dict, num_items_in_batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(the micro-batch's share of the step's policy loss, its own loss_type mean (detached, TRL's metric))``."""
        args = self.args
        completion_ids, completion_mask = batch["completion_ids"], batch["completion_mask"]
        every = torch.ones(completion_ids.shape, dtype=torch.bool, device=completion_ids.device)
        logps = chunked_token_logps(student[every], completion_ids[every], args.temperature).view(completion_ids.shape)  # (B, C)
        old = batch.get("old_per_token_logps")
        old = logps.detach() if old is None else old.to(logps.device, logps.dtype)
        per_token = policy_per_token_loss(logps, old, batch["advantages"].to(logps.device, logps.dtype), completion_mask,
                                          epsilon_low=args.epsilon, epsilon_high=args.epsilon_high, level=args.importance_sampling_level)
        mask = completion_mask.to(logps.dtype)
        total = (per_token * mask).sum()
        if args.loss_type == "grpo":
            per_sequence = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
            return per_sequence.sum() / num_items_in_batch, per_sequence.detach().mean()
        if args.loss_type == "dr_grpo":
            return total / args.max_completion_length / num_items_in_batch, total.detach() / (mask.shape[0] * args.max_completion_length)
        # dapo, bnpo: the step's completion tokens (TRL: the micro-batch's)
        return total / batch["token_normalizer"].to(logps.device, logps.dtype), total.detach() / mask.sum().clamp(min=1.0)

    def _distillation_loss(self, model, student: TokenStates, batch: dict, num_items_in_batch) -> tuple[torch.Tensor, torch.Tensor]:
        args = self.args
        completion_ids, completion_mask = batch["completion_ids"], batch["completion_mask"]
        loss_mask = completion_mask * batch["self_distillation_mask"].to(completion_mask.device).unsqueeze(1).to(completion_mask.dtype)
        selected = loss_mask.bool()
        if not bool(selected.any()):  # nothing to distill: a zero that keeps the graph (zero gradients)
            zero = student.tensor.sum() * 0.0
            return zero, zero.detach()
        teacher = self._teacher_forward(model, batch, completion_ids.shape[1])[:, :-1]
        per_token_selected, student_logps = chunked_self_distillation_per_token(
            student[selected], teacher[selected], completion_ids[selected], temperature=args.temperature, mode=args.distillation_mode,
            alpha=args.distillation_alpha, topk=args.distillation_topk, add_tail=args.distillation_add_tail,
        )
        if args.distillation_is_clip is not None and "old_per_token_logps" in batch:  # capped importance ratio pi / pi_old (detached)
            old = batch["old_per_token_logps"][selected].to(student_logps.dtype)
            ratio = torch.exp((student_logps - old).detach().clamp(min=-20.0, max=20.0)).clamp(max=args.distillation_is_clip)
            per_token_selected = per_token_selected * ratio
        per_token = torch.zeros(loss_mask.shape, dtype=per_token_selected.dtype, device=per_token_selected.device)
        per_token = per_token.index_put(selected.nonzero(as_tuple=True), per_token_selected)  # (B, C), 0 off the distilled tokens
        mask = loss_mask.to(per_token.dtype)
        per_sequence = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)  # (B,), 0 for samples without a teacher context
        return per_sequence.sum() / num_items_in_batch, per_token_selected.detach().sum() / mask.sum().clamp(min=1.0)

    def on_step_end(self, model, state) -> None:
        self.engine.update_weights(model)  # the next rollout samples from the updated student
        if self.args.teacher_model_kind == "ema" and self.teacher_model is not None and state.global_step % self.args.teacher_sync_steps == 0:
            sync_reference_model(self.teacher_model, model, self.args.teacher_update_rate, accelerator=self.loop.accelerator)

    def evaluate_batches(self, model, batches) -> dict[str, float]:
        """The eval loss of ``num_generations_eval`` samples per eval prompt (seeded by ``seed``), computed as in training."""
        group = self.args.num_generations_eval or self.args.num_generations
        return evaluate_online(model, batches, produce=lambda rows, seed: self._rollout_batches(rows, seed, len(rows) * group, mode="eval"),
                               compute_loss=self.compute_loss, count_items=self.count_items, loop=self.loop, seed=self.args.seed)

    def state_dict(self) -> dict:
        state = {"policy_version": self.engine.policy_version, "diagnostic_counters": dict(self._diagnostic_counters)}
        if self.args.teacher_model_kind == "ema" and self.teacher_model is not None:  # the teacher moves: resume needs it
            state["teacher_model"] = {k: v.detach().cpu() for k, v in self.teacher_model.state_dict().items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.engine.set_policy_version(int(state.get("policy_version", 0)))
        self._diagnostic_counters = dict(state.get("diagnostic_counters", {}))
        if "teacher_model" in state and self.teacher_model is not None:
            self.teacher_model.load_state_dict(state["teacher_model"])
