"""Generate ``plugins/ssd/tests/data/trl_1_15_0_reference.json``: TRL 1.15.0's SSD on fixed inputs, in float64.

TRL 1.15.0 is the last release that ships ``trl.experimental.ssd`` (1.16.0 removed it). This script creates a
throwaway virtual environment in a temporary directory, installs ``trl==1.15.0`` into it (no dependencies) with this
venv's pip, and makes this venv's site-packages (torch, transformers, accelerate, datasets, posttrain) visible *behind*
it through a ``.pth`` file, so TRL 1.15 shadows the installed TRL. It then re-runs itself there (``--child``): builds
the tiny tokenizer of ``posttrain.testing`` and a tiny float64 policy whose weights come from :func:`portable_values`
(pure-Python splitmix64, the same bits on every machine, unlike torch's samplers), and for every configuration of
:data:`CONFIGS` runs TRL 1.15's ``SSDTrainer`` on fixed prompts and fixed completions: sampling is replaced by the
completions below (SSD's loss is plain cross-entropy on whatever was sampled, so the sampler's randomness is not
part of the comparison; the rollout engine's sampling is tested in the core). Recorded per configuration: the
unpadded prompt ids TRL tokenized, the completion masks after its ``filter_empty`` step, each micro-batch's loss (TRL's
``compute_loss``, already divided by the gradient accumulation steps), TRL's logged metrics, and fingerprints of the
accumulated gradient of the step (norm, sum, dot with a portable probe, per parameter).
``plugins/ssd/tests/test_ssd_parity.py`` compares posttrain's SSD with this file.

Usage (about half a minute; needs the package index, or ``--find-links DIR`` with the wheel)::

    .venv/bin/python plugins/ssd/scripts/make_trl_reference.py [--find-links /tmp/trl_1.15.0]
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
DEFAULT_OUT = HERE.parent / "tests" / "data" / "trl_1_15_0_reference.json"

#: What the throwaway venv gets (pinned: the reference must not drift with the index).
PINS = ["trl==1.15.0"]

SEED_POLICY = 0


def prompts(kind: str) -> list:
    """Eight prompts: plain strings, or the same texts as one-message conversations."""
    texts = [f"what is {a} + {b}? answer in \\boxed{{}}" for a, b in ((3, 4), (12, 9), (7, 7), (1, 19), (5, 11), (8, 2), (14, 6), (9, 9))]
    texts[3] = "the cat sat on the mat and then " + texts[3]  # a longer prompt: left truncation and uneven padding
    if kind == "conversational":
        return [[{"role": "user", "content": t}] for t in texts]
    return texts


#: The sampled completions (texts; ``<eos>`` appends the end-of-turn token). Several are empty or a one-line stub under
#: 10 characters, which ``filter_empty`` drops: "" (eos only), "hi", "\\boxed{7}" (9 characters).
COMPLETIONS = [
    "\\boxed{7}<eos>",
    "\\boxed{21}<eos>",
    "<eos>",
    "line one\nline two<eos>",
    "hi<eos>",
    "abc def ghi jkl mno",  # no end token: cut at max_completion_length
    "\\boxed{10} is the answer<eos>",
    "  \n  <eos>",
]


def completion_ids(tokenizer) -> list[list[int]]:
    out = []
    for text in COMPLETIONS:
        body, eos = (text[: -len("<eos>")], True) if text.endswith("<eos>") else (text, False)
        ids = tokenizer(body, add_special_tokens=False)["input_ids"] if body else []
        out.append(ids + ([tokenizer.eos_token_id] if eos else []))
    return out


#: name -> prompt kind and SSDConfig overrides (bs x GA = 8 prompts, one step).
CONFIGS = {
    "standard": {"prompts": "standard", "args": {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1}},
    "conversational_ga2": {"prompts": "conversational", "args": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2}},
    "no_filter_ga4": {"prompts": "standard", "args": {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4, "filter_empty": False}},
    "prompt_truncation": {"prompts": "standard", "args": {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "max_prompt_length": 9}},
}


_MASK64 = (1 << 64) - 1


def portable_values(n: int, stream: int) -> list[float]:
    """``n`` floats uniform on [-2**-5, 2**-5) from a splitmix64 stream: exact integer arithmetic, the same bits on every machine."""
    state, out = (stream * 0x2545F4914F6CDD1D) & _MASK64, []
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
        out.append(((z >> 11) - (1 << 52)) * 2.0**-57)
    return out


def portable_model(tokenizer, seed: int):
    """The tiny causal LM of ``posttrain.testing`` in float64, every matrix refilled from :func:`portable_values` (stream ``1000 * seed + index``)."""
    import torch

    from posttrain.testing.tiny_model import build_model

    model = build_model(tokenizer, seed=seed).to(torch.float64)
    with torch.no_grad():
        for index, param in enumerate(model.parameters()):
            if param.ndim >= 2:
                param.copy_(torch.tensor(portable_values(param.numel(), 1000 * seed + index), dtype=torch.float64).view_as(param))
    return model


def reference_tokenizer():
    """The tiny tokenizer, truncating from the left (what TRL's SSD sets on a tokenizer it loads itself)."""
    from posttrain.testing.tiny_model import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.truncation_side = "left"
    return tokenizer


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


# --------------------------------------------------------------------------------------- the child
def _child(out_path: str) -> None:
    import copy
    import warnings

    import torch
    import transformers
    import trl
    from datasets import Dataset

    assert trl.__version__ == "1.15.0", f"the throwaway venv imported trl {trl.__version__} ({trl.__file__})"
    from trl.experimental.ssd import SSDConfig, SSDTrainer
    from trl.trainer.utils import pad, split_tensor_dict

    torch.use_deterministic_algorithms(True)
    tokenizer = reference_tokenizer()
    policy0 = portable_model(tokenizer, SEED_POLICY)
    fixed = completion_ids(tokenizer)
    result = {
        "versions": {"trl": trl.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "dtype": "float64",
        "policy_weight_sum": weight_fingerprint(policy0),
        "completions": COMPLETIONS,
        "completion_ids": fixed,
        "configs": {},
    }
    for name, spec in CONFIGS.items():
        rows = [{"prompt": p} for p in prompts(spec["prompts"])]
        args = SSDConfig(output_dir=os.path.join(tempfile.gettempdir(), f"ssd-ref-{name}"), bf16=False, use_cpu=True, report_to="none",
                         gradient_checkpointing=False, disable_tqdm=True, max_completion_length=max(map(len, fixed)), **spec["args"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = SSDTrainer(model=copy.deepcopy(policy0), args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)

        def fixed_completions(batch_prompts, _fixed=fixed):
            assert len(batch_prompts) == len(_fixed)
            ids = [torch.tensor(c, dtype=torch.long) for c in _fixed]
            return pad(ids, padding_value=tokenizer.pad_token_id, padding_side="right"), pad([torch.ones_like(c) for c in ids], padding_value=0, padding_side="right")

        trainer._generate_completion_ids = fixed_completions  # the sampler, replaced by the fixed completions
        trainer.model.train()
        batch = trainer._build_buffered_batch(rows)
        ga = args.gradient_accumulation_steps
        trainer.current_gradient_accumulation_steps = ga  # set by transformers' training loop; compute_loss divides by it
        losses = []
        for micro in split_tensor_dict(batch, ga):
            loss = trainer.compute_loss(trainer.model, micro)
            loss.backward()  # accumulated over the step's micro-batches, as one optimizer step sees them
            losses.append(loss.item())
        record = {
            "spec": spec,
            "rows": rows,
            "prompt_ids": [ids[m.bool()].tolist() for ids, m in zip(batch["prompt_ids"], batch["prompt_mask"])],
            "completion_mask_sums": batch["completion_mask"].sum(1).tolist(),
            "micro_batch_losses": losses,
            "metrics": {k: list(v) for k, v in trainer._metrics["train"].items()},
            "grads": grad_fingerprints(trainer.model),
        }
        result["configs"][name] = record
        print(f"{name}: losses {[round(x, 6) for x in losses]}, kept {record['completion_mask_sums']}", flush=True)
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
    with tempfile.TemporaryDirectory(prefix="ssd-trl115-") as tmp:
        env_dir = pathlib.Path(tmp) / "venv"
        venv.create(env_dir, with_pip=False, symlinks=True)
        py = f"python{sys.version_info.major}.{sys.version_info.minor}"
        target = env_dir / "lib" / py / "site-packages"
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), *PINS]
        if args.find_links:
            pip += ["--find-links", args.find_links]
        subprocess.run(pip, check=True)
        # processed after the throwaway venv's own site-packages: its trl 1.15 shadows ours
        (target / "zz_posttrain_venv.pth").write_text("".join(f"import site; site.addsitedir({p!r})\n" for p in ours))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
               "CUDA_VISIBLE_DEVICES": "", "PYTHONNOUSERSITE": "1", "TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
        env.pop("PYTHONPATH", None)
        subprocess.run([str(env_dir / "bin" / "python"), str(pathlib.Path(__file__).resolve()), "--child", "--out", args.out], check=True, env=env)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
