"""SDFT on the posttrain loop (heavy: imports torch).

SDFT (Shenfeld et al. 2026) is on-policy self-distillation: the teacher is the model itself, shown privileged
context (a demonstration of the answer) that the student prompt lacks. The student samples completions of
its own prompt; on those completions the student's next-token distributions are pulled toward the
teacher's, whose prompt also holds the privileged context. Built on the core's online scaffold (a
:class:`posttrain.RolloutProducer`, the rollout engine, micro-batches, ``causal_lm_states``); the
teacher logits are never materialized beyond one row chunk. One optimizer step, in order::

    P = per_device_train_batch_size * gradient_accumulation_steps / num_generations prompts (rows with
        `prompt` and `privileged_context`)
      -> teacher prompt = teacher_prompt_template.format(prompt=..., privileged_context=...)
      -> rollout: num_generations completions per prompt, sampled from the student prompt
         (or from the teacher prompt with generate_from_teacher)                        N = P * G
      -> micro-batches of per_device_train_batch_size completions, each with the student prompt, the
         teacher prompt and, when rollouts are reused (num_iterations > 1), pi_old's log-probs
      -> per token t of each completion (logits of both models divided by `temperature`; the teacher's
         under no_grad, in its own dtype):
           topk_logits:   D_alpha on the student's top-k tokens (renormalized, or plus a tail bucket)
           full_logits:   D_alpha over the vocabulary
           sampled_token: (log pi_S(y_t) - log pi_T(y_t)).detach() * log pi_S(y_t)   (reverse KL, alpha = 1)
         times min(pi / pi_old, distillation_is_clip) when pi_old is kept
      -> loss = mean over sequences of (mean over the sequence's loss tokens)

``D_alpha`` is TRL's generalized JSD: alpha=0 forward KL(T || S), alpha=1 reverse KL(S || T), otherwise
``(1 - alpha) KL(S || M) + alpha KL(T || M)`` with ``M = (1 - alpha) p_S + alpha p_T``. The teacher is
``teacher_model_kind``: 'base' (a frozen copy of the initial student), 'live' (the student) or 'ema'
(a copy moved toward the student every ``teacher_sync_steps``). Departures from TRL: docs/methods/sdft.md.
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from posttrain import (  # the loop and the core's online steps (the online scaffold, plugin API 1.5)
    ConfigError, DataError, ProduceRequest, RolloutProducer, TokenStates, TrainerSurface, TrainingLoop, adapter_disabled, add_old_and_ref_logps,
    as_config, attach_rollout_metrics, build_reference_model, build_rollout_engine, causal_lm_states, default_output_dir, evaluate_online,
    generate_rollout, is_peft_model, load_online_policy, pad, prepare_prompt_dataset, prompt_token_ids, rollout_micro_batches,
    sampler_is_old_policy, sampling_from_config, sync_reference_model,
)

from posttrain_sdft.config import SDFTConfig

__all__ = [
    "SDFTTrainer", "compute_divergence", "add_tail_bucket", "self_distillation_per_token", "chunked_self_distillation_per_token",
    "compose_teacher_prompt",
]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- math (pure functions)
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


def add_tail_bucket(log_probs: torch.Tensor) -> torch.Tensor:
    """Append one category ``log(1 - sum p)`` to top-k log-probs ``(..., K)`` so they sum to 1: ``(..., K + 1)``."""
    log_mass = torch.logsumexp(log_probs, dim=-1, keepdim=True).clamp(max=-1e-7)  # captured mass < 1, so the tail stays finite
    return torch.cat([log_probs, torch.log(-torch.expm1(log_mass))], dim=-1)


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


# ----------------------------------------------------------------------------- teacher prompts
def _stringify_privileged_context(value: Any) -> str:
    """The privileged context as text: a string as is; a message list joined by newlines (text parts only)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[0], dict):
        chunks = []
        for message in value:
            content = message.get("content", "")
            text = " ".join(p.get("text", "") for p in content if p.get("type") == "text") if isinstance(content, list) else str(content)
            if text:
                chunks.append(text)
        return "\n".join(chunks)
    return str(value)


def compose_teacher_prompt(prompt: Any, privileged_context: Any, template: str) -> Any:
    """Return the teacher prompt: ``template`` filled with the prompt (a message list: its last user turn) and the context.

    Raises:
        ValueError: the context is None, or a message-list prompt does not end with a user turn.
    """
    if privileged_context is None:
        raise ValueError("its privileged_context is None")
    context = _stringify_privileged_context(privileged_context)
    if isinstance(prompt, list):
        last = prompt[-1] if prompt else {}
        if last.get("role") != "user":
            raise ValueError(f"its prompt ends with a {last.get('role')!r} turn; SDFT's teacher prompt needs a conversation that ends with a user turn")
        content = last.get("content", "")
        text = " ".join(p.get("text", "") for p in content if p.get("type") == "text") if isinstance(content, list) else content
        return list(prompt[:-1]) + [{"role": "user", "content": template.format(prompt=text, privileged_context=context)}]
    return template.format(prompt=prompt, privileged_context=context)


def _privileged_context(row: dict) -> Any:
    """A row's privileged context: its ``privileged_context``, else (prompt/completion data) its ``completion`` as the demonstration."""
    return row["privileged_context"] if "privileged_context" in row else row.get("completion")


def _completion_metrics(lengths: list[int], truncated: list[bool]) -> dict[str, float]:
    """TRL's completion-length metrics of one rollout."""
    terminated = [n for n, t in zip(lengths, truncated) if not t] or [0]
    return {
        "completions/mean_length": sum(lengths) / len(lengths), "completions/min_length": float(min(lengths)),
        "completions/max_length": float(max(lengths)), "completions/clipped_ratio": sum(truncated) / len(truncated),
        "completions/mean_terminated_length": sum(terminated) / len(terminated),
        "completions/min_terminated_length": float(min(terminated)), "completions/max_terminated_length": float(max(terminated)),
    }


# ----------------------------------------------------------------------------- trainer
class SDFTTrainer(TrainerSurface):
    """Train a causal LM with SDFT (on-policy self-distillation from privileged context); TRL 1.16's ``SDFTTrainer`` API.

    Args:
        model: A model object or Hub id / local directory (default ``args.model_name_or_path``).
        args: An :class:`SDFTConfig`, a ``transformers.TrainingArguments`` or a dict of fields.
        train_dataset: Rows with a ``prompt`` (string or messages ending with a user turn) and a
            ``privileged_context`` (string or messages: e.g. a demonstration); prompt/completion rows without
            ``privileged_context`` use their ``completion`` as the demonstration.
        eval_dataset: Same format, or a dict of them.
        processing_class: The tokenizer (default: loaded with the model).
        callbacks: ``transformers.TrainerCallback`` objects (or classes).
        optimizers: Only ``(None, None)``: the loop builds the optimizer and schedule from ``args``.
        peft_config: A ``peft.PeftConfig``; with teacher_model_kind='base' the teacher is the adapter-disabled model.
        rollout_engine: A ``posttrain.RolloutEngine`` (default: one on ``args.rollout_backend``).
        allow_experimental: Python opt-in for this experimental method.

    Raises:
        posttrain.ConfigError: no dataset, an ``optimizers`` pair, or a setting that cannot be honoured.
        posttrain.DataError: a row without ``prompt`` / ``privileged_context``, or a prompt the teacher prompt cannot be built from.
    """

    _tag_names = ["trl", "sdft"]
    _name = "SDFT"

    def __init__(self, model=None, args: SDFTConfig | None = None, train_dataset=None, eval_dataset=None, processing_class=None, callbacks=None,
                 optimizers=(None, None), peft_config=None, rollout_engine=None, allow_experimental=False):
        self.args = args = as_config(args, SDFTConfig, default_output_dir=default_output_dir(model, "SDFT"))
        # the maturity gate runs first: TrainingLoop checks the opt-in
        self.loop = TrainingLoop(args, method="sdft", allow_experimental=allow_experimental, callbacks=callbacks)
        if train_dataset is None:
            raise ConfigError("`train_dataset` is required: pass train_dataset=... (rows with 'prompt' and 'privileged_context').")
        if tuple(optimizers or (None, None)) != (None, None):
            raise ConfigError("optimizers=(optimizer, scheduler) is not supported: posttrain's loop builds them from the config; set optim, learning_rate and lr_scheduler_type instead.")
        self.model, self.processing_class = load_online_policy(model, args, loop=self.loop, processing_class=processing_class, peft_config=peft_config,
                                                               tags=self._tag_names)
        self.pad_token_id = self.processing_class.pad_token_id if self.processing_class.pad_token_id is not None else self.processing_class.eos_token_id
        self._setup_teacher()
        self.train_dataset = self.process_dataset(train_dataset, "train_dataset")
        if isinstance(eval_dataset, dict):
            self.eval_dataset = {key: self.process_dataset(part, f"eval_dataset[{key!r}]") for key, part in eval_dataset.items()}
        else:
            self.eval_dataset = self.process_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        self.loop.setup(self.model, method=self)
        self.engine = rollout_engine or build_rollout_engine(args, model=self.model, tokenizer=self.processing_class, accelerator=self.loop.accelerator)
        self._sampling = sampling_from_config(args)
        prompts_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps // args.num_generations
        self.producer = RolloutProducer(self.loop.prompt_source(len(self.train_dataset), prompts_per_step), self.train_dataset, self._produce,
                                        reuse=args.num_iterations)

    # -------------------------------------------------------------------------- setup
    def _setup_teacher(self) -> None:
        """The teacher of ``teacher_model_kind``: 'live' the student; 'base' a frozen copy (PEFT: the adapter-disabled student); 'ema' a synced copy."""
        kind = self.args.teacher_model_kind
        if kind == "ema" and is_peft_model(self.model):
            raise ConfigError("teacher_model_kind='ema' with a PEFT model is not implemented in posttrain's SDFT (TRL keeps an EMA adapter); use "
                              "teacher_model_kind='base' or 'live', or train without peft_config.")
        if kind == "live":
            self.teacher_model = None  # the student itself, under no_grad
            return
        # 'base' / 'ema': a frozen copy of the initial student, placed like the policy (None for a PEFT 'base': the adapter-disabled student)
        self.teacher_model = build_reference_model(self.model, None, loop=self.loop, model_init_kwargs=self.args.model_init_kwargs,
                                                   disable_dropout_in_ref=self.args.disable_dropout)

    # -------------------------------------------------------------------------- data
    def process_dataset(self, dataset, name: str):
        """Return ``dataset`` as prompt rows; every row's teacher prompt is built once here so a bad row fails before training."""
        dataset = prepare_prompt_dataset(dataset, name, method="SDFT", prompt_ids=self._prompt_ids)
        template = self.args.teacher_prompt_template
        columns = dataset.column_names if hasattr(dataset, "column_names") else None
        if columns is not None and "privileged_context" not in columns and "completion" not in columns:
            raise DataError(f"{name} has no 'privileged_context' column (columns: {sorted(columns)}); SDFT's teacher sees each prompt with its "
                            "privileged context: add a 'privileged_context' column (e.g. a demonstration of the answer).")
        contexts = dataset["privileged_context"] if columns is not None and "privileged_context" in columns else (
            dataset["completion"] if columns is not None else [_privileged_context(row) for row in dataset])
        prompts = dataset["prompt"] if columns is not None and "prompt" in columns else [row.get("prompt") for row in dataset]
        for i, (prompt, context) in enumerate(zip(prompts, contexts)):
            if prompt is None:
                continue  # pre-tokenized prompt_ids rows fail below, with their row
            try:
                compose_teacher_prompt(prompt, context, template)
            except ValueError as exc:
                raise DataError(f"{name} row {i}: {exc}; give every row a 'privileged_context' (a string or a message list) and a prompt ending with a user turn.") from None
        return dataset

    def _prompt_ids(self, row: dict) -> list[int]:
        """Token ids of a prompt (messages through the chat template), keeping the last ``max_prompt_length``."""
        if row.get("prompt") is None and row.get("prompt_ids") is not None:
            raise DataError("SDFT needs a 'prompt' (text or messages), not pre-tokenized 'prompt_ids': the teacher prompt is built from its text.")
        ids = prompt_token_ids(row, self.processing_class, chat_template_kwargs=self.args.chat_template_kwargs)
        limit = self.args.max_prompt_length
        return ids[-limit:] if limit is not None else ids

    @property
    def data_collator(self):
        """The collator of raw prompt rows (TRL's is the identity): :meth:`collate`."""
        return self.collate

    # -------------------------------------------------------------------------- loop protocol
    def collate(self, rows: list[dict]) -> dict:
        return {"rows": [dict(row) for row in rows]}

    def count_items(self, batch: dict) -> int:
        return batch["completion_ids"].shape[0]  # SDFT's loss is a mean over sequences (of per-sequence token means)

    def _produce(self, request: ProduceRequest) -> list[dict]:
        """The producer's callback: one step's micro-batches, sampled with a seed of the step (a resumed run draws the same)."""
        seed = self.args.seed + request.step + 1_000_003 * request.rank
        return self._rollout_batches(request.rows, seed, self.args.per_device_train_batch_size, mode="train")

    def _rollout_batches(self, rows: list[dict], seed: int, size: int, mode: str) -> list[dict]:
        args = self.args
        group = args.num_generations if mode == "train" else (args.num_generations_eval or args.num_generations)
        template = args.teacher_prompt_template
        student_ids = [self._prompt_ids(row) for row in rows]  # (P,)
        teacher_prompts = [compose_teacher_prompt(row["prompt"], _privileged_context(row), template) for row in rows]
        teacher_ids = [self._prompt_ids({"prompt": p}) for p in teacher_prompts]  # (P,)
        expand = lambda values: [v for v in values for _ in range(group)]  # noqa: E731  (N = P * G, grouped)
        generation_ids = teacher_ids if args.generate_from_teacher else student_ids
        rollout = generate_rollout(expand(teacher_prompts if args.generate_from_teacher else [row["prompt"] for row in rows]), expand(generation_ids),
                                   engine=self.engine, sampling=self._sampling, num_generations=group, seed=seed)
        if args.generate_from_teacher:  # the student is trained on its own prompt with the teacher-conditioned completions
            rollout = dataclasses.replace(rollout, prompt_ids=expand(student_ids))
        batches = rollout_micro_batches(rollout, size, self.pad_token_id)
        all_teacher_ids = expand(teacher_ids)
        need_old = mode == "train" and args.num_iterations > 1 and not args.generate_from_teacher and args.distillation_is_clip is not None
        for start, batch in zip(range(0, len(rollout), size), batches):
            ids = [torch.tensor(t, dtype=torch.long) for t in all_teacher_ids[start : start + len(batch["completion_ids"])]]
            batch["teacher_prompt_ids"] = pad(ids, padding_value=self.pad_token_id, padding_side="left")  # (b, P_T)
            batch["teacher_prompt_mask"] = pad([torch.ones_like(t) for t in ids], padding_value=0, padding_side="left")
            sampling_logps = batch.pop("sampling_logprobs")
            if need_old:  # pi_old of the reused rollout: the importance-sampling clip's denominator
                add_old_and_ref_logps(batch, sampling_logps, model=self.model, temperature=args.temperature, need_old=True,
                                      old_from_sampler=sampler_is_old_policy(self._sampling, args.temperature, self.engine.samples_from_policy),
                                      device=self.loop.device, accelerator=self.loop.accelerator, chunk_size=args.logprob_chunk_size)
        attach_rollout_metrics(batches, _completion_metrics([len(c) for c in rollout.completion_ids], list(rollout.truncated)))
        return batches

    # -------------------------------------------------------------------------- the loss
    def _teacher_forward(self, model, batch: dict, num_completion: int) -> TokenStates:
        """The teacher's states at the completion positions (no grad): its own prompt + the same completion."""
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
        """Return the micro-batch's share of the step loss (its sum of per-sequence means / the step's sequences) and its metrics."""
        args = self.args
        completion_ids, completion_mask = batch["completion_ids"], batch["completion_mask"]
        num_completion = completion_ids.shape[1]
        loss_mask = completion_mask
        if args.num_loss_tokens_to_skip > 0:  # leave the first tokens out (teacher-prompt artifacts)
            positions = torch.arange(num_completion, device=completion_mask.device).unsqueeze(0)
            loss_mask = completion_mask * (positions >= args.num_loss_tokens_to_skip).long()
        _, student = causal_lm_states(
            model, chunk_size=args.logprob_chunk_size, use_cache=False,
            input_ids=torch.cat([batch["prompt_ids"], completion_ids], dim=1),
            attention_mask=torch.cat([batch["prompt_mask"], completion_mask], dim=1), logits_to_keep=num_completion + 1,
        )
        teacher = self._teacher_forward(model, batch, num_completion)
        student, teacher = student[:, :-1], teacher[:, :-1]  # position t predicts completion token t: (B, C, .)
        selected = loss_mask.bool()  # only the loss tokens are scored
        per_token_selected, student_logps = chunked_self_distillation_per_token(
            student[selected], teacher[selected], completion_ids[selected], temperature=args.temperature, mode=args.distillation_mode,
            alpha=args.distillation_alpha, topk=args.distillation_topk, add_tail=args.distillation_add_tail,
        )
        if args.distillation_is_clip is not None and "old_per_token_logps" in batch:  # capped importance ratio pi / pi_old (detached)
            old = batch["old_per_token_logps"][selected].to(student_logps.dtype)
            ratio = torch.exp((student_logps - old).detach().clamp(min=-20.0, max=20.0)).clamp(max=args.distillation_is_clip)
            per_token_selected = per_token_selected * ratio
        per_token = torch.zeros(loss_mask.shape, dtype=per_token_selected.dtype, device=per_token_selected.device)
        per_token = per_token.index_put((selected.nonzero(as_tuple=True)), per_token_selected)  # (B, C), 0 off the loss tokens
        mask = loss_mask.to(per_token.dtype)
        per_sequence = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)  # (B,)
        loss = per_sequence.sum() / num_items_in_batch
        mean_token_loss = per_token_selected.detach().sum() / mask.sum().clamp(min=1.0)
        metrics = {"self_distillation/distillation_loss": mean_token_loss, "sdft/distillation_loss": mean_token_loss}
        if "rollout_metric_values" in batch:
            metrics.update(zip(batch["rollout_metric_names"], batch["rollout_metric_values"]))
        return loss, metrics

    def on_step_end(self, model, state) -> None:
        self.engine.update_weights(model)  # the next rollout samples from the updated student
        if self.args.teacher_model_kind == "ema" and state.global_step % self.args.teacher_sync_steps == 0:
            sync_reference_model(self.teacher_model, model, self.args.teacher_update_rate, accelerator=self.loop.accelerator)

    def evaluate_batches(self, model, batches) -> dict[str, float]:
        """The eval loss of ``num_generations_eval`` samples per eval prompt (seeded by ``seed``), computed as in training."""
        group = self.args.num_generations_eval or self.args.num_generations
        return evaluate_online(model, batches, produce=lambda rows, seed: self._rollout_batches(rows, seed, len(rows) * group, mode="eval"),
                               compute_loss=self.compute_loss, count_items=self.count_items, loop=self.loop, seed=self.args.seed)

    def state_dict(self) -> dict:
        state = {"policy_version": self.engine.policy_version}
        if self.args.teacher_model_kind == "ema":  # the teacher moves: resume needs it
            state["teacher_model"] = {k: v.detach().cpu() for k, v in self.teacher_model.state_dict().items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.engine.set_policy_version(int(state.get("policy_version", 0)))
        if "teacher_model" in state and self.teacher_model is not None:
            self.teacher_model.load_state_dict(state["teacher_model"])
