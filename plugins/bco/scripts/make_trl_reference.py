"""Generate ``plugins/bco/tests/data/trl_1_13_0_reference.json``: TRL 1.13.0's BCO on fixed inputs, in float64.

TRL 1.13.0 is the last release that ships ``trl.experimental.bco`` (1.14.0 removed it). This script
creates a throwaway virtual environment in a temporary directory, installs ``trl==1.13.0`` and
scikit-learn (with scipy, joblib, threadpoolctl, cloudpickle, narwhals) into it with this venv's pip, and makes this venv's
site-packages (torch, transformers, accelerate, datasets, posttrain) visible *behind* them through a
``.pth`` file, so TRL 1.13 shadows the installed TRL. It then re-runs itself there (``--child``):
builds the tiny tokenizer of ``posttrain.testing`` and two tiny float64 models whose weights come from
:func:`portable_values` (not torch's initializers, whose float32 normal sampler gives different bits on
AVX2 and non-AVX2/ARM builds), runs TRL 1.13's ``BCOTrainer`` on the fixed rows below for every
configuration of :data:`CONFIGS`, and writes, per configuration and for two consecutive batches (the
running reward mean of batch 2 depends on batch 1): the collated token tensors, the loss, the stored
metrics, the running moments, and gradient fingerprints of every parameter (norm, sum, dot with a
portable probe). UDM configurations also record the sampled prompt embeddings, the fitted
``LogisticRegression`` and the density-ratio weights. ``plugins/bco/tests/test_bco_parity.py``
compares posttrain's BCO with this file: the same inputs bit for bit on any machine, float64 compute,
so the comparison can be tight (see the tolerances there).

Usage (about a minute; needs the package index, or ``--find-links DIR`` with the wheels)::

    taskset -c 1 .venv/bin/python plugins/bco/scripts/make_trl_reference.py [--find-links /tmp/bco_wheels]
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
PINS = ["trl==1.13.0", "scikit-learn==1.9.1", "scipy==1.17.1", "joblib==1.6.0", "threadpoolctl==3.8.0", "cloudpickle==3.1.3", "narwhals==2.29.0"]

SEED_POLICY, SEED_REF, SEED_EMBED, SEED_NUMPY = 0, 1, 2, 1234
BATCH = 8


def standard_rows() -> list[dict]:
    """16 unpaired rows: desirable arithmetic answers, undesirable word prompts (distinct prompt distributions for UDM)."""
    words = ["cat", "dog", "red", "blue", "tree", "mat"]
    rows = []
    for i in range(16):
        a, b = (i * 7) % 10, (i * 3 + 1) % 10
        if i % 3 != 0:
            rows.append({"prompt": f"what is {a} + {b} =", "completion": f" {a + b}" + (" yes" if i % 2 else ""), "label": True})
        else:
            rows.append({"prompt": f"the {words[i % 6]} sat on the {words[(i + 1) % 6]}", "completion": f" {a + b + 1} no", "label": False})
    return rows


def conversational_rows() -> list[dict]:
    return [
        {"prompt": [{"role": "user", "content": r["prompt"]}], "completion": [{"role": "assistant", "content": r["completion"].strip()}], "label": r["label"]}
        for r in standard_rows()
    ]


def paired_rows() -> list[dict]:
    """8 (prompt, chosen, rejected) rows: TRL unpairs them into [8 desirable, 8 undesirable]."""
    return [{"prompt": f"what is {i} + {i + 1} =", "chosen": f" {2 * i + 1}", "rejected": f" {2 * i + 3} maybe"} for i in range(8)]


ROWS = {"standard": standard_rows, "conversational": conversational_rows, "paired": paired_rows}

#: name -> (rows, BCOConfig overrides, whether a separate reference model is passed, UDM on)
CONFIGS = {
    "beta0.1": {"rows": "standard", "args": {"beta": 0.1}, "ref_model": True, "udm": False},
    "beta2.0": {"rows": "standard", "args": {"beta": 2.0}, "ref_model": True, "udm": False},
    "precompute": {"rows": "standard", "args": {"beta": 0.1, "precompute_ref_log_probs": True}, "ref_model": True, "udm": False},
    "precompute_noref": {"rows": "standard", "args": {"beta": 0.5, "precompute_ref_log_probs": True}, "ref_model": False, "udm": False},
    "conversational": {"rows": "conversational", "args": {"beta": 0.1}, "ref_model": True, "udm": False},
    "paired": {"rows": "paired", "args": {"beta": 0.3}, "ref_model": True, "udm": False},
    "truncation": {"rows": "standard", "args": {"beta": 0.1, "max_length": 10}, "ref_model": True, "udm": False},
    # a prompt longer than TRL's budget: TRL's answer[:negative] keeps completion tokens past max_length (a bug, not matched)
    "prompt_over_budget": {"rows": "standard", "args": {"beta": 0.1, "max_length": 8}, "ref_model": True, "udm": False},
    # a tokenizer with a BOS token (prepended to every prompt) and a length budget
    "bos": {"rows": "standard", "args": {"beta": 0.1, "max_length": 11}, "ref_model": True, "udm": False, "bos": True},
    "udm": {"rows": "standard", "args": {"beta": 0.1, "prompt_sample_size": 6, "min_density_ratio": 0.05}, "ref_model": True, "udm": True},
    "udm_clamped": {"rows": "standard", "args": {"beta": 1.0, "prompt_sample_size": 4, "min_density_ratio": 0.9, "max_density_ratio": 1.1}, "ref_model": True, "udm": True},
}


def tokenizer_for(spec: dict, tokenizer):
    """The config's tokenizer: the tiny one, or a copy whose BOS token is ``<|im_start|>`` (``"bos": True``)."""
    if not spec.get("bos"):
        return tokenizer
    import copy

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.bos_token = "<|im_start|>"
    return tokenizer


_MASK64 = (1 << 64) - 1


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


def portable_model(tokenizer, seed: int):
    """The tiny causal LM of ``posttrain.testing`` in float64, every matrix refilled from :func:`portable_values`.

    Vectors keep their exact initial values (norm weights 1, biases 0); the tied embedding/LM-head
    matrix and every projection get stream ``1000 * seed + index`` (index: the parameter's position).
    """
    import torch

    from posttrain.testing.tiny_model import build_model

    model = build_model(tokenizer, seed=seed).to(torch.float64)
    with torch.no_grad():
        for index, param in enumerate(model.parameters()):
            if param.ndim >= 2:
                param.copy_(torch.tensor(portable_values(param.numel(), 1000 * seed + index), dtype=torch.float64).view_as(param))
    return model


def weight_fingerprint(model) -> float:
    """The sum of every weight (float64): equal (to summation order) iff the portable weights are the generator's."""
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def embedding_matrix(tokenizer):
    """The frozen (V, H) float64 embedding table of a portable tiny model (seed 2), times 50 (unit-scale features): the UDM prompt embeddings."""
    return portable_model(tokenizer, SEED_EMBED).get_input_embeddings().weight.detach().clone() * 50.0


def make_embedding_func(matrix):
    """``embedding_func(input_ids, attention_mask)``: the mean of the embedding rows over the attention mask (B, H), float32.

    The mean is taken in float64 and rounded once to float32 (what TRL feeds scikit-learn), so both
    sides see the same float32 embeddings on any machine.
    """
    import torch

    def embedding_func(input_ids, attention_mask):
        mask = attention_mask.cpu().to(matrix.dtype).unsqueeze(-1)  # (B, T, 1)
        return ((matrix[input_ids.cpu()] * mask).sum(1) / mask.sum(1).clamp(min=1)).float()  # (B, H)

    return torch.no_grad()(embedding_func)


def grad_fingerprints(model) -> dict:
    """Per parameter: gradient norm, sum and dot with a portable probe (:func:`portable_values`, stream 7000 + index), in float64."""
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

    import numpy as np
    import sklearn
    import torch
    import transformers
    import trl
    from datasets import Dataset

    from posttrain.testing.tiny_model import build_tokenizer

    assert trl.__version__ == "1.13.0", f"the throwaway venv imported trl {trl.__version__} ({trl.__file__})"
    from trl.experimental.bco import BCOConfig, BCOTrainer

    torch.use_deterministic_algorithms(True)
    tokenizer = build_tokenizer()
    policy0, ref0 = portable_model(tokenizer, SEED_POLICY), portable_model(tokenizer, SEED_REF)
    result = {
        "versions": {"trl": trl.__version__, "sklearn": sklearn.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "seeds": {"policy": SEED_POLICY, "ref": SEED_REF, "embedding": SEED_EMBED, "numpy": SEED_NUMPY},
        "batch_size": BATCH,
        "dtype": "float64",
        "policy_weight_sum": weight_fingerprint(policy0),
        "ref_weight_sum": weight_fingerprint(ref0),
        "configs": {},
    }
    tensor_keys = ("completion_input_ids", "completion_attention_mask", "completion_labels", "embedding_input_ids", "embedding_attention_mask")
    for name, spec in CONFIGS.items():
        rows = ROWS[spec["rows"]]()
        tok = tokenizer_for(spec, tokenizer)
        args = BCOConfig(output_dir=os.path.join(tempfile.gettempdir(), f"bco-ref-{name}"), per_device_train_batch_size=BATCH, per_device_eval_batch_size=BATCH,
                         bf16=False, use_cpu=True, report_to="none", gradient_checkpointing=False, disable_tqdm=True, remove_unused_columns=False,
                         **spec["args"])
        kwargs = {}
        sampled = []
        if spec["udm"]:
            matrix = embedding_matrix(tokenizer)
            kwargs = {"embedding_func": make_embedding_func(matrix), "embedding_tokenizer": tokenizer}
            np.random.seed(SEED_NUMPY)
            choice = np.random.choice

            def recording_choice(n, size):
                idx = choice(n, size=size)
                sampled.append(idx.tolist())
                return idx

            np.random.choice = recording_choice
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = BCOTrainer(model=copy.deepcopy(policy0), ref_model=copy.deepcopy(ref0) if spec["ref_model"] else None, args=args,
                                 train_dataset=Dataset.from_list(rows), processing_class=tok, **kwargs)
        if spec["udm"]:
            np.random.choice = choice
        trainer.get_train_dataloader()  # precomputes the reference log-probs when asked
        data = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
        record = {"rows": rows, "spec": spec, "batches": []}
        if spec["udm"]:
            desirable = [r for r in data if r["label"]]
            undesirable = [r for r in data if not r["label"]]
            emb = make_embedding_func(matrix)
            for part, idx, key in ((desirable, sampled[0], "chosen"), (undesirable, sampled[1], "rejected")):
                batch = trainer.data_collator([part[i] for i in idx])
                record[f"sample_{key}_indices"] = idx
                record[f"sample_{key}_embeddings"] = emb(batch["embedding_input_ids"], batch["embedding_attention_mask"]).tolist()
            record["clf_coef"] = trainer.clf.coef_.tolist()
            record["clf_intercept"] = trainer.clf.intercept_.tolist()
            record["clf_n_iter"] = trainer.clf.n_iter_.tolist()
        for start in range(0, len(data), BATCH):
            batch = trainer.data_collator(data[start : start + BATCH])
            trainer.model.train()
            trainer._stored_metrics.clear()
            loss = trainer.compute_loss(trainer.model, batch)
            loss.backward()
            item = {
                "tensors": {k: batch[k].tolist() for k in tensor_keys if k in batch},
                "label": list(batch["label"]),
                "loss": loss.item(),
                "metrics": {k: v[0] for k, v in trainer._stored_metrics["train"].items()},
                "running": {"mean": trainer.running.mean, "var": trainer.running.var, "std": trainer.running.std, "count": float(trainer.running.count)},
                "grads": grad_fingerprints(trainer.model),
            }
            if "reference_logps" in batch:
                item["reference_logps"] = batch["reference_logps"].tolist()
            if spec["udm"]:
                _, rejected_emb = trainer._get_prompt_embeddings(batch)
                item["predict_proba_rejected"] = trainer._get_chosen_prob(rejected_emb).tolist()
                item["udm_weight_rejected"] = trainer._get_udm_weight(rejected_emb).tolist()
            trainer.model.zero_grad(set_to_none=True)
            record["batches"].append(item)
        first = trainer.data_collator(data[:BATCH])
        with torch.no_grad():
            eval_loss, eval_metrics = trainer.get_batch_loss_metrics(trainer.model, first, do_train=False)
        record["eval_first_batch"] = {"loss": eval_loss.item(), "metrics": eval_metrics}
        result["configs"][name] = record
        print(f"{name}: losses {[round(b['loss'], 6) for b in record['batches']]}, delta {record['batches'][-1]['running']['mean']:.6f}", flush=True)
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
    with tempfile.TemporaryDirectory(prefix="bco-trl113-") as tmp:
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
