"""Distillation from a served teacher on the posttrain loop (heavy: imports torch).

TRL 1.16's ``trl.experimental.server_distillation.ServerDistillationTrainer`` on the core's online scaffold
(plain public functions of ``posttrain``, a :class:`posttrain.RolloutProducer` the loop consumes). The
teacher never sits in training memory: a teacher server (vLLM's OpenAI-compatible server or
:class:`posttrain.TeacherServer`) returns its top-k log-probs of each completion token. One optimizer
step, in order (``_produce`` on the producer, then ``compute_loss`` per micro-batch)::

    P = per_device_train_batch_size * gradient_accumulation_steps prompts (one completion each)
      -> rollout: the student samples one completion per prompt (RolloutEngine, seeded by the step)
      -> teacher: ONE request for the step's sequences -> top loss_top_k log-probs + the sampled token's, per position
      -> micro-batches of per_device_train_batch_size completions, each with its slice of the teacher's answer
      -> loss: generalized JSD on the served support (loss.py), summed over the support and the completion
         tokens of the micro-batch / completion tokens of the whole step

The student's log-probs of the support tokens come from its hidden states and LM head one chunk of rows at
a time (``loss.support_logprobs``): no ``(B, T, V)`` logits. Departures from TRL: docs/methods/server_distill.md.
"""

from __future__ import annotations

import logging

import torch

from posttrain import (
    CompletionLog, ConfigError, ProduceRequest, RolloutProducer, TrainerSurface, TrainingLoop, as_config,
    attach_rollout_metrics, build_rollout_engine, causal_lm_states, default_output_dir, evaluate_online, expand_prompts,
    generate_rollout, load_online_policy, prepare_prompt_dataset, prompt_token_ids, rollout_micro_batches, sampling_from_config,
)

from posttrain import TeacherServerClient

from posttrain_server_distill.config import ServerDistillationConfig
from posttrain_server_distill.loss import served_support, served_topk_divergence, support_logprobs

__all__ = ["ServerDistillationTrainer", "teacher_micro_batch"]

logger = logging.getLogger(__name__)


def teacher_micro_batch(teacher: dict, rows: slice, width: int) -> dict:
    """Slice the step's teacher answer (``TeacherServerClient.sequence_logprobs``, ``(N, T, .)``) to a micro-batch's rows and completion width.

    Positions past ``T`` (padding of a wider micro-batch) get -inf log-probs and token id 0, as the client pads.

    Returns:
        ``{"logprobs" (b, C, K), "logprob_token_ids" (b, C, K), "actual_logprobs" (b, C)}`` on the CPU.
    """
    out = {}
    for key, fill in (("logprobs", float("-inf")), ("logprob_token_ids", 0), ("actual_logprobs", float("-inf"))):
        value = teacher[key][rows]
        if key == "actual_logprobs":
            value = value[..., 0]
        value = value[:, :width]
        if value.shape[1] < width:
            pad = value.new_full((value.shape[0], width - value.shape[1], *value.shape[2:]), fill)
            value = torch.cat([value, pad], dim=1)
        out[key] = value
    return out


class ServerDistillationTrainer(TrainerSurface):
    """Distil a teacher served over HTTP into a causal LM, on the student's own samples; TRL 1.16's ``ServerDistillationTrainer`` API.

    Args:
        model: The student: a model object or Hub id / local directory (default ``args.model_name_or_path``).
        args: A :class:`ServerDistillationConfig` (``teacher_model_server_url`` required), a
            ``transformers.TrainingArguments`` or a dict of fields.
        train_dataset: Prompt-only rows (``datasets.Dataset`` / ``IterableDataset`` / list of dicts): a
            ``prompt`` column (a string or a message list) or pre-tokenized ``prompt_ids``.
        eval_dataset: Same format, or a dict of them (metrics ``eval_<name>_<metric>``).
        processing_class: The student's tokenizer (default: loaded with the model). The teacher must
            share its vocabulary (the server scores the student's token ids).
        callbacks: ``transformers.TrainerCallback`` objects (or classes).
        optimizers: Only ``(None, None)``: the loop builds the optimizer and schedule from ``args``.
        quantization_config: A ``BitsAndBytesConfig`` for a student given by name.
        peft_config: A ``peft.PeftConfig``.
        allow_experimental: Python opt-in for this experimental method (or ``posttrain.activate``).

    Raises:
        posttrain.ConfigError: no dataset, an ``optimizers`` pair, a dataset without ``prompt``, or a config
            TRL refuses (``loss_top_k`` with ``beta``, ``reverse_kl_top_1_mode='argmax'``, no server URL).
        posttrain.TeacherServerError: the server is unreachable at construction (its ``/v1/models``), or
            fails during training (one line: the URL and what came back).
    """

    _tag_names = ["trl", "server-distillation"]
    _name = "Server Distillation"

    def __init__(self, model=None, args: ServerDistillationConfig | None = None, train_dataset=None, eval_dataset=None, processing_class=None,
                 callbacks=None, optimizers=(None, None), quantization_config=None, peft_config=None, allow_experimental=False):
        self.args = args = as_config(args, ServerDistillationConfig, default_output_dir=default_output_dir(model, "ServerDistillation"))
        # the maturity gate runs first: TrainingLoop checks the opt-in
        self.loop = TrainingLoop(args, method="server_distill", allow_experimental=allow_experimental, callbacks=callbacks)
        if train_dataset is None:
            raise ConfigError("`train_dataset` is required: pass train_dataset=... (prompt-only rows with a 'prompt' column).")
        if tuple(optimizers or (None, None)) != (None, None):
            raise ConfigError("optimizers=(optimizer, scheduler) is not supported: posttrain's loop builds them from the config; set optim, "
                              "optim_args, learning_rate, lr_scheduler_type and lr_scheduler_kwargs instead.")
        self.model, self.processing_class = load_online_policy(model, args, loop=self.loop, processing_class=processing_class, peft_config=peft_config,
                                                               quantization_config=quantization_config, tags=self._tag_names)
        tok = self.processing_class
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.beta, self.temperature = args.beta, args.temperature
        self.loss_top_k, self.loss_add_tail, self.reverse_kl_top_1_mode = args.loss_top_k, args.loss_add_tail, args.reverse_kl_top_1_mode
        self.teacher_client = TeacherServerClient(args.teacher_model_server_url, timeout=args.teacher_server_timeout,
                                                  max_retries=args.teacher_server_max_retries)
        self.teacher_client.model  # noqa: B018 - fail now, with the URL, when no server answers
        self.train_dataset = self.process_dataset(train_dataset, "train_dataset")
        if isinstance(eval_dataset, dict):
            self.eval_dataset = {key: self.process_dataset(part, f"eval_dataset[{key!r}]") for key, part in eval_dataset.items()}
        else:
            self.eval_dataset = self.process_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        self.loop.setup(self.model, method=self)
        self.engine = build_rollout_engine(args, model=self.model, tokenizer=tok, accelerator=self.loop.accelerator)
        self.producer = RolloutProducer(self.loop.prompt_source(len(self.train_dataset), self._prompts_per_step()), self.train_dataset, self._produce)
        self._sampling = sampling_from_config(args)
        self._completion_log = CompletionLog(args.per_device_train_batch_size * args.gradient_accumulation_steps)
        self._logs = self._completion_log.logs
        self.add_callback(self._completion_log.callback(args, self.loop))

    # -------------------------------------------------------------------------- data
    def process_dataset(self, dataset, name: str):
        """Return ``dataset`` as prompt rows (``posttrain.prepare_prompt_dataset``); a streamed ``train_dataset`` keeps the rows ``max_steps`` draw."""
        limit = None
        if name == "train_dataset" and self.args.max_steps > 0:
            limit = self.args.max_steps * self._prompts_per_step() * self.loop.accelerator.num_processes
        return prepare_prompt_dataset(dataset, name, method="server_distill", prompt_ids=self._prompt_ids, limit=limit)

    def _prompt_ids(self, row: dict) -> list[int]:
        return prompt_token_ids(row, self.processing_class, chat_template_kwargs=self.args.chat_template_kwargs)

    def _prompts_per_step(self) -> int:
        return self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps

    @property
    def data_collator(self):
        """The collator of raw prompt rows (TRL's is the identity): :meth:`collate`."""
        return self.collate

    def collate(self, rows: list[dict]) -> dict:
        return {"rows": [dict(row) for row in rows]}  # prompts stay raw (the producer reads the dataset's rows itself)

    def count_items(self, batch: dict) -> int:
        return int(batch["completion_mask"].sum())  # the loss is a mean over the step's completion tokens

    # -------------------------------------------------------------------------- one step: rollout -> teacher -> micro-batches
    def _produce(self, request: ProduceRequest) -> list[dict]:
        """The producer's callback: one step's micro-batches, sampled with a seed of the step (a resumed run draws the same)."""
        seed = self.args.seed + request.step + 1_000_003 * request.rank
        return self._rollout_batches(request.rows, seed, self.args.per_device_train_batch_size, mode="train")

    def _rollout_batches(self, rows: list[dict], seed: int, size: int, mode: str) -> list[dict]:
        args, tok = self.args, self.processing_class
        prompts, prompt_ids = expand_prompts(rows, 1, self._prompt_ids, tok)  # (N,) one completion per prompt
        rollout = generate_rollout(prompts, prompt_ids, engine=self.engine, sampling=self._sampling, num_generations=1, seed=seed,
                                   max_completion_length=args.max_completion_length, stop_token_ids=(tok.eos_token_id, self.pad_token_id))
        teacher = self._teacher_logprobs(rollout.prompt_ids, rollout.completion_ids)  # (N, T, .)
        batches = rollout_micro_batches(rollout, size, self.pad_token_id, pad_to_multiple_of=args.pad_to_multiple_of)
        for start, batch in zip(range(0, len(rollout), size), batches):
            batch.pop("sampling_logprobs")
            batch["teacher"] = teacher_micro_batch(teacher, slice(start, start + size), batch["completion_ids"].shape[1])
        lengths = torch.tensor([len(c) for c in rollout.completion_ids], dtype=torch.float32)
        truncated = torch.tensor(rollout.truncated, dtype=torch.bool)
        metrics = {"completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
                   "completions/max_length": float(lengths.max()), "completions/clipped_ratio": float(truncated.float().mean())}
        attach_rollout_metrics(batches, metrics)
        if mode == "train":
            completions = tok.batch_decode(rollout.completion_ids, skip_special_tokens=True)
            actual = teacher["actual_logprobs"][..., 0]  # (N, T): the teacher's log-prob of each sampled token
            counts = torch.tensor([max(len(c), 1) for c in rollout.completion_ids], dtype=actual.dtype)
            self._completion_log.log_extra("teacher_logprob", (torch.where(torch.isfinite(actual), actual, 0.0).sum(1) / counts).tolist())
            empty = torch.zeros(len(prompts), 0)  # no reward functions; the advantage column stays 0
            self._completion_log.record(prompts, completions, empty, [], torch.zeros(len(prompts)))
        return batches

    def _teacher_logprobs(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> dict:
        """The teacher server's top-k and sampled-token log-probs of every completion position (``(N, T, K)`` / ``(N, T, 1)``)."""
        sequences = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
        return self.teacher_client.sequence_logprobs(sequences, [len(p) for p in prompt_ids], top_logprobs=self.loss_top_k, temperature=self.temperature)

    # -------------------------------------------------------------------------- the loss
    def compute_loss(self, model, batch: dict, num_items_in_batch):
        """Return the micro-batch's share of the step loss (its divergence sum / the step's completion tokens) and its metrics."""
        mask = batch["completion_mask"]  # (B, C)
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], mask], dim=1)
        width = batch["completion_ids"].shape[1]
        _, states = causal_lm_states(model, chunk_size=self.args.logprob_chunk_size, input_ids=input_ids, attention_mask=attention_mask,
                                     logits_to_keep=width + 1)
        states = states[:, :-1]  # position t predicts completion token t: (B, C, .)
        support_ids, support_mask, teacher_lp = served_support(batch["teacher"], batch["completion_ids"], mask, beta=self.beta, loss_top_k=self.loss_top_k)
        student_lp, entropy = support_logprobs(states, support_ids, temperature=self.temperature, return_entropy=True)
        per_token = served_topk_divergence(student_lp, teacher_lp.to(student_lp.dtype), support_mask, beta=self.beta, add_tail=self.loss_add_tail)
        valid = mask.bool()
        per_token = torch.where(valid, per_token, torch.zeros_like(per_token))
        denominator = torch.as_tensor(num_items_in_batch, dtype=per_token.dtype, device=per_token.device).clamp(min=1.0)
        loss = per_token.sum() / denominator
        tokens = valid.sum().clamp(min=1)
        metrics = {
            "divergence": (per_token.detach().sum() / tokens).float(),  # mean per-token divergence of this micro-batch
            "entropy": (torch.where(valid, entropy, torch.zeros_like(entropy)).sum() / tokens).float(),
        }
        if "rollout_metric_values" in batch:
            metrics.update(zip(batch["rollout_metric_names"], batch["rollout_metric_values"]))
        return loss, metrics

    def on_step_end(self, model, state) -> None:
        self.engine.update_weights(model)  # the next rollout samples from the updated student

    def evaluate_batches(self, model, batches) -> dict[str, float]:
        """The eval loss (the divergence to the served teacher) of one completion per eval prompt (seeded by ``seed``)."""
        return evaluate_online(model, batches, produce=lambda rows, seed: self._rollout_batches(rows, seed, size=len(rows), mode="eval"),
                               compute_loss=self.compute_loss, count_items=self.count_items, loop=self.loop, seed=self.args.seed)

    def state_dict(self) -> dict:
        return {"policy_version": self.engine.policy_version}

    def load_state_dict(self, state: dict) -> None:
        self.engine.set_policy_version(int(state.get("policy_version", 0)))

