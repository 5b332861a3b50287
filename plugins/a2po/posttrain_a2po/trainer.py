"""A*-PO on the posttrain loop (heavy: imports torch).

A*-PO (Brantley et al. 2025, arXiv:2505.20686), following TRL 1.16's ``trl.experimental.a2po``:

Stage 1 (offline, once, when the trainer is built): ``num_value_samples`` completions per prompt are
sampled from the reference policy (the frozen initial policy: before any update the rollout engine
samples exactly it), scored with the reward functions, and ``V*(x) = beta1 * log(mean_i exp(r_i /
beta1))`` is kept per prompt text (``_optimal_values``, keyed like TRL's: the prompt string, or
conversational messages rendered by the chat template) for the train and eval prompts (every split of
a dict of eval datasets; a dataset given to ``evaluate`` before training gets V* for its new prompts then). With
``filter_all_incorrect``, training prompts whose samples all scored 0 are dropped. V* is saved in every
checkpoint and restored on resume.

Stage 2 (online, each step; the core's RolloutProducer supplies the episodes)::

    prompts (per_device_train_batch_size * gradient_accumulation_steps per process)
      -> rollout: ONE completion per prompt from the current policy (seeded by the step)
      -> reward r: weighted sum of the reward functions                    (N,)
      -> reference sequence log-prob log pi_ref(y|x) (no-grad)             (N,)
      -> loss per micro-batch: (beta2 * (log pi(y|x) - log pi_ref(y|x)) - (r - V*(x)))^2, a mean over the step

Sequence log-probs sum the completion tokens up to and including the first EOS, scored by the
model itself (temperature 1, as TRL's). Departures from TRL: docs/methods/a2po.md.
"""

from __future__ import annotations

import logging
import math
import types

import torch

from posttrain import (
    ConfigError, DataError, ProduceRequest, RolloutProducer, TrainerSurface, TrainingLoop, add_old_and_ref_logps, as_config,
    attach_rollout_metrics, build_reference_model, build_rollout_engine, check_online_arguments, completion_logps, default_output_dir,
    evaluate_online, expand_prompts, generate_rollout, load_online_policy, prepare_prompt_dataset, prompt_token_ids, resolve_online_rewards,
    reward_and_length_metrics, rollout_micro_batches, sampling_from_config, score_rollout,
)

from posttrain_a2po.config import A2POConfig

__all__ = ["A2POTrainer", "optimal_values", "a2po_loss"]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- math (pure functions)
def optimal_values(rewards: torch.Tensor, beta1: float) -> torch.Tensor:
    """Return Stage 1's ``V*(x) = beta1 * log(mean_i exp(r_i / beta1))`` per prompt ``(P,)`` from rewards ``(P, N)`` (a stable logsumexp)."""
    return beta1 * (torch.logsumexp(rewards / beta1, dim=1) - math.log(rewards.shape[1]))


def a2po_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, rewards: torch.Tensor, v_star: torch.Tensor, beta2: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return Stage 2's per-sequence squared errors ``(B,)``, the implicit rewards and the optimal-advantage targets.

    ``(beta2 * (log pi(y|x) - log pi_ref(y|x)) - (r - V*(x)))^2`` from sequence log-probs ``(B,)``.
    """
    implicit_reward = beta2 * (policy_logps - ref_logps)
    target = rewards - v_star
    return (implicit_reward - target) ** 2, implicit_reward, target


# ----------------------------------------------------------------------------- trainer
class A2POTrainer(TrainerSurface):
    """Train a causal LM with A*-PO (optimal advantage regression); TRL 1.16's ``trl.experimental.a2po.A2POTrainer`` API.

    Args:
        model: A model object or Hub id / local directory (default ``args.model_name_or_path``).
        reward_funcs: A callable, a name ('accuracy', 'module:function', a reward-model path) or a list of these
            (default ``args.reward_funcs``). Their weighted sum is the reward r, which A*-PO assumes binary (0/1).
        args: An :class:`A2POConfig`, a ``transformers.TrainingArguments`` or a dict of fields.
        train_dataset: Prompt-only rows (a ``prompt`` column, string or messages, plus any columns for the rewards).
        eval_dataset: Same format, or a dict of them (metrics ``eval_<name>_<metric>``); V* is estimated for its prompts too.
        processing_class: The tokenizer (default: loaded with the model).
        callbacks: ``transformers.TrainerCallback`` objects (or classes).
        optimizers: Only ``(None, None)``: the loop builds the optimizer and schedule from ``args``.
        peft_config: posttrain's addition: a ``peft.PeftConfig`` (the reference is then the adapter-disabled model).
        rollout_engine: posttrain's addition: a ``posttrain.RolloutEngine`` (default: the transformers backend on the policy).
        allow_experimental: Opt in to this experimental method (or ``posttrain.activate('a2po', allow_experimental=True)``).

    Raises:
        posttrain.ConfigError: no reward functions or dataset, mismatched ``reward_weights``, a dataset without ``prompt``.
        posttrain.DataError: every training prompt's reference samples scored 0 (with ``filter_all_incorrect``).
    """

    _tag_names = ["trl", "a2po"]

    def __init__(self, model=None, reward_funcs=None, args: A2POConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, callbacks=None, optimizers=(None, None), peft_config=None, rollout_engine=None, allow_experimental=False):
        self.args = args = as_config(args, A2POConfig, default_output_dir=default_output_dir(model, "A2PO"))
        # the maturity gate first: an experimental method without an opt-in is refused before any other check
        self.loop = TrainingLoop(args, method="a2po", allow_experimental=allow_experimental, callbacks=callbacks)
        check_online_arguments("A2PO", train_dataset=train_dataset, reward_funcs=reward_funcs or args.reward_funcs, optimizers=optimizers)
        self.model, self.processing_class = load_online_policy(model, args, loop=self.loop, processing_class=processing_class, peft_config=peft_config,
                                                               tags=self._tag_names)
        self.pad_token_id = self.processing_class.pad_token_id
        rewards = resolve_online_rewards(reward_funcs, args, loop=self.loop)
        self.reward_funcs, self.reward_func_names, self.reward_weights = rewards.funcs, rewards.names, rewards.weights  # weights (F,)
        # the frozen initial policy: Stage 1 samples it, Stage 2 regularizes towards it
        self.ref_model = build_reference_model(self.model, None, loop=self.loop, model_init_kwargs=args.model_init_kwargs,
                                               disable_dropout_in_ref=args.disable_dropout, needed=True)
        self.train_dataset = prepare_prompt_dataset(train_dataset, "train_dataset", method="A2PO", prompt_ids=self._prompt_ids)
        if isinstance(eval_dataset, dict):  # a dict / DatasetDict of named eval splits (TRL's), each scored on its own
            self.eval_dataset = {key: self._prepare(part, f"eval_dataset[{key!r}]") for key, part in eval_dataset.items()}
        else:
            self.eval_dataset = self._prepare(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        self.loop.setup(self.model, method=self)
        engine_args = types.SimpleNamespace(rollout_backend="transformers", generation_batch_size=args.generation_batch_size, seed=args.seed,
                                            trust_remote_code=args.trust_remote_code)
        self.engine = rollout_engine or build_rollout_engine(engine_args, model=self.model, tokenizer=self.processing_class, accelerator=self.loop.accelerator)
        self._sampling = sampling_from_config(args)  # SamplingParams keywords (generation_kwargs applied)
        # Stage 1, before the first update (the engine samples the initial policy = the reference); a resume restores V* from the checkpoint
        self._optimal_values: dict[str, float] = {}  # prompt text -> V*(x), TRL's keys
        self._all_incorrect: set[str] = set()  # training prompts whose reference samples all scored 0
        self._stage1_calls = 0  # numbers each Stage 1 pass (its sampling seeds)
        evals = list(self.eval_dataset.values()) if isinstance(self.eval_dataset, dict) else [self.eval_dataset] if self.eval_dataset is not None else []
        self._estimate_optimal_values([self.train_dataset, *evals], train=True)
        self.producer = RolloutProducer(self.loop.prompt_source(len(self.train_dataset), self._prompts_per_step()), self.train_dataset, self._produce, reuse=1)

    # -------------------------------------------------------------------------- data
    def _prompt_ids(self, row: dict) -> list[int]:
        """Token ids of a row's prompt (messages via the chat template), left-truncated to ``max_prompt_length``."""
        ids = prompt_token_ids(row, self.processing_class, chat_template_kwargs=self.args.chat_template_kwargs)
        limit = self.args.max_prompt_length
        return ids[-limit:] if limit is not None and len(ids) > limit else ids

    def _prompt_key(self, row: dict) -> str:
        """The key of a row's prompt in ``_optimal_values`` (TRL's): the prompt string, or messages rendered by the chat template
        (generation prompt added); a pre-tokenized row's decoded ``prompt_ids``."""
        prompt = row.get("prompt")
        if isinstance(prompt, str):
            return prompt
        if prompt is None:
            return self.processing_class.decode(list(row["prompt_ids"]))
        return self.processing_class.apply_chat_template(prompt, tools=row.get("tools"), tokenize=False, add_generation_prompt=True,
                                                         **(self.args.chat_template_kwargs or {}))

    def _prepare(self, dataset, name: str):
        return prepare_prompt_dataset(dataset, name, method="A2PO", prompt_ids=self._prompt_ids)

    def process_dataset(self, dataset, name: str):
        """Return an eval ``dataset`` (given to ``evaluate``) as prompt rows, with Stage 1 run for its prompts that have no V* yet (all processes call).

        Raises:
            posttrain.DataError: a prompt without V* once training has started (Stage 1 samples the initial policy).
        """
        prepared = self._prepare(dataset, name)
        if self.engine.policy_version == 0:  # the engine still samples the initial policy, i.e. the reference
            self._estimate_optimal_values([prepared], train=False)
        else:
            missing = [key for key in (self._prompt_key(dict(row)) for row in prepared) if key not in self._optimal_values]
            if missing:
                raise DataError(f"A*-PO: {len(missing)} prompts of {name} have no V* (e.g. {missing[0][:80]!r}) and Stage 1 can no longer sample the "
                                "reference policy after training started; pass this dataset as eval_dataset when building the trainer.")
        return prepared

    def _prompts_per_step(self) -> int:
        return self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps

    @property
    def data_collator(self):
        """The collator of raw prompt rows (TRL's is the identity): :meth:`collate`."""
        return self.collate

    def collate(self, rows: list[dict]) -> dict:
        return {"rows": [dict(row) for row in rows]}  # prompts stay raw (the producer reads the dataset's rows itself)

    def count_items(self, batch: dict) -> int:
        return batch["completion_ids"].shape[0]  # the loss is a mean over sequences

    # -------------------------------------------------------------------------- Stage 1
    def _score(self, rows: list[dict], prompts: list, rollout, num_generations: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(r (N,), rewards_per_func (N, F))``: the weighted reward (NaN where no function scored a completion)."""
        rewards_per_func = score_rollout(rows, prompts, rollout, num_generations, reward_funcs=self.reward_funcs, reward_func_names=self.reward_func_names,
                                         tokenizer=self.processing_class, trainer_state=self.loop.state)  # (N, F)
        r = (rewards_per_func * self.reward_weights.to(rewards_per_func.dtype)).nansum(dim=1)
        r[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
        return r, rewards_per_func

    @torch.no_grad()
    def _estimate_optimal_values(self, datasets: list, *, train: bool) -> None:
        """Stage 1: V*(x) from ``num_value_samples`` reference samples per prompt without a V* yet, each process its share, then shared.

        ``train``: ``datasets[0]`` is the training set (its all-incorrect prompts are recorded and, with
        ``filter_all_incorrect``, dropped). A prompt already estimated (a duplicate, an eval prompt that is
        also a training prompt) keeps its first V*.
        """
        from accelerate.utils import gather_object

        args, accelerator = self.args, self.loop.accelerator
        n, size = args.num_value_samples, args.per_device_train_batch_size
        values, all_incorrect = {}, []
        for d_index, dataset in enumerate(datasets):
            call = self._stage1_calls
            self._stage1_calls += 1
            keys = [self._prompt_key(dict(dataset[i])) for i in range(len(dataset))]
            todo, seen = [], set(self._optimal_values)
            for i, key in enumerate(keys):
                if key not in seen:
                    seen.add(key)
                    todo.append(i)
            indices = todo[accelerator.process_index :: accelerator.num_processes]
            for start in range(0, len(indices), size):
                rows = [dict(dataset[i]) for i in indices[start : start + size]]
                prompts, prompt_ids = expand_prompts(rows, n, self._prompt_ids, self.processing_class)
                seed = args.seed + 7_919 * (start + 1) + 104_729 * call + 1_000_003 * accelerator.process_index
                rollout = generate_rollout(prompts, prompt_ids, engine=self.engine, sampling=self._sampling, num_generations=n, seed=seed,
                                           max_completion_length=args.max_completion_length, stop_token_ids=(self.processing_class.eos_token_id, self.pad_token_id))
                r, _ = self._score(rows, prompts, rollout, n)
                grouped = torch.nan_to_num(r, nan=0.0).double().view(len(rows), n)  # an unscorable sample counts as incorrect (0)
                v_star = optimal_values(grouped, args.beta1)
                for j, i in enumerate(indices[start : start + size]):
                    values[keys[i]] = float(v_star[j])
                    if train and d_index == 0 and float(grouped[j].sum()) == 0.0:
                        all_incorrect.append(keys[i])
            if accelerator.num_processes > 1:
                values = dict(gather_object(list(values.items())))
                if train and d_index == 0:
                    all_incorrect = list(gather_object(all_incorrect))
            self._optimal_values.update(values)  # the next dataset skips the prompts estimated here
            values = {}
        if train:
            self._all_incorrect = set(all_incorrect)
            self._filter_train_dataset()
            logger.info("A*-PO Stage 1: V* estimated for %d prompts (%d training prompts all incorrect).", len(self._optimal_values), len(self._all_incorrect))

    def _filter_train_dataset(self) -> None:
        if not self.args.filter_all_incorrect or not self._all_incorrect:
            return
        keep = [i for i in range(len(self.train_dataset)) if self._prompt_key(dict(self.train_dataset[i])) not in self._all_incorrect]
        if not keep:
            raise DataError(
                f"A*-PO Stage 1: every one of the {len(self.train_dataset)} training prompts had all {self.args.num_value_samples} reference samples "
                "score 0, so filter_all_incorrect=True leaves nothing to train on. Use easier prompts, raise num_value_samples, check the "
                "reward function, or set filter_all_incorrect=False."
            )
        self.train_dataset = self.train_dataset.select(keep) if hasattr(self.train_dataset, "select") else [self.train_dataset[i] for i in keep]

    def optimal_value(self, prompt) -> float:
        """Return the cached V*(x) of a prompt: its text (a string, or messages: rendered by the chat template) or a dataset row."""
        key = self._prompt_key(prompt if isinstance(prompt, dict) else {"prompt": prompt})
        if key not in self._optimal_values:
            raise DataError(f"A*-PO has no V* for the prompt {key[:80]!r}: V* is estimated in Stage 1 for the train_dataset and eval_dataset "
                            "given to the trainer (and for a dataset given to evaluate()); evaluate on those prompts.")
        return self._optimal_values[key]

    # -------------------------------------------------------------------------- Stage 2
    def _produce(self, request: ProduceRequest) -> list[dict]:
        """The producer's callback: one completion per prompt, scored, split into micro-batches with reference log-probs."""
        seed = self.args.seed + request.step + 1_000_003 * request.rank
        return self._generate_and_score(request.rows, seed)

    def _generate_and_score(self, rows: list[dict], seed: int, mode: str = "train") -> list[dict]:
        args = self.args
        prompts, prompt_ids = expand_prompts(rows, 1, self._prompt_ids, self.processing_class)  # (N,) one completion per prompt
        rollout = generate_rollout(prompts, prompt_ids, engine=self.engine, sampling=self._sampling, num_generations=1, seed=seed,
                                   max_completion_length=args.max_completion_length, stop_token_ids=(self.processing_class.eos_token_id, self.pad_token_id))
        rewards, rewards_per_func = self._score(rows, prompts, rollout, 1)  # (N,), (N, F)
        v_star = torch.tensor([self.optimal_value(row) for row in rows], dtype=torch.float64)  # (N,) one completion per row
        size = args.per_device_train_batch_size if mode == "train" else len(rollout)
        micro_batches = rollout_micro_batches(rollout, size, self.pad_token_id)
        for start, batch in zip(range(0, len(rollout), size), micro_batches):
            sampling_logps = batch.pop("sampling_logprobs")
            add_old_and_ref_logps(batch, sampling_logps, model=self.model, temperature=1.0, need_old=False, need_ref=True, ref_model=self.ref_model,
                                  device=self.loop.device, accelerator=self.loop.accelerator, chunk_size=args.logprob_chunk_size)
            mask = batch["completion_mask"].to(batch["ref_per_token_logps"].dtype)
            batch["ref_logps"] = (batch.pop("ref_per_token_logps") * mask).sum(-1)  # (b,) sequence log-prob under the reference
            batch["rewards"] = torch.nan_to_num(rewards[start : start + size], nan=0.0)  # (b,)
            batch["scored"] = (~torch.isnan(rewards[start : start + size])).float()  # (b,) an unscorable completion adds nothing
            batch["v_star"] = v_star[start : start + size]  # (b,)
        metrics = reward_and_length_metrics(rollout, rewards_per_func, self.reward_weights, self.reward_func_names, torch.zeros(len(rollout), dtype=torch.bool), 1)
        metrics.pop("frac_reward_zero_std", None)  # one completion per prompt: no groups
        metrics["v_star"] = float(v_star.mean())
        attach_rollout_metrics(micro_batches, metrics)
        return micro_batches

    def compute_loss(self, model, batch: dict, num_items_in_batch):
        """Return the micro-batch's share of the step loss (a mean of squared errors over the step's sequences) and its metrics."""
        args = self.args
        mask = batch["completion_mask"]
        per_token_logps, entropies, _ = completion_logps(model, batch, 1.0, chunk_size=args.logprob_chunk_size)  # (B, C) at temperature 1, as TRL
        mask = mask.to(per_token_logps.dtype)
        policy_logps = (per_token_logps * mask).sum(-1)  # (B,)
        dtype = policy_logps.dtype
        ref_logps, rewards, v_star = (batch[k].to(policy_logps.device, dtype) for k in ("ref_logps", "rewards", "v_star"))
        squared, implicit_reward, target = a2po_loss(policy_logps, ref_logps, rewards, v_star, args.beta2)
        if "scored" in batch:
            squared = squared * batch["scored"].to(squared.device, dtype)
        loss = squared.sum() / num_items_in_batch
        tokens = mask.sum().clamp(min=1.0)
        metrics = {
            "implicit_reward": implicit_reward.detach().mean(),
            "advantage": target.mean(),
            "kl": ((policy_logps.detach() - ref_logps).sum() / tokens),  # k1 per token, log pi - log pi_ref
            "entropy": (entropies.detach() * mask).sum() / tokens,
        }
        if "rollout_metric_values" in batch:
            metrics.update(zip(batch["rollout_metric_names"], batch["rollout_metric_values"]))
        return loss, metrics

    def on_step_end(self, model, state) -> None:
        self.engine.update_weights(model)  # the next rollout samples from the updated policy

    def evaluate_batches(self, model, batches) -> dict[str, float]:
        """Return the eval loss and rollout metrics of one completion per eval prompt (seeded by ``seed``; V* from Stage 1)."""
        return evaluate_online(model, batches, produce=lambda rows, seed: self._generate_and_score(rows, seed, mode="eval"),
                               compute_loss=self.compute_loss, count_items=self.count_items, loop=self.loop, seed=self.args.seed)

    def state_dict(self) -> dict:
        return {"policy_version": self.engine.policy_version, "optimal_values": [[k, v] for k, v in self._optimal_values.items()],
                "all_incorrect": sorted(self._all_incorrect)}

    def load_state_dict(self, state: dict) -> None:
        self.engine.set_policy_version(int(state.get("policy_version", 0)))
        if "optimal_values" in state:  # the checkpoint's V* (estimated by the run that wrote it) replaces this construction's estimate
            restored = {str(k): float(v) for k, v in state["optimal_values"]}
            if set(state.get("all_incorrect", [])) != self._all_incorrect:
                raise ConfigError("A*-PO resume: the checkpoint's Stage 1 kept other training prompts than this run's Stage 1 (different model, "
                                  "data, reward or seed); resume with the same settings as the run that wrote the checkpoint.")
            self._optimal_values = restored
