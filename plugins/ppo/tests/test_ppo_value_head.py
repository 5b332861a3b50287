"""PPO with a value head on the policy (``value_head=True``) instead of a separate critic.

Checked: on the fixed rollout of the TRL-parity fixtures (the same portable float64 models), the rollout's
values, advantages, the loss ``pg_loss + vf_coef * vf_loss`` and its gradients on every policy and head parameter
equal an independent float64 derivation written below (full logits, per-row GAE loops), and the value loss alone
reaches the trunk; the tiny model learns the verifiable task with the head; a run resumed mid-rollout repeats
the uninterrupted one bit for bit (losses and head weights); ``output_dir`` holds ``value_head.safetensors`` beside a
``model.safetensors`` that plain transformers loads with no unexpected key, and a run started from that directory
continues with the saved head; a value head beside a separate critic is refused in one line.

Tolerances of the derivation: both sides compute in float64 on identical inputs and differ in summation order only
(our log-probs come from chunks of hidden states against the LM head, the derivation's from full logits): relative
1e-9 for losses and values, 1e-8 of each gradient's norm (measured: <= 1e-15 on this machine).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil

import pytest
import torch

from posttrain import ConfigError

from test_ppo_trainer import _config, _prompts, _rows, _weights, low_token_fraction

HERE = pathlib.Path(__file__).resolve().parent
REFERENCE = json.loads((HERE / "data" / "trl_1_12_0_reference.json").read_text())
_spec = importlib.util.spec_from_file_location("ppo_make_trl_reference_vh", HERE.parent / "scripts" / "make_trl_reference.py")
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)  # the portable float64 models (imports no trl)

INVALID = 1.0  # TRL's log-prob on padding


def _batch():
    rollout = REFERENCE["rollout"]
    queries, responses = torch.tensor(rollout["queries"]), torch.tensor(rollout["responses"])
    mask = torch.zeros_like(responses)
    for i, row in enumerate(responses.tolist()):
        mask[i, : row.index(rollout["eos"]) + 1 if rollout["eos"] in row else len(row)] = 1
    return {"prompt_ids": queries, "prompt_mask": torch.ones_like(queries), "completion_ids": responses, "completion_mask": mask}


def _portable_head(hidden: int, stream: int, scale: float, base: torch.nn.Linear | None = None) -> torch.nn.Linear:
    head = torch.nn.Linear(hidden, 1, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(torch.tensor(gen.portable_values(hidden, stream), dtype=torch.float64).view(1, hidden) * scale)
        head.bias.fill_(gen.portable_values(1, stream + 1)[0] * scale)
        if base is not None:
            head.weight += base.weight
            head.bias += base.bias
    return head


# ----------------------------------------------------------------------------- the derivation (float64, independent of the trainer's math)
def _derive_logps_and_values(model, head, batch, temperature):
    """log pi(token) from the full logits at ``temperature`` and the head on the last hidden states, at the states before each completion token."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    out = model(input_ids=ids, attention_mask=attention, output_hidden_states=True)
    p, c = batch["prompt_ids"].shape[1], batch["completion_ids"].shape[1]
    logits = out.logits[:, p - 1 : p - 1 + c] / temperature
    logps = torch.log_softmax(logits, -1).gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
    values = out.hidden_states[-1][:, p - 1 : p - 1 + c] @ head.weight[0] + head.bias[0]
    return logps, values


def _whiten(x, keep_mean=False):
    # TRL's Bessel factor n / (n - 1) is a ratio of integer tensors (a bool mask's sum), so it is float32 (~3e-8 off);
    # the trainer keeps that for parity with TRL 1.12, and so does the derivation
    n = x.numel()
    mean = x.mean()
    var = ((x - mean) ** 2).mean() * (torch.tensor(n) / torch.tensor(n - 1)).to(torch.float64)
    out = (x - mean) / torch.sqrt(var + 1e-8)
    return out + mean if keep_mean else out


def _derive_advantages(old, ref, values, scores, lengths, cfg):
    """Per row: r_t = -kl_coef * KL_t (t <= T), the score at T+1 (T when the row is full); GAE over t <= T+1; returns; whitening."""
    n, c = old.shape
    rewards = torch.zeros(n, c, dtype=torch.float64)
    vals = torch.zeros(n, c, dtype=torch.float64)
    for i in range(n):
        last = lengths[i] - 1
        for t in range(last + 1):
            log_r = ref[i, t] - old[i, t]
            rewards[i, t] = -cfg["kl_coef"] * (-log_r if cfg["kl_estimator"] == "k1" else torch.expm1(log_r) - log_r)
        rewards[i, min(last + 1, c - 1)] += scores[i]
        for t in range(min(last + 2, c)):
            vals[i, t] = values[i, t]
    value_positions = [(i, t) for i in range(n) for t in range(min(lengths[i] + 1, c))]
    if cfg["whiten_rewards"]:
        flat = _whiten(torch.stack([rewards[i, t] for i, t in value_positions]), keep_mean=True)
        whitened = torch.zeros_like(rewards)
        for k, (i, t) in enumerate(value_positions):
            whitened[i, t] = flat[k]
        rewards = whitened
    advantages = torch.zeros(n, c, dtype=torch.float64)
    for i in range(n):
        running = torch.zeros((), dtype=torch.float64)
        for t in reversed(range(c)):
            following = vals[i, t + 1] if t + 1 < c else 0.0
            running = rewards[i, t] + cfg["gamma"] * following - vals[i, t] + cfg["gamma"] * cfg["lam"] * running
            advantages[i, t] = running
    returns = advantages + vals
    policy_positions = [(i, t) for i in range(n) for t in range(lengths[i])]
    flat = _whiten(torch.stack([advantages[i, t] for i, t in policy_positions]))
    whitened = torch.zeros_like(advantages)
    for k, (i, t) in enumerate(policy_positions):
        whitened[i, t] = flat[k]
    return whitened, returns, vals, policy_positions, value_positions


def _derive_loss(new_logps, vpred, old, advantages, returns, old_values, policy_positions, value_positions, cfg):
    pg = []
    for i, t in policy_positions:
        ratio = torch.exp(new_logps[i, t] - old[i, t])
        clipped = torch.clamp(ratio, 1 - cfg["cliprange"], 1 + cfg["cliprange"])
        pg.append(torch.maximum(-advantages[i, t] * ratio, -advantages[i, t] * clipped))
    vf = []
    for i, t in value_positions:
        v = vpred[i, t]
        v_clipped = torch.clamp(v, old_values[i, t] - cfg["cliprange_value"], old_values[i, t] + cfg["cliprange_value"])
        vf.append(torch.maximum((v - returns[i, t]) ** 2, (v_clipped - returns[i, t]) ** 2))
    pg_loss, vf_loss = torch.stack(pg).mean(), 0.5 * torch.stack(vf).mean()
    return pg_loss + cfg["vf_coef"] * vf_loss, pg_loss, vf_loss


@pytest.mark.parametrize("name", sorted(REFERENCE["configs"]))
def test_value_head_loss_and_gradients_match_a_float64_derivation(opt_in, name, tmp_path):
    from datasets import Dataset

    from posttrain import completion_logps
    from posttrain.testing.tiny_model import build_tokenizer
    from posttrain_ppo.trainer import PPOTrainer, compute_advantages, penalize_missing_eos, policy_logps_and_values

    cfg = dict(REFERENCE["configs"][name]["overrides"])
    tok = build_tokenizer()
    policy, reference = gen.portable_policy(tok, gen.SEED_POLICY), gen.portable_policy(tok, gen.SEED_REF)
    args = _config(tmp_path, per_device_train_batch_size=8, response_length=7, value_head=True, **cfg)
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=reference, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                         train_dataset=Dataset.from_dict({"prompt": ["a", "b"]}), allow_experimental=True)
    assert trainer.critic is None and trainer.loop.trainable_model_names == []
    hidden = policy.config.hidden_size
    old_head = _portable_head(hidden, 77, 16.0)  # the head at rollout time; the trained head has moved since
    head = trainer.loop.policy_module("value_head")
    with torch.no_grad():
        head.load_state_dict(_portable_head(hidden, 91, 3.0, base=old_head).state_dict())
    batch = _batch()
    mask, lengths = batch["completion_mask"], batch["completion_mask"].sum(1).tolist()
    temperature = cfg["temperature"] + 1e-7

    # the rollout: pi_old fixed (the file's), pi_ref, values of the old head from one policy forward (the trainer's path)
    old = torch.tensor(REFERENCE["configs"][name]["old_logprobs"], dtype=torch.float64)
    with torch.no_grad():
        ref_logps, _, _ = completion_logps(reference, batch, temperature, compute_entropy=False)
        _, _, values = policy_logps_and_values(trainer.model, old_head, batch, temperature, compute_entropy=False, chunk_size=args.logprob_chunk_size)
        _, derived_values = _derive_logps_and_values(policy, old_head, batch, temperature)
    scores, _ = penalize_missing_eos(torch.tensor(REFERENCE["rollout"]["scores"], dtype=torch.float64), batch["completion_ids"], mask,
                                     REFERENCE["rollout"]["eos"], cfg["missing_eos_penalty"])
    torch.testing.assert_close(values, derived_values, rtol=1e-9, atol=1e-12)
    out = compute_advantages(old, ref_logps, values, scores, mask, kl_coef=cfg["kl_coef"], kl_estimator=cfg["kl_estimator"],
                             whiten_rewards=cfg["whiten_rewards"], gamma=cfg["gamma"], lam=cfg["lam"])
    advantages, returns, old_values, policy_positions, value_positions = _derive_advantages(old, ref_logps, derived_values, scores, lengths, cfg)
    torch.testing.assert_close(out["advantages"], advantages, rtol=1e-9, atol=1e-11)
    for i, t in value_positions:
        assert abs(out["returns"][i, t] - returns[i, t]) <= 1e-9 * max(1.0, abs(returns[i, t])), (i, t)

    # the trainer's loss (one tensor: the head trains through the policy's optimizer) and the derivation's, with their gradients
    micro = dict(batch, padding_mask=out["padding_mask"], padding_mask_p1=out["padding_mask_p1"], advantages=out["advantages"],
                 returns=out["returns"], old_logprobs=out["logprobs"], old_values=out["values"])
    loss, metrics = trainer.compute_loss(trainer.model, micro, torch.tensor(8.0))
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0
    loss.backward()
    ours = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    trainer.model.zero_grad()
    new_logps, vpred = _derive_logps_and_values(policy, head, batch, temperature)
    expected, pg_loss, vf_loss = _derive_loss(new_logps, vpred, old, advantages, returns, old_values, policy_positions, value_positions, cfg)
    expected.backward()
    rel = abs(loss.item() - expected.item()) / abs(expected.item())
    assert rel <= 1e-9, (loss.item(), expected.item())
    assert metrics["loss/value_avg"].item() == pytest.approx(vf_loss.item(), rel=1e-9)
    assert 0 < metrics["policy/clipfrac_avg"].item() < 1 and 0 < metrics["val/clipfrac_avg"].item() < 1  # both clips are exercised
    assert {"value_head.weight", "value_head.bias"} <= set(ours)
    grad_worst = 0.0
    for n, p in trainer.model.named_parameters():
        assert p.grad is not None and p.grad.norm() > 0, n
        grad_worst = max(grad_worst, ((ours[n] - p.grad).norm() / p.grad.norm()).item())
    assert grad_worst <= 1e-8, grad_worst

    # the value loss alone moves the trunk (one network, one optimizer), not only the head
    trainer.model.zero_grad()
    losses, _ = trainer._losses(trainer.model, micro)
    losses["value_head"].backward()
    trunk = [p for n, p in trainer.model.named_parameters() if n.startswith("model.layers.")]
    assert trunk and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trunk)
    print(f"PPO value head [{name}] vs float64 derivation: loss={expected.item():.10f} (pg {pg_loss.item():.6f}, vf {vf_loss.item():.6f}); "
          f"relative loss error {rel:.1e}, worst relative gradient error {grad_worst:.1e}")


def test_reward_rises_with_the_value_head(opt_in, tiny_model_dir, tmp_path):
    """Learning with the head instead of the critic: the score (fraction of 'low' token ids) rises within 20 rollouts (40 steps)."""
    from posttrain_ppo.trainer import PPOTrainer

    args = _config(tmp_path, per_device_train_batch_size=16, response_length=8, max_steps=40, learning_rate=2e-2, num_ppo_epochs=2,
                   num_mini_batches=1, kl_coef=0.0, value_head=True, vf_coef=0.5)
    trainer = PPOTrainer(args=args, model=tiny_model_dir, reward_funcs=low_token_fraction, train_dataset=_prompts(), allow_experimental=True)
    trainer.train()
    rows = _rows(args.output_dir)
    scores = [rows[s]["objective/scores"] for s in sorted(rows)]
    before, after = sum(scores[:10]) / 10, sum(scores[-10:]) / 10
    ev = [rows[s]["val/explained_variance"] for s in sorted(rows)]
    print(f"PPO value head learning: mean score first 5 rollouts {before:.3f} -> last 5 rollouts {after:.3f}; explained variance "
          f"first 5 {sum(ev[:10]) / 10:.2f} -> last 5 {sum(ev[-10:]) / 10:.2f}")
    assert after > before + 0.3
    assert {"loss/value_avg", "val/explained_variance", "val/clipfrac_avg"} <= set(rows[1])
    assert "critic_loss" not in rows[1]  # no separate critic


def test_value_head_resumes_exactly_is_saved_beside_the_policy_and_continues(opt_in, tiny_model_dir, tmp_path):
    """Checkpoint at step 3, inside the first rollout's 4 updates: the resumed run repeats steps 4-6 bit for bit, head included.
    Every checkpoint and output_dir hold value_head.safetensors beside a plain transformers model.safetensors; a run started
    from output_dir continues with the saved head."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from posttrain_ppo.trainer import PPOTrainer

    def run(name, model=tiny_model_dir, train=True, **kw):
        args = _config(tmp_path, name, per_device_train_batch_size=4, num_mini_batches=2, num_ppo_epochs=2, max_steps=6, save_strategy="steps",
                       save_steps=3, kl_coef=0.05, seed=5, value_head=True)
        trainer = PPOTrainer(args=args, model=model, reward_funcs=low_token_fraction, train_dataset=_prompts(), allow_experimental=True)
        if train:
            trainer.train(**kw)
        return args.output_dir, trainer

    full, trainer = run("full")
    for directory in (os.path.join(full, "checkpoint-3"), full):
        entries = set(os.listdir(directory))
        assert "value_head.safetensors" in entries and "critic" not in entries, entries
        assert set(load_file(os.path.join(directory, "value_head.safetensors"))) == {"weight", "bias"}
        assert not any(k.startswith("value_head") for k in _weights(directory))
        _, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)  # plain transformers
        assert not info["unexpected_keys"] and not info["missing_keys"], info
    trained = trainer.loop.policy_module("value_head").state_dict()
    saved = load_file(os.path.join(full, "value_head.safetensors"))
    assert all(torch.equal(saved[k], trained[k]) for k in trained)

    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(full, "checkpoint-3"), os.path.join(resumed, "checkpoint-3"))
    run("resumed", resume_from_checkpoint=True)
    expected, got = _rows(full), _rows(resumed)
    assert sorted(got) == [4, 5, 6]
    for step in (4, 5, 6):  # one process repeats the same ops in the same order: identical
        assert (got[step]["loss"], got[step]["loss/value_avg"], got[step]["policy/clipfrac_avg"]) == \
               (expected[step]["loss"], expected[step]["loss/value_avg"], expected[step]["policy/clipfrac_avg"]), step
    for name in ("model.safetensors", "value_head.safetensors"):
        a, b = load_file(os.path.join(full, name)), load_file(os.path.join(resumed, name))
        assert all(torch.equal(a[k], b[k]) for k in a), name

    _, again = run("continued", model=full, train=False)  # a new run from the output: the trained head, not a fresh one
    head = again.loop.policy_module("value_head").state_dict()
    assert all(torch.equal(head[k], saved[k]) for k in saved)
    _, fresh = run("fresh", train=False)
    assert not torch.equal(fresh.loop.policy_module("value_head").weight, saved["weight"])


def test_value_head_refusals(opt_in, tiny_model_dir, tiny_tokenizer, tmp_path):
    from safetensors.torch import save_file

    from posttrain.testing.tiny_model import build_reward_model
    from posttrain_ppo.trainer import PPOTrainer

    with pytest.raises(ConfigError, match="value_head=True and value_model_path='critic_dir' are both set"):
        _config(tmp_path, value_head=True, value_model_path="critic_dir")
    with pytest.raises(ConfigError, match="critic_learning_rate=0.1 has no effect with value_head=True"):
        _config(tmp_path, value_head=True, critic_learning_rate=0.1)
    with pytest.raises(ConfigError, match="value_head_init_std=-1.0 is invalid"):
        _config(tmp_path, value_head=True, value_head_init_std=-1.0)
    common = dict(processing_class=tiny_tokenizer, reward_funcs=low_token_fraction, train_dataset=_prompts(), allow_experimental=True)
    with pytest.raises(ConfigError, match="value_model is given but value_head=True"):
        PPOTrainer(args=_config(tmp_path, value_head=True), model=tiny_model_dir, value_model=build_reward_model(tiny_tokenizer), **common)
    policy_dir = str(tmp_path / "policy")
    shutil.copytree(tiny_model_dir, policy_dir)
    save_file({"weight": torch.zeros(1, 3), "bias": torch.zeros(1)}, os.path.join(policy_dir, "value_head.safetensors"))
    with pytest.raises(ConfigError, match="not a value head of this policy"):
        PPOTrainer(args=_config(tmp_path, value_head=True), model=policy_dir, **common)
