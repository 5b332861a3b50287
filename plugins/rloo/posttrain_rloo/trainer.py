"""RLOO on the posttrain loop (heavy: imports torch).

Built, like GRPO, on the core's online steps (plain public functions of ``posttrain``: policy loading, rewards,
rollouts, micro-batches, old / reference log-probs, metrics, the completions log); what remains is
RLOO's method logic. The few blocks still shared with ``posttrain_grpo.trainer`` are marked
``# Copied from posttrain_grpo.trainer.<name>`` (word for word, GRPO -> RLOO names) and
tests/test_copied_blocks.py diffs them. One optimizer step, in order (the producer's ``_produce``
then ``compute_loss`` per micro-batch)::

    prompts (P = per_device_train_batch_size * gradient_accumulation_steps / num_generations)
      -> rollout: num_generations completions per prompt (RolloutEngine, seeded by the step)
      -> reward: every reward function on every completion            (N, F), N = P * G
      -> old / reference log-probs (no-grad forwards, only when needed)
      -> reward - beta * sum_t (log pi_old - log pi_ref)   (k1 KL penalty in the reward, per sequence)
      -> advantage: leave-one-out baseline A_i = r_i - mean_{j != i} r_j  (N,)
      -> gradient_accumulation_steps micro-batches of per_device_train_batch_size completions
      -> loss per micro-batch: sequence-level clipped ratio, normalized over the whole step

Features and their flags (field names follow TRL 1.16's RLOOConfig): ``num_generations`` (default
2), ``beta`` (KL penalty in the reward, default 0.05; reference = frozen copy of the initial policy
or the adapter-disabled PEFT model; ``sync_ref_model`` moves it towards the policy), ``epsilon`` /
``epsilon_high`` (clipping of the sequence ratio exp(sum_t log pi - log pi_old)), ``num_iterations``
(rollout reuse with old log-probs from generation time), ``normalize_advantages`` (REINFORCE++),
``reward_clip_range``, ``reward_weights``, ``mask_truncated_completions``, a MoE model's router
load-balancing loss (``router_aux_loss_coef``). Beyond TRL's RLOO: tool calling and environments
(``tools=`` / ``environment_factory=``, GRPO's contract): multi-turn episodes from the core's
``ToolCallingRollout``; the loss, the KL penalty and the importance ratios cover the model-written
tokens only (``tool_mask``). Vision-language models as in TRL's RLOO (``image`` / ``images`` columns, the
processor as ``processing_class``): GRPO's blocks, the images conditioning generation and every forward
(``extras["model_inputs"]``). Departures from TRL: docs/methods/rloo.md.
"""

from __future__ import annotations

import logging
import math

import torch

from posttrain import (  # the loop and the core's online steps (the online scaffold, plugin API 1.5)
    CompletionLog, ConfigError, DataError, ProduceRequest, RolloutBatch, RolloutProducer, TrainerSurface, TrainingLoop, add_old_and_ref_logps, as_config,
    attach_rollout_metrics, build_reference_model, build_rollout_engine, check_online_arguments, check_sync_ref_model, completion_logps,
    default_output_dir, evaluate_online, gather_across_processes, generate_rollout, load_online_policy, nanstd,
    prepare_prompt_dataset, prompt_token_ids, resolve_online_rewards, reward_and_length_metrics, rollout_micro_batches, router_aux_loss_settings,
    sampler_is_old_policy, sampling_from_config, score_rollout, slice_rollout, sync_reference_model, SamplingParams, ToolCallingRollout,
)
from posttrain import (  # vision-language models (plugin API 1.9)
    check_vision_model, image_column, is_processor, prepare_multimodal_messages, processor_tokenizer, row_images, vision_prompt_inputs,
)

from posttrain_rloo.config import RLOOConfig

__all__ = ["RLOOTrainer", "compute_rloo_advantages", "nanstd", "importance_sampling_ratio", "informative_groups", "concat_rollouts"]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- math (pure functions; nanstd is the core's)
def compute_rloo_advantages(
    rewards_per_func: torch.Tensor, reward_weights: torch.Tensor, num_generations: int, normalize_advantages: bool,
    reward_clip_range: tuple[float, float] | None = None, kl: torch.Tensor | None = None, beta: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(advantages (N,), is_std_zero (N/G,))`` with a leave-one-out baseline per group.

    Args:
        rewards_per_func: ``(N, F)`` rewards, NaN where a function returned None.
        reward_weights: ``(F,)`` weights.
        num_generations: Group size G (groups are consecutive rows).
        normalize_advantages: Standardize the advantages over the batch (REINFORCE++).
        reward_clip_range: ``(low, high)`` clamp of the weighted reward, or None.
        kl: ``(N,)`` per-sequence KL estimate sum_t (log pi_old - log pi_ref), or None.
        beta: KL penalty coefficient (reward -= beta * kl).

    Returns:
        Advantages (0 for unscorable completions and for groups with a single scorable one) and,
        per group, whether the rewards' std is zero (for ``frac_reward_zero_std``).
    """
    unscorable = torch.isnan(rewards_per_func).all(dim=1)  # (N,)
    rewards = (rewards_per_func * reward_weights.unsqueeze(0)).nansum(dim=1)  # (N,)
    rewards[unscorable] = torch.nan  # keep unscorable rows out of the baseline
    if reward_clip_range:
        rewards = rewards.clamp(min=reward_clip_range[0], max=reward_clip_range[1])
    if kl is not None and beta != 0.0:
        rewards = rewards - beta * kl
    grouped = rewards.view(-1, num_generations)  # (N/G, G)
    std = nanstd(grouped, dim=1)  # (N/G,)
    scorable = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)  # (N/G, 1)
    baselines = (torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (scorable - 1)  # (N/G, G): mean of the others
    advantages = rewards - baselines.view(-1)  # (N,)
    if normalize_advantages:
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + 1e-4)
    is_std_zero = torch.isclose(std, torch.zeros_like(std))
    return torch.nan_to_num(advantages, nan=0.0), is_std_zero


# Copied from posttrain_grpo.trainer.informative_groups
def informative_groups(rewards_per_func: torch.Tensor, reward_weights: torch.Tensor, num_generations: int) -> torch.Tensor:
    """Return DAPO's filter ``(N/G,)``: True for a group whose weighted rewards are not all equal (it carries a learning signal).

    The weighted reward of a completion is ``sum_f w_f r_f`` over the functions that scored it; a
    completion no function scored is left out, and a group with fewer than two scored completions
    carries no signal.
    """
    unscorable = torch.isnan(rewards_per_func).all(dim=1)  # (N,)
    rewards = (rewards_per_func * reward_weights.unsqueeze(0)).nansum(dim=1)  # (N,)
    rewards[unscorable] = torch.nan
    std = nanstd(rewards.view(-1, num_generations), dim=1)  # (N/G,), NaN with < 2 scored
    return ~(torch.isnan(std) | torch.isclose(std, torch.zeros_like(std)))


# Copied from posttrain_grpo.trainer._concat_extras
def _concat_extras(values: list, sizes: list[int]):
    """Join the ``extras`` values of several rollouts: per-completion lists are concatenated, dicts key by key, anything else is the first's."""
    first = values[0]
    if isinstance(first, dict) and all(isinstance(v, dict) for v in values):
        return {k: _concat_extras([v.get(k) for v in values], sizes) for k in first}
    if all(isinstance(v, (list, tuple)) and len(v) == n for v, n in zip(values, sizes)):
        return [x for v in values for x in v]
    return first


# Copied from posttrain_grpo.trainer.concat_rollouts
def concat_rollouts(parts: list[RolloutBatch]) -> RolloutBatch:
    """Return the completions of ``parts`` one after the other (the inverse of ``posttrain.slice_rollout``).

    Per-completion ``extras`` lists are concatenated; the batch's ``policy_version`` is the oldest part's.
    """
    sizes = [len(p) for p in parts]
    return RolloutBatch([x for p in parts for x in p.prompt_ids], [x for p in parts for x in p.completion_ids],
                        [x for p in parts for x in p.logprobs], [x for p in parts for x in p.truncated],
                        min(p.policy_version for p in parts), extras=_concat_extras([p.extras for p in parts], sizes),
                        policy_versions=[v for p in parts for v in p.policy_versions])


# Copied from posttrain_grpo.trainer.importance_sampling_ratio
def importance_sampling_ratio(
    old_per_token_logps: torch.Tensor, sampling_per_token_logps: torch.Tensor, mask: torch.Tensor, mode: str, clip_min: float | None, clip_max: float | None
) -> torch.Tensor:
    """Return the trainer/sampler IS weight: ``(B, C)`` for token modes, ``(B, 1)`` for sequence modes.

    ``*_truncate`` clamps the ratio to ``[clip_min, clip_max]``; ``*_mask`` zeroes it outside.
    """
    diff = torch.nan_to_num((old_per_token_logps - sampling_per_token_logps) * mask, nan=0.0)  # (B, C)
    if mode.startswith("sequence"):
        diff = diff.sum(dim=-1, keepdim=True)  # (B, 1)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    lo = clip_min if clip_min is not None else -math.inf
    hi = clip_max if clip_max is not None else math.inf
    return ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)


# Copied from posttrain_grpo.trainer.per_token_logps_and_entropies
def per_token_logps_and_entropies(model, batch: dict, temperature: float, compute_entropy: bool = True, chunk_size: int | None = None):
    """Return ``(logps (B, C), entropies (B, C) or None)`` of the completion tokens at ``temperature`` (``posttrain.completion_logps``)."""
    logps, entropies, _ = completion_logps(model, batch, temperature, compute_entropy=compute_entropy, chunk_size=chunk_size)
    return logps, entropies


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


# Copied from posttrain_grpo.trainer.masked_mean
def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ``mask``; a ``(B, 1)`` per-sequence ``x`` is averaged over sequences."""
    if x.shape[1] == 1:
        return x.float().mean()
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def _trained_mask(batch: dict) -> torch.Tensor:
    """``(B, C)`` float mask of the tokens the loss, the KL penalty and the importance ratios cover.

    ``completion_mask`` times ``tool_mask`` (1 at model-written tokens, 0 at inserted tool /
    environment tokens) when the batch comes from tool-calling episodes. The attention mask stays
    the full ``completion_mask``: inserted tokens are read by the model, never trained on.
    """
    mask = batch["completion_mask"].float()
    if "tool_mask" in batch:
        mask = mask * batch["tool_mask"].to(mask.device)
    return mask


# ----------------------------------------------------------------------------- trainer
class RLOOTrainer(TrainerSurface):
    """Train a causal LM with RLOO (REINFORCE Leave-One-Out) or REINFORCE++ (``normalize_advantages``); TRL 1.16's ``RLOOTrainer`` API.

    Args:
        model: A model object or Hub id / local directory (default ``args.model_name_or_path``).
        reward_funcs: A callable, a name ('accuracy', 'module:function', a reward-model path), a
            ``PreTrainedModel`` reward model, or a list of these (default ``args.reward_funcs``).
        args: A :class:`RLOOConfig`, a ``transformers.TrainingArguments`` or a dict of fields.
        train_dataset: Prompt-only rows (``datasets.Dataset`` / ``IterableDataset`` / list of dicts): a
            ``prompt`` column (or pre-tokenized ``prompt_ids``) plus any columns for the rewards. An
            ``IterableDataset`` is materialized once (``max_steps`` steps' worth when ``max_steps > 0``).
            With a vision-language model, an ``images`` (list) or ``image`` column (PIL images, paths,
            bytes) conditions each prompt (TRL's format). May be omitted with a single ``environment_factory`` whose ``reset()`` writes each task
            (empty user prompts, ``max_steps`` steps).
        eval_dataset: Same format, or a dict of them (metrics ``eval_<name>_<metric>``).
        processing_class: The tokenizer, or a vision-language model's processor (``AutoProcessor``; its
            tokenizer pads, decodes and stops generation) (default: loaded with the model).
        reward_processing_classes: Tokenizers of the reward models (one per reward function, None for
            plain functions; a single one for a single reward function).
        callbacks: ``transformers.TrainerCallback`` objects (or classes).
        optimizers: Only ``(None, None)``: the loop builds the optimizer and schedule from ``args``.
        quantization_config: A ``BitsAndBytesConfig`` for a model given by name.
        peft_config: A ``peft.PeftConfig``; with ``beta > 0`` the reference is the adapter-disabled model.
        rollout_engine: A ``posttrain.RolloutEngine`` (default: one on ``args.rollout_backend``).
        allow_experimental: Unused for a stable method; kept for a uniform signature.
        tools: (posttrain; TRL's RLOOTrainer has none, GRPO's contract) Tool functions (sync or
            ``async def``, with type hints and a Google-style docstring): the policy may call them;
            their results are inserted as tokens and it writes on, up to ``max_tool_calling_iterations``
            rounds (``posttrain.ToolCallingRollout``). Needs conversational prompts and a chat
            template that renders tools.
        environment_factory: (posttrain) An environment class (instantiated without arguments,
            pooled), or a dict of them selected per row by an ``environment`` column:
            ``reset(**row)`` starts each episode (a returned string is appended to the prompt), its
            other public methods are tools, an optional ``get_reward()`` is a reward (then
            ``reward_funcs`` may be omitted); reward functions receive ``environments=``.

    Raises:
        posttrain.ConfigError: no reward functions (nor an environment with ``get_reward``) or dataset,
            mismatched ``reward_weights`` / ``reward_processing_classes``, a dataset without ``prompt``,
            a tool without a usable schema, an environment without ``reset``, images with ``tools=`` /
            ``environment_factory=``, or an argument that cannot be honoured.
        posttrain.DataError: an image column for a text-only model; a missing or unreadable image, or
            images that do not match the prompt's placeholders (the message names the row).
    """

    _tag_names = ["trl", "rloo"]

    def __init__(self, model=None, reward_funcs=None, args: RLOOConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, reward_processing_classes=None, callbacks=None, optimizers=(None, None), quantization_config=None,
                 peft_config=None, rollout_engine=None, allow_experimental=False, tools=None, environment_factory=None):
        self.args = args = as_config(args, RLOOConfig, default_output_dir=default_output_dir(model, "RLOO"))
        if train_dataset is None and environment_factory is not None:
            train_dataset = self._placeholder_prompts(args, environment_factory)
        elif environment_factory is not None:
            train_dataset = self._with_default_prompts(train_dataset)
        check_online_arguments("RLOO", train_dataset=train_dataset, optimizers=optimizers,
                               reward_funcs=(reward_funcs or args.reward_funcs) if environment_factory is None else True)  # an environment's get_reward is checked later
        self.loop = TrainingLoop(args, method="rloo", allow_experimental=allow_experimental, callbacks=callbacks)
        self._setup_model(model, processing_class, peft_config, quantization_config)
        self.tool_rollout = self._setup_tools(tools, environment_factory)
        self.tools = self.tool_rollout.all_tools() if self.tool_rollout is not None else []  # TRL's: tools= plus the environments' methods
        if reward_funcs or args.reward_funcs or environment_factory is None:
            self._setup_rewards(reward_funcs, reward_processing_classes)
        else:  # an environment's get_reward() is the only reward
            self.reward_funcs, self.reward_func_names, self.reward_weights, self.reward_processing_classes = [], [], torch.zeros(0), []
        self._add_environment_rewards()
        self.ref_model = build_reference_model(self.model, None, loop=self.loop, model_init_kwargs=args.model_init_kwargs,
                                               disable_dropout_in_ref=args.disable_dropout, needed=args.beta != 0.0)
        check_sync_ref_model(args, self.ref_model)
        self._setup_datasets(train_dataset, eval_dataset)
        self.loop.setup(self.model, method=self)
        self.rollout_func = None  # TRL's RLOOTrainer takes no rollout_func: the engine generates
        self.engine = rollout_engine or build_rollout_engine(args, model=self.model, tokenizer=self._tokenizer, accelerator=self.loop.accelerator)
        # the transformers backend samples from the trained model itself: old log-probs equal the current ones
        self.engine_is_policy = self.engine.samples_from_policy
        # the prompts and rollouts of every step: the loop consumes the producer's steps; its state is checkpointed per process
        self.producer = RolloutProducer(self.loop.prompt_source(len(self.train_dataset), self._prompts_per_step()), self.train_dataset,
                                        self._produce, reuse=self.args.num_iterations)
        self._sampling = sampling_from_config(args)  # SamplingParams keywords (generation_kwargs applied; unknown keys warn)
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

    # Copied from posttrain_grpo.trainer.GRPOTrainer._placeholder_prompts
    @staticmethod
    def _placeholder_prompts(args, environment_factory) -> list[dict]:
        """Without a ``train_dataset`` the environment writes the task in ``reset()`` (TRL 1.16): one step's rows of empty user prompts, cycled ``max_steps`` steps."""
        if isinstance(environment_factory, dict):
            raise ConfigError("A dict environment_factory (several environments) requires a `train_dataset` with an 'environment' column "
                              "routing each row; pass one, or a single environment class.")
        if args.max_steps <= 0:
            raise ConfigError("Without a train_dataset (the environment writes each prompt in reset()), set max_steps > 0: it is the training length.")
        rows = args.per_device_train_batch_size * args.gradient_accumulation_steps // args.num_generations
        return [{"prompt": [{"role": "user", "content": ""}]} for _ in range(max(1, rows))]

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

    # Copied from posttrain_grpo.trainer.GRPOTrainer._setup_rewards
    def _setup_rewards(self, reward_funcs, reward_processing_classes) -> None:
        """Resolve the reward functions (TRL's ``reward_funcs`` / ``reward_func_names`` / ``reward_weights`` / ``reward_processing_classes``)."""
        rewards = resolve_online_rewards(reward_funcs, self.args, loop=self.loop, reward_processing_classes=reward_processing_classes)
        self.reward_funcs, self.reward_func_names, self.reward_weights = rewards.funcs, rewards.names, rewards.weights  # weights (F,)
        self.reward_processing_classes = rewards.processing_classes

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
    # Copied from posttrain_grpo.trainer.GRPOTrainer.process_dataset
    def process_dataset(self, dataset, name: str):
        """Return ``dataset`` as prompt rows (``posttrain.prepare_prompt_dataset``); a streamed ``train_dataset`` keeps the rows ``max_steps`` draw."""
        limit = None
        if name == "train_dataset" and self.args.max_steps > 0:
            limit = self.args.max_steps * self._prompts_per_step() * self.loop.accelerator.num_processes
        dataset = prepare_prompt_dataset(dataset, name, method="RLOO", prompt_ids=lambda row: self._prompt_ids(row, where=f"{name} row 0"), limit=limit)
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
        return batch["completion_ids"].shape[0]  # RLOO's loss is a mean over sequences

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
        # 1. rollout: G completions per prompt, grouped prompt0 x G, prompt1 x G, ...
        # 2. reward: (N, F), NaN where a function returned None
        if mode == "train" and args.dynamic_sampling:  # DAPO: only groups with a learning signal, more prompts from the source
            rows, prompts, rollout, rewards_per_func, sampling_metrics = self._dynamic_sampling(rows, seed, num_generations, indices)
        else:
            prompts, rollout, rewards_per_func = self._rollout_and_rewards(rows, seed, num_generations, self._row_names(rows, indices, mode))
            sampling_metrics = {}

        # 3. micro-batches of per_device_train_batch_size completions (one in eval), with old / reference log-probs
        size = args.per_device_train_batch_size if mode == "train" else len(rollout)
        micro_batches = [self._with_logps(batch, mode) for batch in rollout_micro_batches(
            rollout, size, self.pad_token_id, pad_to_multiple_of=args.pad_to_multiple_of, mask_truncated=args.mask_truncated_completions)]

        # 4. advantage: (N,) from the global batch (this process's in eval), sliced into the micro-batches; the k1 KL penalty goes into the reward
        kl = None
        if args.beta != 0.0:  # sum_t (log pi_old - log pi_ref) per sequence; may be negative (k1, Ahmadian et al. 2024)
            kl = torch.cat([((b["old_per_token_logps"] - b["ref_per_token_logps"]) * _trained_mask(b)).sum(-1) for b in micro_batches])  # (N,)
        kl_or_zeros = kl if kl is not None else torch.zeros(len(rollout))
        if mode == "train":
            (all_rewards, all_kl), local = gather_across_processes(self.loop.accelerator, rewards_per_func, kl_or_zeros)
        else:
            all_rewards, all_kl, local = rewards_per_func, kl_or_zeros, slice(0, len(rollout))
        advantages, is_std_zero = compute_rloo_advantages(
            all_rewards, self.reward_weights, num_generations, args.normalize_advantages, args.reward_clip_range,
            all_kl if kl is not None else None, args.beta,
        )
        advantages, is_std_zero = advantages[local], is_std_zero[local.start // num_generations : local.stop // num_generations]  # (N,), (N/G,)
        world = self.loop.accelerator.num_processes if mode == "train" else 1
        for start, batch in zip(range(0, len(rollout), size), micro_batches):
            batch["advantages"] = advantages[start : start + size]  # (b,)
            # a micro-batch's share of a per-step mean is its mean / (micro-batches x processes): the loop sums the shares
            batch["share_divisor"] = torch.tensor(float(len(micro_batches) * world))

        # 5. metrics of the rollout (the loss returns them with its own); the completion log keeps training rollouts only
        metrics = {**reward_and_length_metrics(rollout, rewards_per_func, self.reward_weights, self.reward_func_names, is_std_zero, num_generations),
                   **self._completion_log.pop_metrics(), **self._importance_sampling_metrics(micro_batches), **sampling_metrics}
        if args.beta != 0.0:  # mean per-token k1 KL of the rollout (the penalty's estimate)
            kl_sum = sum(((b["old_per_token_logps"] - b["ref_per_token_logps"]) * _trained_mask(b)).sum() for b in micro_batches)
            metrics["kl"] = float(kl_sum) / max(1, sum(b["num_completion_tokens"] for b in micro_batches))
        attach_rollout_metrics(micro_batches, metrics)
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

    # Copied from posttrain_grpo.trainer.GRPOTrainer._dynamic_sampling
    def _dynamic_sampling(self, rows: list[dict], seed: int, num_generations: int, indices: list[int] | None = None) -> tuple[list, list, RolloutBatch, torch.Tensor, dict]:
        """DAPO's dynamic sampling: keep the groups with a learning signal, drawing more prompts until ``len(rows)`` groups are kept.

        Round 0 generates ``rows`` (with the step's seed, as without the option); every further
        round takes the prompt source's next prompts (so the source's checkpointed position makes a
        resumed run draw the same ones) with a seed derived from the step's and the round. Every
        process runs the same number of rounds (until all are full, or ``max_num_gen_batches``
        rounds; 0 = one epoch of prompts); a process still short then fills its step with its first
        dropped groups, whose advantages are zero.

        Returns:
            ``(rows, prompts, rollout, rewards_per_func, metrics)`` of the kept groups, in generation order.
        """
        args, accelerator = self.args, self.loop.accelerator
        source = self.producer.source
        want = len(rows)
        cap = args.max_num_gen_batches or max(1, source.steps_per_epoch)
        kept, dropped, generated, rounds = [], [], 0, 0
        batch_rows = rows
        while True:
            round_seed = seed if rounds == 0 else seed + 1_000_000_007 * rounds
            prompts, rollout, rewards_per_func = self._rollout_and_rewards(batch_rows, round_seed, num_generations, self._row_names(batch_rows, indices))
            signal = informative_groups(rewards_per_func, self.reward_weights, num_generations).tolist()  # (P,)
            for g, row in enumerate(batch_rows):
                part = slice(g * num_generations, (g + 1) * num_generations)
                (kept if signal[g] else dropped).append((row, prompts[part], slice_rollout(rollout, part), rewards_per_func[part]))
            rounds, generated = rounds + 1, generated + len(batch_rows)
            full = torch.tensor([float(len(kept) >= want)])
            if accelerator.num_processes > 1:  # collective generation and gathers need the same rounds everywhere
                (full,), _ = gather_across_processes(accelerator, full)
            if bool(full.min() > 0) or rounds >= cap:
                break
            _, indices = source.next_indices()
            batch_rows = [dict(self.train_dataset[i]) for i in indices]
        chosen = kept[:want]
        filled = want - len(chosen)
        chosen += dropped[:filled]
        metrics = {"dynamic_sampling/num_gen_batches": float(rounds), "dynamic_sampling/kept_fraction": len(kept) / generated,
                   "dynamic_sampling/filled_groups": float(filled)}
        return ([c[0] for c in chosen], [p for c in chosen for p in c[1]], concat_rollouts([c[2] for c in chosen]),
                torch.cat([c[3] for c in chosen]), metrics)

    def _with_logps(self, batch: dict, mode: str) -> dict:
        """Add a micro-batch's no-grad log-probs: pi_old (the ratio's denominator and the KL penalty's sample) and the reference's.

        When another engine sampled and ``vllm_importance_sampling_correction`` is on, also the
        trainer/sampler IS weight (GRPO's option; TRL's RLOO has none).
        """
        args = self.args
        sampling_logps = batch.pop("sampling_logprobs")  # (b, C)
        need_old = (mode == "train" and args.num_iterations > 1) or not self.engine_is_policy or args.beta != 0.0  # the KL penalty needs pi_old
        add_old_and_ref_logps(batch, sampling_logps, model=self.model, temperature=args.temperature, need_old=need_old, need_ref=args.beta != 0.0,
                              ref_model=self.ref_model, old_from_sampler=sampler_is_old_policy(self._sampling, args.temperature, self.engine_is_policy),
                              device=self.loop.device, accelerator=self.loop.accelerator, chunk_size=args.logprob_chunk_size)
        if args.vllm_importance_sampling_correction and not self.engine_is_policy:
            batch["importance_sampling_ratio"] = importance_sampling_ratio(
                batch["old_per_token_logps"], sampling_logps, _trained_mask(batch), args.vllm_importance_sampling_mode,
                args.vllm_importance_sampling_clip_min, args.vllm_importance_sampling_clip_max,
            )
        return batch

    # Copied from posttrain_grpo.trainer.GRPOTrainer._importance_sampling_metrics
    @staticmethod
    def _importance_sampling_metrics(micro_batches: list[dict]) -> dict:
        """``sampling/importance_sampling_ratio/{mean,min,max}`` over the rollout's completion tokens (when a correction applies)."""
        if "importance_sampling_ratio" not in micro_batches[0]:
            return {}
        ratios = []
        for b in micro_batches:
            r = b["importance_sampling_ratio"]
            trained = b["completion_mask"] * b["tool_mask"] if "tool_mask" in b else b["completion_mask"]  # tool tokens have no ratio
            ratios.append(r.flatten() if r.shape[1] == 1 else r[trained.bool()])
        flat = torch.cat(ratios)
        return {f"sampling/importance_sampling_ratio/{k}": getattr(flat, k)().item() for k in ("mean", "min", "max")} if flat.numel() else {}

    def compute_loss(self, model, batch: dict, num_items_in_batch):
        """Return the micro-batch's share of the step loss and its metrics (no host syncs)."""
        args = self.args
        mask = _trained_mask(batch)  # (B, C): completion tokens the model wrote (tool / environment tokens: attended to, never trained on)
        per_token_logps, entropies, aux_loss = completion_logps(model, batch, args.temperature, router_aux_loss=self.aux_loss_enabled, chunk_size=args.logprob_chunk_size)  # (B, C), (B, C)
        advantages = batch["advantages"]  # (B,)
        # with one iteration on the trained model's own samples, old == current (detached): no extra forward
        old_per_token_logps = batch.get("old_per_token_logps", per_token_logps.detach())  # (B, C)

        is_ratio = batch.get("importance_sampling_ratio")  # (B, C) / (B, 1) / None
        if is_ratio is not None and is_ratio.shape[1] > 1:  # token modes: weight each token's gradient, keep the value
            per_token_logps = per_token_logps.detach() + is_ratio * (per_token_logps - per_token_logps.detach())
        logps = (per_token_logps * mask).sum(-1)  # (B,) sequence log-prob
        old_logps = (old_per_token_logps * mask).sum(-1)  # (B,)
        coef_1 = torch.exp(logps - old_logps)  # (B,) sequence-level ratio
        eps_low, eps_high = args.epsilon, args.epsilon_high if args.epsilon_high is not None else args.epsilon
        coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        per_sequence_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)  # (B,)
        if is_ratio is not None and is_ratio.shape[1] == 1:  # sequence modes: weight the sequence's loss
            per_sequence_loss = per_sequence_loss * is_ratio.squeeze(1)

        # aggregate: the micro-batch's SUM of per-sequence losses / sequences in the whole step
        loss = per_sequence_loss.sum() / num_items_in_batch

        is_low = (coef_1 < 1 - eps_low) & (advantages < 0)
        is_high = (coef_1 > 1 + eps_high) & (advantages > 0)
        metrics = {
            "entropy": masked_mean(entropies, mask),
            "clip_ratio/low_mean": is_low.float().mean(),
            "clip_ratio/high_mean": is_high.float().mean(),
            "clip_ratio/region_mean": (is_low | is_high).float().mean(),
        }
        if self.aux_loss_enabled and aux_loss is not None:
            share = batch.get("share_divisor", torch.ones(()))
            loss = loss + self.router_aux_loss_coef * aux_loss / share.to(aux_loss.device)
            metrics["aux_loss"] = aux_loss.detach().float()
        if "rollout_metric_values" in batch:
            metrics.update(zip(batch["rollout_metric_names"], batch["rollout_metric_values"]))
        return loss, metrics

    def on_step_end(self, model, state) -> None:
        self.engine.update_weights(model)  # the next rollout samples from the updated policy
        self._sync_ref_model(model, state)

    # Copied from posttrain_grpo.trainer.GRPOTrainer._sync_ref_model
    @torch.no_grad()
    def _sync_ref_model(self, model, state) -> None:
        """TR-DPO: every ``ref_model_sync_steps`` steps, ref = alpha * policy + (1 - alpha) * ref."""
        args = self.args
        if not args.sync_ref_model or self.ref_model is None or state.global_step % args.ref_model_sync_steps != 0:
            return
        sync_reference_model(self.ref_model, model, args.ref_model_mixup_alpha, accelerator=self.loop.accelerator)

    # Copied from posttrain_grpo.trainer.GRPOTrainer.evaluate_batches
    def evaluate_batches(self, model, batches) -> dict[str, float]:
        """Return the eval loss and the rollout metrics of ``num_generations_eval`` samples per eval prompt (seeded by ``seed``).

        Each eval batch is rolled out, scored and given advantages within its groups (no
        cross-process statistics), then its loss is computed as in training (``posttrain.evaluate_online``).
        """
        return evaluate_online(model, batches, produce=lambda rows, seed: self._generate_and_score(rows, seed, mode="eval"),
                               compute_loss=self.compute_loss, count_items=self.count_items, loop=self.loop, seed=self.args.seed)

    def state_dict(self) -> dict:
        state = {"policy_version": self.engine.policy_version}
        if self.args.sync_ref_model and self.ref_model is not None:  # the reference moves: resume needs it
            state["ref_model"] = {k: v.detach().cpu() for k, v in self.ref_model.state_dict().items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.engine.set_policy_version(int(state.get("policy_version", 0)))
        if "ref_model" in state and self.ref_model is not None:
            self.ref_model.load_state_dict(state["ref_model"])
