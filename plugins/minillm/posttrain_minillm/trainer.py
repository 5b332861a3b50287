"""MiniLLM on the posttrain loop (heavy: imports torch).

MiniLLM (Gu, Dong, Wei and Huang 2024, arXiv:2306.08543) distills a teacher into a student by minimizing
the reverse KL ``KL(q_student || p_teacher)`` over the student's own samples with a policy gradient. As
TRL 1.14.2's ``MiniLLMTrainer`` (the last TRL release that shipped it), it is GRPO with two additions.
One optimizer step, in order (the producer's ``_produce``, then ``compute_loss`` per micro-batch)::

    prompts -> rollout: num_generations completions per prompt from the student (RolloutEngine, seeded by the step)
      -> reward advantage per completion (GRPO's group-normalized reward; 0 with TRL's default dummy reward)  (N,)
      -> micro-batches; per micro-batch, one student forward and one no-grad teacher forward (chunked, no [N, V] logits):
         r_t   = log p_teacher(y_t) - log q_student(y_t)                      (at kd_temperature; r_t keeps its gradient)
         A_t   = A_reward + sum_{i>=t} gamma^i r_i [/ sum_{i>=t} gamma^i m_i]  (rkl_advantage; length_normalization)
         loss  = GRPO clipped policy-gradient loss with token advantages A_t   (loss_type: dapo, grpo, bnpo, dr_grpo)
               + mean_t KL(q_student(.|y<t) || p_teacher(.|y<t))              (single_step_decomposition)

The reverse-KL reward is not detached (as in TRL): its gradient through ``log q_student`` gives the paper's
``(R_t - 1)`` term of Eq. 2 at ``gamma=0``. Departures from TRL 1.14.2 (padding positions masked, the
single-step term a per-step token mean): docs/methods/minillm.md.

Vision-language students (``image`` / ``images`` columns, the processor as ``processing_class``): GRPO's
copied blocks encode each prompt with its images and condition generation on them; the student's and
the teacher's forwards both get the batch's ``model_inputs``, so the teacher must be a vision-language
model too (with the student's vocabulary); a text-only teacher with image rows is refused.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from posttrain import (  # the loop and the core's online steps (the online scaffold, plugin API 1.5)
    CompletionLog, ConfigError, DataError, ProduceRequest, RolloutBatch, RolloutProducer, TrainerSurface, TrainingLoop, add_old_and_ref_logps, as_config,
    attach_rollout_metrics, build_rollout_engine, causal_lm_states, check_online_arguments, chunked_distillation_divergence, default_output_dir,
    evaluate_online, gather_across_processes, generate_rollout, lm_head_of, load_online_policy, load_pretrained, nanstd,
    prepare_prompt_dataset, prompt_token_ids, resolve_online_rewards, reward_and_length_metrics, rollout_micro_batches, router_aux_loss_settings,
    sampler_is_old_policy, sampling_from_config, score_rollout, SamplingParams,
)
from posttrain import (  # vision-language models (plugin API 1.9)
    check_vision_model, image_column, is_processor, is_vision_model, prepare_multimodal_messages, processor_tokenizer, row_images, vision_prompt_inputs,
)

from posttrain_minillm.config import MiniLLMConfig

__all__ = ["MiniLLMTrainer", "compute_group_advantages", "reverse_kl_advantages", "dummy_reward_func"]

logger = logging.getLogger(__name__)

_TOKEN_LEVEL_LOSSES = ("dapo", "bnpo")  # normalized by completion tokens


def dummy_reward_func(completions: list, **kwargs) -> list[float]:
    """TRL's placeholder reward when no reward function is given: 1.0 for every completion (zero reward advantages)."""
    return [1.0 for _ in completions]


# ----------------------------------------------------------------------------- math (pure functions; nanstd is the core's)
# Copied from posttrain_grpo.trainer.compute_group_advantages
def compute_group_advantages(
    rewards_per_func: torch.Tensor, reward_weights: torch.Tensor, num_generations: int, scale_rewards: str, multi_objective_aggregation: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(advantages (N,), is_std_zero (N,))`` from rewards grouped ``num_generations`` at a time.

    Args:
        rewards_per_func: ``(N, F)`` rewards, NaN where a function returned None.
        reward_weights: ``(F,)`` weights.
        num_generations: Group size G (N is a multiple of G; groups are consecutive rows).
        scale_rewards: ``"group"``, ``"batch"`` or ``"none"``.
        multi_objective_aggregation: ``"sum_then_normalize"`` or ``"normalize_then_sum"`` (GDPO).

    Returns:
        Advantages (0 where every reward function returned None, or where a std is undefined) and
        whether the std used for each row is zero (for ``frac_reward_zero_std``).
    """
    unscorable = torch.isnan(rewards_per_func).all(dim=1)  # (N,)
    if multi_objective_aggregation == "sum_then_normalize":
        rewards = (rewards_per_func * reward_weights.unsqueeze(0)).nansum(dim=1)  # (N,)
        rewards[unscorable] = torch.nan  # keep unscorable rows out of the group baseline
        grouped = rewards.view(-1, num_generations)  # (N/G, G)
        mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)  # (N,)
        if scale_rewards == "batch":
            std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
        else:  # "group", or "none" (then only logged)
            std = nanstd(grouped, dim=1).repeat_interleave(num_generations)
        advantages = rewards - mean
        if scale_rewards != "none":
            advantages = advantages / (std + 1e-4)
    else:  # GDPO: normalize each reward within its group, sum, then normalize over the batch
        grouped = rewards_per_func.view(-1, num_generations, rewards_per_func.shape[1])  # (N/G, G, F)
        normalized = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)) / (nanstd(grouped, dim=1, keepdim=True) + 1e-4)
        rewards = (normalized.view_as(rewards_per_func) * reward_weights.unsqueeze(0)).nansum(dim=1)  # (N,)
        rewards[unscorable] = torch.nan
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
        advantages = (rewards - torch.nanmean(rewards)) / (std + 1e-4)
    is_std_zero = torch.isclose(std, torch.zeros_like(std))
    return torch.nan_to_num(advantages, nan=0.0), is_std_zero


def reverse_kl_advantages(student_logps: torch.Tensor, teacher_logps: torch.Tensor, mask: torch.Tensor, gamma: float,
                          length_normalization: bool) -> torch.Tensor:
    """Return MiniLLM's reverse-KL advantage ``(B, C)`` (differentiable through ``student_logps``).

    ``r_t = (log p_teacher(y_t) - log q_student(y_t)) * m_t``; with ``gamma == 0`` the advantage is ``r_t``.
    With ``gamma > 0``: ``sum_{i>=t} gamma^i r_i``, divided (``length_normalization``) by
    ``sum_{i>=t} gamma^i m'_i`` where ``m'`` is the mask with 1e-4 at padding (TRL 1.14.2's weights: powers
    of ``gamma`` counted from the first completion token, so without normalization late tokens get
    ``gamma^t``-scaled advantages; with it the factor cancels).

    Args:
        student_logps: ``(B, C)`` log q_student of the completion tokens.
        teacher_logps: ``(B, C)`` log p_teacher of the same tokens.
        mask: ``(B, C)`` 1 for completion tokens, 0 for padding.
        gamma: Discount in [0, 1].
        length_normalization: See above.
    """
    mask = mask.to(student_logps.dtype)
    rewards = teacher_logps.to(student_logps.dtype) * mask - student_logps * mask  # (B, C)
    if gamma <= 0.0:
        return rewards
    powers = torch.pow(torch.tensor(gamma, dtype=student_logps.dtype, device=rewards.device),
                       torch.arange(rewards.shape[1], device=rewards.device, dtype=student_logps.dtype))  # (C,)
    advantages = (rewards * powers).flip(1).cumsum(1).flip(1)  # (B, C): sum_{i>=t} gamma^i r_i
    if length_normalization:
        weights = torch.where(mask < 0.5, torch.full_like(mask, 1e-4), mask)
        advantages = advantages / (weights * powers).flip(1).cumsum(1).flip(1)
    return advantages


def _full_logits(states, temperature: float) -> torch.Tensor:
    """``(B, C, V)`` logits / temperature of :class:`posttrain.TokenStates` (the unchunked fallback only)."""
    if not states.is_chunked:
        return states.tensor / temperature
    logits = states.tensor @ states.weight.t()
    if states.bias is not None:
        logits = logits + states.bias
    return logits / temperature


def single_step_reverse_kl(student_states, teacher_states, temperature: float) -> torch.Tensor:
    """Per-token ``KL(q_student || p_teacher)`` over the vocabulary ``(B, C)``, chunked when both sides give hidden states.

    Gradients flow to the student only; the teacher's states are constants.
    """
    if student_states.is_chunked and teacher_states.is_chunked:
        return chunked_distillation_divergence(student_states.tensor, student_states.weight, teacher_states.tensor, teacher_states.weight,
                                               student_bias=student_states.bias, teacher_bias=teacher_states.bias, beta=1.0,
                                               temperature=temperature, chunk_size=student_states.chunk_size)
    s = F.log_softmax(_full_logits(student_states, temperature), -1)
    with torch.no_grad():
        t = F.log_softmax(_full_logits(teacher_states, temperature), -1).to(s.dtype)
    return (s.exp() * (s - t)).sum(-1)


# Copied from posttrain_grpo.trainer.prompt_with_images
def prompt_with_images(prompt, images: list, *, where: str = "the row"):
    """Return a conversational ``prompt`` with its images in its image parts (``{"type": "image", "image": <PIL.Image>}``), as TRL's reward functions see it.

    String contents become text parts and the images go before the first user text when the
    conversation has no image part (``posttrain.prepare_multimodal_messages``); a string prompt is
    returned as is (its placeholders are the model's own image tokens).

    Raises:
        DataError: The number of image parts differs from the number of images (names ``where``).
    """
    if isinstance(prompt, str):
        return prompt
    remaining = iter(images)
    filled = []
    for message in prepare_multimodal_messages(prompt, len(images), where=where):
        if message.get("role") != "tool" and isinstance(message.get("content"), list):
            message = {**message, "content": [{**part, "image": next(remaining)} if isinstance(part, dict) and part.get("type") == "image" else part
                                              for part in message["content"]]}
        filled.append(message)
    return filled


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ``mask``."""
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


# ----------------------------------------------------------------------------- trainer
class MiniLLMTrainer(TrainerSurface):
    """Distill a teacher into a causal LM with MiniLLM (reverse-KL policy gradient); TRL 1.14.2's ``MiniLLMTrainer`` API.

    Args:
        model: The student: a model object or Hub id / local directory (default ``args.model_name_or_path``).
        teacher_model: The teacher: a model object or a Hub id / local directory (default
            ``args.teacher_model_name_or_path``), with the student's vocabulary. Loaded with
            ``args.teacher_model_init_kwargs`` and placed like the policy (``TrainingLoop.prepare_frozen``).
        reward_funcs: Optional reward functions (as GRPO's); their group-normalized advantage is added to
            the reverse-KL advantage. Default: TRL's dummy reward (1.0 for every completion: zero advantage).
        args: A :class:`MiniLLMConfig`, a ``transformers.TrainingArguments`` or a dict of fields.
        train_dataset: Prompt-only rows (standard ``prompt`` text or conversational messages, or ``prompt_ids``);
            with a vision-language student and teacher, an ``images`` (list) or ``image`` column (TRL's format).
        eval_dataset: Same format, or a dict of them.
        processing_class: The tokenizer, or a vision-language student's processor (``AutoProcessor``) (default: loaded with the student).
        reward_processing_classes: Tokenizers of reward models (as GRPO's).
        callbacks: ``transformers.TrainerCallback`` objects (or classes).
        optimizers: Only ``(None, None)``: the loop builds the optimizer and schedule from ``args``.
        peft_config: A ``peft.PeftConfig`` for the student.
        rollout_func: TRL's hook generating completions (``prompt_ids``, ``completion_ids``, ``logprobs``), or None.
        quantization_config: A ``BitsAndBytesConfig`` for a student given by name.
        rollout_engine: A ``posttrain.RolloutEngine`` (default: one on ``args.rollout_backend``).
        allow_experimental: Opt in to this experimental method.

    Raises:
        posttrain.ConfigError: no teacher, a teacher whose vocabulary differs from the student's,
            ``teacher_model_init_kwargs`` with a teacher object, no dataset, image rows with a text-only
            teacher or a tokenizer (not a processor), or an argument that cannot be honoured.
        posttrain.DataError: an image column for a text-only student; a missing or unreadable image, or
            images that do not match the prompt's placeholders (the message names the row).
    """

    _tag_names = ["trl", "minillm"]

    def __init__(self, model=None, teacher_model=None, reward_funcs=None, args: MiniLLMConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, reward_processing_classes=None, callbacks=None, optimizers=(None, None), peft_config=None, rollout_func=None,
                 quantization_config=None, rollout_engine=None, allow_experimental=False):
        self.args = args = as_config(args, MiniLLMConfig, default_output_dir=default_output_dir(model, "MiniLLM"))
        self.loop = TrainingLoop(args, method="minillm", allow_experimental=allow_experimental, callbacks=callbacks)  # the experimental gate first
        if reward_funcs is None and not args.reward_funcs:
            reward_funcs = [dummy_reward_func]
        check_online_arguments("MiniLLM", train_dataset=train_dataset, reward_funcs=reward_funcs or args.reward_funcs, optimizers=optimizers)
        teacher_model = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
        if teacher_model is None:
            raise ConfigError("MiniLLM needs a teacher: pass teacher_model=<model or path> to MiniLLMTrainer, or set teacher_model_name_or_path in the config.")
        if args.teacher_model_init_kwargs is not None and not isinstance(teacher_model, str):
            raise ConfigError("teacher_model_init_kwargs is set but teacher_model is already a model object: drop teacher_model_init_kwargs, or pass the teacher by name.")
        self._setup_model(model, processing_class, peft_config, quantization_config)
        self._setup_teacher(teacher_model)
        self._setup_rewards(reward_funcs, reward_processing_classes)
        self.tool_rollout = None  # GRPO's shared blocks read it: MiniLLM has no tool-calling episodes
        self._setup_datasets(train_dataset, eval_dataset)
        self._check_teacher_sees_images()
        self.loop.setup(self.model, method=self)
        self.rollout_func = rollout_func
        self.engine = rollout_engine or build_rollout_engine(args, model=self.model, tokenizer=self._tokenizer, accelerator=self.loop.accelerator)
        self.engine_is_policy = self.engine.samples_from_policy  # the transformers backend samples from the student itself
        self.producer = RolloutProducer(self.loop.prompt_source(len(self.train_dataset), self._prompts_per_step()), self.train_dataset,
                                        self._produce, reuse=self.args.num_iterations)
        self._sampling = sampling_from_config(args)
        self._setup_logging()

    # -------------------------------------------------------------------------- setup (the core's online steps)
    # Copied from posttrain_grpo.trainer.GRPOTrainer._setup_model
    def _setup_model(self, model, processing_class, peft_config, quantization_config, lm_head_fp32: bool = False) -> None:
        """Load the policy (``posttrain.load_online_policy``) and read its MoE router-loss settings.

        ``processing_class`` may be a processor: ``self._tokenizer`` (TRL's attribute) is its tokenizer,
        which pads, decodes and stops generation (for a tokenizer, the tokenizer itself).
        """
        self.model, self.processing_class = load_online_policy(model, self.args, loop=self.loop, processing_class=processing_class, peft_config=peft_config,
                                                               quantization_config=quantization_config, tags=self._tag_names, lm_head_fp32=lm_head_fp32)
        self._tokenizer = processor_tokenizer(self.processing_class)
        self.pad_token_id = self._tokenizer.pad_token_id
        self.router_aux_loss_coef, self.aux_loss_enabled = router_aux_loss_settings(self.model, self.args.router_aux_loss_coef)

    def _setup_teacher(self, teacher_model) -> None:
        """Load the teacher (``posttrain.load_pretrained(role="teacher")``), check its vocabulary, freeze and place it like the policy."""
        args = self.args
        teacher, _ = load_pretrained(teacher_model, role="teacher", model_init_kwargs=args.teacher_model_init_kwargs,
                                     trust_remote_code=getattr(args, "trust_remote_code", False), load_tokenizer=False)
        s_head, t_head = lm_head_of(self.model), lm_head_of(teacher)
        s_vocab = s_head.weight.shape[0] if s_head is not None else self.model.config.vocab_size
        t_vocab = t_head.weight.shape[0] if t_head is not None else teacher.config.vocab_size
        if s_vocab != t_vocab:
            name = teacher_model if isinstance(teacher_model, str) else type(teacher).__name__
            raise ConfigError(f"the teacher {name} has a vocabulary of {t_vocab} tokens and the student {s_vocab}: MiniLLM compares their token "
                              "distributions, so both need the same tokenizer and vocabulary (for different tokenizers use the gold method).")
        self.teacher_model = self.loop.prepare_frozen(teacher)

    def _check_teacher_sees_images(self) -> None:
        """Refuse image rows when the teacher is text-only: it would score completions of prompts whose images it cannot see.

        With a vision-language teacher (the student's family and vocabulary), both forwards get the
        batch's ``model_inputs`` (pixel values & co.).
        """
        datasets = [("train_dataset", self.train_dataset)]
        if isinstance(self.eval_dataset, dict):
            datasets += [(f"eval_dataset[{key!r}]", part) for key, part in self.eval_dataset.items()]
        elif self.eval_dataset is not None:
            datasets.append(("eval_dataset", self.eval_dataset))
        for name, dataset in datasets:
            columns = dataset.column_names if hasattr(dataset, "column_names") else list(dataset[0]) if len(dataset) else []
            column = image_column(columns)
            if column is not None and not is_vision_model(self.teacher_model):
                raise ConfigError(f"{name} has an image column {column!r} but MiniLLM's teacher ({type(self.teacher_model).__name__}) is text-only: "
                                  "it cannot see the images its reverse KL would be scored on; use a vision-language teacher with the student's vocabulary, or drop the column.")

    # Copied from posttrain_grpo.trainer.GRPOTrainer._setup_rewards
    def _setup_rewards(self, reward_funcs, reward_processing_classes) -> None:
        """Resolve the reward functions (TRL's ``reward_funcs`` / ``reward_func_names`` / ``reward_weights`` / ``reward_processing_classes``)."""
        rewards = resolve_online_rewards(reward_funcs, self.args, loop=self.loop, reward_processing_classes=reward_processing_classes)
        self.reward_funcs, self.reward_func_names, self.reward_weights = rewards.funcs, rewards.names, rewards.weights  # weights (F,)
        self.reward_processing_classes = rewards.processing_classes

    # Copied from posttrain_grpo.trainer.GRPOTrainer._setup_datasets
    def _setup_datasets(self, train_dataset, eval_dataset) -> None:
        self.train_dataset = self.process_dataset(train_dataset, "train_dataset")
        if isinstance(eval_dataset, dict):
            self.eval_dataset = {key: self.process_dataset(part, f"eval_dataset[{key!r}]") for key, part in eval_dataset.items()}
        else:
            self.eval_dataset = self.process_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else None

    # Copied from posttrain_grpo.trainer.GRPOTrainer._setup_logging
    def _setup_logging(self) -> None:
        """TRL's completion log (``_logs``; written at each training log with ``log_completions``)."""
        args = self.args
        self._completion_log = CompletionLog(args.per_device_train_batch_size * args.gradient_accumulation_steps)  # one rollout
        self._logs = self._completion_log.logs
        self.add_callback(self._completion_log.callback(args, self.loop))

    # -------------------------------------------------------------------------- data
    # Copied from posttrain_grpo.trainer.GRPOTrainer.process_dataset with GRPO->MiniLLM, grpo->minillm
    def process_dataset(self, dataset, name: str):
        """Return ``dataset`` as prompt rows (``posttrain.prepare_prompt_dataset``); a streamed ``train_dataset`` keeps the rows ``max_steps`` draw."""
        limit = None
        if name == "train_dataset" and self.args.max_steps > 0:
            limit = self.args.max_steps * self._prompts_per_step() * self.loop.accelerator.num_processes
        dataset = prepare_prompt_dataset(dataset, name, method="MiniLLM", prompt_ids=lambda row: self._prompt_ids(row, where=f"{name} row 0"), limit=limit)
        columns = dataset.column_names if hasattr(dataset, "column_names") else list(dataset[0]) if len(dataset) else []
        if image_column(columns) is not None and self.tool_rollout is not None:
            raise ConfigError(f"{name} has an image column {image_column(columns)!r} and tools= / environment_factory= are set: tool-calling "
                              "episodes do not carry images yet; train on the images without tools, or drop the image column.")
        return dataset

    # Copied from posttrain_grpo.trainer.GRPOTrainer._prompt_ids
    def _prompt_ids(self, row: dict, where: str = "the row") -> list[int]:
        """Token ids of a row's prompt: its ``prompt_ids`` as given, or the tokenized ``prompt`` (messages via the chat template)."""
        return self._encode_prompt(row, where)[0]

    # Copied from posttrain_grpo.trainer.GRPOTrainer._encode_prompt
    def _encode_prompt(self, row: dict, where: str = "the row") -> tuple[list[int], dict | None, list | None]:
        """Return ``(ids, model_inputs, images)`` of a row's prompt; the last two are None for a text row.

        A tokenizer tokenizes as ever (``posttrain.prompt_token_ids``). A processor renders the prompt
        with its chat template and, for a row with an ``images`` / ``image`` column, its images
        (``posttrain.vision_prompt_inputs``: ids with the image tokens expanded, and ``pixel_values`` &
        co.); an empty image list is a text row (TRL). ``where`` is named in errors.

        Raises:
            DataError: an image column for a text-only model, a missing or unreadable image, images
                that do not match the prompt's image placeholders, or pre-tokenized ``prompt_ids`` with images.
            ConfigError: images with a ``processing_class`` that is not a processor.
        """
        images = None
        if image_column(row) is not None:
            check_vision_model(self.model, row, dataset_name=where)
            images = row_images(row, where=where) or None
        if images is None and (row.get("prompt_ids") is not None or not is_processor(self.processing_class)):
            return prompt_token_ids(row, self.processing_class, chat_template_kwargs=self.args.chat_template_kwargs), None, None
        if row.get("prompt_ids") is not None:
            raise DataError(f"{where}: pre-tokenized 'prompt_ids' cannot carry images (the processor expands the image tokens); give the 'prompt' instead.")
        if not is_processor(self.processing_class):
            raise ConfigError(f"{where} has images but processing_class is a {type(self.processing_class).__name__}, not a processor: "
                              "pass the model's processor (AutoProcessor.from_pretrained(...)) as processing_class.")
        ids, model_inputs = vision_prompt_inputs(self.processing_class, row["prompt"], images, where=where,
                                                 chat_template_kwargs=self.args.chat_template_kwargs, tools=row.get("tools"))
        return ids, model_inputs or None, images

    # Copied from posttrain_grpo.trainer.GRPOTrainer._prompts_per_step
    def _prompts_per_step(self) -> int:
        args = self.args
        return args.per_device_train_batch_size * args.gradient_accumulation_steps // args.num_generations

    @property
    def data_collator(self):
        """The collator of raw prompt rows (TRL's attribute; TRL's is the identity): :meth:`collate`, which keeps them raw."""
        return self.collate

    # -------------------------------------------------------------------------- loop protocol
    # Copied from posttrain_grpo.trainer.GRPOTrainer.collate
    def collate(self, rows: list[dict]) -> dict:
        return {"rows": [dict(row) for row in rows]}  # prompts stay raw (the producer reads the dataset's rows itself)

    def count_items(self, batch: dict) -> int:
        return batch["num_completion_tokens"] if self.args.loss_type in _TOKEN_LEVEL_LOSSES else batch["completion_ids"].shape[0]

    # Copied from posttrain_grpo.trainer.GRPOTrainer._produce
    def _produce(self, request: ProduceRequest) -> list[dict]:
        """The producer's callback: generate, score and split one step's rollouts (the producer reuses them ``num_iterations`` times)."""
        seed = self.args.seed + request.step + 1_000_003 * request.rank
        return self._generate_and_score(request.rows, seed, indices=request.indices)

    # Copied from posttrain_grpo.trainer.GRPOTrainer._generate
    def _generate(self, prompts: list, prompt_ids: list[list[int]] | None = None, num_generations: int = 1, seed: int | None = None,
                  model_inputs: list[dict] | None = None) -> RolloutBatch:
        """Return the rollout of ``prompts`` (``posttrain.generate_rollout``): the engine's, or ``self.rollout_func``'s (TRL's hook).

        ``model_inputs`` (images: one dict per distinct prompt) condition the engine's sampling, and
        the rollout carries them per completion in ``extras["model_inputs"]`` for the forwards.
        """
        if prompt_ids is None and self.rollout_func is None:
            prompt_ids = [self._prompt_ids({"prompt": p}) for p in prompts]
        if model_inputs is not None and self.rollout_func is None:
            rollout = self.engine.generate(prompt_ids[::num_generations], SamplingParams(n=num_generations, seed=seed, **self._sampling),
                                           model_inputs=model_inputs)
        else:
            rollout = generate_rollout(prompts, prompt_ids, engine=self.engine, sampling=self._sampling, num_generations=num_generations, seed=seed,
                                       rollout_func=self.rollout_func, trainer=self, max_completion_length=self.args.max_completion_length,
                                       stop_token_ids=(self._tokenizer.eos_token_id, self.pad_token_id))
        if model_inputs is not None:  # the group members share their prompt's inputs
            rollout.extras = {**rollout.extras, "model_inputs": [inputs for inputs in model_inputs for _ in range(num_generations)]}
        return rollout

    def _generate_and_score(self, rows: list[dict], seed: int, mode: str = "train", indices: list[int] | None = None) -> list[dict]:
        args = self.args
        num_generations = args.num_generations if mode == "train" else (args.num_generations_eval or args.num_generations)
        # 1. rollout: G completions per prompt from the student, grouped prompt0 x G, prompt1 x G, ... (conditioned on the rows' images, if any)
        # 2. reward: (N, F), NaN where a function returned None (TRL's dummy reward: all 1.0)
        prompts, rollout, rewards_per_func = self._rollout_and_rewards(rows, seed, num_generations, self._row_names(rows, indices, mode))

        # 3. micro-batches of per_device_train_batch_size completions (one in eval), with old log-probs when the ratio needs them
        size = args.per_device_train_batch_size if mode == "train" else len(rollout)
        micro_batches = [self._with_logps(batch, mode) for batch in rollout_micro_batches(
            rollout, size, self.pad_token_id, pad_to_multiple_of=args.pad_to_multiple_of, mask_truncated=args.mask_truncated_completions)]

        # 4. reward advantage (N,) from the global batch's rewards (this process's in eval); the reverse-KL part is per token, in compute_loss
        if mode == "train":
            (all_rewards,), local = gather_across_processes(self.loop.accelerator, rewards_per_func)
        else:
            all_rewards, local = rewards_per_func, slice(0, len(rollout))
        scale = args.scale_rewards if num_generations > 1 else "none"
        advantages, is_std_zero = compute_group_advantages(all_rewards, self.reward_weights, num_generations, scale, args.multi_objective_aggregation)
        advantages, is_std_zero = advantages[local], is_std_zero[local]
        world = self.loop.accelerator.num_processes if mode == "train" else 1
        step_tokens = max(1, sum(b["num_completion_tokens"] for b in micro_batches))
        for start, batch in zip(range(0, len(rollout), size), micro_batches):
            batch["advantages"] = advantages[start : start + size]  # (b,)
            batch["share_divisor"] = torch.tensor(float(len(micro_batches) * world))
            # token means over the whole step: this process's step tokens, averaged over processes
            batch["step_token_normalizer"] = torch.tensor(float(step_tokens * world))

        # 5. metrics of the rollout (the loss returns them with its own); the completion log keeps training rollouts only
        metrics = reward_and_length_metrics(rollout, rewards_per_func, self.reward_weights, self.reward_func_names, is_std_zero, num_generations)
        attach_rollout_metrics(micro_batches, {**metrics, **self._completion_log.pop_metrics()})
        if mode == "train":
            completions = self._tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
            self._completion_log.record(prompts, completions, rewards_per_func, self.reward_func_names, advantages)
        else:
            self._completion_log.discard_extra()
        return micro_batches

    # Copied from posttrain_grpo.trainer.GRPOTrainer._row_names
    @staticmethod
    def _row_names(rows: list[dict], indices: list[int] | None, mode: str = "train") -> list[str]:
        """What an error names for each row: ``train_dataset row <index>`` (or the row's place in an eval batch)."""
        if indices is None:
            return [f"{mode} batch row {i}" for i in range(len(rows))]
        return [f"train_dataset row {i}" for i in indices]

    # Copied from posttrain_grpo.trainer.GRPOTrainer._rollout_and_rewards
    def _rollout_and_rewards(self, rows: list[dict], seed: int, num_generations: int, names: list[str] | None = None) -> tuple[list, RolloutBatch, torch.Tensor]:
        """Return ``(prompts (N,), rollout, rewards_per_func (N, F))`` of ``num_generations`` completions of each row.

        Rows with images: the processor's ids and model inputs condition the rollout; the reward
        functions get the prompts with their images (TRL's), the returned prompts (for the completion
        log) keep only the image placeholders. ``names`` (one per row) are what errors name.
        """
        if self.tool_rollout is not None:  # multi-turn episodes with tools / environments (one per completion)
            expanded = [row for row in rows for _ in range(num_generations)]  # (N,)
            result = self.tool_rollout.rollout(self.engine, expanded, SamplingParams(n=1, seed=seed, **self._sampling))
            rewards_per_func = score_rollout(rows, result.prompts, result.rollout, num_generations, reward_funcs=self.reward_funcs,
                                             reward_func_names=self.reward_func_names, tokenizer=self._tokenizer, trainer_state=self.loop.state,
                                             log=self._completion_log, completions=result.completions,
                                             reward_kwargs={"environments": result.environments} if result.environments is not None else None)
            return result.prompts, result.rollout, rewards_per_func
        names = names or [f"row {i}" for i in range(len(rows))]
        encoded = [self._encode_prompt(row, where) for row, where in zip(rows, names)]  # (ids, model inputs or None, images or None) per row
        prompt_ids = [ids for ids, _, _ in encoded for _ in range(num_generations)]  # (N,) grouped: prompt0 x G, prompt1 x G, ...
        prompts = [row["prompt"] if "prompt" in row else self._tokenizer.decode(ids, skip_special_tokens=True)
                   for row, (ids, _, _) in zip(rows, encoded) for _ in range(num_generations)]  # (N,) as posttrain.expand_prompts
        model_inputs, reward_prompts = None, prompts
        if any(inputs for _, inputs, _ in encoded):  # a vision-language batch: every row conditions on its images
            model_inputs = [inputs for _, inputs, _ in encoded]  # one dict per distinct prompt
            reward_prompts = [prompt_with_images(prompt, images, where=where) if images else prompt for prompt, (_, _, images), where in
                              zip(prompts[::num_generations], encoded, names) for _ in range(num_generations)]  # (N,)
        rollout = self._generate(reward_prompts, prompt_ids, num_generations, seed, model_inputs)  # N = P * G completions
        rewards_per_func = score_rollout(rows, reward_prompts, rollout, num_generations, reward_funcs=self.reward_funcs, reward_func_names=self.reward_func_names,
                                         tokenizer=self._tokenizer, trainer_state=self.loop.state, log=self._completion_log)  # (N, F)
        return prompts, rollout, rewards_per_func

    def _with_logps(self, batch: dict, mode: str) -> dict:
        """Add a micro-batch's no-grad old log-probs when the ratio needs them (reused rollouts, or another engine sampled)."""
        args = self.args
        sampling_logps = batch.pop("sampling_logprobs")  # (b, C)
        need_old = (mode == "train" and args.num_iterations > 1) or not self.engine_is_policy
        return add_old_and_ref_logps(batch, sampling_logps, model=self.model, temperature=args.temperature, need_old=need_old, need_ref=False,
                                     ref_model=None, old_from_sampler=sampler_is_old_policy(self._sampling, args.temperature, self.engine_is_policy),
                                     device=self.loop.device, accelerator=self.loop.accelerator, chunk_size=args.logprob_chunk_size)

    def compute_loss(self, model, batch: dict, num_items_in_batch):
        """Return the micro-batch's share of the step loss and its metrics (no host syncs)."""
        args = self.args
        mask = batch["completion_mask"].float()  # (B, C)
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)  # (B, P+C)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        num_completion = batch["completion_ids"].shape[1]
        extra = {"output_router_logits": True} if self.aux_loss_enabled else {}
        images = batch.get("model_inputs") or {}  # a vision-language batch: pixel_values, token_type_ids, ... (the teacher sees them too)
        outputs, states = causal_lm_states(model, chunk_size=args.logprob_chunk_size, input_ids=input_ids, attention_mask=attention_mask,
                                           logits_to_keep=num_completion + 1, **extra, **images)
        student = states[:, :-1]  # position t predicts completion token t
        scores = student.score(batch["completion_ids"], temperature=args.temperature, return_entropy=True, entropy_grad=False)
        per_token_logps, entropies = scores.logps, scores.entropy  # (B, C)
        with torch.no_grad():  # the teacher in its own dtype, one chunk of logits at a time
            _, teacher_states = causal_lm_states(self.teacher_model, chunk_size=args.logprob_chunk_size, input_ids=input_ids,
                                                 attention_mask=attention_mask, logits_to_keep=num_completion + 1, **images)
            teacher = teacher_states[:, :-1]
            teacher_scores = teacher.score(batch["completion_ids"], temperature=args.kd_temperature, return_entropy=True)
        teacher_logps = teacher_scores.logps  # (B, C)
        if args.kd_temperature == args.temperature:
            student_kd_logps = per_token_logps
        else:
            student_kd_logps = student.score(batch["completion_ids"], temperature=args.kd_temperature).logps

        advantages = batch["advantages"].to(per_token_logps.dtype).unsqueeze(1)  # (B, 1): reward advantage
        if args.rkl_advantage:  # + the reverse-KL advantage (B, C), differentiable as in TRL
            advantages = advantages + reverse_kl_advantages(student_kd_logps, teacher_logps, mask, args.gamma, args.length_normalization)

        old_per_token_logps = batch.get("old_per_token_logps", per_token_logps.detach())  # (B, C)
        log_ratio = per_token_logps - old_per_token_logps
        if args.importance_sampling_level == "token":
            log_importance_weights = log_ratio  # (B, C)
        else:  # GSPO: length-normalized sequence log-ratio
            log_importance_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)  # (B, 1)
        coef_1 = torch.exp(log_importance_weights)
        eps_low, eps_high = args.epsilon, args.epsilon_high if args.epsilon_high is not None else args.epsilon
        coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)  # (B, C)
        per_token_loss = per_token_loss.expand_as(mask)

        step_tokens = batch.get("step_token_normalizer", mask.sum().clamp(min=1.0))
        # aggregate: the micro-batch's SUM of per-item losses / items in the whole step (see count_items)
        if args.loss_type == "grpo":  # items = sequences, each a token mean
            loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / num_items_in_batch
        elif args.loss_type == "dr_grpo":  # items = sequences, each a sum / max_completion_length
            loss = (per_token_loss * mask).sum() / args.max_completion_length / num_items_in_batch
        elif args.loss_type == "bnpo":  # this process's step tokens, averaged over processes
            loss = (per_token_loss * mask).sum() / step_tokens
        else:  # dapo: items = completion tokens of the whole step, every process
            loss = (per_token_loss * mask).sum() / num_items_in_batch
        policy_loss = loss.detach()

        if args.single_step_decomposition:
            per_token_rkl = single_step_reverse_kl(student, teacher, args.kd_temperature)  # (B, C)
            loss = loss + (per_token_rkl * mask).sum() / step_tokens  # a token mean over the step
            divergence = masked_mean(per_token_rkl.detach(), mask)
        else:  # the sampled-token estimate of the reverse KL when the exact one is not computed
            divergence = masked_mean((student_kd_logps - teacher_logps).detach(), mask)

        is_low = (coef_1 < 1 - eps_low) & (advantages < 0)
        is_high = (coef_1 > 1 + eps_high) & (advantages > 0)
        metrics = {
            "entropy": masked_mean(entropies.detach(), mask),
            "teacher_entropy": masked_mean(teacher_scores.entropy.detach().to(mask.dtype), mask),
            "reverse_kl": divergence,
            "rkl_reward": masked_mean((teacher_logps - student_kd_logps).detach(), mask),
            "policy_loss": policy_loss * batch.get("share_divisor", torch.ones(())).to(policy_loss.device),
            "clip_ratio/low_mean": masked_mean(is_low.expand_as(mask).float(), mask),
            "clip_ratio/high_mean": masked_mean(is_high.expand_as(mask).float(), mask),
            "clip_ratio/region_mean": masked_mean((is_low | is_high).expand_as(mask).float(), mask),
        }
        if self.aux_loss_enabled and getattr(outputs, "aux_loss", None) is not None:
            share = batch.get("share_divisor", torch.ones(()))
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss / share.to(outputs.aux_loss.device)
            metrics["aux_loss"] = outputs.aux_loss.detach().float()
        if "rollout_metric_values" in batch:
            metrics.update(zip(batch["rollout_metric_names"], batch["rollout_metric_values"]))
        return loss, metrics

    def on_step_end(self, model, state) -> None:
        self.engine.update_weights(model)  # the next rollout samples from the updated student

    # Copied from posttrain_grpo.trainer.GRPOTrainer.evaluate_batches
    def evaluate_batches(self, model, batches) -> dict[str, float]:
        """Return the eval loss and the rollout metrics of ``num_generations_eval`` samples per eval prompt (seeded by ``seed``).

        Each eval batch is rolled out, scored and given advantages within its groups (no
        cross-process statistics), then its loss is computed as in training (``posttrain.evaluate_online``).
        """
        return evaluate_online(model, batches, produce=lambda rows, seed: self._generate_and_score(rows, seed, mode="eval"),
                               compute_loss=self.compute_loss, count_items=self.count_items, loop=self.loop, seed=self.args.seed)

    def state_dict(self) -> dict:
        return {"policy_version": self.engine.policy_version}

    def load_state_dict(self, state: dict) -> None:
        self.engine.set_policy_version(int(state.get("policy_version", 0)))
