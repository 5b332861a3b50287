"""GKD: Generalized Knowledge Distillation (Agarwal et al., ICLR 2024, arXiv:2306.13649), on the core loop.

Each row is a conversation whose last (assistant) message is the completion. One optimizer step, per
micro-batch (``prepare_step`` then ``compute_loss``)::

    u ~ U[0, 1)   (a generator seeded by (seed, step, micro-batch, process): resumable by construction)
    u < lmbda      -> the completions are replaced by the STUDENT's samples of the prompts (on-policy)
    else, seq_kd   -> the completions are replaced by the TEACHER's samples (sequence-level KD data)
    else           -> the dataset's completions
    loss = sum over completion tokens of JSD_beta(p_T(.|y<t) || p_S(.|y<t)) / completion tokens of the step

with, for ``m = beta p_T + (1 - beta) p_S`` (Eq. 1 of the paper, TRL 1.16's ``generalized_jsd_loss``),
``JSD_beta = beta KL(p_T || m) + (1 - beta) KL(p_S || m)``; ``beta=0`` is the forward KL(p_T || p_S),
``beta=1`` the reverse KL(p_S || p_T). Samples are drawn at ``temperature`` (``max_new_tokens`` each,
through ``posttrain``'s rollout engine); the divergence is computed at temperature 1, as TRL's trainer.

The divergence comes from the two models' last hidden states and LM heads
(``posttrain.causal_lm_states`` + ``posttrain.chunked_distillation_divergence``), on the completion
positions only, ``logprob_chunk_size`` rows at a time: neither model's ``(B, T, V)`` logits exist.
The teacher runs under ``torch.no_grad()`` in its own dtype. Heavy module: imports torch.
"""

from __future__ import annotations

import itertools
import random
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from datasets import IterableDataset

from posttrain import (
    ConfigError,
    DataError,
    RolloutEngine,
    TrainerSurface,
    TrainingLoop,
    as_config,
    causal_lm_states,
    chunked_distillation_divergence,
    disable_dropout,
    generate_rollout,
    is_peft_model,
    load_pretrained,
    pad,
)

from posttrain_gkd.config import GKDConfig

__all__ = ["GKDTrainer", "DataCollatorForChatML", "generalized_jsd_loss", "tokenize_conversation"]

_FORMATS = (
    "GKD takes rows {'messages': [{'role', 'content'}, ...]} whose last message is the assistant's completion (TRL's format), "
    "or conversational {'prompt': [...messages], 'completion': [...messages]}, or pre-tokenized {'prompt_ids', 'completion_ids'}; with "
    "lmbda=1.0 or seq_kd=True also prompt-only {'prompt': [...messages]} (every completion is then generated)"
)


# ---------------------------------------------------------------------------------------------- math
def generalized_jsd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None, beta: float = 0.5,
                         temperature: float = 1.0, reduction: str = "batchmean", num_items_in_batch: Any = None) -> torch.Tensor:
    """The generalized JSD of Eq. 1 from full logits, with TRL's ``GKDTrainer.generalized_jsd_loss`` arguments and reductions.

    A reference on ``(..., V)`` logits (the trainer itself never builds them; it uses
    :func:`posttrain.chunked_distillation_divergence`). The divergence at a position is the sum over the vocabulary
    of ``beta * p_T (log p_T - log m) + (1 - beta) * p_S (log p_S - log m)``, ``m = beta p_T + (1 - beta) p_S``,
    both at ``temperature``. As TRL: positions where ``labels == -100`` are dropped; ``batchmean`` sums and divides
    by the kept positions (at least 1; without labels, by the batch size); ``num_items_in_batch`` replaces that
    divisor; ``sum``; ``mean`` and ``none`` act on the per-vocabulary-entry terms ``(..., V)``.
    """
    s = F.log_softmax(student_logits / temperature, dim=-1)
    t = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        terms = t.exp() * (t - s)
    elif beta == 1:
        terms = s.exp() * (s - t)
    else:
        b = torch.tensor(beta, dtype=s.dtype, device=s.device)
        m = torch.logsumexp(torch.stack([s + torch.log1p(-b), t + torch.log(b)]), dim=0)
        terms = beta * t.exp() * (t - m) + (1 - beta) * s.exp() * (s - m)
    if labels is not None:
        terms = terms[labels != -100]  # (n, V)
    if num_items_in_batch is not None:
        total = terms.sum()
        return total / (num_items_in_batch.to(total.device) if isinstance(num_items_in_batch, torch.Tensor) else num_items_in_batch)
    if reduction == "batchmean":
        return terms.sum() / max(terms.shape[0], 1)
    if reduction == "sum":
        return terms.sum()
    if reduction == "mean":
        return terms.mean()
    return terms


# ---------------------------------------------------------------------------------------------- data
def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(isinstance(m, dict) and "role" in m for m in value)


def tokenize_conversation(tokenizer, prompt_messages: list, all_messages: list) -> tuple[list[int], int]:
    """Return ``(ids, prompt_length)`` of a conversation as TRL's ``DataCollatorForChatML`` tokenizes it.

    The whole conversation is rendered with the chat template and tokenized once; the completion
    starts at the first token that begins at or after the end of the rendered prompt (the prompt
    messages with the generation prompt). Without a fast tokenizer's offsets, the prompt's own token
    count is the boundary.
    """
    prompt_text = tokenizer.apply_chat_template(prompt_messages, add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(all_messages, add_generation_prompt=False, tokenize=False)
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
        boundary = next((i for i, (start, _) in enumerate(offsets) if start >= len(prompt_text)), len(ids))
    else:
        ids = list(tokenizer(full_text, add_special_tokens=False)["input_ids"])
        boundary = len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    return ids, boundary


class DataCollatorForChatML:
    """Collate processed rows (``input_ids``, ``prompt_length``) into TRL's ChatML batch, LEFT-padded as TRL's collator.

    Returns ``input_ids`` / ``attention_mask`` / ``labels`` ``(B, T)`` (labels: the completion tokens,
    -100 elsewhere), ``prompts`` / ``prompt_attention_mask`` ``(B, P)`` and ``num_tokens``.
    """

    def __init__(self, pad_token_id: int, ignore_index: int = -100):
        self.pad_token_id = pad_token_id
        self.ignore_index = ignore_index

    def __call__(self, rows: list[dict]) -> dict:
        ids = [torch.tensor(list(r["input_ids"]), dtype=torch.long) for r in rows]
        prompts = [t[: int(r["prompt_length"])] for t, r in zip(ids, rows)]
        labels = [torch.cat([torch.full((int(r["prompt_length"]),), self.ignore_index, dtype=torch.long), t[int(r["prompt_length"]):]])
                  for t, r in zip(ids, rows)]
        ones = [torch.ones(len(t), dtype=torch.long) for t in ids]
        batch = {
            "input_ids": pad(ids, padding_value=self.pad_token_id, padding_side="left"),
            "attention_mask": pad(ones, padding_value=0, padding_side="left"),
            "labels": pad(labels, padding_value=self.ignore_index, padding_side="left"),
            "prompts": pad(prompts, padding_value=self.pad_token_id, padding_side="left"),
            "prompt_attention_mask": pad([torch.ones(len(p), dtype=torch.long) for p in prompts], padding_value=0, padding_side="left"),
        }
        batch["num_tokens"] = int(batch["attention_mask"].sum())
        return batch


# ------------------------------------------------------------------------------------------- trainer
class GKDTrainer(TrainerSurface):
    """Distill ``teacher_model`` into ``model`` with GKD; TRL 1.16's ``GKDTrainer`` signature.

    Metrics (means over the logging window): ``divergence`` (the generalized JSD per completion token:
    the loss before normalization over the step), ``entropy`` / ``teacher_entropy`` (the student's and
    the teacher's next-token entropy on the completion tokens), ``on_policy`` (share of micro-batches
    sampled by the student), ``teacher_generated`` (share sampled by the teacher, ``seq_kd``),
    ``completions/mean_length``; the loop adds ``loss``, ``num_tokens``, ``prepare_step_fraction``.

    Args:
        model: The student: a causal LM, a ``PeftModel``, or a Hub id / local directory.
        teacher_model: The teacher: a causal LM or a Hub id / local directory (default
            ``args.teacher_model_name_or_path``), loaded with ``args.teacher_model_init_kwargs``; it must
            share the student's vocabulary.
        args: A :class:`GKDConfig` (or a dict / TRL ``GKDConfig``).
        data_collator: Optional collator of processed rows (``input_ids``, ``prompt_length``) into
            ``input_ids`` / ``attention_mask`` / ``labels`` / ``prompts`` / ``prompt_attention_mask``
            (default :class:`DataCollatorForChatML`).
        train_dataset: Rows (see ``_FORMATS``); a ``datasets.Dataset``, an ``IterableDataset`` or a list of dicts.
        eval_dataset: Rows of the same shape, or a dict of them; scored on their own completions (no sampling).
        processing_class: The tokenizer (loaded with the model when omitted).
        compute_metrics: Not supported (None).
        callbacks: ``transformers.TrainerCallback`` objects.
        optimizers: Must be ``(None, None)``: set ``optim``/``lr_scheduler_type`` in the config.
        preprocess_logits_for_metrics: Not supported (None).
        peft_config: Optional PEFT config (the adapter is trained).
        formatting_func: Accepted, no effect (TRL's GKD skips the SFT dataset preparation that would call it).
        allow_experimental: Python opt-in for this experimental method.

    Raises:
        posttrain.ConfigError: no teacher, a vocabulary mismatch (use ``gold``), ``teacher_model_init_kwargs``
            with a teacher object, or an argument that cannot be honoured.
        posttrain.DataError: an invalid row (named by index and column).
    """

    def __init__(
        self,
        model=None,
        teacher_model=None,
        args: GKDConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        preprocess_logits_for_metrics=None,
        peft_config=None,
        formatting_func=None,
        *,
        allow_experimental: bool = False,
    ) -> None:
        name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", None)
        self.args = args = as_config(args, GKDConfig, default_output_dir=f"{str(name).rstrip('/').split('/')[-1]}-GKD" if name else None)
        # The maturity gate runs first: TrainingLoop refuses an experimental method without an opt-in.
        self.loop = TrainingLoop(args, method="gkd", allow_experimental=allow_experimental, callbacks=callbacks)
        if optimizers is not None and any(part is not None for part in optimizers):
            raise ConfigError("optimizers=(optimizer, scheduler) cannot be honoured: set optim, learning_rate, weight_decay and lr_scheduler_type in the config.")
        if compute_metrics is not None or preprocess_logits_for_metrics is not None:
            raise ConfigError("compute_metrics / preprocess_logits_for_metrics are not supported by posttrain's GKD: evaluation reports the divergence (eval_loss, eval_divergence) and entropies.")
        if formatting_func is not None:
            warnings.warn("posttrain: formatting_func is accepted but unused by GKD (as in TRL, whose GKD skips the SFT dataset preparation).", UserWarning, stacklevel=2)
        if train_dataset is None:
            raise ConfigError("`train_dataset` is required: pass train_dataset=... (a datasets.Dataset, an IterableDataset or a list of dicts).")
        teacher = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
        if teacher is None:
            raise ConfigError("GKD needs a teacher: pass teacher_model=... (a model object, a Hub id or a local directory) or set teacher_model_name_or_path.")
        if args.teacher_model_init_kwargs is not None and not isinstance(teacher, str):
            raise ConfigError("teacher_model_init_kwargs apply to a teacher loaded by name, but teacher_model is already a model object: "
                              "drop teacher_model_init_kwargs, or pass the teacher as a Hub id / directory.")

        self.model, self.processing_class = self.loop.load_model(model, processing_class=processing_class, peft_config=peft_config)
        base = self.model.get_base_model() if is_peft_model(self.model) else self.model
        if getattr(getattr(base, "config", None), "is_encoder_decoder", False):
            raise ConfigError(f"{type(base).__name__} is an encoder-decoder model; posttrain's GKD trains decoder-only causal LMs.")
        self.tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        if args.pad_token is not None:
            if self.tokenizer.convert_tokens_to_ids(args.pad_token) in (None, self.tokenizer.unk_token_id):
                raise ConfigError(f"pad_token={args.pad_token!r} is not a token of the tokenizer: pick one of its tokens (e.g. its EOS {self.tokenizer.eos_token!r}).")
            self.tokenizer.pad_token = args.pad_token
        elif self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.pad_token_id = self.tokenizer.pad_token_id

        param = next(base.parameters(), None)
        dtype = param.dtype if param is not None else torch.float32
        teacher, _ = load_pretrained(teacher, role="teacher", model_init_kwargs=args.teacher_model_init_kwargs, trust_remote_code=args.trust_remote_code,
                                     default_dtype=dtype, load_tokenizer=False)
        student_vocab, teacher_vocab = _vocab_size(base), _vocab_size(teacher)
        if student_vocab != teacher_vocab:
            raise ConfigError(
                f"the student has vocab_size {student_vocab} but the teacher has {teacher_vocab}: GKD compares full next-token distributions "
                "and needs a shared vocabulary. Use a teacher with the student's tokenizer, or the 'gold' method (cross-tokenizer distillation)."
            )
        if args.disable_dropout:
            disable_dropout(self.model)
        self.teacher_model = self.loop.prepare_frozen(teacher)
        self.lmbda, self.beta, self.temperature, self.seq_kd = args.lmbda, args.beta, args.temperature, args.seq_kd
        self.sampling = {"max_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}
        self.engine = RolloutEngine("transformers", model=self.model, tokenizer=self.tokenizer, accelerator=self.loop.accelerator,
                                    generation_batch_size=args.generation_batch_size)
        self._teacher_engine = None  # built on the first seq_kd batch
        self.data_collator = data_collator if data_collator is not None else DataCollatorForChatML(self.pad_token_id)
        self._warned: set[str] = set()
        self._all_generated = args.lmbda == 1.0 or args.seq_kd  # then the dataset's completions are never used
        self.train_dataset = self.process_dataset(train_dataset, "train_dataset")
        if isinstance(eval_dataset, dict):
            self.eval_dataset = {key: self.process_dataset(part, f"eval_dataset[{key!r}]") for key, part in eval_dataset.items()}
        else:
            self.eval_dataset = self.process_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        self.loop.setup(self.model, method=self)  # checks this object against posttrain.MethodProtocol

    # train(), evaluate(), save_model(), state, callbacks: posttrain.TrainerSurface, delegated to self.loop.

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message + " Shown once; it likely applies to other rows too.", stacklevel=4)

    # ------------------------------------------------------------------ data
    def process_dataset(self, dataset, name: str):
        """Validate and tokenize rows into a ``datasets.Dataset`` of ``input_ids`` and ``prompt_length``; also used by ``evaluate(eval_dataset=...)``.

        Raises:
            DataError: an empty dataset, a row without a known format, a completion that is not the
                assistant's, or a prompt that ``max_length`` leaves empty (named by index and column).
        """
        args = self.args
        if isinstance(dataset, dict):
            raise ConfigError(f"{name} is a dict of datasets {sorted(dataset)}: pass one dataset (e.g. dataset['train']); only eval_dataset may be a dict.")
        if isinstance(dataset, IterableDataset):
            limit = None
            if name == "train_dataset" and args.max_steps > 0:
                limit = args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * self.loop.accelerator.num_processes
            rows = [dict(r) for r in itertools.islice(dataset, limit)]
        elif hasattr(dataset, "to_list"):
            rows = dataset.to_list()
        else:
            rows = [dict(r) if isinstance(r, dict) else r for r in dataset]
        if not rows:
            raise DataError(f"{name} is empty: give the trainer at least one row; {_FORMATS}.")
        out = [self._tokenize_row(row, index, name) for index, row in enumerate(rows)]
        from datasets import Dataset

        return Dataset.from_list(out)

    def _tokenize_row(self, row: Any, index: int, name: str) -> dict:
        args = self.args
        where = f"{name} row {index}"
        if not isinstance(row, dict):
            raise DataError(f"{where} is a {type(row).__name__}, not a dict of columns; {_FORMATS}.")
        if row.get("prompt_ids") is not None and row.get("completion_ids") is not None:
            prompt, completion = list(row["prompt_ids"]), list(row["completion_ids"])
            ids, boundary = prompt + completion, len(prompt)
            if not prompt or not completion:
                raise DataError(f"{where}: {'prompt_ids' if not prompt else 'completion_ids'} is empty; GKD needs a prompt to sample from and a completion to score.")
        else:
            if row.get("messages") is not None:
                messages, column = row["messages"], "messages"
                if not _is_messages(messages) or len(messages) < 2:
                    raise DataError(f"{where}, column 'messages': expected a list of at least 2 {{'role', 'content'}} messages (prompt, then the completion), "
                                    f"got {str(messages)[:80]!r}; {_FORMATS}.")
                prompt_messages, completion_messages = messages[:-1], messages[-1:]
            elif row.get("prompt") is not None and row.get("completion") is not None:
                column = "completion"
                for key in ("prompt", "completion"):
                    if not _is_messages(row[key]):
                        raise DataError(f"{where}, column {key!r}: expected a list of {{'role', 'content'}} messages, got {type(row[key]).__name__} "
                                        f"{str(row[key])[:80]!r}; {_FORMATS}.")
                prompt_messages, completion_messages = row["prompt"], row["completion"]
            elif _is_messages(row.get("prompt")) and row.get("completion") is None and name == "train_dataset" and self._all_generated:
                column, prompt_messages, completion_messages = "prompt", row["prompt"], []  # every completion is sampled (lmbda=1 or seq_kd)
            else:
                hint = ""
                if row.get("prompt") is not None:
                    hint = (" Prompt-only conversational rows are accepted in train_dataset when every completion is generated (lmbda=1.0 or "
                            "seq_kd=True), or use the online 'distill' method.")
                raise DataError(f"{where}: no 'messages' column (columns: {sorted(row)}); {_FORMATS}.{hint}")
            if not completion_messages:
                if not getattr(self.tokenizer, "chat_template", None):
                    raise ConfigError("the dataset is conversational but the tokenizer has no chat template: set tokenizer.chat_template.")
                text = self.tokenizer.apply_chat_template(prompt_messages, add_generation_prompt=True, tokenize=False)
                ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
                if args.max_length is not None and len(ids) > args.max_length:
                    ids = ids[-args.max_length:]
                return {"input_ids": ids, "prompt_length": len(ids)}
            if completion_messages[-1].get("role") != "assistant":
                raise DataError(f"{where}, column {column!r}: the last message has role {completion_messages[-1].get('role')!r}; the completion GKD scores "
                                "must be the assistant's (end the conversation with an assistant message).")
            if not getattr(self.tokenizer, "chat_template", None):
                raise ConfigError("the dataset is conversational but the tokenizer has no chat template: set tokenizer.chat_template (or pass pre-tokenized prompt_ids/completion_ids).")
            ids, boundary = tokenize_conversation(self.tokenizer, prompt_messages, prompt_messages + completion_messages)
            if boundary >= len(ids):
                raise DataError(f"{where}: the completion renders to no token (the chat template drops it?); give the assistant message some content.")
        if args.max_length is not None and len(ids) > args.max_length:  # keep the last max_length tokens, as TRL's collator
            cut = len(ids) - args.max_length
            ids, boundary = ids[cut:], max(0, boundary - cut)
            if boundary == 0:
                raise DataError(f"{where}: the completion alone fills max_length={args.max_length}, so no prompt token is left to generate from; raise max_length.")
        return {"input_ids": ids, "prompt_length": boundary}

    def collate(self, rows: list[dict]) -> dict:
        """Return ``data_collator(rows)``: TRL's ChatML batch (left-padded) plus ``num_tokens``."""
        batch = dict(self.data_collator(list(rows)))
        batch.setdefault("num_tokens", int(batch["attention_mask"].sum()))
        return batch

    def count_items(self, batch: dict) -> int:
        return int((batch["labels"][:, 1:] != -100).sum())  # completion tokens scored (the loss is a token mean over the step)

    # ------------------------------------------------------------------ the mix: dataset, student or teacher completions
    def _draw(self, step: int, index: int) -> float:
        """The micro-batch's uniform draw, from (seed, step, micro-batch, process) alone: a resumed run draws the same."""
        rank = self.loop.accelerator.process_index
        return random.Random(f"gkd/{self.args.seed}/{step}/{index}/{rank}").random()

    def _sample_seed(self, step: int, index: int) -> int:
        rank = self.loop.accelerator.process_index
        return (self.args.seed * 1_000_003 + step * 1_009 + index * 101 + rank) % (2**31 - 1)

    def prepare_step(self, micro_batches: list[dict], state) -> list[dict]:
        """Replace each micro-batch's completions by the student's (probability ``lmbda``) or, with ``seq_kd``, the teacher's samples."""
        step = state.global_step
        out = []
        for index, batch in enumerate(micro_batches):
            source = "dataset"
            if self._draw(step, index) < self.lmbda:
                source = "student"
            elif self.seq_kd:
                source = "teacher"
            if source != "dataset":
                batch = self._generated(batch, source, self._sample_seed(step, index))
            batch["on_policy"] = torch.tensor(float(source == "student"))
            batch["teacher_generated"] = torch.tensor(float(source == "teacher"))
            out.append(batch)
        return out

    def _teacher_rollout_engine(self) -> RolloutEngine:
        if self._teacher_engine is None:
            self._teacher_engine = RolloutEngine("transformers", model=self.teacher_model, tokenizer=self.tokenizer, accelerator=None,
                                                 generation_batch_size=self.args.generation_batch_size)
        return self._teacher_engine

    @torch.no_grad()
    def _generated(self, batch: dict, source: str, seed: int) -> dict:
        """Return ``batch`` with completions sampled by ``source`` from its prompts (``posttrain.generate_rollout``), in the collator's layout."""
        mask = batch["prompt_attention_mask"].bool()
        prompt_ids = [row[m].tolist() for row, m in zip(batch["prompts"], mask)]
        engine = self.engine if source == "student" else self._teacher_rollout_engine()
        rollout = generate_rollout(prompt_ids, prompt_ids, engine=engine, sampling=self.sampling, num_generations=1, seed=seed)
        tensors = rollout.to_tensors(self.pad_token_id)  # prompt (B, P) left-padded, completion (B, C) right-padded
        input_ids = torch.cat([tensors["prompt_ids"], tensors["completion_ids"]], dim=1)
        attention_mask = torch.cat([tensors["prompt_mask"], tensors["completion_mask"]], dim=1)
        labels = torch.cat([torch.full_like(tensors["prompt_ids"], -100), tensors["completion_ids"].masked_fill(tensors["completion_mask"] == 0, -100)], dim=1)
        new = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels", "num_tokens")}
        new.update(input_ids=input_ids, attention_mask=attention_mask, labels=labels, num_tokens=int(attention_mask.sum()),
                   completion_length=torch.tensor(float(tensors["completion_mask"].sum(1).float().mean())))
        return new

    # ------------------------------------------------------------------ the loss
    def compute_loss(self, model, batch: dict, num_items_in_batch):
        """Return the micro-batch's share of the step's mean generalized JSD per completion token, and its metrics."""
        chunk = self.args.logprob_chunk_size
        model_inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        _, student = causal_lm_states(model, chunk_size=chunk, **model_inputs)
        self.teacher_model.eval()
        with torch.no_grad():
            _, teacher = causal_lm_states(self.teacher_model, chunk_size=chunk, **model_inputs)
        labels = batch["labels"][:, 1:]  # position i predicts token i + 1
        mask = labels != -100  # (B, T-1): completion tokens
        s_rows, t_rows = student.tensor[:, :-1][mask], teacher.tensor[:, :-1][mask]  # (n, H) hidden states, or (n, V) logits (unchunked)
        if student.is_chunked and teacher.is_chunked:
            per_token = chunked_distillation_divergence(s_rows, student.weight, t_rows, teacher.weight, student_bias=student.bias, teacher_bias=teacher.bias,
                                                        beta=self.beta, temperature=1.0, chunk_size=student.chunk_size)  # (n,)
        else:  # a model whose head posttrain cannot reproduce: its logits, on the completion rows only
            per_token = generalized_jsd_loss(_rows_logits(student, s_rows), _rows_logits(teacher, t_rows), beta=self.beta, reduction="none").sum(-1)
        loss = per_token.sum() / num_items_in_batch
        with torch.no_grad():
            n = max(per_token.numel(), 1)
            metrics = {
                "divergence": per_token.detach().sum() / n,
                "entropy": _entropy(student, s_rows.detach(), chunk or 256).sum() / n,
                "teacher_entropy": _entropy(teacher, t_rows, chunk or 256).sum() / n,
            }
        for key in ("on_policy", "teacher_generated"):
            if key in batch:
                metrics[key] = batch[key]
        metrics["completions/mean_length"] = batch["completion_length"] if "completion_length" in batch else mask.sum(1).float().mean()
        return loss, metrics

    # ------------------------------------------------------------------ TRL's static helpers (same names and arguments)
    generalized_jsd_loss = staticmethod(generalized_jsd_loss)

    @staticmethod
    @torch.no_grad()
    def generate_on_policy_outputs(model, inputs: dict, generation_config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """TRL's helper: ``model.generate`` from ``inputs["prompts"]`` (left-padded) with ``generation_config``; return
        ``(ids, attention_mask, labels)``, the completion scored up to and including its first stop token (every token when
        the config names no EOS), -100 on the prompt and after the stop. The trainer itself samples through
        posttrain's rollout engine (:meth:`prepare_step`), in the same layout."""
        prompts, prompt_mask = inputs["prompts"], inputs["prompt_attention_mask"]
        ids = model.generate(input_ids=prompts, attention_mask=prompt_mask, generation_config=generation_config, return_dict_in_generate=True).sequences
        width = prompts.shape[1]
        completion = ids[:, width:]
        eos = generation_config.eos_token_id
        if eos is None:
            completion_mask = torch.ones_like(completion)
        else:
            stops = torch.isin(completion, torch.tensor(eos, device=ids.device).reshape(-1))
            first = torch.where(stops.any(1), stops.int().argmax(1), torch.full_like(stops[:, 0], completion.shape[1], dtype=torch.long))
            completion_mask = (torch.arange(completion.shape[1], device=ids.device)[None] <= first[:, None]).to(ids.dtype)
        attention_mask = torch.cat([prompt_mask.to(ids.dtype), completion_mask], dim=1)
        labels = ids.masked_fill(attention_mask == 0, -100)
        labels[:, :width] = -100
        return ids, attention_mask, labels

    def on_step_end(self, model, state) -> None:
        self.engine.update_weights(model)  # the next on-policy sample comes from the updated student

    def state_dict(self) -> dict:
        return {"policy_version": self.engine.policy_version}

    def load_state_dict(self, state: dict) -> None:
        self.engine.set_policy_version(int(state.get("policy_version", 0)))


def _vocab_size(model) -> int | None:
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "vocab_size", None)


def _rows_logits(states, rows: torch.Tensor) -> torch.Tensor:
    """Logits ``(n, V)`` of selected rows: ``rows`` are hidden states of chunked ``states`` (projected here) or already logits."""
    if not states.is_chunked:
        return rows
    return F.linear(rows, states.weight, states.bias)


def _entropy(states, rows: torch.Tensor, chunk: int) -> torch.Tensor:
    """Per-row entropy (nats, float32 or float64) of the next-token distribution at ``rows`` (see :func:`_rows_logits`), ``chunk`` rows at a time."""
    out = [rows.new_zeros(0, dtype=torch.float64 if rows.dtype == torch.float64 else torch.float32)]
    for start in range(0, rows.shape[0], chunk):
        z = _rows_logits(states, rows[start : start + chunk])
        logp = F.log_softmax(z if z.dtype == torch.float64 else z.float(), -1)
        out.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out)
