"""Parity with TRL 1.16's ``trl.experimental.online_dpo.OnlineDPOTrainer`` on fixed completions.

Both trainers get the same float64 tiny model, the same prompts and the same two completions per
prompt: TRL's ``_generate`` is replaced by one returning them (TRL's layout: every prompt's first
completion, then every prompt's second), ours comes from a rollout backend returning them (grouped
per prompt). Then TRL's ``training_step`` (labels from the reward function, missing-EOS penalty,
prompt truncation to ``max_length``, loss, backward) is compared with our producer's micro-batch and
``compute_loss``: the loss, TRL's logged statistics and every parameter's gradient.

Tolerances. Everything runs in float64 (TRL's ``_forward`` takes a full log-softmax, we score
hidden states against the LM head): the two computations differ by summation order only,
~1e-15 relative, so 1e-10 (loss, metrics) and 1e-8 (gradients, per tensor by norm) hold on any
machine and thread count. Measured differences are printed.
"""

from __future__ import annotations

import copy

import pytest
import torch
from online_dpo_helpers import low_token_count

trl = pytest.importorskip("trl")
pytest.importorskip("trl.experimental.online_dpo")

import posttrain  # noqa: E402

PROMPTS = ["what is 1 + 2", "hello", "the cat sat on the mat", "one two"]
EOS = 2
MAX_NEW = 6
# two completions per prompt: shorter ones end with EOS (as a sampler stops), full-length ones may not
FIXED = {
    0: ([40, 50, 60, EOS], [300, 301, 302, 303, 304, 305]),
    1: ([10, 11, 12, 13, 14, 15], [200, EOS]),
    2: ([5, 6, 7, 8, 9, EOS], [250, 251, 252, 253, 254, 255]),
    3: ([100, 101, 102, 103, 104, 105], [20, 21, 22, 23, 24, 25]),
}
FULL = {k: ([7, 8, 9, 10, 11, 12], [300, 301, 302, 303, 304, 305]) if k % 2 else ([400, 401, 60, 3, 4, 5], [30, 31, 32, 33, 34, 35]) for k in range(4)}


class PairBackend:
    """A rollout backend returning fixed completions per prompt (index found by the prompt's ids)."""

    name = "fixed_pairs"

    def __init__(self, table, prompt_ids):
        self.table, self.prompt_ids, self.policy_version = table, prompt_ids, 0

    def generate(self, prompt_ids, sampling):
        from posttrain import RolloutBatch

        prompts, completions, logprobs, truncated = [], [], [], []
        for p in prompt_ids:
            k = self.prompt_ids.index(list(p))
            for c in self.table[k][: sampling.n]:
                prompts.append(list(p))
                completions.append(list(c))
                logprobs.append([-1.0] * len(c))
                truncated.append(len(c) >= sampling.max_tokens and c[-1] != EOS)
        return RolloutBatch(prompts, completions, logprobs, truncated, policy_version=self.policy_version)

    def update_weights(self, model):
        self.policy_version += 1


@pytest.fixture(autouse=True)
def _opt_in(clean_gate):
    posttrain.activate("online_dpo", allow_experimental=True)
    yield


@pytest.fixture(scope="module")
def base():
    from posttrain.testing.tiny_model import build_model, build_tokenizer

    tok = build_tokenizer()
    model = build_model(tok, hidden_size=32, num_layers=2, seed=0).to(torch.float64)
    ref = copy.deepcopy(model)  # a reference that differs from the policy, so the logits are not all 0
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)
    return tok, model, ref


def _trl_batch(tok, table):
    """TRL's tensors: prompts left-padded and repeated, completions right-padded, halves layout."""
    from posttrain import prompt_token_ids

    ids = [prompt_token_ids({"prompt": p}, tok) for p in PROMPTS]
    width = max(map(len, ids))
    prompt_ids = torch.tensor([[tok.pad_token_id] * (width - len(x)) + x for x in ids] * 2)
    prompt_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids] * 2)
    completions = [table[k][0] for k in range(len(PROMPTS))] + [table[k][1] for k in range(len(PROMPTS))]
    cw = max(map(len, completions))
    completion_ids = torch.tensor([c + [tok.pad_token_id] * (cw - len(c)) for c in completions])
    completion_mask = torch.tensor([[1] * len(c) + [0] * (cw - len(c)) for c in completions])
    return ids, (prompt_ids, prompt_mask, completion_ids, completion_mask, None)


CASES = {
    "sigmoid": (dict(loss_type="sigmoid", beta=0.1), FIXED),
    "ipo": (dict(loss_type="ipo", beta=0.5), FIXED),
    "missing_eos_penalty": (dict(loss_type="sigmoid", beta=0.2, missing_eos_penalty=1.0), FIXED),
    "max_length_cuts_prompt": (dict(loss_type="sigmoid", beta=0.1, max_length=9), FIXED),
    "unpadded": (dict(loss_type="ipo", beta=0.1), FULL),
}
EVERY_CASE = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected",
              "objective/scores", "objective/scores_margin", "val/contain_eos_token", "beta"]
# TRL sums these over padded positions too; they agree where no completion is padded
UNPADDED_ONLY = ["objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward"]


@pytest.mark.parametrize("case", list(CASES))
def test_loss_metrics_and_gradients_match_trl(base, case, tmp_path):
    from trl.experimental.online_dpo import OnlineDPOConfig as TRLConfig
    from trl.experimental.online_dpo import OnlineDPOTrainer as TRLTrainer

    from posttrain import RolloutEngine
    from posttrain_online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    tok, model, ref = base
    overrides, table = CASES[case]
    overrides = {"max_length": 512, **overrides}
    data = [{"prompt": p} for p in PROMPTS]
    common = dict(per_device_train_batch_size=len(PROMPTS), max_new_tokens=MAX_NEW, report_to="none", gradient_checkpointing=False, **overrides)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trl_args = TRLConfig(output_dir=str(tmp_path / "trl"), bf16=False, use_cpu=True, **common)
        theirs = TRLTrainer(model=copy.deepcopy(model), ref_model=copy.deepcopy(ref), reward_funcs=low_token_count, args=trl_args, train_dataset=__import__("datasets").Dataset.from_list(data), processing_class=tok)
    prompt_ids, fixed = _trl_batch(tok, table)
    theirs._generate = lambda model, prompts, images=None: fixed
    trl_loss = theirs.training_step(theirs.model, {"prompt": list(PROMPTS)})
    trl_stats = {k: v[-1] for k, v in theirs.stats.items() if v}
    trl_stats["loss"] = trl_loss.item()

    args = OnlineDPOConfig(output_dir=str(tmp_path / "ours"), save_strategy="no", **common)
    ours = OnlineDPOTrainer(model=copy.deepcopy(model), ref_model=copy.deepcopy(ref), reward_funcs=low_token_count, args=args, train_dataset=data, processing_class=tok,
                            rollout_engine=RolloutEngine(PairBackend(table, prompt_ids)))
    (batch,) = ours._produce(posttrain.ProduceRequest(rows=data, indices=list(range(len(data))), step=0, rank=0, policy_version=0, epoch=0))
    ours.model.zero_grad()
    loss, metrics = ours.compute_loss(ours.model, batch, torch.tensor(float(len(PROMPTS))))
    loss.backward()
    our_stats = {k: float(v) for k, v in metrics.items()}
    our_stats["loss"] = loss.item()

    keys = EVERY_CASE + (UNPADDED_ONLY if table is FULL else [])
    worst = 0.0
    for key in keys:
        a, b = our_stats[key], float(trl_stats[key])
        rel = abs(a - b) / max(abs(b), 1e-12)
        worst = max(worst, rel if abs(b) > 1e-12 else abs(a - b))
        assert a == pytest.approx(b, rel=1e-10, abs=1e-12), f"{key}: ours {a!r} trl {b!r}"
    trl_params = dict(theirs.model.named_parameters())
    worst_grad = 0.0
    for name, p in ours.model.named_parameters():
        g = trl_params[name].grad
        assert g is not None and g.norm() > 0, name
        rel = ((p.grad - g).norm() / g.norm()).item()
        assert rel <= 1e-8, f"{name}: |ours - trl| / |trl| = {rel:.2e}"
        worst_grad = max(worst_grad, rel)
    print(f"{case}: loss ours={our_stats['loss']:.12f} trl={trl_stats['loss']:.12f}; worst metric rel {worst:.1e}, worst gradient rel {worst_grad:.1e}")
