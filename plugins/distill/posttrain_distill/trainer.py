"""On-policy distillation on the posttrain loop (heavy: imports torch); TRL 1.16's ``DistillationTrainer``.

Built on the core's online steps (plain public functions of ``posttrain``: policy loading, rollouts,
micro-batches, the completions log, online evaluation) and its chunked numerics; what remains is the
method. One optimizer step, in order (the producer's ``_produce`` then ``compute_loss`` per micro-batch)::

    prompts (per_device_train_batch_size * gradient_accumulation_steps per process, one completion each)
      -> rollout: the student samples a completion per prompt (RolloutEngine, seeded by the step)
      -> gradient_accumulation_steps micro-batches of per_device_train_batch_size completions
      -> per micro-batch: the student's and the teacher's hidden states on prompt + completion
         (the teacher under no_grad, in its own dtype; each row's teacher when there are several)
      -> per completion token: generalized JSD of the two next-token distributions at `temperature`,
         projected through each LM head a chunk of rows at a time (posttrain.chunked_distillation_divergence)
      -> loss = sum over the step's valid completion tokens / their number (over the whole step and
         every process: TRL's num_items_in_batch)

Features and their flags (TRL 1.16's ``DistillationConfig`` names): ``beta`` (0 forward KL, 0.5 JSD,
1 reverse KL, the default), ``temperature`` (sampling and loss), ``teacher_model`` /
``teacher_model_name_or_path`` / ``teacher_model_init_kwargs`` / ``teacher_model_revision``; beyond TRL,
several teachers (``teacher_model={name: model}`` or ``teacher_models``, a ``teacher`` column per row), and a
served teacher (``teacher_model_server_url``: no local teacher; per step ONE request to the server for the
top ``loss_top_k`` and sampled-token log-probs of every completion position, and the loss on that support,
``loss_add_tail``: posttrain_distill/served.py). Tool calling (TRL's ``tools=``, ``max_tool_calling_iterations``;
``tool_call_timeout``): each completion is a multi-turn episode from the core's ``ToolCallingRollout``; student and
teacher (local or served) read the whole sequence, inserted tool tokens included, and the divergence and every
per-token metric cover the model-written tokens only (``completion_mask * tool_mask``).
Departures from TRL: docs/methods/distill.md.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from posttrain import (  # the loop, the core's online steps and chunked numerics (plugin API 1.5), tool-calling rollouts (1.8)
    CompletionLog, ConfigError, DataError, ProduceRequest, RolloutProducer, SamplingParams, TeacherServerClient, ToolCallingRollout, TrainerSurface,
    TrainingLoop, as_config, attach_rollout_metrics, build_rollout_engine, causal_lm_states, chunked_distillation_divergence, default_output_dir,
    evaluate_online, expand_prompts, generate_rollout, load_online_policy, load_pretrained, prepare_prompt_dataset, prompt_token_ids,
    rollout_micro_batches, sampling_from_config,
)

from posttrain_distill.config import DistillationConfig
from posttrain_distill.served import TEACHER_KEYS, served_support, served_topk_divergence, slice_teacher, support_logprobs

__all__ = ["DistillationTrainer", "distillation_divergence_sums", "generalized_jsd"]

logger = logging.getLogger(__name__)

#: the name of the teacher given as one model (``teacher_model=`` / ``teacher_model_name_or_path``)
DEFAULT_TEACHER = "teacher"


# ----------------------------------------------------------------------------- math (pure functions)
def generalized_jsd(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-row generalized JSD of two log-distributions ``(n, V)``: beta=0 KL(T||S), beta=1 KL(S||T), else the mixture form (arXiv:2306.13649 Eq. 1)."""
    if beta == 0.0:
        return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    if beta == 1.0:
        return (student_logp.exp() * (student_logp - teacher_logp)).sum(-1)
    mixture = torch.logaddexp(student_logp + math.log1p(-beta), teacher_logp + math.log(beta))
    return beta * (teacher_logp.exp() * (teacher_logp - mixture)).sum(-1) + (1 - beta) * (student_logp.exp() * (student_logp - mixture)).sum(-1)


def _trained_mask(batch: dict) -> torch.Tensor:
    """``(B, C)`` mask of the completion tokens the divergence and the per-token metrics cover.

    ``completion_mask`` times ``tool_mask`` (1 at model-written tokens, 0 at inserted tool tokens) when the
    batch comes from tool-calling episodes (TRL's ``loss_mask``). Attention keeps the full ``completion_mask``:
    student and teacher read the tool tokens, which are never trained on.
    """
    mask = batch["completion_mask"]
    if "tool_mask" in batch:
        mask = mask * batch["tool_mask"].to(mask.device, mask.dtype)
    return mask


def _tool_metrics(rollout) -> dict[str, float]:
    """The ``tools/*`` metrics of a ``ToolCallingRollout`` rollout (the core's names, as ``posttrain.reward_and_length_metrics`` logs them)."""
    extras = rollout.extras
    calls, failures, turns = sum(extras["tool_call_count"]), sum(extras["tool_failure_count"]), extras["turns"]
    return {
        "tools/call_frequency": calls / len(rollout),  # TRL's: tool calls per completion
        "tools/failure_frequency": failures / calls if calls else 0.0,
        "tools/mean_turns": sum(turns) / len(turns),
        "tools/turn_limit_ratio": sum(r == "max_turns" for r in extras["stop_reason"]) / len(rollout),
    }


def _rows_of(states, valid: torch.Tensor) -> torch.Tensor:
    """The valid rows ``(n, H or V)`` of token states ``(B, C, .)``."""
    flat = states.tensor.reshape(-1, states.tensor.shape[-1])
    return flat[valid]


def _float(z: torch.Tensor) -> torch.Tensor:
    """``z`` in float32 (float64 stays float64), as the chunked path computes."""
    return z if z.dtype == torch.float64 else z.float()


def _logits_of(states, rows: torch.Tensor) -> torch.Tensor:
    """Full logits of ``rows`` (the fallback of a model whose head is post-processed): the rows themselves, or their projection."""
    if not states.is_chunked:
        return rows
    dtype = states.compute_dtype or rows.dtype
    return F.linear(rows.to(dtype), states.weight.to(dtype), None if states.bias is None else states.bias.to(dtype))


def distillation_divergence_sums(student_states, teacher_states, loss_mask: torch.Tensor, *, beta: float, temperature: float = 1.0,
                                 chunk_size: int | None = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(divergence sum, student entropy sum, teacher entropy sum, valid tokens)`` over the masked completion tokens.

    The sums TRL 1.16's ``_chunked_divergence_loss`` reduces (before ``/ num_items_in_batch``): only the
    valid positions are projected, through each model's own LM head, ``chunk_size`` rows at a time
    (:func:`posttrain.chunked_distillation_divergence`); the teacher's side carries no gradient. When either
    model's head cannot be reproduced from its hidden states (:func:`posttrain.causal_lm_states` returned
    its logits: a soft-capped or scaled head), the divergence comes from the full logits of the valid rows.

    Args:
        student_states: The student's ``posttrain.TokenStates`` ``(B, C, .)`` at the positions predicting the completion tokens.
        teacher_states: The teacher's, at the same positions (computed under ``torch.no_grad``).
        loss_mask: ``(B, C)``: 1 where a completion token is trained on.
        beta: 0 forward KL, 1 reverse KL, else the generalized JSD.
        temperature: Both distributions are ``softmax(logits / temperature)``.
        chunk_size: Rows per chunk (None/0: one chunk).

    Returns:
        Four scalars: the summed per-token divergence (differentiable), the summed student and teacher
        entropies (nats, detached) and the number of valid tokens.
    """
    valid = loss_mask.reshape(-1) != 0
    n_valid = valid.sum()
    s_rows, t_rows = _rows_of(student_states, valid), _rows_of(teacher_states, valid).detach()
    if student_states.is_chunked and teacher_states.is_chunked:
        s_dtype = student_states.compute_dtype or s_rows.dtype
        t_dtype = teacher_states.compute_dtype or t_rows.dtype
        s_bias, t_bias = student_states.bias, teacher_states.bias
        divergence, s_entropy, t_entropy = chunked_distillation_divergence(
            s_rows.to(s_dtype), student_states.weight.to(s_dtype), t_rows.to(t_dtype), teacher_states.weight.to(t_dtype),
            student_bias=None if s_bias is None else s_bias.to(s_dtype), teacher_bias=None if t_bias is None else t_bias.to(t_dtype),
            beta=float(beta), temperature=float(temperature), chunk_size=int(chunk_size or max(1, s_rows.shape[0])),
            return_entropy=True, return_teacher_entropy=True,
        )
    else:  # a post-processed head: the model's own logits of the valid rows
        s = F.log_softmax(_float(_logits_of(student_states, s_rows)) / temperature, -1)
        with torch.no_grad():
            t = F.log_softmax(_float(_logits_of(teacher_states, t_rows)).to(s.device, s.dtype) / temperature, -1)
        divergence = generalized_jsd(s, t, float(beta))
        s_entropy = -(s.detach().exp() * s.detach()).sum(-1)
        t_entropy = -(t.exp() * t).sum(-1)
    return divergence.sum(), s_entropy.detach().sum(), t_entropy.detach().sum(), n_valid


# ----------------------------------------------------------------------------- trainer
class DistillationTrainer(TrainerSurface):
    """Distill a teacher into a causal LM on the student's own samples (generalized JSD); TRL 1.16's ``DistillationTrainer`` API.

    Args:
        model: The student: a model object, a Hub id or a local directory (default ``args.model_name_or_path``).
        teacher_model: The teacher: a model object, a Hub id or a directory (default
            ``args.teacher_model_name_or_path``), or a dict ``{name: model or path}`` of several teachers (default
            ``args.teacher_models``), of which each training row's ``teacher`` column picks one. Every teacher must
            share the student's vocabulary. None with ``args.teacher_model_server_url`` (a served teacher).
        args: A :class:`DistillationConfig`, a ``transformers.TrainingArguments`` or a dict of fields.
        train_dataset: Prompt-only rows (``datasets.Dataset`` / ``IterableDataset`` / list of dicts): a ``prompt``
            column, standard (a string) or conversational (messages), and with several teachers a ``teacher`` column.
        eval_dataset: Same format, or a dict of them (metrics ``eval_<name>_<metric>``).
        processing_class: The student's tokenizer (default: loaded with the model).
        callbacks: ``transformers.TrainerCallback`` objects (or classes).
        optimizers: Only ``(None, None)``: the loop builds the optimizer and schedule from ``args``.
        quantization_config: A ``BitsAndBytesConfig`` for a student given by name.
        peft_config: A ``peft.PeftConfig`` for the student.
        tools: Tool functions (sync or ``async def``, with type hints and a Google-style docstring), TRL's
            ``tools=``: the student may call them while it samples; their results are inserted as tokens and it
            writes on, up to ``max_tool_calling_iterations`` rounds (``posttrain.ToolCallingRollout``). The
            teacher scores the whole sequence; the divergence covers the student's own tokens only. Needs
            conversational prompts and a chat template that renders tools.
        rollout_engine: A ``posttrain.RolloutEngine`` (default: one on ``args.rollout_backend``).
        allow_experimental: Unused for a stable method; kept for a uniform signature.

    Raises:
        posttrain.ConfigError: no dataset or no teacher, a teacher whose vocabulary differs from the student's,
            ``teacher_model_init_kwargs`` with a teacher object, a tool without a usable schema (or two tools of one
            name), an ``optimizers`` pair, or a ``teacher_model`` together with ``teacher_model_server_url``.
        posttrain.DataError: a row without ``prompt``, whose ``teacher`` names no known teacher, or (with ``tools``)
            whose prompt is not a list of messages.
        posttrain.TeacherServerError: the teacher server is unreachable at construction (its ``/v1/models``), or
            dies, times out or answers a wrong shape during training (one line: the URL and what came back); the
            checkpoints saved before stay loadable.
    """

    _tag_names = ["trl", "distillation"]

    def __init__(self, model=None, teacher_model=None, args: DistillationConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, callbacks=None, optimizers=(None, None), quantization_config=None, peft_config=None, tools=None,
                 rollout_engine=None, allow_experimental=False):
        self.args = args = as_config(args, DistillationConfig, default_output_dir=default_output_dir(model, "Distillation"))
        if train_dataset is None:
            raise ConfigError("`train_dataset` is required: pass train_dataset=... (prompt-only rows with a 'prompt' column).")
        if tuple(optimizers or (None, None)) != (None, None):
            raise ConfigError("optimizers=(optimizer, scheduler) is not supported: posttrain's loop builds them from the config; set optim, "
                              "optim_args, learning_rate, lr_scheduler_type and lr_scheduler_kwargs instead.")
        self.loop = TrainingLoop(args, method="distill", allow_experimental=allow_experimental, callbacks=callbacks)
        self.model, self.processing_class = load_online_policy(model, args, loop=self.loop, processing_class=processing_class, peft_config=peft_config,
                                                               quantization_config=quantization_config, tags=self._tag_names)
        self.pad_token_id = self.processing_class.pad_token_id
        self.tools = list(tools or [])
        self.tool_rollout = self._setup_tools(tools, None)  # TRL's DistillationTrainer has tools=, no environment_factory=
        self.teacher_client = None
        if args.teacher_model_server_url is not None:
            self._setup_server(teacher_model)
        else:
            self._setup_teachers(teacher_model)
        self.train_dataset = self.process_dataset(train_dataset, "train_dataset")
        if isinstance(eval_dataset, dict):
            self.eval_dataset = {key: self.process_dataset(part, f"eval_dataset[{key!r}]") for key, part in eval_dataset.items()}
        else:
            self.eval_dataset = self.process_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        self.loop.setup(self.model, method=self)
        self.engine = rollout_engine or build_rollout_engine(args, model=self.model, tokenizer=self.processing_class, accelerator=self.loop.accelerator)
        self.producer = RolloutProducer(self.loop.prompt_source(len(self.train_dataset), self._prompts_per_step()), self.train_dataset, self._produce)
        self._sampling = sampling_from_config(args)
        self.beta, self.temperature = args.beta, args.temperature
        self._completion_log = CompletionLog(args.per_device_train_batch_size * args.gradient_accumulation_steps)  # one rollout
        self._logs = self._completion_log.logs
        self.add_callback(self._completion_log.callback(args, self.loop))

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

    # -------------------------------------------------------------------------- teachers
    def _setup_server(self, teacher_model) -> None:
        """A served teacher: no local model; ``self.teacher_client`` asks the server (checked now: its ``/v1/models`` must answer)."""
        args = self.args
        if teacher_model is not None:
            raise ConfigError("teacher_model=... and teacher_model_server_url are both given: a served teacher replaces the local one; "
                              "pass teacher_model=None, or unset teacher_model_server_url.")
        self.teacher_client = TeacherServerClient(args.teacher_model_server_url, timeout=args.teacher_server_timeout,
                                                  max_retries=args.teacher_server_max_retries)
        self.teacher_client.model  # noqa: B018 - fail now, with the URL, when no server answers
        self.teachers, self.teacher_names, self.teacher_model, self._routed = {}, [], None, False

    def _setup_teachers(self, teacher_model) -> None:
        """Load (by name), check and place every teacher: ``self.teachers`` {name: frozen model}, in order."""
        args = self.args
        if isinstance(teacher_model, dict):
            given = dict(teacher_model)
        elif teacher_model is not None:
            given = {DEFAULT_TEACHER: teacher_model}
        elif args.teacher_models:
            given = dict(args.teacher_models)
        elif args.teacher_model_name_or_path is not None:
            given = {DEFAULT_TEACHER: args.teacher_model_name_or_path}
        else:
            raise ConfigError("no teacher: pass teacher_model=... (a model, a Hub id or a directory; or a dict of them), or set "
                              "teacher_model_name_or_path (or teacher_models) in the config.")
        if not given:
            raise ConfigError("teacher_model is an empty dict: give {name: model or path} for at least one teacher.")
        self._routed = isinstance(teacher_model, dict) or (teacher_model is None and bool(args.teacher_models))  # named teachers: read 'teacher'
        init_kwargs = dict(args.teacher_model_init_kwargs or {})
        if args.teacher_model_revision is not None:
            init_kwargs.setdefault("revision", args.teacher_model_revision)
        student_vocab = self.model.config.get_text_config().vocab_size
        self.teachers = {}
        for name, teacher in given.items():
            if not isinstance(teacher, str) and args.teacher_model_init_kwargs is not None:
                raise ConfigError(f"teacher_model_init_kwargs is set but the teacher {name!r} is already a model object: load it yourself "
                                  "with those arguments, or pass its Hub id / directory instead.")
            teacher, _ = load_pretrained(teacher, role="teacher", model_init_kwargs=init_kwargs if isinstance(teacher, str) else None,
                                         trust_remote_code=args.trust_remote_code, load_tokenizer=False)
            teacher_vocab = teacher.config.get_text_config().vocab_size
            if teacher_vocab != student_vocab:
                label = "the teacher" if len(given) == 1 else f"the teacher {name!r}"
                raise ConfigError(
                    f"the student has vocab_size {student_vocab} but {label} has vocab_size {teacher_vocab}: distill compares full next-token "
                    "distributions, which needs one vocabulary; use a teacher with the student's vocabulary, or distill across tokenizers "
                    "with the gold method (`posttrain train gold --allow-experimental gold ...`)."
                )
            self.teachers[name] = self.loop.prepare_frozen(teacher)  # eval mode, no grad, sharded like the student
        self.teacher_names = list(self.teachers)
        self.teacher_model = self.teachers[self.teacher_names[0]]  # TRL's attribute (the first teacher)

    def _teacher_index(self, row: dict, i: int, name: str) -> int:
        """The index of the row's teacher (its ``teacher`` column; none or None: the first; one unnamed teacher: always it)."""
        chosen = row.get("teacher") if self._routed else None
        if chosen is None:
            return 0
        if chosen not in self.teachers:
            raise DataError(f"{name} row {i} has teacher={chosen!r}, which is not a known teacher: use one of {self.teacher_names} "
                            "(the names of teacher_model={...} / teacher_models), or None for the first.")
        return self.teacher_names.index(chosen)

    # -------------------------------------------------------------------------- data
    def process_dataset(self, dataset, name: str):
        """Return ``dataset`` as prompt rows (``posttrain.prepare_prompt_dataset``) after checking every row's ``teacher`` (and, with tools, its prompt)."""
        limit = None
        if name == "train_dataset" and self.args.max_steps > 0:
            limit = self.args.max_steps * self._prompts_per_step() * self.loop.accelerator.num_processes
        dataset = prepare_prompt_dataset(dataset, name, method="distill", prompt_ids=self._prompt_ids, limit=limit)
        columns = getattr(dataset, "column_names", None)
        if self._routed and (columns is None or "teacher" in columns):
            chosen = dataset["teacher"] if columns is not None else [row.get("teacher") for row in dataset]
            for i, value in enumerate(chosen):
                self._teacher_index({"teacher": value}, i, name)
        if self.tool_rollout is not None:  # an episode renders messages with the tools: a text or pre-tokenized prompt cannot
            prompts = (dataset["prompt"] if "prompt" in columns else [None] * len(dataset)) if columns is not None else [row.get("prompt") for row in dataset]
            for i, prompt in enumerate(prompts):
                if not (isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "role" in m for m in prompt)):
                    raise DataError(f"{name} row {i}: tools= needs a conversational 'prompt' (a list of {{'role', 'content'}} messages), got "
                                    f"{str(prompt)[:60]!r}; wrap a text prompt as [{{'role': 'user', 'content': text}}].")
        return dataset

    def _prompt_ids(self, row: dict) -> list[int]:
        """Token ids of a row's prompt: its ``prompt_ids`` as given, or the tokenized ``prompt`` (messages via the chat template)."""
        return prompt_token_ids(row, self.processing_class, chat_template_kwargs=self.args.chat_template_kwargs)

    def _prompts_per_step(self) -> int:
        return self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps  # one completion per prompt

    @property
    def data_collator(self):
        """The collator of raw prompt rows (TRL's attribute; TRL's is the identity): :meth:`collate`, which keeps them raw."""
        return self.collate

    # -------------------------------------------------------------------------- loop protocol
    def collate(self, rows: list[dict]) -> dict:
        return {"rows": [dict(row) for row in rows]}  # prompts stay raw (the producer reads the dataset's rows itself)

    def count_items(self, batch: dict) -> int:
        return int(batch["num_completion_tokens"])  # the loss is a mean over the step's valid completion tokens

    def _produce(self, request: ProduceRequest) -> list[dict]:
        """The producer's callback: sample one completion per prompt and split the step into micro-batches."""
        seed = self.args.seed + request.step + 1_000_003 * request.rank
        return self._generate(request.rows, seed)

    def _generate(self, rows: list[dict], seed: int, mode: str = "train") -> list[dict]:
        args = self.args
        if self.tool_rollout is not None:  # multi-turn episodes with tools (one per prompt): model turns + inserted tool tokens
            result = self.tool_rollout.rollout(self.engine, rows, SamplingParams(n=1, seed=seed, **self._sampling))
            prompts, rollout = result.prompts, result.rollout
        else:
            prompts, prompt_ids = expand_prompts(rows, 1, self._prompt_ids, self.processing_class)  # (N,)
            rollout = generate_rollout(prompts, prompt_ids, engine=self.engine, sampling=self._sampling, num_generations=1, seed=seed,
                                       max_completion_length=args.max_completion_length,
                                       stop_token_ids=(self.processing_class.eos_token_id, self.pad_token_id))
        teacher_index = torch.tensor([self._teacher_index(row, i, "train_dataset" if mode == "train" else "eval_dataset") for i, row in enumerate(rows)])
        size = args.per_device_train_batch_size if mode == "train" else len(rollout)
        micro_batches = rollout_micro_batches(rollout, size, self.pad_token_id, pad_to_multiple_of=args.pad_to_multiple_of)
        served = None
        if self.teacher_client is not None:  # one request for the step: the server's top-k and sampled-token log-probs, (N, T, .)
            # the full sequences, inserted tool tokens included: the teacher reads what the student read
            sequences = [list(p) + list(c) for p, c in zip(rollout.prompt_ids, rollout.completion_ids)]
            served = self.teacher_client.sequence_logprobs(sequences, [len(p) for p in rollout.prompt_ids], top_logprobs=args.loss_top_k,
                                                           temperature=self.temperature)
        for start, batch in zip(range(0, len(rollout), size), micro_batches):
            batch.pop("sampling_logprobs")  # the loss uses the teacher's distribution, not the sampler's log-probs
            batch["teacher_index"] = teacher_index[start : start + size]  # (b,)
            if served is not None:
                batch.update(slice_teacher(served, slice(start, start + size), batch["completion_ids"].shape[1]))
        tool_mask = rollout.extras.get("tool_mask")  # tool episodes: lengths count the model-written tokens (as TRL)
        lengths = torch.tensor([float(sum(m)) for m in tool_mask] if tool_mask is not None else [len(c) for c in rollout.completion_ids],
                               dtype=torch.float32)  # (N,)
        truncated = torch.tensor(rollout.truncated, dtype=torch.bool)
        terminated = lengths[~truncated] if bool((~truncated).any()) else torch.zeros(1)
        metrics = {
            "completions/mean_length": lengths.mean().item(), "completions/min_length": lengths.min().item(),
            "completions/max_length": lengths.max().item(), "completions/clipped_ratio": truncated.float().mean().item(),
            "completions/mean_terminated_length": terminated.mean().item(), "completions/min_terminated_length": terminated.min().item(),
            "completions/max_terminated_length": terminated.max().item(),
        }
        if self.tool_rollout is not None:
            metrics.update(_tool_metrics(rollout))
        attach_rollout_metrics(micro_batches, metrics)
        if mode == "train":
            completions = self.processing_class.batch_decode(rollout.completion_ids, skip_special_tokens=True)
            if len(self.teacher_names) > 1:
                self._completion_log.log_extra("teacher", [self.teacher_names[int(k)] for k in teacher_index])
            nothing = torch.zeros(len(rollout), 0)
            self._completion_log.record(prompts, completions, nothing, [], torch.full((len(rollout),), float("nan")))
        return micro_batches

    def compute_loss(self, model, batch: dict, num_items_in_batch):
        """Return the micro-batch's share of the step loss (summed divergence / the step's valid tokens) and its metrics."""
        args = self.args
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)  # (B, P+C)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)  # (B, P+C): tool tokens are read
        loss_mask = _trained_mask(batch)  # (B, C): ... and never trained on (TRL's completion_mask * tool_mask)
        keep = batch["completion_ids"].shape[1] + 1
        _, student_states = causal_lm_states(model, chunk_size=args.logprob_chunk_size, input_ids=input_ids, attention_mask=attention_mask,
                                             logits_to_keep=keep, use_cache=False)
        student_states = student_states[:, :-1]  # position t predicts completion token t: (B, C, .)
        if self.teacher_client is not None:
            return self._served_loss(student_states, batch, num_items_in_batch)
        if len(self.teachers) == 1:
            groups = [(self.teacher_model, None)]
        else:
            index = batch["teacher_index"]
            groups = [(self.teachers[name], (index == k).nonzero().squeeze(1)) for k, name in enumerate(self.teacher_names)]
        total = entropy = teacher_entropy = n_valid = None
        for teacher, rows in groups:
            if rows is not None and rows.numel() == 0:
                continue
            ids, mask, s_states = (input_ids, attention_mask, student_states) if rows is None else (input_ids[rows], attention_mask[rows], student_states[rows])
            with torch.no_grad():  # the teacher in its own dtype, no graph
                _, teacher_states = causal_lm_states(teacher, chunk_size=args.logprob_chunk_size, input_ids=ids, attention_mask=mask,
                                                     logits_to_keep=keep, use_cache=False)
            sums = distillation_divergence_sums(s_states, teacher_states[:, :-1], loss_mask if rows is None else loss_mask[rows],
                                                beta=self.beta, temperature=self.temperature, chunk_size=args.logprob_chunk_size)
            if total is None:
                total, entropy, teacher_entropy, n_valid = sums
            else:
                total, entropy, teacher_entropy, n_valid = (a + b for a, b in zip((total, entropy, teacher_entropy, n_valid), sums))
        loss = total / torch.as_tensor(num_items_in_batch, device=total.device).clamp(min=1.0)
        count = n_valid.clamp(min=1).float()
        metrics = {"entropy": entropy.float() / count, "teacher_entropy": teacher_entropy.float() / count}
        if "rollout_metric_values" in batch:
            metrics.update(zip(batch["rollout_metric_names"], batch["rollout_metric_values"]))
        return loss, metrics

    def _served_loss(self, student_states, batch: dict, num_items_in_batch):
        """The loss on the served support: the generalized JSD of the student's and the served teacher's log-probs of its tokens."""
        mask = _trained_mask(batch)  # (B, C): model-written completion tokens
        teacher = {source: batch[key] for key, source in TEACHER_KEYS.items()}
        support_ids, support_mask, teacher_lp = served_support(teacher, batch["completion_ids"], mask, beta=self.beta, loss_top_k=self.args.loss_top_k)
        student_lp, entropy = support_logprobs(student_states, support_ids, temperature=self.temperature, return_entropy=True)
        per_token = served_topk_divergence(student_lp, teacher_lp.to(student_lp.dtype), support_mask, beta=self.beta, add_tail=self.args.loss_add_tail)
        valid = mask.bool()
        per_token = torch.where(valid, per_token, torch.zeros_like(per_token))  # (B, C)
        loss = per_token.sum() / torch.as_tensor(num_items_in_batch, dtype=per_token.dtype, device=per_token.device).clamp(min=1.0)
        count = valid.sum().clamp(min=1).float()
        actual = torch.where(valid, batch["teacher_actual_logprobs"], torch.zeros_like(batch["teacher_actual_logprobs"]))
        metrics = {"entropy": torch.where(valid, entropy, torch.zeros_like(entropy)).sum().float() / count,
                   "teacher_logprob": actual.sum().float() / count}  # the served teacher's mean log-prob of the sampled tokens
        if "rollout_metric_values" in batch:
            metrics.update(zip(batch["rollout_metric_names"], batch["rollout_metric_values"]))
        return loss, metrics

    def on_step_end(self, model, state) -> None:
        self.engine.update_weights(model)  # the next rollout samples from the updated student

    def evaluate_batches(self, model, batches) -> dict[str, float]:
        """Return the eval loss and metrics: each eval batch sampled by the student (seeded by ``seed``) and scored against its teacher."""
        return evaluate_online(model, batches, produce=lambda rows, seed: self._generate(rows, seed, mode="eval"),
                               compute_loss=self.compute_loss, count_items=self.count_items, loop=self.loop, seed=self.args.seed)

    def state_dict(self) -> dict:
        return {"policy_version": self.engine.policy_version}

    def load_state_dict(self, state: dict) -> None:
        self.engine.set_policy_version(int(state.get("policy_version", 0)))
