"""ReMax on the posttrain loop (heavy: imports torch).

Li, Xu, Zhang, Lin, Yu, Sun and Luo 2023, *ReMax: A Simple, Effective, and Efficient Reinforcement Learning
Method for Aligning Large Language Models*, arXiv:2310.10505. REINFORCE whose baseline for a sampled
completion ``y ~ pi(.|x)`` is the reward of the GREEDY completion ``y_bar = argmax pi(.|x)`` of the same
prompt (Algorithm 1)::

    grad = 1/N sum_i (r(x_i, y_i) - r(x_i, y_bar_i)) * sum_t grad log pi(y_i,t | x_i, y_i,<t)

Built on the core's online steps like RLOO (blocks identical to ``posttrain_rloo.trainer`` are marked
``# Copied from`` and diffed by tests/test_copied_blocks.py). One optimizer step, in order (the
producer's ``_produce`` then ``compute_loss`` per micro-batch)::

    prompts (P = per_device_train_batch_size * gradient_accumulation_steps / num_generations)
      -> rollout: num_generations sampled completions per prompt (RolloutEngine, seeded by the step)
      -> greedy rollout: one argmax completion per prompt (the same engine, temperature 0)
      -> reward: every reward function on every sampled and every greedy completion   (N, F), (P, F)
      -> old / reference log-probs of the sampled completions (no-grad, only when needed)
      -> r_i - beta * sum_t (log pi_old - log pi_ref)   (k1 KL penalty in the sampled reward)
      -> advantage A_i = r_i - r(greedy of i's prompt)   (N,)
      -> loss per micro-batch: -A_i * exp(sum_t log pi - log pi_old) (clipped when reused), summed / N

With ``num_iterations=1`` on the policy's own samples the ratio is exp(0) = 1 with gradient
``grad sum_t log pi``: exactly the paper's REINFORCE estimator. Vision-language models as RLOO's
(``image`` / ``images`` columns, the processor as ``processing_class``): each prompt is encoded with its
images once; the sampled and the greedy completions are generated conditioned on them and every forward
gets them (``extras["model_inputs"]``). Departures: docs/methods/remax.md.
"""

from __future__ import annotations

import logging

import torch

from posttrain import (  # the loop and the core's online steps
    CompletionLog, ConfigError, DataError, ProduceRequest, RolloutBatch, RolloutProducer, TrainerSurface, TrainingLoop, add_old_and_ref_logps, as_config,
    attach_rollout_metrics, build_reference_model, build_rollout_engine, check_online_arguments, check_sync_ref_model, completion_logps,
    default_output_dir, evaluate_online, generate_rollout, load_online_policy, prepare_prompt_dataset, prompt_token_ids,
    resolve_online_rewards, reward_and_length_metrics, rollout_micro_batches, router_aux_loss_settings, sampler_is_old_policy,
    sampling_from_config, score_rollout, sync_reference_model, SamplingParams,
)
from posttrain import (  # vision-language models (plugin API 1.9)
    check_vision_model, image_column, is_processor, prepare_multimodal_messages, processor_tokenizer, row_images, vision_prompt_inputs,
)

from posttrain_remax.config import ReMaxConfig

__all__ = ["ReMaxTrainer", "compute_remax_advantages"]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- math (pure functions)
def _weighted_reward(rewards_per_func: torch.Tensor, reward_weights: torch.Tensor, reward_clip_range) -> torch.Tensor:
    """``(M,)`` weighted reward, NaN where every function returned None, clamped to ``reward_clip_range``."""
    rewards = (rewards_per_func * reward_weights.unsqueeze(0)).nansum(dim=1)  # (M,)
    rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
    if reward_clip_range:
        rewards = rewards.clamp(min=reward_clip_range[0], max=reward_clip_range[1])  # NaN stays NaN
    return rewards


def compute_remax_advantages(
    rewards_per_func: torch.Tensor, greedy_rewards_per_func: torch.Tensor, reward_weights: torch.Tensor, num_generations: int,
    reward_clip_range: tuple[float, float] | None = None, kl: torch.Tensor | None = None, beta: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(advantages (N,), is_zero_signal (P,), greedy_rewards (P,))``: ReMax's greedy baseline.

    Args:
        rewards_per_func: ``(N, F)`` rewards of the sampled completions (``N = P * G``, groups are
            consecutive rows), NaN where a function returned None.
        greedy_rewards_per_func: ``(P, F)`` rewards of each prompt's greedy completion.
        reward_weights: ``(F,)`` weights.
        num_generations: G, sampled completions per prompt.
        reward_clip_range: ``(low, high)`` clamp of both weighted rewards, or None.
        kl: ``(N,)`` per-sequence KL estimate sum_t (log pi_old - log pi_ref) of the sampled completions, or None.
        beta: KL penalty coefficient (sampled reward -= beta * kl; the baseline carries none).

    Returns:
        Advantages ``r_i - beta * kl_i - r(greedy)`` (0 where the sampled or the greedy completion is
        unscorable); per prompt, whether every sampled completion got exactly the baseline (no
        learning signal, ``frac_reward_zero_std``); the greedy rewards (NaN where unscorable).
    """
    rewards = _weighted_reward(rewards_per_func, reward_weights, reward_clip_range)  # (N,)
    greedy = _weighted_reward(greedy_rewards_per_func, reward_weights, reward_clip_range)  # (P,)
    if kl is not None and beta != 0.0:
        rewards = rewards - beta * kl
    advantages = rewards - greedy.repeat_interleave(num_generations)  # (N,)
    advantages = torch.nan_to_num(advantages, nan=0.0)
    is_zero_signal = (advantages.view(-1, num_generations) == 0).all(dim=1)  # (P,)
    return advantages, is_zero_signal, greedy


# Copied from posttrain_rloo.trainer.prompt_with_images with RLOO->ReMax, rloo->remax
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


# Copied from posttrain_rloo.trainer.masked_mean
def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ``mask``; a ``(B, 1)`` per-sequence ``x`` is averaged over sequences."""
    if x.shape[1] == 1:
        return x.float().mean()
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


# ----------------------------------------------------------------------------- trainer
class ReMaxTrainer(TrainerSurface):
    """Train a causal LM with ReMax: REINFORCE with the greedy completion's reward as baseline (experimental).

    The constructor takes the arguments of posttrain's (and TRL 1.16's) ``RLOOTrainer``, so a run moves
    between the two by changing the class.

    Args:
        model: A model object or Hub id / local directory (default ``args.model_name_or_path``).
        reward_funcs: A callable, a name ('accuracy', 'module:function', a reward-model path), a
            ``PreTrainedModel`` reward model, or a list of these (default ``args.reward_funcs``).
        args: A :class:`ReMaxConfig`, a ``transformers.TrainingArguments`` or a dict of fields.
        train_dataset: Prompt-only rows: a ``prompt`` column (or ``prompt_ids``) plus any columns for the rewards;
            with a vision-language model, an ``images`` (list) or ``image`` column (TRL's format).
        eval_dataset: Same format, or a dict of them (metrics ``eval_<name>_<metric>``).
        processing_class: The tokenizer, or a vision-language model's processor (``AutoProcessor``) (default: loaded with the model).
        reward_processing_classes: Tokenizers of the reward models (one per reward function, None for plain functions).
        callbacks: ``transformers.TrainerCallback`` objects (or classes).
        optimizers: Only ``(None, None)``: the loop builds the optimizer and schedule from ``args``.
        quantization_config: A ``BitsAndBytesConfig`` for a model given by name.
        peft_config: A ``peft.PeftConfig``; with ``beta > 0`` the reference is the adapter-disabled model.
        rollout_engine: A ``posttrain.RolloutEngine`` (default: one on ``args.rollout_backend``); it
            generates both the sampled and the greedy completions.
        allow_experimental: Opt in to this experimental method (or ``posttrain.activate('remax', allow_experimental=True)``).

    Raises:
        posttrain.ConfigError: no reward functions or dataset, mismatched ``reward_weights``, a dataset
            without ``prompt``, images with a tokenizer (not a processor), or an argument that cannot be honoured.
        posttrain.DataError: an image column for a text-only model; a missing or unreadable image, or
            images that do not match the prompt's placeholders (the message names the row).
    """

    _tag_names = ["posttrain", "remax"]

    def __init__(self, model=None, reward_funcs=None, args: ReMaxConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, reward_processing_classes=None, callbacks=None, optimizers=(None, None), quantization_config=None,
                 peft_config=None, rollout_engine=None, allow_experimental=False):
        self.args = args = as_config(args, ReMaxConfig, default_output_dir=default_output_dir(model, "ReMax"))
        self.loop = TrainingLoop(args, method="remax", allow_experimental=allow_experimental, callbacks=callbacks)  # the maturity gate first
        check_online_arguments("ReMax", train_dataset=train_dataset, reward_funcs=reward_funcs or args.reward_funcs, optimizers=optimizers)
        self._setup_model(model, processing_class, peft_config, quantization_config)
        self._setup_rewards(reward_funcs, reward_processing_classes)
        self.ref_model = build_reference_model(self.model, None, loop=self.loop, model_init_kwargs=args.model_init_kwargs,
                                               disable_dropout_in_ref=args.disable_dropout, needed=args.beta != 0.0)
        check_sync_ref_model(args, self.ref_model)
        self.tool_rollout = None  # RLOO's shared blocks read it: ReMax has no tool-calling episodes
        self._setup_datasets(train_dataset, eval_dataset)
        self.loop.setup(self.model, method=self)
        self.rollout_func = None  # the engine generates (sampled and greedy)
        self.engine = rollout_engine or build_rollout_engine(args, model=self.model, tokenizer=self._tokenizer, accelerator=self.loop.accelerator)
        self.engine_is_policy = self.engine.samples_from_policy
        self.producer = RolloutProducer(self.loop.prompt_source(len(self.train_dataset), self._prompts_per_step()), self.train_dataset,
                                        self._produce, reuse=self.args.num_iterations)
        self._sampling = sampling_from_config(args)
        # the baseline: argmax decoding with the same length limit and repetition penalty (temperature 0 = greedy in SamplingParams)
        self._greedy_sampling = {**self._sampling, "temperature": 0.0}
        self._setup_logging()

    # -------------------------------------------------------------------------- setup (the core's online steps)
    # Copied from posttrain_rloo.trainer.RLOOTrainer._setup_model with RLOO->ReMax, rloo->remax
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

    # Copied from posttrain_rloo.trainer.RLOOTrainer._setup_rewards with RLOO->ReMax, rloo->remax
    def _setup_rewards(self, reward_funcs, reward_processing_classes) -> None:
        """Resolve the reward functions (TRL's ``reward_funcs`` / ``reward_func_names`` / ``reward_weights`` / ``reward_processing_classes``)."""
        rewards = resolve_online_rewards(reward_funcs, self.args, loop=self.loop, reward_processing_classes=reward_processing_classes)
        self.reward_funcs, self.reward_func_names, self.reward_weights = rewards.funcs, rewards.names, rewards.weights  # weights (F,)
        self.reward_processing_classes = rewards.processing_classes

    # Copied from posttrain_rloo.trainer.RLOOTrainer._setup_datasets with RLOO->ReMax, rloo->remax
    def _setup_datasets(self, train_dataset, eval_dataset) -> None:
        self.train_dataset = self.process_dataset(train_dataset, "train_dataset")
        if isinstance(eval_dataset, dict):
            self.eval_dataset = {key: self.process_dataset(part, f"eval_dataset[{key!r}]") for key, part in eval_dataset.items()}
        else:
            self.eval_dataset = self.process_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else None

    # Copied from posttrain_rloo.trainer.RLOOTrainer._setup_logging with RLOO->ReMax, rloo->remax
    def _setup_logging(self) -> None:
        """TRL's completion log (``_logs``; written at each training log with ``log_completions``)."""
        args = self.args
        self._completion_log = CompletionLog(args.per_device_train_batch_size * args.gradient_accumulation_steps)  # one rollout
        self._logs = self._completion_log.logs
        self.add_callback(self._completion_log.callback(args, self.loop))

    # -------------------------------------------------------------------------- data
    # Copied from posttrain_rloo.trainer.RLOOTrainer.process_dataset with RLOO->ReMax, rloo->remax
    def process_dataset(self, dataset, name: str):
        """Return ``dataset`` as prompt rows (``posttrain.prepare_prompt_dataset``); a streamed ``train_dataset`` keeps the rows ``max_steps`` draw."""
        limit = None
        if name == "train_dataset" and self.args.max_steps > 0:
            limit = self.args.max_steps * self._prompts_per_step() * self.loop.accelerator.num_processes
        dataset = prepare_prompt_dataset(dataset, name, method="ReMax", prompt_ids=lambda row: self._prompt_ids(row, where=f"{name} row 0"), limit=limit)
        columns = dataset.column_names if hasattr(dataset, "column_names") else list(dataset[0]) if len(dataset) else []
        if image_column(columns) is not None and self.tool_rollout is not None:
            raise ConfigError(f"{name} has an image column {image_column(columns)!r} and tools= / environment_factory= are set: tool-calling "
                              "episodes do not carry images yet; train on the images without tools, or drop the image column.")
        return dataset

    # Copied from posttrain_rloo.trainer.RLOOTrainer._prompt_ids with RLOO->ReMax, rloo->remax
    def _prompt_ids(self, row: dict, where: str = "the row") -> list[int]:
        """Token ids of a row's prompt: its ``prompt_ids`` as given, or the tokenized ``prompt`` (messages via the chat template)."""
        return self._encode_prompt(row, where)[0]

    # Copied from posttrain_rloo.trainer.RLOOTrainer._encode_prompt with RLOO->ReMax, rloo->remax
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

    # Copied from posttrain_rloo.trainer.RLOOTrainer._prompts_per_step with RLOO->ReMax, rloo->remax
    def _prompts_per_step(self) -> int:
        args = self.args
        return args.per_device_train_batch_size * args.gradient_accumulation_steps // args.num_generations

    @property
    def data_collator(self):
        """The collator of raw prompt rows: :meth:`collate`, which keeps them raw (the producer generates)."""
        return self.collate

    # -------------------------------------------------------------------------- loop protocol
    # Copied from posttrain_rloo.trainer.RLOOTrainer.collate with RLOO->ReMax, rloo->remax
    def collate(self, rows: list[dict]) -> dict:
        return {"rows": [dict(row) for row in rows]}  # prompts stay raw (the producer reads the dataset's rows itself)

    # Copied from posttrain_rloo.trainer.RLOOTrainer.count_items with RLOO->ReMax, rloo->remax
    def count_items(self, batch: dict) -> int:
        return batch["completion_ids"].shape[0]  # ReMax's loss is a mean over sequences

    # Copied from posttrain_rloo.trainer.RLOOTrainer._produce with RLOO->ReMax, rloo->remax
    def _produce(self, request: ProduceRequest) -> list[dict]:
        """The producer's callback: generate, score and split one step's rollouts (the producer reuses them ``num_iterations`` times)."""
        seed = self.args.seed + request.step + 1_000_003 * request.rank
        return self._generate_and_score(request.rows, seed, indices=request.indices)

    # Copied from posttrain_rloo.trainer.RLOOTrainer._generate with RLOO->ReMax, rloo->remax
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

    def _generate_greedy(self, prompts: list, prompt_ids: list[list[int]], seed: int, model_inputs: list[dict] | None = None) -> RolloutBatch:
        """Return one greedy (argmax) completion per prompt from the same engine as the samples (``temperature=0``; the seed only keeps the global RNG untouched).

        ``model_inputs`` (images: one dict per prompt) condition the greedy decoding as they do the samples.
        """
        if model_inputs is not None:
            return self.engine.generate(prompt_ids, SamplingParams(n=1, seed=seed, **self._greedy_sampling), model_inputs=model_inputs)
        return generate_rollout(prompts, prompt_ids, engine=self.engine, sampling=self._greedy_sampling, num_generations=1, seed=seed,
                                max_completion_length=self.args.max_completion_length,
                                stop_token_ids=(self._tokenizer.eos_token_id, self.pad_token_id))

    def _generate_and_score(self, rows: list[dict], seed: int, mode: str = "train", indices: list[int] | None = None) -> list[dict]:
        args = self.args
        num_generations = args.num_generations if mode == "train" else (args.num_generations_eval or args.num_generations)
        names = self._row_names(rows, indices, mode)  # what errors name for each row
        # 1. rollouts: G sampled completions per prompt (prompt0 x G, prompt1 x G, ...) and one greedy completion per prompt
        encoded = [self._encode_prompt(row, where) for row, where in zip(rows, names)]  # (ids, model inputs or None, images or None) per row
        prompt_ids = [ids for ids, _, _ in encoded for _ in range(num_generations)]  # (N,)
        prompts = [row["prompt"] if "prompt" in row else self._tokenizer.decode(ids, skip_special_tokens=True)
                   for row, (ids, _, _) in zip(rows, encoded) for _ in range(num_generations)]  # (N,) as posttrain.expand_prompts
        model_inputs, reward_prompts = None, prompts
        if any(inputs for _, inputs, _ in encoded):  # a vision-language batch: samples, greedy completions and forwards see the images
            model_inputs = [inputs for _, inputs, _ in encoded]  # one dict per distinct prompt
            reward_prompts = [prompt_with_images(prompt, images, where=where) if images else prompt for prompt, (_, _, images), where in
                              zip(prompts[::num_generations], encoded, names) for _ in range(num_generations)]  # (N,) as TRL's rewards see them
        rollout = self._generate(reward_prompts, prompt_ids, num_generations, seed, model_inputs)  # N = P * G completions
        greedy = self._generate_greedy(reward_prompts[::num_generations], prompt_ids[::num_generations], seed, model_inputs)  # P completions

        # 2. rewards: (N, F) and (P, F), NaN where a function returned None; only the samples go to the completion log
        score = dict(reward_funcs=self.reward_funcs, reward_func_names=self.reward_func_names, tokenizer=self._tokenizer, trainer_state=self.loop.state)
        rewards_per_func = score_rollout(rows, reward_prompts, rollout, num_generations, log=self._completion_log, **score)  # (N, F)
        greedy_rewards_per_func = score_rollout(rows, reward_prompts[::num_generations], greedy, 1, **score)  # (P, F)

        # 3. micro-batches of per_device_train_batch_size sampled completions (one in eval), with old / reference log-probs
        size = args.per_device_train_batch_size if mode == "train" else len(rollout)
        micro_batches = [self._with_logps(batch, mode) for batch in rollout_micro_batches(
            rollout, size, self.pad_token_id, pad_to_multiple_of=args.pad_to_multiple_of, mask_truncated=args.mask_truncated_completions)]

        # 4. advantage (N,): the baseline is per prompt, so no cross-process statistics are needed
        kl = None
        if args.beta != 0.0:  # sum_t (log pi_old - log pi_ref) per sampled sequence (k1; may be negative)
            kl = torch.cat([((b["old_per_token_logps"] - b["ref_per_token_logps"]) * b["completion_mask"]).sum(-1) for b in micro_batches])  # (N,)
        advantages, is_zero_signal, greedy_rewards = compute_remax_advantages(
            rewards_per_func, greedy_rewards_per_func, self.reward_weights, num_generations, args.reward_clip_range, kl, args.beta)
        world = self.loop.accelerator.num_processes if mode == "train" else 1
        for start, batch in zip(range(0, len(rollout), size), micro_batches):
            batch["advantages"] = advantages[start : start + size]  # (b,)
            batch["share_divisor"] = torch.tensor(float(len(micro_batches) * world))

        # 5. metrics of the rollout (the loss returns them with its own)
        metrics = {**reward_and_length_metrics(rollout, rewards_per_func, self.reward_weights, self.reward_func_names, is_zero_signal, num_generations),
                   **self._completion_log.pop_metrics()}
        greedy_lengths = torch.tensor([len(c) for c in greedy.completion_ids], dtype=torch.float32)
        metrics["greedy/reward"] = torch.nanmean(greedy_rewards).item()  # the baseline
        metrics["greedy/mean_length"] = greedy_lengths.mean().item()
        metrics["advantage_abs_mean"] = advantages.abs().mean().item()
        if args.beta != 0.0:  # mean per-token k1 KL of the sampled rollout (the penalty's estimate)
            kl_sum = sum(((b["old_per_token_logps"] - b["ref_per_token_logps"]) * b["completion_mask"]).sum() for b in micro_batches)
            metrics["kl"] = float(kl_sum) / max(1, sum(b["num_completion_tokens"] for b in micro_batches))
        attach_rollout_metrics(micro_batches, metrics)
        if mode == "train":
            completions = self._tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
            self._completion_log.record(prompts, completions, rewards_per_func, self.reward_func_names, advantages)
        else:
            self._completion_log.discard_extra()
        return micro_batches

    # Copied from posttrain_rloo.trainer.RLOOTrainer._row_names with RLOO->ReMax, rloo->remax
    @staticmethod
    def _row_names(rows: list[dict], indices: list[int] | None, mode: str = "train") -> list[str]:
        """What an error names for each row: ``train_dataset row <index>`` (or the row's place in an eval batch)."""
        if indices is None:
            return [f"{mode} batch row {i}" for i in range(len(rows))]
        return [f"train_dataset row {i}" for i in indices]

    def _with_logps(self, batch: dict, mode: str) -> dict:
        """Add a micro-batch's no-grad log-probs: pi_old (the ratio's denominator and the KL penalty's sample) and the reference's."""
        args = self.args
        sampling_logps = batch.pop("sampling_logprobs")  # (b, C)
        need_old = (mode == "train" and args.num_iterations > 1) or not self.engine_is_policy or args.beta != 0.0
        return add_old_and_ref_logps(batch, sampling_logps, model=self.model, temperature=args.temperature, need_old=need_old, need_ref=args.beta != 0.0,
                                     ref_model=self.ref_model, old_from_sampler=sampler_is_old_policy(self._sampling, args.temperature, self.engine_is_policy),
                                     device=self.loop.device, accelerator=self.loop.accelerator, chunk_size=args.logprob_chunk_size)

    # RLOO's sequence-level clipped loss (as posttrain_rloo.trainer.RLOOTrainer.compute_loss before its importance-sampling
    # correction options; not marked as a copy: ReMax has no such correction)
    def compute_loss(self, model, batch: dict, num_items_in_batch):
        """Return the micro-batch's share of the step loss and its metrics (no host syncs)."""
        args = self.args
        mask = batch["completion_mask"].float()  # (B, C)
        per_token_logps, entropies, aux_loss = completion_logps(model, batch, args.temperature, router_aux_loss=self.aux_loss_enabled, chunk_size=args.logprob_chunk_size)  # (B, C), (B, C)
        advantages = batch["advantages"]  # (B,)
        # with one iteration on the trained model's own samples, old == current (detached): no extra forward
        old_per_token_logps = batch.get("old_per_token_logps", per_token_logps.detach())  # (B, C)

        logps = (per_token_logps * mask).sum(-1)  # (B,) sequence log-prob
        old_logps = (old_per_token_logps * mask).sum(-1)  # (B,)
        coef_1 = torch.exp(logps - old_logps)  # (B,) sequence-level ratio
        eps_low, eps_high = args.epsilon, args.epsilon_high if args.epsilon_high is not None else args.epsilon
        coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        per_sequence_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)  # (B,)

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

    # Copied from posttrain_rloo.trainer.RLOOTrainer.on_step_end with RLOO->ReMax, rloo->remax
    def on_step_end(self, model, state) -> None:
        self.engine.update_weights(model)  # the next rollout samples from the updated policy
        self._sync_ref_model(model, state)

    # Copied from posttrain_rloo.trainer.RLOOTrainer._sync_ref_model with RLOO->ReMax, rloo->remax
    @torch.no_grad()
    def _sync_ref_model(self, model, state) -> None:
        """TR-DPO: every ``ref_model_sync_steps`` steps, ref = alpha * policy + (1 - alpha) * ref."""
        args = self.args
        if not args.sync_ref_model or self.ref_model is None or state.global_step % args.ref_model_sync_steps != 0:
            return
        sync_reference_model(self.ref_model, model, args.ref_model_mixup_alpha, accelerator=self.loop.accelerator)

    # Copied from posttrain_rloo.trainer.RLOOTrainer.evaluate_batches with RLOO->ReMax, rloo->remax
    def evaluate_batches(self, model, batches) -> dict[str, float]:
        """Return the eval loss and the rollout metrics of ``num_generations_eval`` samples per eval prompt (seeded by ``seed``).

        Each eval batch is rolled out, scored and given advantages within its groups (no
        cross-process statistics), then its loss is computed as in training (``posttrain.evaluate_online``).
        """
        return evaluate_online(model, batches, produce=lambda rows, seed: self._generate_and_score(rows, seed, mode="eval"),
                               compute_loss=self.compute_loss, count_items=self.count_items, loop=self.loop, seed=self.args.seed)

    # Copied from posttrain_rloo.trainer.RLOOTrainer.state_dict with RLOO->ReMax, rloo->remax
    def state_dict(self) -> dict:
        state = {"policy_version": self.engine.policy_version}
        if self.args.sync_ref_model and self.ref_model is not None:  # the reference moves: resume needs it
            state["ref_model"] = {k: v.detach().cpu() for k, v in self.ref_model.state_dict().items()}
        return state

    # Copied from posttrain_rloo.trainer.RLOOTrainer.load_state_dict with RLOO->ReMax, rloo->remax
    def load_state_dict(self, state: dict) -> None:
        self.engine.set_policy_version(int(state.get("policy_version", 0)))
        if "ref_model" in state and self.ref_model is not None:
            self.ref_model.load_state_dict(state["ref_model"])
