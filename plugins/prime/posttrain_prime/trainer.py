"""PRIME on the posttrain loop (heavy: imports torch).

Cui et al. 2025, *Process Reinforcement through Implicit Rewards*, arXiv:2502.01456. Dense per-token
rewards from an IMPLICIT process reward model: a causal LM pi_prm (initialized from the policy / SFT
model) whose log-ratio to the frozen reference is the reward, ``r_t = beta * (log pi_prm(y_t) - log
pi_ref(y_t))``. The PRM is trained online, beside the policy, with cross-entropy on the rollouts'
outcome labels; the policy is trained with PPO's clipped loss on RLOO-style advantages that add the
implicit rewards' return to the outcome reward's leave-one-out advantage. One optimizer step::

    prompts (P = per_device_train_batch_size * gradient_accumulation_steps / num_generations)
      -> rollout: K = num_generations completions per prompt (the core's producer and rollout engine)
      -> outcome reward o_i (the reward functions, weighted)                         (N,)
      -> optional online filter: a prompt whose mean outcome is outside accuracy_filter_range is dropped
      -> no-grad log-probs: pi_old (when needed), pi_ref, pi_prm (the PRM before this step's update)
      -> r_t^i = beta (log pi_prm - log pi_ref);  m_i = mean_t r_t^i
      -> A_t^i = c_p * sum_{s>=t} (r_s^i - 1/(K-1) sum_{j!=i} m_j) + c_o * (o_i - 1/(K-1) sum_{j!=i} o_j)
      -> whitened over the step's tokens (whiten_advantages)
      -> losses per micro-batch: policy  -1/N sum_i mean_t min(rho_t A_t, clip(rho_t) A_t)
                                 PRM     1/N sum_i BCE(sigmoid(beta sum_t log pi_prm/pi_ref), clamp(o_i, 0, 1))

The PRM is a second trainable model (``loop.add_trainable_model("prm", ...)``): its own AdamW at
``prm_learning_rate``, saved in ``checkpoint-N/prm/`` with its optimizer and schedule, resumed exactly.
Vision-language models as RLOO's (``image`` / ``images`` columns, the processor as ``processing_class``):
RLOO's copied blocks encode each prompt with its images and condition generation on them; the policy,
pi_old, reference and PRM forwards all get the batch's ``model_inputs`` (a text-only PRM is refused).
Departures: docs/methods/prime.md.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F

from posttrain import (  # the loop and the core's online steps
    CompletionLog, ConfigError, DataError, ProduceRequest, RolloutBatch, RolloutProducer, TrainerSurface, TrainingLoop, add_old_and_ref_logps, as_config,
    attach_rollout_metrics, build_reference_model, build_rollout_engine, check_online_arguments, completion_logps, default_output_dir,
    evaluate_online, generate_rollout, load_online_policy, load_pretrained, prepare_prompt_dataset, prompt_token_ids,
    resolve_online_rewards, reward_and_length_metrics, rollout_micro_batches, router_aux_loss_settings, sampler_is_old_policy,
    sampling_from_config, score_rollout, SamplingParams,
)
from posttrain import (  # vision-language models (plugin API 1.9)
    check_vision_model, image_column, is_processor, is_vision_model, prepare_multimodal_messages, processor_tokenizer, row_images, vision_prompt_inputs,
)

from posttrain_prime.config import PRIMEConfig

__all__ = ["PRIMETrainer", "compute_prime_advantages", "implicit_prm_loss"]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- math (pure functions)
def compute_prime_advantages(
    token_rewards: list[torch.Tensor], outcome: torch.Tensor, keep: torch.Tensor, num_generations: int, *,
    process_reward_coef: float = 1.0, outcome_reward_coef: float = 1.0, whiten: bool = True,
) -> list[torch.Tensor]:
    """Return the per-token advantages of N completions (one 1-D tensor each), PRIME's RLOO with returns.

    Args:
        token_rewards: N tensors ``(L_i,)``: the implicit process rewards beta * (log pi_prm - log pi_ref)
            of each completion's counted tokens.
        outcome: ``(N,)`` outcome rewards (groups of ``num_generations`` consecutive rows).
        keep: ``(N,)`` bool: rows that take part (not filtered, scorable); the others get zero advantage and
            are left out of their group's baselines and of the whitening.
        num_generations: K.
        process_reward_coef: c_p, the weight of the process rewards' return.
        outcome_reward_coef: c_o, the weight of the outcome's leave-one-out advantage.
        whiten: Standardize the kept tokens' advantages over all of them (mean 0, unit variance).

    Returns:
        N tensors ``(L_i,)``: ``c_p * sum_{s>=t} (r_s - b_i) + c_o * (o_i - mean_{j != i} o_j)`` with
        ``b_i`` the mean over the group's other kept rows of their per-token mean reward.
    """
    n = len(token_rewards)
    dtype = token_rewards[0].dtype if n else torch.float32
    means = torch.stack([r.mean() if r.numel() else torch.zeros((), dtype=dtype) for r in token_rewards]).to(dtype)  # (N,)
    keep_f = keep.to(dtype)
    means_k, outcome_k = (means * keep_f).view(-1, num_generations), (torch.nan_to_num(outcome.to(dtype)) * keep_f).view(-1, num_generations)
    others = (keep_f.view(-1, num_generations).sum(dim=1, keepdim=True) - keep_f.view(-1, num_generations)).clamp(min=1.0)  # (P, K)
    process_baseline = ((means_k.sum(dim=1, keepdim=True) - means_k) / others).view(-1)  # (N,)
    outcome_adv = (outcome_k - (outcome_k.sum(dim=1, keepdim=True) - outcome_k) / others).view(-1)  # (N,)
    advantages = []
    for i, r in enumerate(token_rewards):
        returns = torch.flip(torch.cumsum(torch.flip(r - process_baseline[i], [0]), 0), [0])  # sum_{s>=t}
        a = process_reward_coef * returns + outcome_reward_coef * outcome_adv[i]
        advantages.append(a if bool(keep[i]) else torch.zeros_like(r))
    if whiten:
        kept = [a for a, k in zip(advantages, keep.tolist()) if k and a.numel()]
        if kept:
            flat = torch.cat(kept)
            mean, var = flat.mean(), flat.var(unbiased=True) if flat.numel() > 1 else torch.zeros((), dtype=flat.dtype)
            scale = torch.rsqrt(var + 1e-8)
            advantages = [(a - mean) * scale if k else a for a, k in zip(advantages, keep.tolist())]
    return advantages


def implicit_prm_loss(prm_logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, beta: float) -> torch.Tensor:
    """Return the per-row cross-entropy ``(B,)`` of the implicit PRM: BCE(sigmoid(beta * sum_t (log pi_prm - log pi_ref)), label).

    Args:
        prm_logps: ``(B, C)`` the PRM's log-probs of the completion tokens (with gradient).
        ref_logps: ``(B, C)`` the reference's.
        mask: ``(B, C)`` counted tokens.
        labels: ``(B,)`` outcome labels in [0, 1].
        beta: The implicit reward coefficient.
    """
    reward = beta * ((prm_logps - ref_logps) * mask).sum(-1)  # (B,) the implicit outcome reward
    return F.binary_cross_entropy_with_logits(reward, labels.to(reward.dtype), reduction="none")


# Copied from posttrain_rloo.trainer.prompt_with_images with RLOO->PRIME, rloo->prime
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


# ----------------------------------------------------------------------------- trainer
class PRIMETrainer(TrainerSurface):
    """Train a causal LM with PRIME: implicit process rewards from an implicit PRM trained online (experimental).

    The constructor takes posttrain's (TRL 1.16's) ``RLOOTrainer`` arguments plus ``prm_model``.

    Args:
        model: A model object or Hub id / local directory (default ``args.model_name_or_path``).
        reward_funcs: The outcome reward(s): a callable, a name ('accuracy', 'module:function', a
            reward-model path), a ``PreTrainedModel``, or a list (default ``args.reward_funcs``). The PRM's
            labels are the weighted outcome clamped to [0, 1] (the paper: a 0/1 verifier).
        args: A :class:`PRIMEConfig`, a ``transformers.TrainingArguments`` or a dict of fields.
        train_dataset: Prompt-only rows: a ``prompt`` column (or ``prompt_ids``) plus any columns for the rewards;
            with a vision-language model, an ``images`` (list) or ``image`` column (TRL's format).
        eval_dataset: Same format, or a dict of them.
        processing_class: The tokenizer, or a vision-language model's processor (``AutoProcessor``) (default: loaded with the model).
        reward_processing_classes: Tokenizers of reward models.
        callbacks: ``transformers.TrainerCallback`` objects (or classes).
        optimizers: Only ``(None, None)``.
        quantization_config: A ``BitsAndBytesConfig`` for a model given by name.
        peft_config: Refused: the implicit reward needs a separate frozen reference and PRM.
        rollout_engine: A ``posttrain.RolloutEngine`` (default: one on ``args.rollout_backend``).
        prm_model: The implicit PRM (a causal LM object or path; default ``args.prm_model_name_or_path``,
            else a copy of the initial policy).
        allow_experimental: Opt in to this experimental method.

    Raises:
        posttrain.ConfigError: no reward functions or dataset, a ``peft_config``, image rows with a text-only
            ``prm_model`` or a tokenizer (not a processor), or an argument that cannot be honoured.
        posttrain.DataError: an image column for a text-only model; a missing or unreadable image, or
            images that do not match the prompt's placeholders (the message names the row).
    """

    _tag_names = ["posttrain", "prime"]

    def __init__(self, model=None, reward_funcs=None, args: PRIMEConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, reward_processing_classes=None, callbacks=None, optimizers=(None, None), quantization_config=None,
                 peft_config=None, rollout_engine=None, prm_model=None, allow_experimental=False):
        self.args = args = as_config(args, PRIMEConfig, default_output_dir=default_output_dir(model, "PRIME"))
        self.loop = TrainingLoop(args, method="prime", allow_experimental=allow_experimental, callbacks=callbacks)  # the maturity gate first
        check_online_arguments("PRIME", train_dataset=train_dataset, reward_funcs=reward_funcs or args.reward_funcs, optimizers=optimizers)
        if peft_config is not None:
            raise ConfigError("peft_config is not supported by PRIME: the implicit reward needs a frozen reference and a separate PRM; train the full model (or pass a PeftModel you built).")
        self._setup_model(model, processing_class, peft_config, quantization_config)
        self._setup_rewards(reward_funcs, reward_processing_classes)
        prm_source = prm_model if prm_model is not None else args.prm_model_name_or_path
        if prm_source is None:
            prm = copy.deepcopy(self.model)  # the paper: the PRM starts from the SFT (= initial policy) model
        else:
            prm, _ = load_pretrained(prm_source, role="policy", model_init_kwargs=args.model_init_kwargs, trust_remote_code=args.trust_remote_code,
                                     default_dtype=next(self.model.parameters()).dtype, load_tokenizer=False)
        self.ref_model = build_reference_model(self.model, None, loop=self.loop, model_init_kwargs=args.model_init_kwargs,
                                               disable_dropout_in_ref=args.disable_dropout, needed=True)
        self.tool_rollout = None  # RLOO's shared blocks read it: PRIME has no tool-calling episodes
        self._setup_datasets(train_dataset, eval_dataset)
        self._check_prm_sees_images(prm)
        self.loop.setup(self.model, method=self)
        self.loop.add_trainable_model("prm", prm, learning_rate=args.prm_learning_rate, weight_decay=args.prm_weight_decay)
        self.rollout_func = None
        self.engine = rollout_engine or build_rollout_engine(args, model=self.model, tokenizer=self._tokenizer, accelerator=self.loop.accelerator)
        self.engine_is_policy = self.engine.samples_from_policy
        self.producer = RolloutProducer(self.loop.prompt_source(len(self.train_dataset), self._prompts_per_step()), self.train_dataset,
                                        self._produce, reuse=self.args.num_iterations)
        self._sampling = sampling_from_config(args)
        self._setup_logging()

    @property
    def prm(self):
        """The implicit PRM as the loop trains it (prepared by the run's backend)."""
        return self.loop.trainable_model("prm")

    # -------------------------------------------------------------------------- setup (the core's online steps)
    # Copied from posttrain_rloo.trainer.RLOOTrainer._setup_model with RLOO->PRIME, rloo->prime
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

    def _check_prm_sees_images(self, prm) -> None:
        """Refuse image rows with a text-only implicit PRM (one given by path): its rewards would ignore the images."""
        datasets = [("train_dataset", self.train_dataset)]
        if isinstance(self.eval_dataset, dict):
            datasets += [(f"eval_dataset[{key!r}]", part) for key, part in self.eval_dataset.items()]
        elif self.eval_dataset is not None:
            datasets.append(("eval_dataset", self.eval_dataset))
        for name, dataset in datasets:
            columns = dataset.column_names if hasattr(dataset, "column_names") else list(dataset[0]) if len(dataset) else []
            column = image_column(columns)
            if column is not None and not is_vision_model(prm):
                raise ConfigError(f"{name} has an image column {column!r} but PRIME's implicit PRM ({type(prm).__name__}) is text-only: its rewards "
                                  "would ignore the images; leave prm_model unset (a copy of the policy) or give a vision-language PRM, or drop the column.")

    # Copied from posttrain_rloo.trainer.RLOOTrainer._setup_rewards with RLOO->PRIME, rloo->prime
    def _setup_rewards(self, reward_funcs, reward_processing_classes) -> None:
        """Resolve the reward functions (TRL's ``reward_funcs`` / ``reward_func_names`` / ``reward_weights`` / ``reward_processing_classes``)."""
        rewards = resolve_online_rewards(reward_funcs, self.args, loop=self.loop, reward_processing_classes=reward_processing_classes)
        self.reward_funcs, self.reward_func_names, self.reward_weights = rewards.funcs, rewards.names, rewards.weights  # weights (F,)
        self.reward_processing_classes = rewards.processing_classes

    # Copied from posttrain_rloo.trainer.RLOOTrainer._setup_datasets with RLOO->PRIME, rloo->prime
    def _setup_datasets(self, train_dataset, eval_dataset) -> None:
        self.train_dataset = self.process_dataset(train_dataset, "train_dataset")
        if isinstance(eval_dataset, dict):
            self.eval_dataset = {key: self.process_dataset(part, f"eval_dataset[{key!r}]") for key, part in eval_dataset.items()}
        else:
            self.eval_dataset = self.process_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else None

    # Copied from posttrain_rloo.trainer.RLOOTrainer._setup_logging with RLOO->PRIME, rloo->prime
    def _setup_logging(self) -> None:
        """TRL's completion log (``_logs``; written at each training log with ``log_completions``)."""
        args = self.args
        self._completion_log = CompletionLog(args.per_device_train_batch_size * args.gradient_accumulation_steps)  # one rollout
        self._logs = self._completion_log.logs
        self.add_callback(self._completion_log.callback(args, self.loop))

    # -------------------------------------------------------------------------- data
    # Copied from posttrain_rloo.trainer.RLOOTrainer.process_dataset with RLOO->PRIME, rloo->prime
    def process_dataset(self, dataset, name: str):
        """Return ``dataset`` as prompt rows (``posttrain.prepare_prompt_dataset``); a streamed ``train_dataset`` keeps the rows ``max_steps`` draw."""
        limit = None
        if name == "train_dataset" and self.args.max_steps > 0:
            limit = self.args.max_steps * self._prompts_per_step() * self.loop.accelerator.num_processes
        dataset = prepare_prompt_dataset(dataset, name, method="PRIME", prompt_ids=lambda row: self._prompt_ids(row, where=f"{name} row 0"), limit=limit)
        columns = dataset.column_names if hasattr(dataset, "column_names") else list(dataset[0]) if len(dataset) else []
        if image_column(columns) is not None and self.tool_rollout is not None:
            raise ConfigError(f"{name} has an image column {image_column(columns)!r} and tools= / environment_factory= are set: tool-calling "
                              "episodes do not carry images yet; train on the images without tools, or drop the image column.")
        return dataset

    # Copied from posttrain_rloo.trainer.RLOOTrainer._prompt_ids with RLOO->PRIME, rloo->prime
    def _prompt_ids(self, row: dict, where: str = "the row") -> list[int]:
        """Token ids of a row's prompt: its ``prompt_ids`` as given, or the tokenized ``prompt`` (messages via the chat template)."""
        return self._encode_prompt(row, where)[0]

    # Copied from posttrain_rloo.trainer.RLOOTrainer._encode_prompt with RLOO->PRIME, rloo->prime
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

    # Copied from posttrain_rloo.trainer.RLOOTrainer._prompts_per_step with RLOO->PRIME, rloo->prime
    def _prompts_per_step(self) -> int:
        args = self.args
        return args.per_device_train_batch_size * args.gradient_accumulation_steps // args.num_generations

    @property
    def data_collator(self):
        """The collator of raw prompt rows: :meth:`collate`, which keeps them raw (the producer generates)."""
        return self.collate

    # -------------------------------------------------------------------------- loop protocol
    # Copied from posttrain_rloo.trainer.RLOOTrainer.collate with RLOO->PRIME, rloo->prime
    def collate(self, rows: list[dict]) -> dict:
        return {"rows": [dict(row) for row in rows]}  # prompts stay raw (the producer reads the dataset's rows itself)

    # Copied from posttrain_rloo.trainer.RLOOTrainer.count_items with RLOO->PRIME, rloo->prime
    def count_items(self, batch: dict) -> int:
        return batch["completion_ids"].shape[0]  # PRIME's loss is a mean over sequences

    # Copied from posttrain_rloo.trainer.RLOOTrainer._produce with RLOO->PRIME, rloo->prime
    def _produce(self, request: ProduceRequest) -> list[dict]:
        """The producer's callback: generate, score and split one step's rollouts (the producer reuses them ``num_iterations`` times)."""
        seed = self.args.seed + request.step + 1_000_003 * request.rank
        return self._generate_and_score(request.rows, seed, indices=request.indices)

    # Copied from posttrain_rloo.trainer.RLOOTrainer._generate with RLOO->PRIME, rloo->prime
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
        k = args.num_generations if mode == "train" else (args.num_generations_eval or args.num_generations)
        # the rollout (conditioned on the rows' images, if any) and its rewards (N, F)
        prompts, rollout, rewards_per_func = self._rollout_and_rewards(rows, seed, k, self._row_names(rows, indices, mode))
        outcome = (rewards_per_func * self.reward_weights.unsqueeze(0)).nansum(dim=1)  # (N,)
        scorable = ~torch.isnan(rewards_per_func).all(dim=1)
        if args.reward_clip_range:
            outcome = outcome.clamp(min=args.reward_clip_range[0], max=args.reward_clip_range[1])
        keep = scorable.clone()
        group_mean = torch.stack([outcome[g * k:(g + 1) * k][scorable[g * k:(g + 1) * k]].mean() if scorable[g * k:(g + 1) * k].any()
                                  else torch.tensor(float("nan")) for g in range(len(rows))])  # (P,)
        if args.accuracy_filter_range is not None and mode == "train":  # online filtering (the paper: accuracy in [0.2, 0.8])
            low, high = args.accuracy_filter_range
            in_range = (group_mean >= low) & (group_mean <= high)
            keep &= in_range.repeat_interleave(k)
        keep &= (scorable.view(-1, k).sum(dim=1) >= 2).repeat_interleave(k)  # a leave-one-out baseline needs 2 scorable rows

        size = args.per_device_train_batch_size if mode == "train" else len(rollout)
        micro_batches = [self._with_logps(batch, mode) for batch in rollout_micro_batches(
            rollout, size, self.pad_token_id, pad_to_multiple_of=args.pad_to_multiple_of, mask_truncated=args.mask_truncated_completions)]
        token_rewards = []
        for batch in micro_batches:  # implicit process rewards of each completion's counted tokens
            r = args.beta * (batch["prm_per_token_logps"].double() - batch["ref_per_token_logps"].double())  # (b, C)
            token_rewards += [row[m.bool()] for row, m in zip(r, batch["completion_mask"])]
        advantages = compute_prime_advantages(token_rewards, outcome.double(), keep, k, process_reward_coef=args.process_reward_coef,
                                              outcome_reward_coef=args.outcome_reward_coef, whiten=args.whiten_advantages)
        world = self.loop.accelerator.num_processes if mode == "train" else 1
        labels = outcome.clamp(0.0, 1.0)
        for start, batch in zip(range(0, len(rollout), size), micro_batches):
            mask = batch["completion_mask"]
            adv = torch.zeros(mask.shape, dtype=torch.float32)
            for row in range(mask.shape[0]):
                adv[row][mask[row].bool()] = advantages[start + row].float()
            batch["advantages"] = adv  # (b, C)
            batch["keep"] = keep[start : start + mask.shape[0]].float()  # (b,)
            batch["outcome_labels"] = labels[start : start + mask.shape[0]]  # (b,)
            batch["share_divisor"] = torch.tensor(float(len(micro_batches) * world))

        is_std_zero = torch.tensor([bool(torch.all(outcome[g * k:(g + 1) * k] == outcome[g * k])) for g in range(len(rows))])
        metrics = {**reward_and_length_metrics(rollout, rewards_per_func, self.reward_weights, self.reward_func_names, is_std_zero, k),
                   **self._completion_log.pop_metrics()}
        seq_rewards = torch.stack([r.sum() for r in token_rewards]).float()  # (N,) implicit outcome rewards beta * log ratio
        metrics["prm/implicit_reward_mean"] = seq_rewards.mean().item()
        pos, neg = labels > 0.5, labels <= 0.5
        # the PRM's accuracy: does sigmoid(implicit reward) side with the outcome label?
        metrics["prm/accuracy"] = ((seq_rewards > 0) == pos).float()[scorable].mean().item() if scorable.any() else float("nan")
        metrics["prm/reward_margin"] = (seq_rewards[pos].mean() - seq_rewards[neg].mean()).item() if pos.any() and neg.any() else float("nan")
        # held out for the PRM (it has not trained on this rollout yet): KL(label || sigmoid(implicit reward)), the cross-entropy above the labels' entropy
        entropy = F.binary_cross_entropy(labels, labels, reduction="none")
        excess = F.binary_cross_entropy_with_logits(seq_rewards, labels, reduction="none") - entropy
        metrics["prm/excess_ce"] = excess[scorable].mean().item() if scorable.any() else float("nan")
        metrics["frac_filtered"] = 1.0 - keep.float().mean().item()
        kl_sum = sum(((b["prm_per_token_logps"] - b["ref_per_token_logps"]) * b["completion_mask"]).sum() for b in micro_batches)
        metrics["prm/kl_to_ref"] = float(kl_sum) / max(1, sum(b["num_completion_tokens"] for b in micro_batches))
        attach_rollout_metrics(micro_batches, metrics)
        if mode == "train":
            completions = self._tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
            self._completion_log.record(prompts, completions, rewards_per_func, self.reward_func_names, torch.stack([a.sum() for a in advantages]).float())
        else:
            self._completion_log.discard_extra()
        return micro_batches

    # Copied from posttrain_rloo.trainer.RLOOTrainer._row_names with RLOO->PRIME, rloo->prime
    @staticmethod
    def _row_names(rows: list[dict], indices: list[int] | None, mode: str = "train") -> list[str]:
        """What an error names for each row: ``train_dataset row <index>`` (or the row's place in an eval batch)."""
        if indices is None:
            return [f"{mode} batch row {i}" for i in range(len(rows))]
        return [f"train_dataset row {i}" for i in indices]

    # Copied from posttrain_rloo.trainer.RLOOTrainer._rollout_and_rewards with RLOO->PRIME, rloo->prime
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

    @torch.no_grad()
    def _with_logps(self, batch: dict, mode: str) -> dict:
        """Add a micro-batch's no-grad log-probs: pi_old (when needed), the reference's and the PRM's (before this step's update)."""
        args = self.args
        sampling_logps = batch.pop("sampling_logprobs")
        need_old = (mode == "train" and args.num_iterations > 1) or not self.engine_is_policy
        add_old_and_ref_logps(batch, sampling_logps, model=self.model, temperature=args.temperature, need_old=need_old, need_ref=True,
                              ref_model=self.ref_model, old_from_sampler=sampler_is_old_policy(self._sampling, args.temperature, self.engine_is_policy),
                              device=self.loop.device, accelerator=self.loop.accelerator, chunk_size=args.logprob_chunk_size)
        on_device = {k: v.to(self.loop.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        if batch.get("model_inputs"):  # a vision-language batch: the PRM sees the images too
            on_device["model_inputs"] = {k: v.to(self.loop.device) if isinstance(v, torch.Tensor) else v for k, v in batch["model_inputs"].items()}
        prm_logps, _, _ = completion_logps(self.prm, on_device, args.temperature, compute_entropy=False, chunk_size=args.logprob_chunk_size)
        batch["prm_per_token_logps"] = prm_logps.float().cpu()  # (b, C), stored like the reference's
        return batch

    def compute_loss(self, model, batch: dict, num_items_in_batch):
        """Return the micro-batch's shares of the policy and PRM losses (a dict, one per trained model) and metrics."""
        args = self.args
        mask = batch["completion_mask"].float()  # (B, C)
        keep = batch["keep"]  # (B,)
        per_token_logps, entropies, aux_loss = completion_logps(model, batch, args.temperature, router_aux_loss=self.aux_loss_enabled, chunk_size=args.logprob_chunk_size)
        old = batch.get("old_per_token_logps", per_token_logps.detach())
        advantages = batch["advantages"].to(per_token_logps.dtype)  # (B, C)
        ratio = torch.exp(per_token_logps - old)
        eps_low, eps_high = args.epsilon, args.epsilon_high if args.epsilon_high is not None else args.epsilon
        per_token = -torch.min(ratio * advantages, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * advantages)  # (B, C)
        per_sequence = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)  # (B,) token mean
        policy_loss = (per_sequence * keep).sum() / num_items_in_batch

        prm_logps, _, _ = completion_logps(self.prm, batch, args.temperature, compute_entropy=False, chunk_size=args.logprob_chunk_size)
        prm_rows = implicit_prm_loss(prm_logps, batch["ref_per_token_logps"].to(prm_logps.dtype), mask.to(prm_logps.dtype), batch["outcome_labels"], args.beta)
        prm_loss = (prm_rows * keep.to(prm_rows.dtype)).sum() / num_items_in_batch

        is_low = (ratio < 1 - eps_low) & (advantages < 0)
        is_high = (ratio > 1 + eps_high) & (advantages > 0)
        counted = mask.sum().clamp(min=1.0)
        metrics = {
            "entropy": (entropies * mask).sum() / counted,
            "clip_ratio/low_mean": (is_low.float() * mask).sum() / counted,
            "clip_ratio/high_mean": (is_high.float() * mask).sum() / counted,
            "clip_ratio/region_mean": ((is_low | is_high).float() * mask).sum() / counted,
        }
        if self.aux_loss_enabled and aux_loss is not None:
            share = batch.get("share_divisor", torch.ones(()))
            policy_loss = policy_loss + self.router_aux_loss_coef * aux_loss / share.to(aux_loss.device)
            metrics["aux_loss"] = aux_loss.detach().float()
        if "rollout_metric_values" in batch:
            metrics.update(zip(batch["rollout_metric_names"], batch["rollout_metric_values"]))
        return {"model": policy_loss, "prm": prm_loss}, metrics

    def on_step_end(self, model, state) -> None:
        self.engine.update_weights(model)  # the next rollout samples from the updated policy

    def evaluate_batches(self, model, batches) -> dict[str, float]:
        """Return the eval loss (the policy's), ``prm_loss`` and the rollout metrics of ``num_generations_eval`` samples per eval prompt.

        Each eval batch is rolled out, scored and given advantages within its own rows (no filtering, no
        cross-process statistics), then both losses are computed as in training (``posttrain.evaluate_online``).
        """
        def policy_loss_and_metrics(model, batch, num_items_in_batch):
            losses, metrics = self.compute_loss(model, batch, num_items_in_batch)
            return losses["model"], {**metrics, "prm_loss": losses["prm"].detach()}

        return evaluate_online(model, batches, produce=lambda rows, seed: self._generate_and_score(rows, seed, mode="eval"),
                               compute_loss=policy_loss_and_metrics, count_items=self.count_items, loop=self.loop, seed=self.args.seed)

    def state_dict(self) -> dict:
        return {"policy_version": self.engine.policy_version}  # the PRM and its optimizer are checkpointed by the loop

    def load_state_dict(self, state: dict) -> None:
        self.engine.set_policy_version(int(state.get("policy_version", 0)))
