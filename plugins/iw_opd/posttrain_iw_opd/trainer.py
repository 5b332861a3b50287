"""IW-OPD on the posttrain loop (heavy: imports torch).

Importance-Weighted On-Policy Distillation (Xie et al. 2026, arXiv:2606.22600) as TRL 1.16's
``trl.experimental.iw_opd``, built on the core's online steps (policy loading, rollout engine,
micro-batches, chunked log-probs) and a frozen local teacher (``posttrain.load_pretrained(...,
role="teacher")`` + ``TrainingLoop.prepare_frozen``). One optimizer step, in order (the producer's
``_produce``, then ``compute_loss`` per micro-batch)::

    P = generation_batch_size prompts (cut to max_prompt_length tokens)
      -> rollout: num_generations completions per prompt, sampled by the student (RolloutEngine, seeded by the step)
      -> micro-batches of per_device_train_batch_size completions
      -> per micro-batch: student forward (grad) and teacher forward (no grad, teacher's dtype), chunked over rows
      -> distillation_objective='iw_opd' (default), per completion token t of sequence i:
             A_t = log pi_T(y_t) - log pi_S(y_t)                     (detached; vLLM: the sampler's log-prob)
             w_t = 1 + gamma * (1 - sum_{s<t} |A_s| / max(sum_s |A_s|, epsilon))
             loss = -sum_{i,t} w_t A_t log pi_S(y_t) / (completion tokens of the step)
         distillation_objective='jsd': the generalized JSD (beta) between student and teacher at every
             completion position, on the full vocabulary (loss_top_k=0) or a top-k support (+ tail bucket)

Log-probs are at ``temperature``. No ``(B, T, V)`` logits are kept: the student and the teacher are run
through ``posttrain.causal_lm_states`` (hidden states + LM head) and scored ``logprob_chunk_size`` rows
at a time (``TokenStates.score``, ``posttrain.chunked_distillation_divergence``, and for a top-k support a
checkpointed chunk whose logits the backward recomputes). Departures from TRL: docs/methods/iw_opd.md.
"""

from __future__ import annotations

import copy
import logging
import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from posttrain import (  # the loop and the core's online steps (the online scaffold, plugin API 1.5)
    CompletionLog, ConfigError, ProduceRequest, RolloutProducer, TrainerSurface, TrainingLoop, as_config, attach_rollout_metrics,
    build_rollout_engine, causal_lm_states, chunked_distillation_divergence, default_output_dir, evaluate_online, expand_prompts,
    generate_rollout, load_online_policy, load_pretrained, prepare_prompt_dataset, prompt_token_ids, rollout_micro_batches,
)

from posttrain_iw_opd.config import IWOPDConfig

__all__ = ["IWOPDTrainer", "iw_opd_token_loss", "support_divergence"]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- math (pure functions)
def iw_opd_token_loss(student_logps: torch.Tensor, teacher_logps: torch.Tensor, mask: torch.Tensor, *, gamma: float, epsilon: float,
                      behaviour_logps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(per-token loss (B, C), A (B, C), w (B, C))`` of IW-OPD on sampled completion tokens.

    Args:
        student_logps: ``(B, C)`` log pi_S of the sampled tokens (differentiable).
        teacher_logps: ``(B, C)`` log pi_T of the same tokens (constant).
        mask: ``(B, C)`` 1 on completion tokens, 0 on padding.
        gamma: Weight amplification: ``w_t`` lies in ``[1, 1 + gamma]``, 1 + gamma at the first token.
        epsilon: Floor of a sequence's total ``|A|``.
        behaviour_logps: ``(B, C)`` log-probs of the sampler when it is not the student itself (vLLM), else None.

    Returns:
        The per-token loss ``-w_t A_t log pi_S(y_t)`` (0 on padding), the advantages ``A_t = log pi_T - log pi_behaviour``
        (detached, 0 on padding) and the prefix weights ``w_t`` (detached).
    """
    valid = mask.bool()
    behaviour = student_logps if behaviour_logps is None else behaviour_logps
    zero = torch.zeros((), dtype=student_logps.dtype, device=student_logps.device)
    advantage = torch.where(valid, teacher_logps.to(student_logps.dtype) - behaviour.to(student_logps.dtype), zero).detach()
    size = advantage.abs()
    before = size.cumsum(dim=1) - size  # sum_{s<t} |A_s|
    total = size.sum(dim=1, keepdim=True).clamp_min(epsilon)
    weight = (1.0 + gamma * (1.0 - before / total)).detach()
    per_token = torch.where(valid, -student_logps * (weight * advantage), zero)
    return per_token, advantage, weight


def _add_tail(logps: torch.Tensor, support: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Append the bucket ``log(1 - sum_k p_k)`` of the mass outside the support (the sum capped just below 1)."""
    inside = torch.logsumexp(logps, dim=-1, keepdim=True).clamp(max=-1e-7)
    outside = torch.log(-torch.expm1(inside))
    return torch.cat([logps, outside], dim=-1), torch.cat([support, torch.ones_like(support[..., :1])], dim=-1)


def _divergence(student: torch.Tensor, teacher: torch.Tensor, beta: float, support: torch.Tensor | None) -> torch.Tensor:
    """Per-entry generalized JSD terms (sum them over the last dim): beta 0 forward KL, 1 reverse KL, else the mixture form.

    With ``support`` (a bool mask), entries outside it are 0.
    """
    zero = torch.zeros((), dtype=student.dtype, device=student.device)
    if support is not None:
        ls, lt = torch.where(support, student, zero), torch.where(support, teacher, zero)
        ps, pt = torch.where(support, student.exp(), zero), torch.where(support, teacher.exp(), zero)
        if beta == 0:
            return torch.nan_to_num(pt * (lt - ls), nan=0.0)
        if beta == 1:
            return torch.nan_to_num(ps * (ls - lt), nan=0.0)
        b = torch.tensor(beta, dtype=student.dtype, device=student.device)
        mix = (1 - b) * ps + b * pt
        lm = torch.where(support, torch.log(mix.clamp_min(torch.finfo(student.dtype).tiny)), zero)
        return b * torch.nan_to_num(pt * (lt - lm), nan=0.0) + (1 - b) * torch.nan_to_num(ps * (ls - lm), nan=0.0)
    if beta == 0:
        return F.kl_div(student, teacher, reduction="none", log_target=True)
    if beta == 1:
        return F.kl_div(teacher, student, reduction="none", log_target=True)
    b = torch.tensor(beta, dtype=student.dtype, device=student.device)
    lm = torch.logsumexp(torch.stack([student + torch.log1p(-b), teacher + torch.log(b)]), dim=0)
    return b * F.kl_div(lm, teacher, reduction="none", log_target=True) + (1 - b) * F.kl_div(lm, student, reduction="none", log_target=True)


def support_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tokens: torch.Tensor, *, beta: float, temperature: float,
                       top_k: int, add_tail: bool, reverse_mode: str = "sampled") -> torch.Tensor:
    """Return the per-token divergence ``(N,)`` of the 'jsd' objective from logits ``(N, V)`` (TRL 1.16's rules for the support).

    * ``beta > 0`` and ``top_k == 1``: the support is the teacher's top-1 token and the reverse-KL token
      (the sampled ``tokens``, or the student's argmax with ``reverse_mode='argmax'``); reverse KL alone
      (``beta == 1``) uses the reverse-KL token only.
    * ``top_k > 0`` otherwise (and ``V > top_k``): forward KL on the teacher's top-k, reverse KL on the
      student's top-k, JSD on the union of both.
    * ``top_k == 0`` (or ``V <= top_k``): the full vocabulary.

    On a support, both distributions get a tail bucket for the mass outside it (``add_tail``) or are
    renormalized over it.
    """
    student = F.log_softmax(student_logits / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    vocab = student.shape[-1]
    if beta > 0 and top_k == 1:
        reverse = student_logits.argmax(dim=-1) if reverse_mode == "argmax" else tokens
        if beta == 1:
            index = reverse.unsqueeze(-1)  # (N, 1)
            support = torch.ones_like(index, dtype=torch.bool)
        else:
            index = torch.stack([teacher_logits.argmax(dim=-1), reverse], dim=-1)  # (N, 2)
            support = torch.stack([torch.ones_like(reverse, dtype=torch.bool), reverse != index[:, 0]], dim=-1)
    elif top_k > 0 and vocab > top_k:
        index, support = _topk_support(student_logits, teacher_logits, beta, top_k)
    else:
        return _divergence(student, teacher, beta, None).sum(dim=-1)
    return _support_terms(student, teacher, index, support, beta, add_tail).sum(dim=-1)


def _topk_support(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index, support)`` of the top-k rule: forward KL the teacher's top-k, reverse KL the student's, JSD the union (duplicates masked)."""
    if beta == 0:
        index = teacher_logits.topk(top_k, dim=-1).indices
    elif beta == 1:
        index = student_logits.topk(top_k, dim=-1).indices
    else:
        index = torch.cat([teacher_logits.topk(top_k, dim=-1).indices, student_logits.topk(top_k, dim=-1).indices], dim=-1)
    support = torch.ones_like(index, dtype=torch.bool)
    for j in range(1, index.shape[-1]):  # a token already in the support counts once
        support[..., j] = ~((index[..., j : j + 1] == index[..., :j]) & support[..., :j]).any(dim=-1)
    return index, support


def _support_terms(student: torch.Tensor, teacher: torch.Tensor, index: torch.Tensor, support: torch.Tensor, beta: float,
                   add_tail: bool) -> torch.Tensor:
    """Per-entry divergence terms of log-probs ``student``/``teacher`` restricted to ``index`` (``support``: which entries count)."""
    index = torch.where(support, index, torch.zeros_like(index))
    minus_inf = torch.full((), float("-inf"), dtype=student.dtype, device=student.device)
    s_sup = torch.where(support, student.gather(-1, index), minus_inf)
    t_sup = torch.where(support, teacher.gather(-1, index), minus_inf)
    if add_tail:
        s_sup, full_support = _add_tail(s_sup, support)
        t_sup, _ = _add_tail(t_sup, support)
        support = full_support
    else:
        s_sup = s_sup - torch.logsumexp(s_sup, dim=-1, keepdim=True)
        t_sup = t_sup - torch.logsumexp(t_sup, dim=-1, keepdim=True)
    return _divergence(s_sup, t_sup, beta, support)


def _rows_logits(rows: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """Logits of hidden-state rows through an LM head (or the rows themselves when they are logits), float32 (float64 kept)."""
    z = rows if weight is None else F.linear(rows, weight, bias)
    return z if z.dtype == torch.float64 else z.float()


def _chunk_divergence(s_rows, s_weight, s_bias, t_rows, t_weight, t_bias, tokens, options):
    student_logits = _rows_logits(s_rows, s_weight, s_bias)
    with torch.no_grad():
        teacher_logits = _rows_logits(t_rows, t_weight, t_bias)
    return support_divergence(student_logits, teacher_logits.to(student_logits.dtype), tokens, **options)


def chunked_support_divergence(student_states, teacher_states, tokens: torch.Tensor, valid: torch.Tensor, *, chunk_size: int | None,
                               **options) -> torch.Tensor:
    """:func:`support_divergence` at the ``valid`` positions of ``(B, C)`` states, a chunk of rows at a time: ``(n_valid,)``.

    Each chunk runs under ``torch.utils.checkpoint``: its ``(rows, V)`` logits are freed after the forward and
    recomputed in the backward, so no more than one chunk of full-vocabulary logits exists at a time.
    The full-vocabulary case of two chunked models goes to ``posttrain.chunked_distillation_divergence``.
    """
    flat = valid.reshape(-1)
    s_rows = student_states.tensor.reshape(-1, student_states.tensor.shape[-1])[flat]
    t_rows = teacher_states.tensor.reshape(-1, teacher_states.tensor.shape[-1])[flat].detach()
    toks = tokens.reshape(-1)[flat]
    if student_states.weight is None:  # the student's own logits exist already: no chunking to gain
        return _chunk_divergence(s_rows, None, None, t_rows, teacher_states.weight, teacher_states.bias, toks, options)
    top_k, vocab = options["top_k"], student_states.weight.shape[0]
    full_vocabulary = top_k == 0 or (top_k >= vocab and not (options["beta"] > 0 and top_k == 1))
    if full_vocabulary and teacher_states.weight is not None:
        return chunked_distillation_divergence(s_rows, student_states.weight, t_rows, teacher_states.weight, student_bias=student_states.bias,
                                               teacher_bias=teacher_states.bias, beta=options["beta"], temperature=options["temperature"],
                                               chunk_size=chunk_size or 256)
    size = chunk_size or 256
    parts = [checkpoint(_chunk_divergence, s_rows[i : i + size], student_states.weight, student_states.bias, t_rows[i : i + size],
                        teacher_states.weight, teacher_states.bias, toks[i : i + size], options, use_reentrant=False)
             for i in range(0, s_rows.shape[0], size)]
    return torch.cat(parts) if parts else s_rows.new_zeros(0)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


class _LogEvery:
    """The completion log's view of the config: ``log_completions`` holds at every ``log_completions_steps``-th step only (TRL's rule)."""

    def __init__(self, args, loop):
        self._args, self._loop = args, loop
        self.log_unique_prompts = False

    def __getattr__(self, name):
        return getattr(self._args, name)

    @property
    def log_completions(self) -> bool:
        step = self._loop.state.global_step
        return bool(self._args.log_completions and step > 0 and step % self._args.log_completions_steps == 0)


# ----------------------------------------------------------------------------- trainer
class IWOPDTrainer(TrainerSurface):
    """Distill a frozen teacher into a causal LM on the student's own samples with IW-OPD; TRL 1.16's ``IWOPDTrainer`` API.

    Args:
        model: The student: a model object, or a Hub id / local directory (default ``args.model_name_or_path``).
        teacher_model: The teacher: a model object or a Hub id / directory (default ``args.teacher_model_name_or_path``).
            It must share the student's tokenizer (vocabulary); a teacher with another tokenizer is the gold plugin's case.
        args: An :class:`IWOPDConfig`, a ``transformers.TrainingArguments`` or a dict of fields.
        data_collator: Only None (the producer reads the prompt rows itself).
        train_dataset: Prompt-only rows: a ``prompt`` column (string or messages), pre-tokenized ``prompt_ids``, or TRL's
            ``messages`` column (a trailing assistant turn is dropped: the student generates the completion).
        eval_dataset: Same format, or a dict of them.
        processing_class: The student's tokenizer (default: loaded with the model).
        compute_metrics: Only None.
        callbacks: ``transformers.TrainerCallback`` objects (or classes).
        optimizers: Only ``(None, None)``: the loop builds the optimizer and schedule from ``args``.
        preprocess_logits_for_metrics: Only None.
        peft_config: A ``peft.PeftConfig`` for the student.
        rollout_engine: A ``posttrain.RolloutEngine`` (default: one on ``args.rollout_backend``).
        allow_experimental: Python opt-in for this experimental method.

    Raises:
        posttrain.ConfigError: no teacher or no dataset, a teacher with another vocabulary, a dataset without prompts,
            or an argument that cannot be honoured.
    """

    _tag_names = ["trl", "iw-opd"]

    def __init__(self, model=None, teacher_model=None, args: IWOPDConfig | None = None, data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, compute_metrics=None, callbacks=None, optimizers=(None, None), preprocess_logits_for_metrics=None,
                 peft_config=None, rollout_engine=None, allow_experimental=False):
        self.args = args = as_config(args, IWOPDConfig, default_output_dir=default_output_dir(model, "IW-OPD"))
        # the maturity gate runs first: TrainingLoop checks the opt-in
        self.loop = TrainingLoop(args, method="iw_opd", allow_experimental=allow_experimental, callbacks=callbacks)
        self._check_arguments(train_dataset, data_collator, compute_metrics, optimizers, preprocess_logits_for_metrics)
        teacher_model = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
        if teacher_model is None:
            raise ConfigError("IW-OPD needs a teacher: pass teacher_model=<model or Hub id / directory> to the trainer, or set "
                              "teacher_model_name_or_path in the config (CLI: --teacher_model_name_or_path PATH).")
        self.model, self.processing_class = load_online_policy(model, args, loop=self.loop, processing_class=processing_class, peft_config=peft_config,
                                                               tags=self._tag_names)
        self.pad_token_id = self.processing_class.pad_token_id
        self.teacher_model = self._load_teacher(teacher_model)
        self.train_dataset = self.process_dataset(train_dataset, "train_dataset")
        if isinstance(eval_dataset, dict):
            self.eval_dataset = {key: self.process_dataset(part, f"eval_dataset[{key!r}]") for key, part in eval_dataset.items()}
        else:
            self.eval_dataset = self.process_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        self.loop.setup(self.model, method=self)
        engine_args = copy.copy(args)
        engine_args.generation_batch_size = None  # TRL's generation_batch_size counts prompts per step, not sequences per generate call
        self.engine = rollout_engine or build_rollout_engine(engine_args, model=self.model, tokenizer=self.processing_class, accelerator=self.loop.accelerator)
        # the transformers backend samples from the trained student itself: A_t uses its current log-probs (TRL without vLLM);
        # another sampler (vLLM) gives its own log-probs of the sampled tokens (TRL's rollout_logprobs)
        self.engine_is_policy = self.engine.samples_from_policy
        self._sampling = dict(max_tokens=args.max_completion_length, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              min_p=0.0, repetition_penalty=1.0)
        self.producer = RolloutProducer(self.loop.prompt_source(len(self.train_dataset), args.generation_batch_size), self.train_dataset,
                                        self._produce, reuse=1)
        self._completion_log = CompletionLog(args.per_device_train_batch_size * args.gradient_accumulation_steps)
        self._logs = self._completion_log.logs
        self.add_callback(self._completion_log.callback(_LogEvery(args, self.loop), self.loop))

    # -------------------------------------------------------------------------- setup
    @staticmethod
    def generalized_jsd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None, beta: float = 0.5,
                             temperature: float = 1.0, reduction: str = "batchmean", top_k: int = 0, add_tail: bool = True,
                             num_items_in_batch=None) -> torch.Tensor:
        """The generalized JSD of the 'jsd' objective from full logits ``(..., V)``, with TRL's ``IWOPDTrainer.generalized_jsd_loss`` arguments.

        A reference on materialized logits (the trainer itself scores chunks of rows and never builds them).
        ``beta`` 0 is forward KL(teacher || student), 1 reverse KL, else ``beta KL(T || M) + (1 - beta) KL(S || M)``
        with ``M = beta T + (1 - beta) S``; both distributions at ``temperature``. ``top_k > 0`` (and ``V > top_k``)
        restricts the divergence to the teacher's top-k (beta 0), the student's (beta 1) or their union, with a tail
        bucket for the mass outside it (``add_tail``) or renormalized over it. Reduction as TRL: positions where
        ``labels == -100`` are dropped; ``num_items_in_batch`` given: sum / num_items_in_batch; ``batchmean``: sum /
        kept positions (at least 1; without labels, / the size of dim 0); ``sum``; ``mean`` and ``none`` act on the
        per-entry terms.
        """
        student_logits, teacher_logits = student_logits / temperature, teacher_logits / temperature
        student, teacher = F.log_softmax(student_logits, dim=-1), F.log_softmax(teacher_logits, dim=-1)
        if top_k > 0 and student_logits.shape[-1] > top_k:
            index, support = _topk_support(student_logits, teacher_logits, beta, top_k)
            terms = _support_terms(student, teacher, index, support, beta, add_tail)
        else:
            terms = _divergence(student, teacher, beta, None)
        mask = None
        if labels is not None:
            mask = labels != -100
            terms = terms[mask]
        if num_items_in_batch is not None:
            total = terms.sum()
            return total / (num_items_in_batch.to(total.device) if isinstance(num_items_in_batch, torch.Tensor) else num_items_in_batch)
        if reduction == "batchmean":
            return terms.sum() / (mask.sum().clamp_min(1) if mask is not None else max(terms.shape[0], 1))
        if reduction == "sum":
            return terms.sum()
        if reduction == "mean":
            return terms.mean()
        return terms

    @staticmethod
    def _check_arguments(train_dataset, data_collator, compute_metrics, optimizers, preprocess_logits_for_metrics) -> None:
        if train_dataset is None:
            raise ConfigError("`train_dataset` is required: pass train_dataset=... (prompt-only rows with a 'prompt' or 'messages' column).")
        if data_collator is not None:
            raise ConfigError("data_collator is not supported: IW-OPD reads the prompt rows itself and the student generates the completions; leave it None.")
        if compute_metrics is not None or preprocess_logits_for_metrics is not None:
            raise ConfigError("compute_metrics / preprocess_logits_for_metrics are not supported: evaluation rolls out the eval prompts and reports the loss "
                              "and the distillation metrics; leave them None.")
        if tuple(optimizers or (None, None)) != (None, None):
            raise ConfigError("optimizers=(optimizer, scheduler) is not supported: posttrain's loop builds them from the config; set optim, optim_args, "
                              "learning_rate, lr_scheduler_type and lr_scheduler_kwargs instead.")

    def _load_teacher(self, teacher):
        """Load (by name) the frozen teacher, check that it shares the student's vocabulary, and place it like the policy."""
        args = self.args
        init_kwargs = dict(args.teacher_model_init_kwargs or {})
        if isinstance(teacher, str):
            if args.teacher_model_revision is not None:
                init_kwargs.setdefault("revision", args.teacher_model_revision)
            teacher, tokenizer = load_pretrained(teacher, role="teacher", model_init_kwargs=init_kwargs, trust_remote_code=args.trust_remote_code)
        else:
            if args.teacher_model_init_kwargs is not None:
                raise ConfigError("teacher_model_init_kwargs is set in the config but teacher_model is already instantiated: drop one of them.")
            tokenizer = None
            if getattr(getattr(teacher, "config", None), "_name_or_path", None):
                try:
                    _, tokenizer = load_pretrained(teacher, role="teacher", trust_remote_code=args.trust_remote_code)
                except ConfigError:
                    tokenizer = None  # an in-memory teacher without a loadable tokenizer: the vocabulary size is checked below
        if tokenizer is not None and tokenizer.get_vocab() != self.processing_class.get_vocab():
            raise ConfigError(
                "the teacher's tokenizer differs from the student's: IW-OPD compares the two models token by token on one vocabulary. Use a "
                "teacher with the student's tokenizer, or the gold plugin (posttrain.experimental.gold) for teachers with another tokenizer."
            )
        student_vocab = self.model.get_output_embeddings().weight.shape[0] if hasattr(self.model, "get_output_embeddings") else None
        teacher_head = teacher.get_output_embeddings() if hasattr(teacher, "get_output_embeddings") else None
        if student_vocab is not None and teacher_head is not None and teacher_head.weight.shape[0] != student_vocab:
            if tokenizer is None:
                raise ConfigError(
                    f"the teacher's vocabulary ({teacher_head.weight.shape[0]} rows) differs from the student's ({student_vocab}) and its tokenizer "
                    "could not be loaded to compare them: give a teacher with the student's vocabulary, or use the gold plugin for another tokenizer."
                )
            teacher.resize_token_embeddings(student_vocab)  # same tokenizer, padded embedding tables of another size (TRL does the same)
        return self.loop.prepare_frozen(teacher)

    # -------------------------------------------------------------------------- data
    def process_dataset(self, dataset, name: str):
        """Return ``dataset`` as prompt rows; TRL's ``messages`` rows become ``prompt`` rows (a trailing assistant turn dropped)."""
        dataset = self._messages_to_prompts(dataset)
        limit = None
        if name == "train_dataset" and self.args.max_steps > 0:
            limit = self.args.max_steps * self.args.generation_batch_size * self.loop.accelerator.num_processes
        return prepare_prompt_dataset(dataset, name, method="IW-OPD", prompt_ids=self._prompt_ids, limit=limit)

    @staticmethod
    def _messages_to_prompts(dataset):
        from datasets import Dataset, IterableDataset

        def convert(row):
            messages = row["messages"]
            has_completion = len(messages) > 1 and messages[-1].get("role") == "assistant"
            return {"prompt": messages[:-1] if has_completion else messages}

        if isinstance(dataset, (Dataset, IterableDataset)):  # a stream's columns are None when it declares no features
            columns = dataset.column_names or []
            if "messages" in columns and "prompt" not in columns and "prompt_ids" not in columns:
                return dataset.map(convert, remove_columns=["messages"])
            return dataset
        if isinstance(dataset, list) and dataset and isinstance(dataset[0], dict) and "messages" in dataset[0] and "prompt" not in dataset[0]:
            return [{**{k: v for k, v in row.items() if k != "messages"}, **convert(row)} for row in dataset]
        return dataset

    def _prompt_ids(self, row: dict) -> list[int]:
        """A row's prompt ids, cut to ``max_prompt_length`` on the tokenizer's ``truncation_side`` (TRL's collator does the same)."""
        ids = prompt_token_ids(row, self.processing_class, chat_template_kwargs=self.args.chat_template_kwargs)
        limit = self.args.max_prompt_length
        if limit is not None and len(ids) > limit:
            ids = ids[-limit:] if getattr(self.processing_class, "truncation_side", "right") == "left" else ids[:limit]
        return ids

    @property
    def data_collator(self):
        """The collator of raw prompt rows (TRL's attribute): :meth:`collate`, which keeps them raw."""
        return self.collate

    # -------------------------------------------------------------------------- loop protocol
    def collate(self, rows: list[dict]) -> dict:
        return {"rows": [dict(row) for row in rows]}  # prompts stay raw (the producer reads the dataset's rows itself)

    def count_items(self, batch: dict) -> int:
        return batch["num_completion_tokens"]  # a token-level mean over the whole step

    def _produce(self, request: ProduceRequest) -> list[dict]:
        """The producer's callback: one step's micro-batches, sampled with a seed of the step (a resumed run draws the same)."""
        seed = self.args.seed + request.step + 1_000_003 * request.rank
        return self._rollout_batches(request.rows, seed, size=self.args.per_device_train_batch_size, mode="train")

    def _rollout_batches(self, rows: list[dict], seed: int, size: int, mode: str) -> list[dict]:
        args, tok, group = self.args, self.processing_class, self.args.num_generations
        prompts, prompt_ids = expand_prompts(rows, group, self._prompt_ids, tok)  # (N,): each prompt G times in a row
        rollout = generate_rollout(prompts, prompt_ids, engine=self.engine, sampling=self._sampling, num_generations=group, seed=seed,
                                   max_completion_length=args.max_completion_length, stop_token_ids=(tok.eos_token_id, self.pad_token_id))
        batches = rollout_micro_batches(rollout, size, self.pad_token_id)  # padded CPU tensors, masks, num_completion_tokens
        for batch in batches:
            sampling_logps = batch.pop("sampling_logprobs")  # (b, C)
            if not self.engine_is_policy:
                batch["rollout_logprobs"] = sampling_logps.float()
        lengths = torch.tensor([len(c) for c in rollout.completion_ids], dtype=torch.float32)
        metrics = {"completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
                   "completions/max_length": float(lengths.max()), "completions/clipped_ratio": float(sum(rollout.truncated)) / len(rollout)}
        attach_rollout_metrics(batches, metrics)
        if mode == "train":
            completions = tok.batch_decode(rollout.completion_ids, skip_special_tokens=True)
            self._completion_log.record(prompts, completions, torch.zeros(len(rollout), 0), [], torch.zeros(len(rollout)))
        return batches

    # -------------------------------------------------------------------------- the loss
    def _states(self, model, batch: dict):
        """``TokenStates`` ``(B, C, .)`` whose position t predicts completion token t (one forward, no full logits kept)."""
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        num_completion = batch["completion_ids"].shape[1]
        _, states = causal_lm_states(model, chunk_size=self.args.logprob_chunk_size, input_ids=input_ids, attention_mask=attention_mask,
                                     logits_to_keep=num_completion + 1)
        return states[:, :-1]

    def compute_loss(self, model, batch: dict, num_items_in_batch):
        """Return the micro-batch's share of the step loss (its sum / the step's completion tokens) and its metrics (no host syncs)."""
        args = self.args
        mask = batch["completion_mask"]
        fmask = mask.float()
        labels = batch["completion_ids"].masked_fill(mask == 0, -100)
        student = self._states(model, batch)
        with torch.no_grad():
            teacher = self._states(self.teacher_model, batch)
            t_scores = teacher.score(labels, temperature=args.temperature, return_entropy=True, entropy_grad=False)
        metrics = {}
        if args.distillation_objective == "iw_opd":
            s_scores = student.score(labels, temperature=args.temperature, return_entropy=True, entropy_grad=False)
            student_logps = s_scores.logps
            self._check_teacher(t_scores.logps, mask)
            per_token, advantage, weight = iw_opd_token_loss(student_logps, t_scores.logps, mask, gamma=args.iw_opd_gamma, epsilon=args.iw_opd_epsilon,
                                                             behaviour_logps=batch.get("rollout_logprobs"))
            loss = per_token.sum() / num_items_in_batch
            valid = mask.bool()
            big = torch.full((), float("inf"), dtype=weight.dtype, device=weight.device)
            metrics.update({
                "iw_opd/mean_advantage": _masked_mean(weight * advantage, fmask), "iw_opd/mean_abs_advantage": _masked_mean(advantage.abs(), fmask),
                "iw_opd/mean_weight": _masked_mean(weight, fmask), "iw_opd/min_weight": torch.where(valid, weight, big).amin(),
                "iw_opd/max_weight": torch.where(valid, weight, -big).amax(),
            })
        else:
            divergence = chunked_support_divergence(student, teacher, batch["completion_ids"], mask.bool(), chunk_size=args.logprob_chunk_size,
                                                    beta=args.beta, temperature=args.temperature, top_k=args.loss_top_k, add_tail=args.loss_add_tail,
                                                    reverse_mode=args.reverse_kl_top_1_mode)
            loss = divergence.sum() / num_items_in_batch
            with torch.no_grad():
                s_scores = student.score(labels, temperature=args.temperature, return_entropy=True, entropy_grad=False)
            student_logps = s_scores.logps
            metrics["divergence"] = divergence.detach().sum() / fmask.sum().clamp(min=1.0)
        metrics.update({
            # log pi_S - log pi_T on the student's own samples: a Monte-Carlo estimate of KL(student || teacher) per token
            "teacher_kl": _masked_mean((student_logps.detach() - t_scores.logps).float(), fmask),
            "entropy": _masked_mean(s_scores.entropy.detach().float(), fmask),
            "teacher_entropy": _masked_mean(t_scores.entropy.float(), fmask),
        })
        if "rollout_metric_values" in batch:
            metrics.update(zip(batch["rollout_metric_names"], batch["rollout_metric_values"]))
        return loss, metrics

    @staticmethod
    def _check_teacher(teacher_logps: torch.Tensor, mask: torch.Tensor) -> None:
        bad = (mask.bool() & ~torch.isfinite(teacher_logps)).sum()
        if bool(bad):  # one host sync per micro-batch, on a scalar
            raise ValueError(f"the teacher gives a non-finite log-probability to {int(bad)} of {int(mask.sum())} sampled completion tokens "
                             "(a -inf logit or a NaN in the teacher): IW-OPD needs log pi_T of every sampled token; check the teacher's weights and dtype.")

    def on_step_end(self, model, state) -> None:
        self.engine.update_weights(model)  # the next rollout samples from the updated student

    def evaluate_batches(self, model, batches) -> dict[str, float]:
        """Roll out each eval batch (seeded by ``seed``) and compute its loss and metrics as in training (``posttrain.evaluate_online``)."""
        return evaluate_online(model, batches, produce=lambda rows, seed: self._rollout_batches(rows, seed, size=len(rows) * self.args.num_generations, mode="eval"),
                               compute_loss=self.compute_loss, count_items=self.count_items, loop=self.loop, seed=self.args.seed)

    def state_dict(self) -> dict:
        return {"policy_version": self.engine.policy_version}

    def load_state_dict(self, state: dict) -> None:
        self.engine.set_policy_version(int(state.get("policy_version", 0)))
