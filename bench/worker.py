"""One benchmark run in a fresh process: ``python -m bench.worker --framework posttrain|trl|bare ...``.

Measures, for ``warmup + steps`` optimizer steps of one workload:

* ``time_to_first_step_s``: from the parent's clock just before it started this process
  (``--t0``, ``time.time()``) to the end of the first optimizer step: interpreter start,
  imports, model/data loading, trainer setup and the first step.
* ``step_times_s``: wall time between consecutive step ends, for the steps after warm-up.
  Step ends are stamped with no extra work on either side:
    - posttrain: the loop calls ``method.on_step_end(model, state)`` after every optimizer step;
      the worker wraps the trainer's (or adds one) with a ``perf_counter`` stamp.
    - TRL: a ``TrainerCallback.on_step_end`` (TRL's CallbackHandler calls its callbacks every
      step anyway; the worker's adds one Python call).
    - bare: a ``perf_counter`` stamp after ``optimizer.zero_grad``.
  The interval between two stamps holds everything a step costs: data collation, generation,
  forwards, backward, clipping, optimizer, scheduler, per-step bookkeeping.
* ``step_cpu_times_s``: the same intervals in process CPU time (all threads), less sensitive to
  other processes on a shared machine (but spin-waiting threads count).
* ``loadavg_start`` / ``loadavg_end``: the 1-minute load average around the run (noise indicator).
* ``peak_rss_mb``: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` at the end of training.
* ``train_s``: the whole ``trainer.train()`` call (bare: from before its first step to after its
  last), with ``train_to_first_step_s`` (set-up + the first step) and ``last_step_to_train_end_s``
  (after the last step: the final save, summary, trackers) beside it.
* ``rss_added_by_training_mb``: peak RSS minus the RSS just before ``train()`` (``/proc/self/statm``):
  the memory training adds on top of the loaded model(s), data and imports.
* ``memory_floor_mb``: the bytes no framework can avoid for the trained parameters, read from the run's own
  model(s) and optimizer(s) after training (:func:`memory_floor`): a gradient per trainable parameter
  (``numel * element_size``) plus every tensor the optimizer holds in ``optimizer.state`` (AdamW: ``exp_avg``,
  ``exp_avg_sq`` in the state's dtype, and its ``step``). ``memory_above_floor_mb`` is the memory added by training
  minus that floor; on ``--device cuda``, where the floor's tensors live on the GPU, it is ``peak_gpu_mem_mb`` minus
  the floor instead (the weights included: posttrain places the model on the GPU inside ``train()``, TRL before it), as
  ``memory_above_floor_basis`` says. ``memory_floor_detail`` splits the floor into gradients and optimizer state.
* ``posttrain_file`` (and ``plugin_file``, posttrain runs): the ``__file__`` of the ``posttrain`` package (and of
  the trainer's module) the run imported, so a before/after comparison can show which code it measured.

The result is written as JSON to ``--json-out``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

from bench.workloads import COMMON, DPO_BETA, GRPO_BETA, KTO_BETA, RLOO_BETA, reward_num_words, write_json


class _Stamps:
    def __init__(self, total: int = 0) -> None:
        self.total = total
        self.rss_at_last_step_mb: float | None = None  # ru_maxrss when the last step ended (before any final save)
        self.ends: list[float] = []  # perf_counter at each optimizer step's end
        self.cpu_ends: list[float] = []  # process CPU time (all threads) at each step's end
        self.first_end_wall: float | None = None  # time.time() at the first step's end
        self.train_begin: float | None = None  # perf_counter just before trainer.train() (bare: before its first step)
        self.train_end: float | None = None  # perf_counter when trainer.train() returned (bare: after its last step)
        self.rss_before_train_mb: float | None = None  # current RSS just before train()
        #: (trained models, their optimizers) after training, for the memory floor (set by every runner)
        self.trained: tuple[list, list] | None = None

    def begin_train(self) -> None:
        self.rss_before_train_mb = current_rss_mb()
        self.train_begin = time.perf_counter()

    def end_train(self) -> None:
        self.train_end = time.perf_counter()

    def stamp(self) -> None:
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())
        if self.first_end_wall is None:
            self.first_end_wall = time.time()
        if len(self.ends) == self.total:
            self.rss_at_last_step_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    """The process's resident set size now (``/proc/self/statm``; falls back to the peak off Linux)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def memory_floor(models, optimizers) -> dict:
    """The memory no framework can avoid for the trained parameters, from the run's own objects after training.

    Args:
        models: The trained models (the policy, and any trainable model beside it); their parameters with
            ``requires_grad`` each need a gradient of their own size and dtype.
        optimizers: Their optimizers (a wrapper such as accelerate's ``AcceleratedOptimizer`` exposes the wrapped
            optimizer's ``state``); every tensor in ``optimizer.state`` counts (AdamW: ``exp_avg``, ``exp_avg_sq``
            and ``step``).

    Returns:
        ``{"gradients_mb", "optimizer_state_mb", "total_mb", "device"}``: MiB (2**20 bytes) and the device type
        of the trained parameters (``"cpu"``, ``"cuda"``, ...).

    Raises:
        ValueError: no trainable parameter, or an optimizer with no state after training (the floor would be wrong).
    """
    import torch

    seen, grad_bytes, devices = set(), 0, set()
    for model in models:
        for p in model.parameters():
            if p.requires_grad and id(p) not in seen:  # tied weights: one parameter, one gradient
                seen.add(id(p))
                grad_bytes += p.numel() * p.element_size()
                devices.add(p.device.type)
    if not seen:
        raise ValueError("memory floor: the run's models have no parameter with requires_grad; nothing was trained")
    state_bytes, tensors = 0, set()
    for opt in optimizers:
        if not opt.state:
            raise ValueError(f"memory floor: {type(opt).__name__}.state is empty after training; read it before it is dropped")
        for per_param in opt.state.values():
            for value in per_param.values():
                if isinstance(value, torch.Tensor) and id(value) not in tensors:
                    tensors.add(id(value))
                    state_bytes += value.numel() * value.element_size()
    return {"gradients_mb": grad_bytes / 2**20, "optimizer_state_mb": state_bytes / 2**20,
            "total_mb": (grad_bytes + state_bytes) / 2**20, "device": "cuda" if "cuda" in devices else sorted(devices)[0]}


def _posttrain_trained(trainer) -> tuple[list, list]:
    """The policy and its optimizer of a posttrain trainer after ``train()`` (no benchmark workload trains a model beside it).

    Raises:
        ValueError: the trainer trained other models too (``loop.trainable_model_names``): their optimizers have no
            public accessor, so the floor would be too low.
    """
    loop = trainer.loop
    extra = list(getattr(loop, "trainable_model_names", ()))
    if extra:
        raise ValueError(f"memory floor: the run also trained {extra}; count their gradients and optimizer state too")
    return [loop.unwrapped_model()], [loop.optimizer]


# ====================================================================== posttrain
#: the experimental offline-preference plugins (issue 11), timed against posttrain's DPO on the same rows
#: (``python -m bench.preference``): name -> (plugin, Config/Trainer prefix, config overrides)
WAVE1 = {
    "orpo": ("orpo", "ORPO", {}),
    "cpo": ("cpo", "CPO", {"loss_type": "sigmoid"}),
    "simpo": ("cpo", "CPO", {"loss_type": "simpo", "cpo_alpha": 0.0}),
    "tpo": ("tpo", "TPO", {}),
    "bco": ("bco", "BCO", {}),
}


def _wave1_trainer(a, ds, common: dict):
    """An experimental preference trainer (opted in here, as ``--allow-experimental`` does on the CLI)."""
    import importlib

    import posttrain

    plugin, prefix, overrides = WAVE1[a.method]
    posttrain.activate(plugin, allow_experimental=True)
    module = importlib.import_module(f"posttrain.experimental.{plugin}")
    config = getattr(module, f"{prefix}Config")(max_length=4 * a.seq_len, beta=DPO_BETA, **overrides, **common)
    return getattr(module, f"{prefix}Trainer")(model=a.model_dir, args=config, train_dataset=ds)


def run_posttrain(a, rows, stamps: _Stamps, out_dir: str) -> dict:
    from datasets import Dataset

    common = dict(
        output_dir=out_dir,
        per_device_train_batch_size=a.batch_size,
        max_steps=a.warmup + a.steps,
        logging_steps=10**6,
        logging_first_step=False,
        save_strategy="no",
        disable_tqdm=True,
        report_to="none",
        bf16=a.bf16,
        gradient_checkpointing=False,  # the plugins' default is TRL's (on since 2.0.0); off in all three, as the bare loop has none
        **COMMON,
    )
    ds = Dataset.from_list(rows)
    if a.method == "sft":
        from posttrain.methods.sft import SFTConfig, SFTTrainer

        trainer = SFTTrainer(model=a.model_dir, args=SFTConfig(max_length=a.seq_len, **common), train_dataset=ds)
    elif a.method == "dpo":
        from posttrain.methods.dpo import DPOConfig, DPOTrainer

        cfg = DPOConfig(max_length=4 * a.seq_len, beta=DPO_BETA, loss_type=["sigmoid"], **common)
        trainer = DPOTrainer(model=a.model_dir, args=cfg, train_dataset=ds)
    elif a.method == "kto":
        from posttrain.methods.kto import KTOConfig, KTOTrainer

        trainer = KTOTrainer(model=a.model_dir, args=KTOConfig(max_length=4 * a.seq_len, beta=KTO_BETA, **common), train_dataset=ds)
    elif a.method in ("grpo", "rloo"):
        if a.method == "grpo":
            from posttrain.methods.grpo import GRPOConfig as Config, GRPOTrainer as Trainer

            extra = dict(beta=GRPO_BETA)
        else:
            from posttrain.methods.rloo import RLOOConfig as Config, RLOOTrainer as Trainer

            extra = dict(beta=RLOO_BETA)
        common["per_device_train_batch_size"] = a.batch_size * a.num_generations  # completions, as in TRL
        if a.vllm:
            extra["rollout_backend"] = "vllm"
        cfg = Config(num_generations=a.num_generations, max_completion_length=a.completion_len, temperature=1.0, **extra, **common)
        trainer = Trainer(model=a.model_dir, reward_funcs=[reward_num_words], args=cfg, train_dataset=ds)
    elif a.method in WAVE1:
        trainer = _wave1_trainer(a, ds, common)
    else:
        raise SystemExit(f"unknown method {a.method}")

    original = getattr(trainer, "on_step_end", None)

    def on_step_end(model, state):
        if original is not None:
            original(model, state)
        stamps.stamp()

    trainer.on_step_end = on_step_end
    stamps.begin_train()
    out = trainer.train()
    stamps.end_train()
    stamps.trained = _posttrain_trained(trainer)
    import posttrain

    return {"loss": float(out.training_loss), "posttrain_file": posttrain.__file__, "plugin_file": sys.modules[type(trainer).__module__].__file__}


# ====================================================================== TRL
def run_trl(a, rows, stamps: _Stamps, out_dir: str) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.stamp()

    common = dict(
        output_dir=out_dir,
        per_device_train_batch_size=a.batch_size,
        max_steps=a.warmup + a.steps,
        logging_steps=10**6,
        logging_first_step=False,
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        report_to="none",
        bf16=a.bf16,
        fp16=False,
        use_cpu=a.device != "cuda",
        gradient_checkpointing=False,  # TRL's default (and posttrain's plugins') is on; off in all three, as the bare loop has none
        dataloader_num_workers=0,
        **COMMON,
    )
    ds = Dataset.from_list(rows)
    if a.method == "sft":
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(model=a.model_dir, args=SFTConfig(max_length=a.seq_len, **common), train_dataset=ds, callbacks=[StepTimer()])
    elif a.method == "dpo":
        from trl import DPOConfig, DPOTrainer

        cfg = DPOConfig(max_length=4 * a.seq_len, beta=DPO_BETA, loss_type=["sigmoid"], **common)
        trainer = DPOTrainer(model=a.model_dir, args=cfg, train_dataset=ds, callbacks=[StepTimer()])
    elif a.method == "kto":
        from trl import KTOConfig, KTOTrainer

        cfg = KTOConfig(max_length=4 * a.seq_len, beta=KTO_BETA, **common)
        trainer = KTOTrainer(model=a.model_dir, args=cfg, train_dataset=ds, callbacks=[StepTimer()])
    elif a.method in ("grpo", "rloo"):
        if a.method == "grpo":
            from trl import GRPOConfig as Config, GRPOTrainer as Trainer

            extra = dict(beta=GRPO_BETA)
        else:
            from trl import RLOOConfig as Config, RLOOTrainer as Trainer

            extra = dict(beta=RLOO_BETA)
        common["per_device_train_batch_size"] = a.batch_size * a.num_generations
        if a.vllm:
            extra.update(use_vllm=True, vllm_mode="colocate")
        cfg = Config(num_generations=a.num_generations, max_completion_length=a.completion_len, temperature=1.0, **extra, **common)
        trainer = Trainer(model=a.model_dir, reward_funcs=[reward_num_words], args=cfg, train_dataset=ds, callbacks=[StepTimer()])
    else:
        raise SystemExit(f"unknown method {a.method}")
    stamps.begin_train()
    out = trainer.train()
    stamps.end_train()
    stamps.trained = ([trainer.accelerator.unwrap_model(trainer.model)], [trainer.optimizer])
    return {"loss": float(out.training_loss)}


# ====================================================================== bare PyTorch
def run_bare(a, rows, stamps: _Stamps, out_dir: str) -> dict:
    """The floor: only the forwards/backward/optimizer work (and rollouts) the method needs."""
    import copy
    import random

    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(a.device)
    torch.manual_seed(COMMON["seed"])
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=COMMON["learning_rate"], weight_decay=COMMON["weight_decay"], fused=True)  # the fastest AdamW torch has (TRL also uses it)
    pad = tok.pad_token_id
    if a.bf16:  # the same mixed precision the trainers use on GPU: fp32 master weights, bf16 autocast
        forward = model.forward
        model.forward = lambda *args, **kw: _autocast(forward, *args, **kw)
    order = list(range(len(rows)))
    random.Random(COMMON["seed"]).shuffle(order)
    n_steps = a.warmup + a.steps
    losses = []
    stamps.begin_train()

    def logps_of(logits, targets):  # (B, T, V), (B, T) -> (B, T); logit - logsumexp: no (B, T, V) log-softmax
        return torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)

    def optimizer_step(loss):
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), COMMON["max_grad_norm"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        stamps.stamp()

    def batch_rows(step, per_step):
        idx = [order[(step * per_step + i) % len(order)] for i in range(per_step)]
        return [rows[i] for i in idx]

    if a.method == "sft":
        eos = tok.eos_token
        encoded = [tok(text=r["text"] + eos)["input_ids"][: a.seq_len] for r in rows]
        for step in range(n_steps):
            ids = [encoded[order[(step * a.batch_size + i) % len(order)]] for i in range(a.batch_size)]
            length = max(map(len, ids))
            input_ids = torch.full((len(ids), length), pad, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for i, x in enumerate(ids):
                input_ids[i, : len(x)] = torch.tensor(x)
                mask[i, : len(x)] = 1
            input_ids, mask = input_ids.to(device), mask.to(device)
            logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits[:, :-1]
            labels = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
            optimizer_step(loss)
    elif a.method == "dpo":
        ref = copy.deepcopy(model).eval().requires_grad_(False)
        enc = []
        for r in rows:
            p = tok(text=r["prompt"])["input_ids"]
            enc.append((p, tok(text=r["chosen"], add_special_tokens=False)["input_ids"], tok(text=r["rejected"], add_special_tokens=False)["input_ids"]))
        for step in range(n_steps):
            batch = [enc[order[(step * a.batch_size + i) % len(order)]] for i in range(a.batch_size)]
            seqs = [p + c for p, c, _ in batch] + [p + r for p, _, r in batch]  # chosen rows then rejected rows
            plen = [len(p) for p, _, _ in batch] * 2
            length = max(map(len, seqs))
            input_ids = torch.full((len(seqs), length), pad, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            cmask = torch.zeros_like(input_ids, dtype=torch.bool)
            for i, s in enumerate(seqs):
                input_ids[i, : len(s)] = torch.tensor(s)
                mask[i, : len(s)] = 1
                cmask[i, plen[i] : len(s)] = True
            input_ids, mask, cmask = input_ids.to(device), mask.to(device), cmask[:, 1:].to(device)
            targets = input_ids[:, 1:]
            with torch.no_grad():
                ref_lp = (logps_of(ref(input_ids=input_ids, attention_mask=mask, use_cache=False).logits[:, :-1].float(), targets) * cmask).sum(-1)
            lp = (logps_of(model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits[:, :-1].float(), targets) * cmask).sum(-1)
            b = a.batch_size
            margin = (lp[:b] - ref_lp[:b]) - (lp[b:] - ref_lp[b:])
            loss = -F.logsigmoid(DPO_BETA * margin).mean()
            optimizer_step(loss)
    elif a.method == "kto":
        # TRL's KTO: each row's KL partner is the previous row's completion (rotated by one within the batch); the
        # policy's KL forward runs without grad; the KL estimate is the batch mean, clamped at 0 and detached
        ref = copy.deepcopy(model).eval().requires_grad_(False)
        enc = [(tok(text=r["prompt"])["input_ids"], tok(text=r["completion"], add_special_tokens=False)["input_ids"], bool(r["label"])) for r in rows]

        def pack(pairs):  # [(prompt ids, completion ids)] -> input_ids, attention mask, completion mask (shifted)
            seqs = [p + c for p, c in pairs]
            length = max(map(len, seqs))
            input_ids = torch.full((len(seqs), length), pad, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            cmask = torch.zeros_like(input_ids, dtype=torch.bool)
            for i, (p, c) in enumerate(pairs):
                input_ids[i, : len(p) + len(c)] = torch.tensor(p + c)
                mask[i, : len(p) + len(c)] = 1
                cmask[i, len(p) : len(p) + len(c)] = True
            return input_ids.to(device), mask.to(device), cmask[:, 1:].to(device)

        def seq_logps(net, ids, mask, cmask):
            return (logps_of(net(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float(), ids[:, 1:]) * cmask).sum(-1)

        for step in range(n_steps):
            batch = [enc[order[(step * a.batch_size + i) % len(order)]] for i in range(a.batch_size)]
            main = pack([(p, c) for p, c, _ in batch])
            kl = pack([(batch[i][0], batch[i - 1][1]) for i in range(len(batch))])
            label = torch.tensor([y for _, _, y in batch], device=device)
            with torch.no_grad():
                ref_lp, ref_kl = seq_logps(ref, *main), seq_logps(ref, *kl)
                kl_est = (seq_logps(model, *kl) - ref_kl).mean().clamp(min=0)
            logratio = seq_logps(model, *main) - ref_lp
            loss = torch.where(label, 1 - torch.sigmoid(KTO_BETA * (logratio - kl_est)), 1 - torch.sigmoid(KTO_BETA * (kl_est - logratio))).mean()
            optimizer_step(loss)
    elif a.method in ("grpo", "rloo"):
        g, c = a.num_generations, a.completion_len
        beta = GRPO_BETA if a.method == "grpo" else RLOO_BETA
        ref = copy.deepcopy(model).eval().requires_grad_(False) if beta > 0 else None
        tok.padding_side = "left"
        eos_id = tok.eos_token_id
        for step in range(n_steps):
            prompts = [r["prompt"] for r in batch_rows(step, a.batch_size)]
            enc = tok(text=prompts, return_tensors="pt", padding=True, padding_side="left")
            p_ids = enc["input_ids"].repeat_interleave(g, 0).to(device)
            p_mask = enc["attention_mask"].repeat_interleave(g, 0).to(device)
            with torch.no_grad():
                out = model.generate(
                    input_ids=p_ids, attention_mask=p_mask, do_sample=True, max_new_tokens=c, temperature=1.0, top_k=0, top_p=1.0,
                    pad_token_id=pad, eos_token_id=eos_id,
                )
            comp = out[:, p_ids.shape[1] :]  # (N, C')
            is_eos = comp == eos_id
            first_eos = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full((comp.shape[0],), comp.shape[1], device=device))
            c_mask = (torch.arange(comp.shape[1], device=device)[None] <= first_eos[:, None]).float()  # (N, C')
            texts = tok.batch_decode(comp, skip_special_tokens=True)
            rewards = torch.tensor(reward_num_words(texts), device=device)  # (N,)
            ids = torch.cat([p_ids, comp], 1)
            mask = torch.cat([p_mask, c_mask.long()], 1)
            p = p_ids.shape[1]
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, p - 1 : -1].float()  # (N, C', V)
            lp = logps_of(logits, comp)  # (N, C')
            if a.method == "grpo":
                r = rewards.view(-1, g)
                adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).flatten()
                ratio = torch.exp(lp - lp.detach())
                loss = -(ratio * adv[:, None] * c_mask).sum() / c_mask.sum().clamp(min=1)  # dapo, one iteration
            else:
                with torch.no_grad():
                    ref_lp = logps_of(ref(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, p - 1 : -1].float(), comp)
                    kl = ((lp.detach() - ref_lp) * c_mask).sum(1)
                    r = (rewards - beta * kl).view(-1, g)
                    adv = (r - (r.sum(1, keepdim=True) - r) / (g - 1)).flatten()  # leave-one-out baseline
                seq_lp = (lp * c_mask).sum(1)
                ratio = torch.exp(seq_lp - seq_lp.detach())
                loss = -(ratio * adv).mean()
            optimizer_step(loss)
    else:
        raise SystemExit(f"unknown method {a.method}")
    loss = float(torch.stack(losses).mean())
    stamps.end_train()
    stamps.trained = ([model], [opt])
    return {"loss": loss}


def _autocast(fn, *args, **kwargs):
    import torch

    with torch.autocast("cuda", dtype=torch.bfloat16):
        return fn(*args, **kwargs)


RUNNERS = {"posttrain": run_posttrain, "trl": run_trl, "bare": run_bare}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.worker", description=__doc__.splitlines()[0])
    p.add_argument("--framework", required=True, choices=sorted(RUNNERS))
    p.add_argument("--method", required=True)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--data", required=True, help="JSON list of dataset rows")
    p.add_argument("--json-out", required=True)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--completion-len", type=int, default=32)
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU path)")
    p.add_argument("--vllm", action="store_true", help="GRPO/RLOO rollouts with vLLM (GPU path)")
    p.add_argument("--t0", type=float, default=None, help="the parent's time.time() just before starting this process")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    t0 = a.t0 if a.t0 is not None else time.time()
    import torch

    torch.set_num_threads(a.threads)
    with open(a.data) as fh:
        rows = json.load(fh)
    stamps = _Stamps(a.warmup + a.steps)
    load_start = os.getloadavg()[0]
    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix=f"bench-{a.framework}-") as out_dir:
        extra = RUNNERS[a.framework](a, rows, stamps, out_dir)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    ends = stamps.ends
    if len(ends) != a.warmup + a.steps:
        raise SystemExit(f"{a.framework}/{a.method}: saw {len(ends)} step ends, expected {a.warmup + a.steps}")
    first = max(1, a.warmup)
    step_times = [ends[i] - ends[i - 1] for i in range(first, len(ends))]
    cpu = stamps.cpu_ends
    step_cpu_times = [cpu[i] - cpu[i - 1] for i in range(first, len(cpu))]
    result = {
        "framework": a.framework,
        "method": a.method,
        "steps": a.steps,
        "warmup": a.warmup,
        "batch_size": a.batch_size,
        "step_times_s": step_times,
        "step_cpu_times_s": step_cpu_times,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg()[0],
        "time_to_first_step_s": stamps.first_end_wall - t0,
        "peak_rss_mb": peak_rss_mb,
        "peak_rss_at_last_step_mb": stamps.rss_at_last_step_mb,
        "rss_before_train_mb": stamps.rss_before_train_mb,
        "rss_added_by_training_mb": peak_rss_mb - stamps.rss_before_train_mb,
        "train_s": stamps.train_end - stamps.train_begin,
        "train_to_first_step_s": ends[0] - stamps.train_begin,
        "last_step_to_train_end_s": stamps.train_end - ends[-1],
        "threads": torch.get_num_threads(),
        "torch_threads_requested": a.threads,
        **extra,
    }
    if a.device == "cuda":
        result["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    floor = memory_floor(*stamps.trained)
    result["memory_floor_mb"] = floor["total_mb"]
    result["memory_floor_detail"] = floor
    basis = "peak_gpu_mem_mb" if floor["device"] == "cuda" and "peak_gpu_mem_mb" in result else "rss_added_by_training_mb"
    result["memory_above_floor_mb"] = result[basis] - floor["total_mb"]
    result["memory_above_floor_basis"] = basis
    result.setdefault("posttrain_file", sys.modules["posttrain"].__file__ if "posttrain" in sys.modules else None)
    write_json(a.json_out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
