"""Generate ``plugins/minillm/tests/data/trl_1_14_2_reference.json``: TRL 1.14.2's MiniLLM loss on fixed inputs, in float64.

TRL 1.14.2 is the last release that ships ``trl.experimental.minillm`` (1.15.0 removed it). This script
creates a throwaway virtual environment in a temporary directory, installs ``trl==1.14.2`` into it
(no dependencies) with this venv's pip, and makes this venv's site-packages (torch, transformers,
accelerate, datasets, posttrain) visible *behind* it through a ``.pth`` file, so TRL 1.14.2 shadows
the installed TRL. It then re-runs itself there (``--child``): builds the tiny tokenizer of
``posttrain.testing`` and two tiny float64 models (student and teacher) whose matrices come from
:func:`portable_values` (pure-Python integers: the same bits on every machine, unlike torch's
samplers), and for every configuration of :data:`CONFIGS` calls TRL's
``MiniLLMTrainer.compute_loss`` once on the fixed batch of :func:`fixed_batch` (reward advantages,
prompt and completion tokens, optionally old log-probs), then records the loss and gradient
fingerprints of every student parameter (norm, sum, dot with a portable probe). It also records the
fields and defaults of TRL 1.14.2's ``MiniLLMConfig``. ``plugins/minillm/tests/test_minillm_parity.py``
compares posttrain's MiniLLM with this file.

The batch has no completion padding: TRL 1.14.2 builds its token mask from ``input_ids != -100``
(always true), so it averages the single-step term over padding positions too; posttrain masks them
(docs/methods/minillm.md, "Departures"). On unpadded completions both agree.

Usage (a few seconds; needs the package index, or ``--find-links DIR`` with the wheel)::

    .venv/bin/python plugins/minillm/scripts/make_trl_reference.py [--find-links /tmp/trl_1.14.2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import venv

HERE = pathlib.Path(__file__).resolve().parent
DEFAULT_OUT = HERE.parent / "tests" / "data" / "trl_1_14_2_reference.json"
TRL_VERSION = "1.14.2"
PINS = [f"trl=={TRL_VERSION}"]

SEED_STUDENT, SEED_TEACHER = 0, 1
BATCH, PROMPT_LEN, COMPLETION_LEN = 4, 5, 6

#: name -> MiniLLMConfig overrides (and "old": whether old log-probs, i.e. a reused rollout, are given)
CONFIGS = {
    "default": {"args": {}},
    "gamma0.9": {"args": {"gamma": 0.9}},
    "gamma0.9_no_length_norm": {"args": {"gamma": 0.9, "length_normalization": False}},
    "kd_temperature2_temperature0.7": {"args": {"kd_temperature": 2.0, "temperature": 0.7}},
    "no_rkl_advantage": {"args": {"rkl_advantage": False}},
    "no_single_step": {"args": {"single_step_decomposition": False}},
    "reward_only": {"args": {"rkl_advantage": False, "single_step_decomposition": False}},
    "loss_grpo": {"args": {"loss_type": "grpo"}},
    "loss_bnpo": {"args": {"loss_type": "bnpo"}},
    "loss_dr_grpo": {"args": {"loss_type": "dr_grpo"}},
    "old_logps_clipped": {"args": {"epsilon": 0.05, "gamma": 0.5}, "old": True},
    "sequence_level": {"args": {"importance_sampling_level": "sequence", "epsilon": 0.05}, "old": True},
}

_MASK64 = (1 << 64) - 1


def portable_values(n: int, stream: int) -> list[float]:
    """``n`` floats uniform on [-2**-5, 2**-5) from a splitmix64 stream: the same bits on every machine."""
    state, out = (stream * 0x2545F4914F6CDD1D) & _MASK64, []
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
        out.append(((z >> 11) - (1 << 52)) * 2.0**-57)
    return out


def portable_model(tokenizer, seed: int, scale: float = 1.0):
    """The tiny causal LM of ``posttrain.testing`` in float64, every matrix refilled from :func:`portable_values` (times ``scale``)."""
    import torch

    from posttrain.testing.tiny_model import build_model

    model = build_model(tokenizer, seed=seed).to(torch.float64)
    with torch.no_grad():
        for index, param in enumerate(model.parameters()):
            if param.ndim >= 2:
                values = torch.tensor(portable_values(param.numel(), 1000 * seed + index), dtype=torch.float64).view_as(param)
                param.copy_(values * scale)
    return model


def teacher_model(tokenizer):
    """The teacher: a portable model (seed 1) with 8x larger weights, so its token distributions are far from the student's."""
    return portable_model(tokenizer, SEED_TEACHER, scale=8.0)


def student_model(tokenizer):
    """The student: a portable model (seed 0) with 4x larger weights (non-uniform distributions, so every gradient term is visible)."""
    return portable_model(tokenizer, SEED_STUDENT, scale=4.0)


def fixed_batch(vocab_size: int) -> dict:
    """Token ids, reward advantages and old log-probs as plain lists (deterministic integer arithmetic)."""
    prompt_ids = [[(7 + 13 * b + 29 * t) % (vocab_size - 10) + 5 for t in range(PROMPT_LEN)] for b in range(BATCH)]
    completion_ids = [[(11 + 17 * b + 31 * t) % (vocab_size - 10) + 5 for t in range(COMPLETION_LEN)] for b in range(BATCH)]
    advantages = [0.75, -0.75, 1.25, -0.5][:BATCH]
    # old log-probs: offsets of +-0.0625 * k from the current ones are added in the child (exact binary fractions)
    old_offsets = [[((b + 2 * t) % 5 - 2) * 0.0625 for t in range(COMPLETION_LEN)] for b in range(BATCH)]
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "advantages": advantages, "old_offsets": old_offsets}


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


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


# --------------------------------------------------------------------------------------- the child
def _child(out_path: str) -> None:
    import copy
    import warnings

    import torch
    import transformers
    import trl
    from datasets import Dataset

    from posttrain.testing.tiny_model import build_tokenizer

    assert trl.__version__ == TRL_VERSION, f"the throwaway venv imported trl {trl.__version__} ({trl.__file__})"
    from trl.experimental.minillm import MiniLLMConfig, MiniLLMTrainer

    torch.use_deterministic_algorithms(True)
    tokenizer = build_tokenizer()
    student0, teacher0 = student_model(tokenizer), teacher_model(tokenizer)
    data = fixed_batch(len(tokenizer))
    defaults = {}
    for f in dataclasses.fields(MiniLLMConfig):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = _jsonable(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = _jsonable(f.default_factory())
    result = {
        "versions": {"trl": trl.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "dtype": "float64",
        "student_weight_sum": weight_fingerprint(student0),
        "teacher_weight_sum": weight_fingerprint(teacher0),
        "batch": data,
        "config_defaults": defaults,
        "configs": {},
    }
    rows = [{"prompt": "what is 1 + 1 ="} for _ in range(BATCH)]
    for name, spec in CONFIGS.items():
        args = MiniLLMConfig(output_dir=os.path.join(tempfile.gettempdir(), f"minillm-ref-{name}"), per_device_train_batch_size=BATCH, num_generations=2,
                             max_completion_length=COMPLETION_LEN, bf16=False, use_cpu=True, report_to="none", gradient_checkpointing=False,
                             disable_tqdm=True, **spec["args"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = MiniLLMTrainer(model=copy.deepcopy(student0), teacher_model=copy.deepcopy(teacher0), args=args,
                                     train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
        trainer.current_gradient_accumulation_steps = 1
        model = trainer.model
        model.train()
        inputs = {
            "prompt_ids": torch.tensor(data["prompt_ids"]),
            "prompt_mask": torch.ones(BATCH, PROMPT_LEN, dtype=torch.long),
            "completion_ids": torch.tensor(data["completion_ids"]),
            "completion_mask": torch.ones(BATCH, COMPLETION_LEN, dtype=torch.long),
            "advantages": torch.tensor(data["advantages"], dtype=torch.float64),
            "num_items_in_batch": torch.tensor(float(BATCH * COMPLETION_LEN), dtype=torch.float64),
        }
        old = None
        if spec.get("old"):
            with torch.no_grad():
                logits = model(input_ids=torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)).logits[:, PROMPT_LEN - 1 : -1] / args.temperature
                current = torch.gather(logits.log_softmax(-1), -1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)
            old = current + torch.tensor(data["old_offsets"], dtype=torch.float64)
            inputs["old_per_token_logps"] = old
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        result["configs"][name] = {
            "spec": spec,
            "loss": loss.item(),
            "old_per_token_logps": None if old is None else old.tolist(),
            "grads": grad_fingerprints(model),
        }
        model.zero_grad(set_to_none=True)
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
    with tempfile.TemporaryDirectory(prefix="minillm-trl1142-") as tmp:
        env_dir = pathlib.Path(tmp) / "venv"
        venv.create(env_dir, with_pip=False, symlinks=True)
        py = f"python{sys.version_info.major}.{sys.version_info.minor}"
        target = env_dir / "lib" / py / "site-packages"
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), *PINS]
        if args.find_links:
            pip += ["--find-links", args.find_links]
        subprocess.run(pip, check=True)
        # processed after the throwaway venv's own site-packages: its trl 1.14.2 shadows ours
        (target / "zz_posttrain_venv.pth").write_text("".join(f"import site; site.addsitedir({p!r})\n" for p in ours))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
               "CUDA_VISIBLE_DEVICES": "", "PYTHONNOUSERSITE": "1", "TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
        env.pop("PYTHONPATH", None)
        subprocess.run([str(env_dir / "bin" / "python"), str(pathlib.Path(__file__).resolve()), "--child", "--out", args.out], check=True, env=env)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
