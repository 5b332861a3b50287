"""GOLD on the posttrain loop (heavy: imports torch): on-policy logit distillation, across tokenizers with ULD.

TRL 1.16's ``trl.experimental.gold.GOLDTrainer`` on the core's online scaffold. One optimizer step, in order (the
producer's ``_produce``, then ``compute_loss`` per micro-batch)::

    generation_batch_size rows, each repeated num_generations times        N = per_device_train_batch_size * GA
      -> GA micro-batches; each is on-policy with probability lmbda (a RNG seeded by the step)
           on-policy:  the student samples a completion of each prompt (the rollout engine, seeded by the step)
           off-policy: the dataset's completion (prompt/completion or the last assistant turn of messages)
      -> student sequence  [prompt | completion]  and, with use_uld_loss, the teacher's own tokenization of the same
         prompt and completion text (+ the teacher's EOS) with the byte span of every completion token
      -> loss per micro-batch:
           same tokenizer: generalized JSD(beta) of student and teacher at temperature `temperature` on every
                           completion token (chunked from hidden states), sum / the step's completion tokens
           use_uld_loss:   uld_crossentropy_weight * CE + uld_distillation_weight * mean over sequences of the ULD loss
                           (posttrain_gold.uld), as a share of the step's sequences

Departures from TRL: docs/methods/gold.md.
"""

from __future__ import annotations

import copy
import json
import random
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from posttrain import (
    ConfigError, DataError, ProduceRequest, RolloutProducer, TrainerSurface, TrainingLoop, as_config, attach_rollout_metrics,
    build_rollout_engine, causal_lm_states, chunked_distillation_divergence, default_output_dir, evaluate_online, generate_rollout,
    load_online_policy, load_pretrained, sampling_from_config,
)

from posttrain_gold.config import GOLDConfig
from posttrain_gold.uld import VocabularyMap, completion_byte_offsets, generalized_jsd, is_byte_level, uld_sequence_loss

__all__ = ["GOLDTrainer"]


def _common_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return a[:n]


def _pad(rows: list[list], value, width: int | None = None) -> torch.Tensor:
    """Right-pad lists of ints (or of ``(start, end)`` pairs) into a tensor."""
    width = max([len(r) for r in rows] + [width or 0, 1])
    out = []
    for r in rows:
        out.append(list(r) + [value] * (width - len(r)))
    return torch.tensor(out, dtype=torch.long)


def _row_logits(states, row: int, start: int, stop: int) -> torch.Tensor:
    """``(stop - start, V)`` logits of one sequence's positions ``start:stop`` from :class:`posttrain.TokenStates` (one chunk)."""
    x = states.tensor[row, start:stop]
    if states.weight is None:
        return x
    return F.linear(x.to(states.weight.dtype), states.weight, states.bias)


class GOLDTrainer(TrainerSurface):
    """Distill a teacher into a causal LM with GOLD, the tokenizers the same or not; TRL 1.16's ``GOLDTrainer`` API.

    Args:
        model: The student: a model object or Hub id / local directory (default ``args.model_name_or_path``).
        teacher_model: The teacher: a model object or Hub id / directory (default ``args.teacher_model_name_or_path``),
            loaded with ``posttrain.load_pretrained(role="teacher")`` and frozen.
        args: A :class:`GOLDConfig` (or a dict / TrainingArguments).
        data_collator: Only None (GOLD builds its micro-batches itself).
        train_dataset: Rows with a ``prompt`` (string or messages) and a ``completion`` (string or messages), or a
            ``messages`` list whose last assistant turn is the completion; prompt-only rows when ``lmbda == 1``.
        eval_dataset: Same formats (eval: the loss on the dataset's completions, or on samples for prompt-only rows).
        processing_class: The student's tokenizer (default: loaded with the model).
        compute_metrics: Only None.
        callbacks: ``transformers.TrainerCallback`` objects.
        optimizers: Only ``(None, None)``: the loop builds the optimizer and schedule from ``args``.
        preprocess_logits_for_metrics: Only None.
        peft_config: A ``peft.PeftConfig`` for the student.
        allow_experimental: The Python opt-in of this experimental method.

    Raises:
        posttrain.ConfigError: no teacher or dataset, an argument posttrain cannot honour, a vocabulary mismatch
            without ``use_uld_loss``, a non-byte-level tokenizer with ``use_extended_uld``.
        posttrain.DataError: a row without a prompt, without a completion where one is needed, or with an empty prompt.
    """

    _tag_names = ["trl", "gold"]

    def __init__(self, model=None, teacher_model=None, args: GOLDConfig | None = None, data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, compute_metrics=None, callbacks=None, optimizers=(None, None), preprocess_logits_for_metrics=None,
                 peft_config=None, allow_experimental=False):
        self.args = args = as_config(args, GOLDConfig, default_output_dir=default_output_dir(model, "GOLD"))
        self.loop = TrainingLoop(args, method="gold", allow_experimental=allow_experimental, callbacks=callbacks)  # the maturity gate first
        for name, value in (("data_collator", data_collator), ("compute_metrics", compute_metrics), ("preprocess_logits_for_metrics", preprocess_logits_for_metrics)):
            if value is not None:
                raise ConfigError(f"GOLDTrainer: {name} is not offered by posttrain's GOLD (it builds and scores its micro-batches itself); pass None.")
        if optimizers not in ((None, None), None, [None, None]):
            raise ConfigError("GOLDTrainer: optimizers must be (None, None): set optim, learning_rate and lr_scheduler_type in the config.")
        if train_dataset is None:
            raise ConfigError("GOLDTrainer needs a train_dataset: rows with 'prompt' and 'completion', or 'messages' (prompt-only rows when lmbda=1).")
        teacher_model = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
        self.model, self.processing_class = load_online_policy(model, args, loop=self.loop, processing_class=processing_class, peft_config=peft_config,
                                                               tags=self._tag_names)
        tok = self.processing_class
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if teacher_model is None:  # TRL's documented default: the teacher is the model being trained (a frozen copy of its initial weights)
            teacher_model = copy.deepcopy(self.model)
        self._setup_teacher(teacher_model)
        self.train_dataset = self._prepare_dataset(train_dataset, "train_dataset", need_completion=args.lmbda < 1.0)
        if isinstance(eval_dataset, dict):
            self.eval_dataset = {k: self._prepare_dataset(v, f"eval_dataset[{k!r}]", need_completion=False) for k, v in eval_dataset.items()}
        else:
            self.eval_dataset = self._prepare_dataset(eval_dataset, "eval_dataset", need_completion=False) if eval_dataset is not None else None
        self.loop.setup(self.model, method=self)
        sampling_args = SimpleNamespace(max_completion_length=args.max_completion_length, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                        min_p=None, repetition_penalty=1.0, generation_kwargs=None, rollout_backend="transformers",
                                        generation_batch_size=None, seed=args.seed, trust_remote_code=args.trust_remote_code)
        self._sampling = sampling_from_config(sampling_args)
        self.engine = build_rollout_engine(sampling_args, model=self.model, tokenizer=tok, accelerator=self.loop.accelerator)
        self.producer = RolloutProducer(self.loop.prompt_source(len(self.train_dataset), args.generation_batch_size), self.train_dataset, self._produce)

    # -------------------------------------------------------------------------- setup
    def _setup_teacher(self, teacher) -> None:
        args = self.args
        init_kwargs = args.teacher_model_init_kwargs
        if isinstance(init_kwargs, str):
            init_kwargs = json.loads(init_kwargs)
        if init_kwargs and not isinstance(teacher, str):
            raise ConfigError("teacher_model_init_kwargs is set but the teacher is already a model object: drop teacher_model_init_kwargs, or pass the teacher by name.")
        init_kwargs = dict(init_kwargs or {})
        if args.teacher_model_revision is not None:
            init_kwargs.setdefault("revision", args.teacher_model_revision)
        teacher_tokenizer = None
        if args.use_uld_loss:
            source = args.teacher_tokenizer_name_or_path or (teacher if isinstance(teacher, str) else getattr(teacher.config, "_name_or_path", None))
            if not source:
                raise ConfigError("use_uld_loss needs the teacher's tokenizer: set teacher_tokenizer_name_or_path (the teacher model object has no path).")
            teacher_tokenizer = self._load_tokenizer(source, init_kwargs if source == teacher else {})
        model, _ = load_pretrained(teacher, role="teacher", model_init_kwargs=init_kwargs, trust_remote_code=args.trust_remote_code, load_tokenizer=False)
        self.teacher_tokenizer = teacher_tokenizer
        student_vocab = self.model.get_output_embeddings().weight.shape[0]
        teacher_vocab = model.get_output_embeddings().weight.shape[0]
        if not args.use_uld_loss and teacher_vocab != student_vocab:
            raise ConfigError(f"the teacher's vocabulary ({teacher_vocab} tokens) differs from the student's ({student_vocab}): GOLD's JSD needs one "
                              "vocabulary; set use_uld_loss=True (with teacher_tokenizer_name_or_path) to distill across tokenizers.")
        if args.use_uld_loss and args.use_extended_uld:
            for who, tk in (("student", self.processing_class), ("teacher", teacher_tokenizer)):
                if not is_byte_level(tk):
                    raise ConfigError(f"use_extended_uld=True aligns tokens by byte spans and needs byte-level BPE tokenizers; the {who}'s is not: set use_extended_uld=False.")
        self.vocabulary = VocabularyMap(self.processing_class, teacher_tokenizer) if args.use_uld_loss and args.uld_use_hybrid_loss else None
        self.teacher_model = self.loop.prepare_frozen(model)

    def _load_tokenizer(self, source: str, init_kwargs: dict):
        from transformers import AutoTokenizer

        kwargs = {k: init_kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in init_kwargs}
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=self.args.trust_remote_code, **kwargs)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"teacher tokenizer {source!r} does not load ({str(exc).splitlines()[0]}): set teacher_tokenizer_name_or_path to a tokenizer directory or Hub id.") from None
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def _prepare_dataset(self, dataset, name: str, *, need_completion: bool):
        from datasets import Dataset, IterableDataset

        if isinstance(dataset, IterableDataset):
            dataset = Dataset.from_list(list(dataset))
        elif not isinstance(dataset, Dataset):
            dataset = Dataset.from_list([dict(r) for r in dataset])
        if len(dataset) == 0:
            raise DataError(f"{name} is empty: give it rows with 'prompt' and 'completion' (or 'messages').")
        columns = set(dataset.column_names)
        if "prompt" not in columns and "messages" not in columns:
            raise DataError(f"{name} row 0 has neither 'prompt' nor 'messages' (columns: {sorted(columns)}): GOLD needs prompts, with 'completion' "
                            "(or 'messages' ending with an assistant turn) for off-policy micro-batches.")
        if need_completion and "completion" not in columns and "messages" not in columns:
            raise DataError(f"{name} has prompts only (columns: {sorted(columns)}) but lmbda={self.args.lmbda} < 1 trains some micro-batches on the "
                            "dataset's completions: add a 'completion' column, or set lmbda=1.0 (every micro-batch on-policy).")
        self._texts(dataset[0], 0, name)  # a row the chat template cannot render fails here, not mid-run
        return dataset

    # -------------------------------------------------------------------------- data
    def _texts(self, row: dict, index: int, name: str = "train_dataset") -> tuple[str, str | None, bool]:
        """``(prompt text, completion text or None, append EOS)`` of a row, rendered as TRL's GOLD renders it."""
        tok, kwargs = self.processing_class, dict(row.get("chat_template_kwargs") or {})
        prompt, completion = row.get("prompt"), row.get("completion")
        if prompt is None and row.get("messages") is not None:
            messages = list(row["messages"])
            last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
            if last is None or last == 0:
                raise DataError(f"{name} row {index}: 'messages' needs an assistant turn after at least one other turn (the prompt); fix the row.")
            prompt, completion = messages[:last], messages[last:last + 1]
        if prompt is None:
            raise DataError(f"{name} row {index} has no 'prompt' (or 'messages'); fix the row.")
        if isinstance(prompt, str):
            if completion is not None and not isinstance(completion, str):
                raise DataError(f"{name} row {index}: a string prompt needs a string completion (got {type(completion).__name__}); fix the row.")
            return prompt, completion, completion is not None
        prompt_text = tok.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False, **kwargs)
        if completion is None:
            return prompt_text, None, False
        if isinstance(completion, str):
            raise DataError(f"{name} row {index}: a conversational prompt needs a conversational completion (a list of messages); fix the row.")
        full = tok.apply_chat_template(list(prompt) + list(completion), tokenize=False, **kwargs)
        prefix = _common_prefix(prompt_text, full)
        return prefix, full[len(prefix):], False

    def _encode(self, text: str) -> list[int]:
        return self.processing_class(text, add_special_tokens=False)["input_ids"]

    def _sequence(self, row: dict, index: int, completion_ids: list[int] | None = None) -> dict:
        """One sequence of a micro-batch: the student's prompt/completion ids and spans, the texts the teacher re-tokenizes."""
        args, tok = self.args, self.processing_class
        prompt_text, completion_text, append_eos = self._texts(row, index)
        prompt_ids = self._encode(prompt_text)
        if not prompt_ids:
            raise DataError(f"train_dataset row {index} has an empty prompt; GOLD generates from and aligns on the prompt: fix the row.")
        if completion_ids is None:  # off-policy: the dataset's completion
            completion_ids = self._encode(completion_text)
            text_tokens = len(completion_ids)
            if append_eos and (not completion_ids or completion_ids[-1] != tok.eos_token_id):
                completion_ids = completion_ids + [tok.eos_token_id]
            else:
                text_tokens = None
            if args.max_length is not None and len(completion_ids) >= args.max_length:
                raise DataError(f"train_dataset row {index}: its completion has {len(completion_ids)} tokens, max_length={args.max_length} leaves no room for "
                                "the prompt: raise max_length or shorten the row.")
        else:  # on-policy: the student's sample, decoded as generated, after the prompt it was sampled from
            text_tokens = None
            completion_text = tok.decode(completion_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            sampled_from = self._budgeted_prompt(prompt_ids)
            if len(sampled_from) < len(prompt_ids):
                prompt_ids = sampled_from
                prompt_text = tok.decode(prompt_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if args.max_length is not None and len(prompt_ids) + len(completion_ids) > args.max_length:
            prompt_ids = prompt_ids[len(prompt_ids) + len(completion_ids) - args.max_length:]  # keep the prompt's end
            prompt_text = tok.decode(prompt_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return {"prompt_ids": prompt_ids, "completion_ids": list(completion_ids), "prompt_text": prompt_text, "completion_text": completion_text,
                "spans": completion_byte_offsets(tok, completion_ids, text_tokens=text_tokens) if self._extended else None}

    @property
    def _extended(self) -> bool:
        return self.args.use_uld_loss and self.args.use_extended_uld

    def _teacher_sequence(self, prompt_text: str, completion_text: str) -> dict:
        """The teacher's tokenization of a prompt and completion text, with its EOS appended (TRL's ``build_teacher_inputs_from_texts``)."""
        t = self.teacher_tokenizer
        prompt_ids = t(prompt_text, add_special_tokens=True)["input_ids"]
        if t.eos_token_id is not None and prompt_ids and prompt_ids[-1] == t.eos_token_id:
            prompt_ids = prompt_ids[:-1]
        completion_ids = t(completion_text, add_special_tokens=False)["input_ids"]
        text_tokens = len(completion_ids)
        if t.eos_token_id is not None:
            completion_ids = completion_ids + [t.eos_token_id]
        spans = completion_byte_offsets(t, completion_ids, text_tokens=text_tokens) if self._extended else None
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "spans": spans}

    def build_micro_batch(self, sequences: list[dict], on_policy: bool) -> dict:
        """Tensorize sequences (right-padded ``[prompt | completion]`` rows) and, with ULD, the teacher's."""
        batch = self._tensors(sequences, self.pad_token_id)
        if self.args.use_uld_loss:
            teacher = [self._teacher_sequence(s["prompt_text"], s["completion_text"]) for s in sequences]
            t_pad = self.teacher_tokenizer.pad_token_id if self.teacher_tokenizer.pad_token_id is not None else 0
            batch.update({f"teacher_{k}": v for k, v in self._tensors(teacher, t_pad).items() if k != "completion_ids"})
        batch["on_policy"] = torch.tensor(float(on_policy))
        batch["num_completion_tokens"] = int(batch["completion_lengths"].sum())
        return batch

    def _tensors(self, sequences: list[dict], pad_id: int) -> dict:
        full = [s["prompt_ids"] + s["completion_ids"] for s in sequences]
        out = {
            "input_ids": _pad(full, pad_id),
            "attention_mask": _pad([[1] * len(f) for f in full], 0),
            "prompt_lengths": torch.tensor([len(s["prompt_ids"]) for s in sequences]),
            "completion_lengths": torch.tensor([len(s["completion_ids"]) for s in sequences]),
            "completion_ids": _pad([s["completion_ids"] for s in sequences], pad_id),
        }
        if self._extended:
            out["spans"] = _pad([s["spans"] for s in sequences], (0, 0))  # (b, C, 2) completion-token byte spans
        return out

    # -------------------------------------------------------------------------- one step
    def collate(self, rows: list[dict]) -> dict:
        return {"rows": [dict(row) for row in rows]}  # eval batches stay raw (evaluate_batches builds them)

    def count_items(self, batch: dict) -> int:
        if self.args.use_uld_loss:
            return int(batch["completion_lengths"].shape[0])  # ULD: a mean over sequences
        return int(batch["num_completion_tokens"])  # JSD: a mean over completion tokens

    def _produce(self, request: ProduceRequest) -> list[dict]:
        """The producer's callback: one step's micro-batches; the on/off-policy draws and the samples are seeded by the step."""
        args = self.args
        seed = args.seed + request.step + 1_000_003 * request.rank
        draws = random.Random(seed)
        flags = [draws.random() < args.lmbda for _ in range(args.gradient_accumulation_steps)]
        return self._micro_batches(request.rows, request.indices, flags, seed, args.per_device_train_batch_size, args.num_generations)

    def _micro_batches(self, rows: list[dict], indices: list[int], flags: list[bool], seed: int, size: int, repeats: int) -> list[dict]:
        expanded = [(row, index) for row, index in zip(rows, indices) for _ in range(repeats)]
        slices = [expanded[k * size:(k + 1) * size] for k in range(len(flags))]
        sampled: dict[int, list[list[int]]] = {}
        on_policy = [k for k, flag in enumerate(flags) if flag]
        if on_policy:
            prompts = [self._sequence_prompt(row, index) for k in on_policy for row, index in slices[k]]
            rollout = generate_rollout(prompts, prompts, engine=self.engine, sampling=self._sampling, num_generations=1, seed=seed)
            completions = iter(rollout.completion_ids)
            for k in on_policy:
                sampled[k] = [list(next(completions)) for _ in slices[k]]
        batches = []
        for k, part in enumerate(slices):
            sequences = [self._sequence(row, index, sampled[k][j] if k in sampled else None) for j, (row, index) in enumerate(part)]
            batch = self.build_micro_batch(sequences, k in sampled)
            batches.append(batch)
        lengths = torch.cat([b["completion_lengths"] for b in batches]).float()
        attach_rollout_metrics(batches, {"on_policy_fraction": sum(flags) / len(flags), "completions/mean_length": float(lengths.mean())})
        return batches

    def _sequence_prompt(self, row: dict, index: int) -> list[int]:
        """The prompt ids the student samples from (its end kept within max_length - max_completion_length)."""
        prompt_text, _, _ = self._texts(row, index)
        ids = self._encode(prompt_text)
        if not ids:
            raise DataError(f"train_dataset row {index} has an empty prompt; GOLD generates from the prompt: fix the row.")
        return self._budgeted_prompt(ids)

    def _budgeted_prompt(self, ids: list[int]) -> list[int]:
        """The end of a prompt that leaves max_completion_length tokens within max_length (TRL's budget before generation)."""
        if self.args.max_length is not None:
            ids = ids[-(self.args.max_length - self.args.max_completion_length):]
        return ids

    # -------------------------------------------------------------------------- the loss
    def compute_loss(self, model, batch: dict, num_items_in_batch):
        """Return the micro-batch's share of the step loss and its metrics."""
        if self.args.use_uld_loss:
            loss, metrics = self._uld_loss(model, batch, num_items_in_batch)
        else:
            loss, metrics = self._jsd_loss(model, batch, num_items_in_batch)
        metrics["on_policy"] = batch["on_policy"]
        if "rollout_metric_values" in batch:
            metrics.update(zip(batch["rollout_metric_names"], batch["rollout_metric_values"]))
        return loss, metrics

    def _completion_targets(self, batch: dict, prefix: str = "") -> torch.Tensor:
        """``(b, T)`` bool: the positions whose next token is a completion token."""
        ids = batch[f"{prefix}input_ids"]
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        start = batch[f"{prefix}prompt_lengths"].unsqueeze(1) - 1
        return (pos >= start) & (pos < start + batch[f"{prefix}completion_lengths"].unsqueeze(1))

    def _jsd_loss(self, model, batch: dict, num_items):
        args = self.args
        targets = self._completion_targets(batch)
        _, student = causal_lm_states(model, chunk_size=args.logprob_chunk_size, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        with torch.no_grad():
            _, teacher = causal_lm_states(self.teacher_model, chunk_size=args.logprob_chunk_size, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        s_rows, t_rows = student.tensor[targets], teacher.tensor[targets]  # (n, H) hidden states, or (n, V) logits
        if student.weight is not None and teacher.weight is not None:
            # teacher logits in the teacher's dtype, one chunk of rows at a time (no (n, V) logits kept)
            per_token = chunked_distillation_divergence(s_rows, student.weight, t_rows, teacher.weight, student_bias=student.bias, teacher_bias=teacher.bias,
                                                        beta=args.beta, temperature=args.temperature, chunk_size=args.logprob_chunk_size)
        else:  # a head the chunked path cannot reproduce: the model's own logits
            s_logits = s_rows if student.weight is None else F.linear(s_rows, student.weight, student.bias)
            t_logits = t_rows if teacher.weight is None else F.linear(t_rows, teacher.weight, teacher.bias)
            per_token = generalized_jsd(F.log_softmax(s_logits / args.temperature, -1), F.log_softmax(t_logits.to(s_logits.dtype) / args.temperature, -1), args.beta)
        loss = per_token.sum() / num_items
        metrics = {"divergence": per_token.detach().sum() / max(1, per_token.numel())}
        with torch.no_grad():  # entropies at temperature 1 (the teacher_mode_collapse diagnostic), chunked, no gradient
            labels = batch["input_ids"][:, 1:][targets[:, :-1]]  # (n,) the completion tokens
            metrics["entropy"] = student[:, :-1][targets[:, :-1]].score(labels, return_entropy=True, entropy_grad=False).entropy.mean()
            metrics["teacher_entropy"] = teacher[:, :-1][targets[:, :-1]].score(labels, return_entropy=True, entropy_grad=False).entropy.mean()
        return loss, metrics

    def _uld_loss(self, model, batch: dict, num_items):
        args = self.args
        _, student = causal_lm_states(model, chunk_size=args.logprob_chunk_size, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        with torch.no_grad():
            _, teacher = causal_lm_states(self.teacher_model, chunk_size=args.logprob_chunk_size, input_ids=batch["teacher_input_ids"],
                                          attention_mask=batch["teacher_attention_mask"])
        b = batch["input_ids"].shape[0]
        shift = 1 if args.uld_token_merge_strategy == "bayesian" else 0
        rows, matched, unmatched, entropies = [], [], [], ([], [])
        s_p, s_c = batch["prompt_lengths"].tolist(), batch["completion_lengths"].tolist()
        t_p, t_c = batch["teacher_prompt_lengths"].tolist(), batch["teacher_completion_lengths"].tolist()
        s_sizes = [c - 1 if args.uld_skip_student_eos else c for c in s_c]
        t_sizes = [c - 1 if args.uld_skip_teacher_eos else c for c in t_c]
        for i in range(b):
            if s_sizes[i] <= 0 or t_sizes[i] <= 0:
                rows.append(student.tensor[i].sum() * 0.0)
                continue
            s_logits = _row_logits(student, i, s_p[i] - shift, s_p[i] - shift + s_sizes[i])
            with torch.no_grad():
                t_logits = _row_logits(teacher, i, t_p[i] - shift, t_p[i] - shift + t_sizes[i])
            s_ids = batch["completion_ids"][i, : s_sizes[i]].tolist()
            t_ids = batch["teacher_input_ids"][i, t_p[i]: t_p[i] + t_sizes[i]].tolist()
            s_spans = batch["spans"][i, : s_sizes[i]].tolist() if self._extended else None
            t_spans = batch["teacher_spans"][i, : t_sizes[i]].tolist() if self._extended else None
            loss_i, parts = uld_sequence_loss(s_logits, t_logits.to(s_logits.dtype), s_ids, t_ids, s_spans, t_spans, extended=self._extended,
                                              strategy=args.uld_token_merge_strategy, student_temperature=args.uld_student_temperature,
                                              teacher_temperature=args.uld_teacher_temperature, vocabulary=self.vocabulary, beta=args.beta,
                                              matched_weight=args.uld_hybrid_matched_weight, unmatched_weight=args.uld_hybrid_unmatched_weight)
            rows.append(loss_i)
            with torch.no_grad():  # entropies at temperature 1 over the scored positions (the teacher_mode_collapse diagnostic)
                entropies[0].append(-(F.log_softmax(s_logits.detach(), -1).exp() * F.log_softmax(s_logits.detach(), -1)).sum(-1).mean())
                entropies[1].append(-(F.log_softmax(t_logits, -1).exp() * F.log_softmax(t_logits, -1)).sum(-1).mean())
            if parts is not None:
                matched.append(parts[0].detach())
                unmatched.append(parts[1].detach())
        distill = torch.stack(rows).sum()  # sum over the micro-batch's sequences
        loss = args.uld_distillation_weight * distill / num_items
        metrics = {"divergence": distill.detach() / b}
        if args.uld_crossentropy_weight > 0:
            logits = torch.cat([_row_logits(student, i, s_p[i] - 1, s_p[i] - 1 + s_c[i]) for i in range(b)])  # (n, V)
            labels = torch.cat([batch["completion_ids"][i, : s_c[i]] for i in range(b)])
            ce = F.cross_entropy(logits, labels)  # a mean over the micro-batch's completion tokens (TRL's)
            loss = loss + args.uld_crossentropy_weight * ce * b / num_items
            metrics["crossentropy"] = ce.detach()
        if entropies[0]:
            metrics["entropy"] = torch.stack(entropies[0]).mean()
            metrics["teacher_entropy"] = torch.stack(entropies[1]).mean()
        if matched:
            metrics["matched_loss"] = torch.stack(matched).mean()
            metrics["unmatched_loss"] = torch.stack(unmatched).mean()
        return loss, metrics

    # -------------------------------------------------------------------------- loop protocol
    def on_step_end(self, model, state) -> None:
        self.engine.update_weights(model)  # the next on-policy micro-batch samples from the updated student

    def evaluate_batches(self, model, batches) -> dict[str, float]:
        """Eval loss: off-policy on the dataset's completions (TRL's), on-policy samples for prompt-only rows (seeded by ``seed``)."""
        def produce(rows, seed):
            flag = not all(("completion" in r and r["completion"] is not None) or r.get("messages") for r in rows)
            return self._micro_batches(rows, list(range(len(rows))), [flag], seed, len(rows), 1)

        return evaluate_online(model, batches, produce=produce, compute_loss=self.compute_loss, count_items=self.count_items, loop=self.loop, seed=self.args.seed)

    def state_dict(self) -> dict:
        return {"policy_version": self.engine.policy_version}

    def load_state_dict(self, state: dict) -> None:
        self.engine.set_policy_version(int(state.get("policy_version", 0)))
