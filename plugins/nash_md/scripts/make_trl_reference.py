"""Generate ``plugins/nash_md/tests/data/trl_1_13_0_reference.json``: TRL 1.13.0's Nash-MD loss, gradients and mixture on fixed completions, float64.

TRL 1.13.0 is the last release that ships ``trl.experimental.nash_md`` (1.14.0 removed it). This script
creates a throwaway virtual environment in a temporary directory, installs ``trl==1.13.0`` into it
with this venv's pip, and makes this venv's site-packages (torch, transformers, accelerate, datasets,
posttrain) visible *behind* it through a ``.pth`` file, so TRL 1.13 shadows the installed TRL. It then
re-runs itself there (``--child``): builds the tiny tokenizer of ``posttrain.testing`` and two tiny
float64 models (policy and reference) whose weights come from :func:`portable_values` (the same bits
on any machine), and runs TRL 1.13's own ``NashMDTrainer._compute_logprobs`` and
``NashMDTrainer._compute_losses`` (called unbound on a stub that carries only what they read: the
reference model and ``beta``) on FIXED prompts, policy completions and preference probabilities (the
sampling and the reward are not part of the reference). Per configuration it writes the loss, the
per-completion score and KL terms and gradient fingerprints of every policy parameter; and, per
mixture coefficient, the log-probabilities TRL's ``GeometricMixtureWrapper.forward`` gives the fixed
completions' tokens. ``plugins/nash_md/tests/test_nash_md_parity.py`` compares.

No patch of TRL 1.13 was needed: these pieces run unchanged against the installed transformers / torch.

Usage (about a minute; needs the package index, or ``--find-links DIR`` with the wheel)::

    .venv/bin/python plugins/nash_md/scripts/make_trl_reference.py [--find-links /tmp/wheels_trl]
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
PROMPT_LENGTH = 5
POLICY_LENGTHS = [4, 6, 3, 5]  # completion lengths (the EOS, where there is one, included)
POLICY_EOS = [True, False, True, False]
PROBABILITY = [0.8, 0.3, 0.5, 0.62]  # P(policy completion > mixture completion), as sigmoid(s(y) - s(y')) would give
CONFIGS = {"beta_0.1": {"beta": 0.1}, "beta_1.0": {"beta": 1.0}, "beta_0": {"beta": 0.0}}
MIXTURE_COEFS = [0.5, 0.2]

_MASK64 = (1 << 64) - 1


# Copied from plugins/bco/scripts/make_trl_reference.py.portable_values
def portable_values(n: int, stream: int) -> list[float]:
    """``n`` floats uniform on [-2**-5, 2**-5) (std 0.018, near the tiny model's init) from a splitmix64 stream.

    Pure-Python integers and exact conversions (an integer below 2**53 times a power of two): the
    same bits on every machine and every torch build, unlike torch's samplers.
    """
    state, out = (stream * 0x2545F4914F6CDD1D) & _MASK64, []
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
        out.append(((z >> 11) - (1 << 52)) * 2.0**-57)
    return out


# Copied from plugins/bco/scripts/make_trl_reference.py.portable_model
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


# Copied from plugins/bco/scripts/make_trl_reference.py.grad_fingerprints
def grad_fingerprints(model) -> dict:
    """Per parameter: gradient norm, sum and dot with a portable probe (:func:`portable_values`, stream 7000 + index), in float64."""
    import torch

    out = {}
    for index, (name, param) in enumerate(model.named_parameters()):
        grad = torch.zeros_like(param, dtype=torch.float64) if param.grad is None else param.grad.detach().double()
        probe = torch.tensor(portable_values(param.numel(), 7000 + index), dtype=torch.float64).view_as(grad)
        out[name] = [grad.norm().item(), grad.sum().item(), (grad * probe).sum().item()]
    return out


def fixed_tokens(tokenizer, lengths: list[int], eos: list[bool], offset: int) -> list[list[int]]:
    """Deterministic completions: ordinary token ids (never pad / EOS), ending in EOS where ``eos`` says so."""
    avoid = {tokenizer.pad_token_id, tokenizer.eos_token_id}
    rows = []
    for i, (n, ends) in enumerate(zip(lengths, eos)):
        ids = []
        for j in range(n - 1 if ends else n):
            t = 10 + (offset + 37 * i + 11 * j) % 400
            while t in avoid:
                t += 1
            ids.append(t)
        rows.append(ids + ([tokenizer.eos_token_id] if ends else []))
    return rows


def fixed_inputs(tokenizer) -> dict:
    """The prompts (all ``PROMPT_LENGTH`` tokens: no left padding), the policy's completions and the preference probabilities."""
    prompts = fixed_tokens(tokenizer, [PROMPT_LENGTH] * len(PROBABILITY), [False] * len(PROBABILITY), 3)
    return {"prompt_ids": prompts, "policy_completion_ids": fixed_tokens(tokenizer, POLICY_LENGTHS, POLICY_EOS, 101), "probability": PROBABILITY}


# --------------------------------------------------------------------------------------- the child
def _child(out_path: str) -> None:
    import types

    import torch
    import transformers
    import trl

    from posttrain.testing.tiny_model import build_tokenizer

    assert trl.__version__ == "1.13.0", f"the throwaway venv imported trl {trl.__version__} ({trl.__file__})"
    from trl.experimental.nash_md import NashMDTrainer
    from trl.experimental.nash_md.nash_md_trainer import GeometricMixtureWrapper

    torch.use_deterministic_algorithms(True)
    tokenizer = build_tokenizer()
    inputs = fixed_inputs(tokenizer)
    pad = tokenizer.pad_token_id
    prompt_ids = torch.tensor(inputs["prompt_ids"])
    width = max(map(len, inputs["policy_completion_ids"]))
    completion_ids = torch.tensor([r + [pad] * (width - len(r)) for r in inputs["policy_completion_ids"]])
    completion_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in inputs["policy_completion_ids"]])
    model_data = {"input_ids": torch.cat([prompt_ids, completion_ids], 1), "attention_mask": torch.cat([torch.ones_like(prompt_ids), completion_mask], 1)}
    probability = torch.tensor(inputs["probability"], dtype=torch.float64)
    result = {"versions": {"trl": trl.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
              "dtype": "float64", "inputs": inputs, "configs": {}, "mixture": {}}
    for name, cfg in CONFIGS.items():
        policy, ref = portable_model(tokenizer, SEED_POLICY), portable_model(tokenizer, SEED_REF)
        policy.train(), ref.eval()
        stub = types.SimpleNamespace(ref_model=ref, beta=cfg["beta"])
        logprobs, ref_logprobs = NashMDTrainer._compute_logprobs(stub, policy, model_data, PROMPT_LENGTH)
        loss, score, kl = NashMDTrainer._compute_losses(stub, logprobs, ref_logprobs, probability)
        loss.backward()
        result["configs"][name] = {**cfg, "loss": loss.item(), "score": score.tolist(), "kl": kl.tolist(), "grads": grad_fingerprints(policy)}
    policy, ref = portable_model(tokenizer, SEED_POLICY).eval(), portable_model(tokenizer, SEED_REF).eval()
    for coef in MIXTURE_COEFS:
        wrapper = GeometricMixtureWrapper(model=policy, ref_model=ref, generation_config=None, mixture_coef=coef)
        logp = wrapper(input_ids=model_data["input_ids"], attention_mask=model_data["attention_mask"]).logits  # (B, T, V) log-probs of the mixture
        token_logp = logp[:, PROMPT_LENGTH - 1 : -1].gather(-1, completion_ids[..., None]).squeeze(-1) * completion_mask
        result["mixture"][str(coef)] = token_logp.tolist()
    with open(out_path, "w") as fh:
        json.dump(result, fh, indent=1)


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
    with tempfile.TemporaryDirectory(prefix="nash-md-trl113-") as tmp:
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
               "CUDA_VISIBLE_DEVICES": "", "PYTHONNOUSERSITE": "1", "TQDM_DISABLE": "1"}
        env.pop("PYTHONPATH", None)
        subprocess.run([str(env_dir / "bin" / "python"), str(pathlib.Path(__file__).resolve()), "--child", "--out", args.out], check=True, env=env)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
