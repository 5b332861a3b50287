"""Generate ``plugins/xpo/tests/data/trl_1_13_0_reference.json``: TRL 1.13.0's XPO loss and gradients on fixed completions, float64.

TRL 1.13.0 is the last release that ships ``trl.experimental.xpo`` (1.14.0 removed it). This script
creates a throwaway virtual environment in a temporary directory, installs ``trl==1.13.0`` into it
with this venv's pip, and makes this venv's site-packages (torch, transformers, accelerate, datasets,
posttrain) visible *behind* it through a ``.pth`` file, so TRL 1.13 shadows the installed TRL. It then
re-runs itself there (``--child``): builds the tiny tokenizer of ``posttrain.testing`` and two tiny
float64 models (policy and reference) whose weights come from :func:`portable_values` (the same bits
on any machine), and runs TRL 1.13's own ``XPOTrainer._compute_logprobs`` and
``XPOTrainer._compute_losses`` (called unbound on a stub that carries only what they read: the
reference model, ``args.loss_type``, ``beta`` and ``alpha``) on FIXED prompts, policy completions,
reference completions and chosen masks (the sampling and the reward are not part of the reference:
TRL drew them with its own ``generate``). Per configuration it writes the loss, the per-pair DPO and
XPO terms and gradient fingerprints of every policy parameter. ``plugins/xpo/tests/test_xpo_parity.py``
feeds the same token ids to posttrain's ``XPOTrainer.compute_loss`` and compares.

No patch of TRL 1.13 was needed: both methods run unchanged against the installed transformers / torch.

Usage (about a minute; needs the package index, or ``--find-links DIR`` with the wheel)::

    .venv/bin/python plugins/xpo/scripts/make_trl_reference.py [--find-links /tmp/wheels_trl]
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
REF_LENGTHS = [5, 2, 6, 4]
POLICY_EOS = [True, False, True, False]
REF_EOS = [False, True, True, False]
CHOSEN = [True, False, True, False]  # the policy's completion is preferred in pairs 0 and 2
CONFIGS = {
    "sigmoid": {"loss_type": "sigmoid", "beta": 0.1, "alpha": 1e-5},
    "sigmoid_large_alpha": {"loss_type": "sigmoid", "beta": 0.5, "alpha": 0.2},
    "ipo": {"loss_type": "ipo", "beta": 0.25, "alpha": 0.05},
}

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
    """The prompts (all ``PROMPT_LENGTH`` tokens: no left padding), both completions of each pair and the chosen mask."""
    prompts = fixed_tokens(tokenizer, [PROMPT_LENGTH] * len(CHOSEN), [False] * len(CHOSEN), 3)
    return {"prompt_ids": prompts, "policy_completion_ids": fixed_tokens(tokenizer, POLICY_LENGTHS, POLICY_EOS, 101),
            "ref_completion_ids": fixed_tokens(tokenizer, REF_LENGTHS, REF_EOS, 211), "chosen_mask": CHOSEN}


# --------------------------------------------------------------------------------------- the child
def _child(out_path: str) -> None:
    import types

    import torch
    import transformers
    import trl

    from posttrain.testing.tiny_model import build_tokenizer

    assert trl.__version__ == "1.13.0", f"the throwaway venv imported trl {trl.__version__} ({trl.__file__})"
    from trl.experimental.xpo import XPOTrainer

    torch.use_deterministic_algorithms(True)
    tokenizer = build_tokenizer()
    inputs = fixed_inputs(tokenizer)
    pad = tokenizer.pad_token_id

    def right_padded(rows):
        width = max(map(len, rows))
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return ids, mask

    prompt_ids = torch.tensor(inputs["prompt_ids"])
    prompt_mask = torch.ones_like(prompt_ids)

    def data(rows):
        ids, mask = right_padded(rows)
        return {"input_ids": torch.cat([prompt_ids, ids], 1), "attention_mask": torch.cat([prompt_mask, mask], 1)}

    model_data, ref_data = data(inputs["policy_completion_ids"]), data(inputs["ref_completion_ids"])
    chosen = torch.tensor(inputs["chosen_mask"])
    result = {"versions": {"trl": trl.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
              "dtype": "float64", "inputs": inputs, "configs": {}}
    for name, cfg in CONFIGS.items():
        policy, ref = portable_model(tokenizer, SEED_POLICY), portable_model(tokenizer, SEED_REF)
        policy.train(), ref.eval()
        stub = types.SimpleNamespace(ref_model=ref, args=types.SimpleNamespace(loss_type=cfg["loss_type"]), beta=cfg["beta"], alpha=cfg["alpha"])
        logprobs = XPOTrainer._compute_logprobs(stub, policy, model_data, ref_data, PROMPT_LENGTH)
        loss, dpo_losses, xpo_losses = XPOTrainer._compute_losses(stub, *logprobs, chosen)
        loss.backward()
        result["configs"][name] = {**cfg, "loss": loss.item(), "dpo_losses": dpo_losses.tolist(), "xpo_losses": xpo_losses.tolist(),
                                   "grads": grad_fingerprints(policy)}
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
    with tempfile.TemporaryDirectory(prefix="xpo-trl113-") as tmp:
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
