"""Generate ``plugins/grpo_replay/tests/data/trl_1_13_0_reference.json``: TRL 1.13.0's GRPO-with-replay-buffer pieces, float64.

TRL 1.13.0 is the last release that ships ``trl.experimental.grpo_with_replay_buffer`` (1.14.0 removed
it). This script creates a throwaway virtual environment, installs ``trl==1.13.0`` into it (no
dependencies) with this venv's pip, makes this venv's site-packages visible *behind* it through a
``.pth`` file (so TRL 1.13 shadows the installed TRL) and re-runs itself there (``--child``), recording:

* ``buffer``: TRL's ``ReplayBuffer`` (max_size 5) fed the score sequence of :data:`BUFFER_ADDS`, then
  asked for 3 and for 7 samples after ``torch.manual_seed`` of :data:`SAMPLE_SEEDS` (the global
  generator TRL draws with): the heap's scores in heap order and the ids drawn;
* ``configs``: ``GRPOWithReplayBufferTrainer._compute_loss`` (the loss replayed groups are trained
  with) on the fixed batch of :func:`fixed_batch`, train mode, one accumulation step: the loss, the
  logged clip fractions and gradient fingerprints of every parameter.

TRL's ``update_with_replay_buffer`` is not recorded: inside ``_generate_and_score_completions`` TRL
1.13 passes it per-completion (1-D) advantages and stds, where the method indexes groups of a 2-D
tensor (``group_std_rewards.max(dim=0)``, ``group_advantages[group_idx] = list``), so in a real run it
buffers at most one group per step and fails when a zero-variance group meets a non-empty buffer.
posttrain implements the documented per-group behaviour (config help and TRL's unit tests); see
``docs/methods/grpo_replay.md``.

Usage (under a minute; needs the package index, or ``--find-links DIR`` with the wheel)::

    .venv/bin/python plugins/grpo_replay/scripts/make_trl_reference.py [--find-links /tmp/wheels_trl]
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
DEFAULT_OUT = HERE.parent / "tests" / "data" / "trl_1_13_0_reference.json"

#: What the throwaway venv gets (pinned: the reference must not drift with the index).
PINS = ["trl==1.13.0"]

SEED_POLICY, SEED_REF = 0, 1
B, PROMPT_LEN, MAX_LEN = 6, 5, 7
PROMPT_LENS, COMPLETION_LENS = [3, 5, 5, 2, 4, 5], [7, 3, 1, 5, 7, 4]
ADVANTAGES = [1.0, -0.5, 0.8, -1.2, 0.3, -0.1]

#: ReplayBuffer: the scores added in order (distinct: TRL's (score, data) heap cannot compare equal scores).
BUFFER_ADDS = [0.5, 0.8, 0.3, 0.9, 0.7, 0.6, 0.4, 1.3, 0.05, 1.1]
SAMPLE_SEEDS = [0, 1, 2]

#: name -> GRPOWithReplayBufferConfig overrides (TRL 1.13 field names).
CONFIGS = {
    "grpo": {"loss_type": "grpo", "epsilon": 0.02},
    "dapo": {"loss_type": "dapo", "epsilon": 0.02, "epsilon_high": 0.03},
    "beta_kl": {"loss_type": "grpo", "epsilon": 0.02, "beta": 0.1},
}

# Copied from plugins/bco/scripts/make_trl_reference.py (portable weights and fingerprints; no import of another plugin)
_MASK64 = (1 << 64) - 1


def portable_values(n: int, stream: int) -> list[float]:
    """``n`` floats uniform on [-2**-5, 2**-5) from a splitmix64 stream: the same bits on every machine and torch build."""
    state, out = (stream * 0x2545F4914F6CDD1D) & _MASK64, []
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
        out.append(((z >> 11) - (1 << 52)) * 2.0**-57)
    return out


def portable_model(tokenizer, seed: int):
    """The tiny causal LM of ``posttrain.testing`` in float64, every matrix refilled from :func:`portable_values`."""
    import torch

    from posttrain.testing.tiny_model import build_model

    model = build_model(tokenizer, seed=seed).to(torch.float64)
    with torch.no_grad():
        for index, param in enumerate(model.parameters()):
            if param.ndim >= 2:
                param.copy_(torch.tensor(portable_values(param.numel(), 1000 * seed + index), dtype=torch.float64).view_as(param))
    return model


def weight_fingerprint(model) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def grad_fingerprints(model) -> dict:
    """Per parameter: gradient norm, sum and dot with a portable probe (stream 7000 + index), in float64."""
    import torch

    out = {}
    for index, (name, param) in enumerate(model.named_parameters()):
        grad = torch.zeros_like(param, dtype=torch.float64) if param.grad is None else param.grad.detach().double()
        probe = torch.tensor(portable_values(param.numel(), 7000 + index), dtype=torch.float64).view_as(grad)
        out[name] = [grad.norm().item(), grad.sum().item(), (grad * probe).sum().item()]
    return out
# (end of the copied part)


def fixed_batch() -> dict:
    """Left-padded prompts, right-padded completions of different lengths (one of length 1); ids from a portable stream."""
    import torch

    ids = [3 + int((v + 2.0**-5) * 2.0**5 * 190) for v in portable_values(B * (PROMPT_LEN + MAX_LEN), 99)]  # in [3, 383)
    prompt_ids = torch.zeros(B, PROMPT_LEN, dtype=torch.long)
    prompt_mask = torch.zeros(B, PROMPT_LEN, dtype=torch.long)
    completion_ids = torch.zeros(B, MAX_LEN, dtype=torch.long)
    completion_mask = torch.zeros(B, MAX_LEN, dtype=torch.long)
    for i, (p, c) in enumerate(zip(PROMPT_LENS, COMPLETION_LENS)):
        row = ids[i * (PROMPT_LEN + MAX_LEN) : (i + 1) * (PROMPT_LEN + MAX_LEN)]
        prompt_ids[i, PROMPT_LEN - p :] = torch.tensor(row[:p])
        prompt_mask[i, PROMPT_LEN - p :] = 1
        completion_ids[i, :c] = torch.tensor(row[PROMPT_LEN : PROMPT_LEN + c])
        completion_mask[i, :c] = 1
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids, "completion_mask": completion_mask}


def perturbation() -> list[list[float]]:
    """(B, MAX_LEN) portable offsets in [-0.05, 0.05): old log-probs = current + this, so the ratios are not 1."""
    values = portable_values(B * MAX_LEN, 77)
    return [[v * 1.6 for v in values[i * MAX_LEN : (i + 1) * MAX_LEN]] for i in range(B)]


def low_token_fraction(completion_ids, **kwargs):
    return [sum(3 <= t < 67 for t in c) / max(1, len(c)) for c in completion_ids]


# --------------------------------------------------------------------------------------- the child
def _child(out_path: str) -> None:
    import copy
    import warnings

    import torch
    import transformers
    import trl
    from datasets import Dataset

    from posttrain.testing.tiny_model import build_tokenizer

    assert trl.__version__ == "1.13.0", f"the throwaway venv imported trl {trl.__version__} ({trl.__file__})"
    from trl.experimental.grpo_with_replay_buffer import GRPOWithReplayBufferConfig as GRPOConfig
    from trl.experimental.grpo_with_replay_buffer import GRPOWithReplayBufferTrainer as GRPOTrainer
    from trl.experimental.grpo_with_replay_buffer import ReplayBuffer

    torch.use_deterministic_algorithms(True)
    tokenizer = build_tokenizer()
    policy0, ref0 = portable_model(tokenizer, SEED_POLICY), portable_model(tokenizer, SEED_REF)
    batch = fixed_batch()
    mask = batch["completion_mask"]
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], mask], dim=1)
    result = {
        "versions": {"trl": trl.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "dtype": "float64",
        "policy_weight_sum": weight_fingerprint(policy0),
        "ref_weight_sum": weight_fingerprint(ref0),
        "batch": {k: v.tolist() for k, v in batch.items()},
        "advantages": ADVANTAGES,
        "configs": {},
        "buffer": {},
    }
    for seed in SAMPLE_SEEDS:
        buffer = ReplayBuffer(max_size=5)
        buffer.add(BUFFER_ADDS, [{"id": i} for i in range(len(BUFFER_ADDS))])
        torch.manual_seed(seed)
        first = [d["id"] for d in buffer.sample(3)]
        second = [d["id"] for d in buffer.sample(7)]  # more than the buffer holds: with replacement
        result["buffer"][str(seed)] = {"heap_scores": [entry[0] for entry in buffer.heap], "heap_ids": [entry[1]["id"] for entry in buffer.heap],
                                       "sample_3": first, "sample_7": second}
    prompts = Dataset.from_dict({"prompt": ["what is 1 + 2", "hello", "the cat sat on the mat"]})
    for name, overrides in CONFIGS.items():
        args = GRPOConfig(output_dir=os.path.join(tempfile.gettempdir(), f"grpo-replay-ref-{name}"), per_device_train_batch_size=B, num_generations=2,
                          max_completion_length=MAX_LEN, bf16=False, use_cpu=True, report_to="none", gradient_checkpointing=False,
                          disable_tqdm=True, **{**overrides, "beta": 0.0})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = GRPOTrainer(model=copy.deepcopy(policy0), reward_funcs=low_token_fraction, args=args, train_dataset=prompts,
                                  processing_class=tokenizer)
        trainer.current_gradient_accumulation_steps = 1
        # TRL would load a reference model by its Hub id when beta != 0: build with beta 0, then set the attribute its loss reads
        trainer.beta = overrides.get("beta", 0.0)
        model = trainer.model
        with torch.no_grad():
            current, _, _ = trainer._get_per_token_logps_and_entropies(model, input_ids, attention_mask, MAX_LEN)
            ref = None
            if trainer.beta != 0.0:
                ref_model = copy.deepcopy(ref0)
                ref, _, _ = trainer._get_per_token_logps_and_entropies(ref_model, input_ids, attention_mask, MAX_LEN)
        old = (current + torch.tensor(perturbation(), dtype=torch.float64)) * mask
        inputs = dict(batch, advantages=torch.tensor(ADVANTAGES, dtype=torch.float64), old_per_token_logps=old, num_items_in_batch=mask.sum())
        if ref is not None:
            inputs["ref_per_token_logps"] = ref * mask
        model.train()
        model.zero_grad(set_to_none=True)
        trainer._metrics["train"].clear()
        loss = trainer._compute_loss(model, inputs)
        loss.backward()
        record = {
            "overrides": overrides,
            "old_per_token_logps": old.tolist(),
            "ref_per_token_logps": None if ref is None else (ref * mask).tolist(),
            "loss": loss.item(),
            "metrics": {k: v[0] for k, v in trainer._metrics["train"].items()},
            "grads": grad_fingerprints(model),
        }
        result["configs"][name] = record
        print(f"{name}: loss {loss.item():.10f}", flush=True)
    pathlib.Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(out_path).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")


# -------------------------------------------------------------------------------------- the parent
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
    with tempfile.TemporaryDirectory(prefix="grpo-replay-trl113-") as tmp:
        env_dir = pathlib.Path(tmp) / "venv"
        venv.create(env_dir, with_pip=False, symlinks=True)
        py = f"python{sys.version_info.major}.{sys.version_info.minor}"
        target = env_dir / "lib" / py / "site-packages"
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), *PINS]
        if args.find_links:
            pip += ["--find-links", args.find_links]
        subprocess.run(pip, check=True)
        # processed after the throwaway venv's own site-packages: its trl 1.13 shadows ours
        (target / "zz_posttrain_venv.pth").write_text("".join(f"import site; site.addsitedir({p!r})\n" for p in ours))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
               "CUDA_VISIBLE_DEVICES": "", "PYTHONNOUSERSITE": "1", "TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
        env.pop("PYTHONPATH", None)
        subprocess.run([str(env_dir / "bin" / "python"), str(pathlib.Path(__file__).resolve()), "--child", "--out", args.out], check=True, env=env)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
