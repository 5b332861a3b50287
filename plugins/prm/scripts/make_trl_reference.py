"""Generate ``plugins/prm/tests/data/trl_1_13_0_reference.json``: TRL 1.13.0's PRM trainer on fixed rows, in float64.

TRL 1.13.0 is the last release that ships ``trl.experimental.prm`` (1.14.0 removed it). This script
creates a throwaway virtual environment in a temporary directory, installs ``trl==1.13.0`` into it
with this venv's pip, and makes this venv's site-packages (torch, transformers, accelerate, datasets,
posttrain) visible *behind* it through a ``.pth`` file, so TRL 1.13 shadows the installed TRL. It
then re-runs itself there (``--child``): builds the tiny tokenizer of ``posttrain.testing`` and a tiny
float64 token-classification model (two labels) whose weights come from :func:`portable_values`
(pure-Python integers: the same bits on every machine, unlike torch's samplers), runs TRL 1.13's
``PRMTrainer`` on the fixed stepwise rows below for every configuration of :data:`CONFIGS`, and
writes per configuration: the tokenized train (and eval) rows, and per batch of :data:`BATCH` rows
the collated tensors, the loss of ``PRMTrainer.compute_loss``, TRL's ``compute_accuracy`` on the
logits, and gradient fingerprints of every parameter (norm, sum, dot with a portable probe).
``plugins/prm/tests/test_prm_parity.py`` compares posttrain's PRM trainer with this file.

Nothing was patched in TRL 1.13: it runs as released against the installed transformers and torch.

Usage (about a minute; needs the package index, or ``--find-links DIR`` with the wheel)::

    .venv/bin/python plugins/prm/scripts/make_trl_reference.py [--find-links /tmp/wheels_trl]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import types
import venv

HERE = pathlib.Path(__file__).resolve().parent
DEFAULT_OUT = HERE.parent / "tests" / "data" / "trl_1_13_0_reference.json"

PINS = ["trl==1.13.0"]  # pinned: the reference must not drift with the index
SEED = 0
BATCH = 4


def stepwise_rows() -> list[dict]:
    """8 stepwise-supervision rows: arithmetic steps, each labelled correct (True) or wrong (False); 1 to 3 steps."""
    rows = []
    for i in range(8):
        a, b, c = (i * 7) % 10, (i * 3 + 1) % 10, i % 4 + 1
        first_ok, second_ok = i % 3 != 0, i % 2 == 0
        s1 = a + b if first_ok else a + b + 1
        s2 = s1 * c if second_ok else s1 * c + 2
        steps, labels = [f"{a} + {b} = {s1}"], [first_ok]
        if i % 4 != 3:
            steps.append(f"{s1} * {c} = {s2}")
            labels.append(second_ok)
        if i % 4 == 1:
            steps.append(f"the answer is {s2}")
            labels.append(first_ok and second_ok)
        rows.append({"prompt": f"what is ({a} + {b}) * {c} ?", "completions": steps, "labels": labels})
    return rows


#: name -> PRMConfig overrides (plus "bos": a tokenizer with a BOS token, "padding_side")
CONFIGS = {
    "default": {"args": {}},
    "last_step_only": {"args": {"train_on_last_step_only": True}},
    "truncation": {"args": {"max_length": 24, "max_completion_length": 16}},
    "separator": {"args": {"step_separator": " then"}},  # a two-token separator: the label sits on its last token
    "bos": {"args": {"max_length": 20}, "bos": True},
    "left_padding": {"args": {}, "padding_side": "left"},
}


def tokenizer_for(spec: dict, tokenizer):
    """The config's tokenizer: the tiny one, or a copy with a BOS token (``<|im_start|>``) or another padding side."""
    import copy

    if not spec.get("bos") and not spec.get("padding_side"):
        return tokenizer
    tokenizer = copy.deepcopy(tokenizer)
    if spec.get("bos"):
        tokenizer.bos_token = "<|im_start|>"
    if spec.get("padding_side"):
        tokenizer.padding_side = spec["padding_side"]
    return tokenizer


_MASK64 = (1 << 64) - 1


def portable_values(n: int, stream: int) -> list[float]:
    """``n`` floats uniform on [-2**-5, 2**-5) from a splitmix64 stream (exact conversions: the same bits everywhere)."""
    state, out = (stream * 0x2545F4914F6CDD1D) & _MASK64, []
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
        out.append(((z >> 11) - (1 << 52)) * 2.0**-57)
    return out


def _rms_norm64(self, hidden_states):
    """RMSNorm computed in the input's dtype when it is float64 (transformers' own casts to float32)."""
    import torch

    dtype = torch.promote_types(hidden_states.dtype, torch.float32)
    x = hidden_states.to(dtype)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return self.weight * x.to(hidden_states.dtype)


def portable_model(tokenizer, seed: int = SEED):
    """A tiny Qwen2 ``AutoModelForTokenClassification`` (2 labels) in float64, every weight from :func:`portable_values`.

    The architecture is the tiny causal LM's of ``posttrain.testing`` (its config, ``num_labels=2``).
    Norm weights are 1; every other parameter (matrices and biases, the score head included) gets
    stream ``1000 * seed + index``. RMSNorms compute in float64 (no float32 rounding step).
    """
    import copy

    import torch
    from transformers import AutoModelForTokenClassification

    from posttrain.testing.tiny_model import build_model

    config = copy.deepcopy(build_model(tokenizer, seed=seed).config)
    config.num_labels = 2
    config.id2label, config.label2id = {0: "LABEL_0", 1: "LABEL_1"}, {"LABEL_0": 0, "LABEL_1": 1}
    model = AutoModelForTokenClassification.from_config(config, dtype=torch.float32).to(torch.float64)
    model.config.dtype = torch.float64
    with torch.no_grad():
        for index, (name, param) in enumerate(model.named_parameters()):
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.copy_(torch.tensor(portable_values(param.numel(), 1000 * seed + index), dtype=torch.float64).view_as(param))
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_rms_norm64, module)
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


# --------------------------------------------------------------------------------------- the child
def _child(out_path: str) -> None:
    import copy
    import warnings

    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import EvalPrediction

    from posttrain.testing.tiny_model import build_tokenizer

    assert trl.__version__ == "1.13.0", f"the throwaway venv imported trl {trl.__version__} ({trl.__file__})"
    from trl.experimental.prm import PRMConfig, PRMTrainer
    from trl.experimental.prm.prm_trainer import compute_accuracy

    torch.use_deterministic_algorithms(True)
    tokenizer = build_tokenizer()
    model0 = portable_model(tokenizer)
    rows = stepwise_rows()
    result = {
        "versions": {"trl": trl.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "batch_size": BATCH,
        "dtype": "float64",
        "weight_sum": weight_fingerprint(model0),
        "rows": rows,
        "configs": {},
    }
    for name, spec in CONFIGS.items():
        tok = tokenizer_for(spec, tokenizer)
        args = PRMConfig(output_dir=os.path.join(tempfile.gettempdir(), f"prm-ref-{name}"), per_device_train_batch_size=BATCH, bf16=False,
                         use_cpu=True, report_to="none", gradient_checkpointing=False, disable_tqdm=True, **spec["args"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = PRMTrainer(model=copy.deepcopy(model0), args=args, train_dataset=Dataset.from_list(rows),
                                 eval_dataset=Dataset.from_list(rows), processing_class=tok)
        train = [dict(trainer.train_dataset[i]) for i in range(len(trainer.train_dataset))]
        evals = [dict(trainer.eval_dataset[i]) for i in range(len(trainer.eval_dataset))]
        record = {"spec": spec, "train_rows": train, "eval_rows": evals, "batches": []}
        for start in range(0, len(train), BATCH):
            batch = trainer.data_collator(train[start : start + BATCH])
            trainer.model.train()
            loss, outputs = trainer.compute_loss(trainer.model, dict(batch), return_outputs=True)
            loss.backward()
            logits = outputs["logits"].detach()
            accuracy = compute_accuracy(EvalPrediction(predictions=logits.numpy(), label_ids=batch["labels"].numpy()))
            record["batches"].append({
                "tensors": {k: batch[k].tolist() for k in ("input_ids", "attention_mask", "labels")},
                "loss": loss.item(),
                "accuracy": accuracy["accuracy"],
                "grads": grad_fingerprints(trainer.model),
            })
            trainer.model.zero_grad(set_to_none=True)
        result["configs"][name] = record
        print(f"{name}: losses {[round(b['loss'], 6) for b in record['batches']]}", flush=True)
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
    with tempfile.TemporaryDirectory(prefix="prm-trl113-") as tmp:
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
