"""Generate ``plugins/ppo/tests/data/trl_1_12_0_reference.json``: TRL 1.12.0's PPOTrainer on a fixed rollout, in float64.

TRL 1.12.0 is the last release that ships ``trl.experimental.ppo`` (1.13.0 removed it). This script
creates a throwaway virtual environment in a temporary directory, installs ``trl==1.12.0`` into it
(``--no-deps``) with this venv's pip, and makes this venv's site-packages (torch, transformers,
accelerate, datasets, posttrain) visible *behind* it through a ``.pth`` file, so TRL 1.12 shadows the
installed TRL. It then re-runs itself there (``--child``).

The child drives TRL 1.12's own ``PPOTrainer.train()`` for one rollout and one optimizer step
(``num_ppo_epochs=1``, one mini-batch, one micro-batch holding the whole rollout), with three
module-level functions of ``trl.experimental.ppo.ppo_trainer`` replaced so that the rollout is fixed:

* ``batch_generation`` returns the fixed responses of each query (padded after the EOS, as
  ``generate`` pads) and fixed sampler logits, from which TRL takes pi_old (so the ratio is not 1
  and clipping happens);
* ``get_reward`` returns the fixed score of each query when called with the reward model, and the
  rollout's values from TRL's own ``get_reward`` applied to a second critic (``SEED_OLD_CRITIC``, a
  fixed input like pi_old: the trained critic then differs from it and the value loss clips);
* ``masked_whiten`` / ``masked_mean`` / ``forward`` and ``accelerator.backward`` are wrapped to
  *record* what TRL computes (raw and whitened advantages, the policy and value losses, the
  critic's values, the gradients right after TRL's backward). Nothing else of TRL is changed.

Models: the tiny tokenizer of ``posttrain.testing`` and tiny float64 models whose matrices come from
:func:`portable_values` (not torch's initializers, whose samplers differ across CPU builds): the
policy, the reference, the critic (a one-label sequence classifier) and the sampler (whose logits
are mixed into the policy's to make pi_old). ``plugins/ppo/tests/test_ppo_parity.py`` rebuilds the
same models bit for bit and compares posttrain's PPO with this file.

Usage (about a minute; needs the package index, or ``--find-links DIR`` with the wheel)::

    .venv/bin/python plugins/ppo/scripts/make_trl_reference.py [--find-links /tmp/ppo_wheels]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import venv

HERE = pathlib.Path(__file__).resolve().parent
DEFAULT_OUT = HERE.parent / "tests" / "data" / "trl_1_12_0_reference.json"
PINS = ["trl==1.12.0"]

SEED_POLICY, SEED_REF, SEED_CRITIC, SEED_SAMPLER, SEED_OLD_CRITIC = 0, 1, 2, 3, 4
QUERY_LEN, WIDTH = 4, 7
#: (query token ids, response token ids before the EOS or None = no EOS (fills the width), fixed score)
ROWS = [
    ([11, 12, 13, 14], [21, 22, 23], 0.5),
    ([15, 16, 17, 18], [24, 25, 26, 27, 28], -0.3),
    ([31, 32, 33, 34], [29], 1.2),
    ([35, 36, 37, 38], None, 0.8),
    ([41, 42, 43, 44], [51, 52], -1.0),
    ([45, 46, 47, 48], [53, 54, 55, 56, 57, 58], 0.1),
    ([61, 62, 63, 64], [], 0.7),
    ([65, 66, 67, 68], [71, 72, 73, 74], -0.6),
]
#: name -> PPOConfig overrides (both sides), the temperature included
CONFIGS = {
    "default": {"kl_coef": 0.05, "kl_estimator": "k1", "whiten_rewards": False, "gamma": 1.0, "lam": 0.95, "cliprange": 0.2,
                "cliprange_value": 0.2, "vf_coef": 0.1, "missing_eos_penalty": None, "temperature": 0.7},
    "k3_whiten_eos_penalty": {"kl_coef": 0.2, "kl_estimator": "k3", "whiten_rewards": True, "gamma": 0.9, "lam": 0.8, "cliprange": 0.1,
                              "cliprange_value": 0.05, "vf_coef": 0.5, "missing_eos_penalty": 1.0, "temperature": 1.0},
}
SAMPLER_MIX = 0.5  # sampler logits = policy logits + SAMPLER_MIX * the sampler model's logits (then / temperature)

_MASK64 = (1 << 64) - 1


def portable_values(n: int, stream: int) -> list[float]:
    """``n`` floats uniform on [-2**-5, 2**-5) from a splitmix64 stream: the same bits on every machine (pure-Python integers)."""
    state, out = (stream * 0x2545F4914F6CDD1D) & _MASK64, []
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
        out.append(((z >> 11) - (1 << 52)) * 2.0**-57)
    return out


def _refill(model, seed: int):
    import torch

    model = model.to(torch.float64)
    with torch.no_grad():
        for index, param in enumerate(model.parameters()):
            if param.ndim >= 2:  # matrices from the portable stream; norm weights (1) and biases (0) stay exact
                param.copy_(torch.tensor(portable_values(param.numel(), 1000 * seed + index), dtype=torch.float64).view_as(param) * 4.0)
    return model


def portable_policy(tokenizer, seed: int):
    """The tiny causal LM of ``posttrain.testing`` in float64 with portable matrices (std ~0.07)."""
    from posttrain.testing.tiny_model import build_model

    return _refill(build_model(tokenizer, seed=seed), seed)


def portable_critic(tokenizer, seed: int = SEED_CRITIC):
    """The tiny one-label sequence classifier of ``posttrain.testing`` in float64 with portable matrices."""
    from posttrain.testing.tiny_model import build_reward_model

    return _refill(build_reward_model(tokenizer, seed=seed), seed)


def fixed_rollout(tokenizer):
    """``(queries (B, Q), responses (B, C) padded after the EOS, scores (B,))`` as lists."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    queries, responses, scores = [], [], []
    for query, response, score in ROWS:
        full = [60 + (i * 7) % 40 for i in range(WIDTH)] if response is None else response + [eos]
        queries.append(list(query))
        responses.append(full + [pad] * (WIDTH - len(full)))
        scores.append(score)
    return queries, responses, scores


def sampler_logits(policy, sampler, queries, responses, temperature: float):
    """``(B, C, V)`` float64 logits of pi_old: (policy + SAMPLER_MIX * sampler) logits at the completion positions / (temperature + 1e-7)."""
    import torch

    ids = torch.cat([torch.tensor(queries), torch.tensor(responses)], dim=1)
    with torch.no_grad():
        logits = policy(input_ids=ids).logits + SAMPLER_MIX * sampler(input_ids=ids).logits
    return logits[:, QUERY_LEN - 1 : -1] / (temperature + 1e-7)


def grad_fingerprints(model) -> dict:
    """Per parameter: gradient norm, sum and dot with a portable probe (stream 7000 + index), in float64."""
    import torch

    out = {}
    for index, (name, param) in enumerate(model.named_parameters()):
        grad = torch.zeros_like(param, dtype=torch.float64) if param.grad is None else param.grad.detach().double()
        probe = torch.tensor(portable_values(param.numel(), 7000 + index), dtype=torch.float64).view_as(grad)
        out[name] = [grad.norm().item(), grad.sum().item(), (grad * probe).sum().item()]
    return out


# --------------------------------------------------------------------------------------- the child
def _run_config(name: str, overrides: dict, tmp: str) -> dict:
    import torch
    from datasets import Dataset

    import trl
    import trl.experimental.ppo.ppo_trainer as M
    from posttrain.testing.tiny_model import build_tokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    assert trl.__version__ == "1.12.0", trl.__version__
    torch.manual_seed(0)
    tok = build_tokenizer()
    policy, ref, sampler = portable_policy(tok, SEED_POLICY), portable_policy(tok, SEED_REF), portable_policy(tok, SEED_SAMPLER)
    critic, old_critic, reward_model = portable_critic(tok), portable_critic(tok, SEED_OLD_CRITIC), portable_critic(tok, 9)
    queries, responses, scores = fixed_rollout(tok)
    temperature = overrides["temperature"]
    logits = sampler_logits(policy, sampler, queries, responses, temperature)
    by_query = {tuple(q): i for i, q in enumerate(queries)}
    record: dict = {"masked_mean": [], "whiten": [], "values": None}
    state = {"training": False}

    def fake_batch_generation(model, q, local_rollout_forward_batch_size, pad_token_id, generation_config):
        rows = [by_query[tuple(x.tolist())] for x in q]
        record["order"] = rows
        return torch.cat([q, torch.tensor([responses[i] for i in rows])], dim=1), logits[rows]

    real_get_reward = M.get_reward

    def fake_get_reward(model, query_responses, pad_token_id, context_length):
        if model is reward_model:
            rows = [by_query[tuple(x.tolist())] for x in query_responses[:, :context_length]]
            return None, torch.tensor([scores[i] for i in rows], dtype=torch.float64), None
        # the rollout's values V_t come from another critic (a fixed input, as pi_old): the value loss then clips
        full, last, lengths = real_get_reward(old_critic, query_responses, pad_token_id, context_length)
        record["values"] = full[:, context_length - 1 : -1].squeeze(-1).detach().clone()
        return full, last, lengths

    real_whiten, real_mean, real_forward, real_generation = M.masked_whiten, M.masked_mean, M.forward, M.batch_generation

    def rec_whiten(values, mask, shift_mean=True):
        out = real_whiten(values, mask, shift_mean=shift_mean)
        record["whiten"].append({"input": values.detach().clone(), "output": out.detach().clone(), "shift_mean": shift_mean})
        return out

    def rec_mean(values, mask, axis=None):
        out = real_mean(values, mask, axis)
        if state["training"]:
            record["masked_mean"].append(out.detach().clone())
        return out

    def rec_forward(model, query_responses, pad_token_id):
        if isinstance(model, M.PolicyAndValueWrapper):
            state["training"] = True
        return real_forward(model, query_responses, pad_token_id)

    M.batch_generation, M.get_reward, M.masked_whiten, M.masked_mean, M.forward = fake_batch_generation, fake_get_reward, rec_whiten, rec_mean, rec_forward
    try:
        args = PPOConfig(output_dir=os.path.join(tmp, name), per_device_train_batch_size=len(ROWS), gradient_accumulation_steps=1, num_mini_batches=1,
                         num_ppo_epochs=1, total_episodes=len(ROWS), response_length=WIDTH, stop_token="eos", learning_rate=0.0, report_to="none",
                         bf16=False, use_cpu=True, gradient_checkpointing=False, num_sample_generations=0, save_strategy="no", logging_steps=1,
                         seed=0, **overrides)
        trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward_model,
                             train_dataset=Dataset.from_dict({"input_ids": queries}), value_model=critic)
        accelerator = trainer.accelerator
        real_backward = accelerator.backward

        def rec_backward(loss, **kwargs):
            real_backward(loss, **kwargs)
            record["loss"] = float(loss)
            record["policy_grads"] = grad_fingerprints(trainer.model.policy)
            record["critic_grads"] = grad_fingerprints(trainer.model.value_model)

        accelerator.backward = rec_backward
        trainer.train()
    finally:
        M.batch_generation, M.get_reward, M.masked_whiten, M.masked_mean, M.forward = real_generation, real_get_reward, real_whiten, real_mean, real_forward

    order = record["order"]  # TRL's rollout rows, as indices of ROWS (its dataloader shuffles)
    back = torch.empty(len(order), dtype=torch.long)
    back[torch.tensor(order)] = torch.arange(len(order))  # TRL row of each fixed row
    advantage_call = [w for w in record["whiten"] if w["shift_mean"]][-1]
    vf_half_mean, vf_clipfrac, pg_loss, pg_clipfrac = (float(x) for x in record["masked_mean"][:4])
    old = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(responses).unsqueeze(-1)).squeeze(-1)  # (B, C), fixed row order
    return {
        "overrides": overrides,
        "old_logprobs": old.tolist(),
        "values": record["values"][back].tolist(),
        "raw_advantages": advantage_call["input"][back].tolist(),
        "advantages": advantage_call["output"][back].tolist(),
        "pg_loss": pg_loss,
        "vf_loss": 0.5 * vf_half_mean,
        "pg_clipfrac": pg_clipfrac,
        "vf_clipfrac": vf_clipfrac,
        "loss": record["loss"],
        "policy_grads": record["policy_grads"],
        "critic_grads": record["critic_grads"],
    }


def _child(out_path: str) -> None:
    import torch
    import transformers

    import trl
    from posttrain.testing.tiny_model import build_tokenizer

    torch.set_num_threads(1)
    tok = build_tokenizer()
    queries, responses, scores = fixed_rollout(tok)
    result = {
        "generator": "plugins/ppo/scripts/make_trl_reference.py",
        "versions": {"trl": trl.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "rollout": {"queries": queries, "responses": responses, "scores": scores, "eos": tok.eos_token_id, "pad": tok.pad_token_id},
        "configs": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in CONFIGS.items():
            result["configs"][name] = _run_config(name, overrides, tmp)
            print(name, "loss", result["configs"][name]["loss"], "pg", result["configs"][name]["pg_loss"], "vf", result["configs"][name]["vf_loss"])
    pathlib.Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(out_path).write_text(json.dumps(result, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--find-links", default=None, help="a directory of wheels to install from (else the package index)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.out)
        return 0
    import site

    ours = [p for p in site.getsitepackages() if p.endswith("site-packages")]
    with tempfile.TemporaryDirectory(prefix="ppo-trl112-") as tmp:
        env_dir = pathlib.Path(tmp) / "venv"
        venv.create(env_dir, with_pip=False, symlinks=True)
        py = f"python{sys.version_info.major}.{sys.version_info.minor}"
        target = env_dir / "lib" / py / "site-packages"
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), *PINS]
        if args.find_links:
            pip += ["--find-links", args.find_links]
        subprocess.run(pip, check=True)
        # processed after the throwaway venv's own site-packages: its trl 1.12 shadows ours
        (target / "zz_posttrain_venv.pth").write_text("".join(f"import site; site.addsitedir({p!r})\n" for p in ours))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
               "CUDA_VISIBLE_DEVICES": "", "PYTHONNOUSERSITE": "1", "TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
        env.pop("PYTHONPATH", None)
        subprocess.run([str(env_dir / "bin" / "python"), str(pathlib.Path(__file__).resolve()), "--child", "--out", args.out], check=True, env=env)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
