"""BEMA (Block and Zhang 2025, arXiv:2508.00180): the core's posttrain.BEMA against TRL 1.16's BEMACallback,
the SFT option (saved average), the DPO option (BEMA reference) and exact resume.

Ours and TRL's compute the same average with different operations, so they are compared on a float64 model:
in float32 their last bits differ by an amount that depends on the CPU's kernels. Ours keeps the model's
dtype; TRL computes in it too but stores the result in ``type(model)(model.config)``, built in torch's
default float32, i.e. our float64 average rounded to float32 (half an ulp, 2**-24 relative; the float64
difference of the two computations is ~1e-16). A wrong decay or bias term is off by > 1e-3.
"""

from __future__ import annotations

import copy

import pytest
import torch

from posttrain import BEMA


def _assert_equals_trl(ours, trl, what):
    """``ours`` (float64) rounds to TRL's float32 copy: within one float32 ulp of each entry (see the module docstring)."""
    assert ours.dtype == torch.float64 and trl.dtype == torch.float32, (what, ours.dtype, trl.dtype)
    torch.testing.assert_close(ours, trl.double(), rtol=torch.finfo(torch.float32).eps, atol=1e-12 * float(trl.abs().max()), msg=lambda m: f"{what}: {m}")


@pytest.fixture
def model64(tiny_tokenizer):
    from posttrain.testing.tiny_model import build_model

    return build_model(tiny_tokenizer, dtype=torch.float64)


def _trajectory(model, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)
        yield


@pytest.mark.parametrize("opts", [
    dict(update_freq=3, update_after=2, lag=10, ema_power=0.5, bias_power=0.2),
    dict(update_freq=1, update_after=0, lag=4, ema_power=0.0, bias_power=0.5, multiplier=2.0, min_ema_multiplier=0.1),
])
def test_bema_equals_trl_bema_callback_on_the_same_weight_trajectory(model64, opts, tmp_path):
    from transformers import TrainerControl, TrainerState
    from trl.trainer.callbacks import BEMACallback

    theirs = BEMACallback(**opts)
    state, control = TrainerState(), TrainerControl()
    theirs.on_train_begin(None, state, control, model=model64)
    ours = BEMA(model64, **opts)
    for step, _ in enumerate(_trajectory(model64, 12), start=1):
        state.global_step = step
        theirs.on_step_end(None, state, control, model=model64)
        ours.step(model64, step)
        expected = dict(theirs.running_model.named_parameters())
        for name, value in ours.weights().items():
            _assert_equals_trl(value, expected[name].detach(), (step, name))
    assert ours.last_update > 0


def _sft(tiny_model, tiny_tokenizer, tmp_path, callbacks=(), **cfg):
    from posttrain.testing import make_tiny_datasets
    from posttrain_sft import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-2, report_to="none", disable_tqdm=True,
                     gradient_checkpointing=False, logging_steps=1, seed=0, **cfg)
    return SFTTrainer(model=copy.deepcopy(tiny_model), args=args, train_dataset=make_tiny_datasets(16)["prompt_completion"],
                      processing_class=tiny_tokenizer, callbacks=list(callbacks))


def test_sft_use_bema_saves_the_average_trl_bema_callback_computes_on_the_same_run(model64, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM
    from trl.trainer.callbacks import BEMACallback

    opts = dict(update_freq=2, update_after=1, lag=10)
    reference = BEMACallback(**opts)  # TRL's callback runs inside our loop as a plain TrainerCallback: same trajectory
    trainer = _sft(model64, tiny_tokenizer, tmp_path / "run", callbacks=[reference], max_steps=6, save_strategy="no", use_bema=True,
                   bema_update_freq=2, bema_update_after=1, bema_lag=10)
    trainer.train()
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "bema", dtype=torch.float64)
    expected = dict(reference.running_model.named_parameters())
    trained = dict(trainer.model.named_parameters())
    for name, value in saved.named_parameters():
        _assert_equals_trl(value.detach(), expected[name].detach(), name)
    assert any(not torch.equal(saved.get_parameter(n), trained[n].detach()) for n in expected), "the average equals the final weights"


def test_sft_bema_resumes_exactly(tiny_model, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    common = dict(save_strategy="steps", save_steps=2, use_bema=True, bema_update_freq=1, bema_lag=5)
    _sft(tiny_model, tiny_tokenizer, tmp_path / "full", max_steps=4, **common).train()
    resumed = _sft(tiny_model, tiny_tokenizer, tmp_path / "resumed", max_steps=4, **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "bema").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "resumed" / "bema").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dpo_bema_ref_model_takes_the_policy_bema_weights(model64, tiny_tokenizer, tmp_path):
    from trl.trainer.callbacks import BEMACallback

    from posttrain.testing import make_tiny_datasets
    from posttrain_dpo import DPOConfig, DPOTrainer

    reference = BEMACallback(update_freq=2, lag=10)
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-2, report_to="none", disable_tqdm=True,
                     gradient_checkpointing=False, max_steps=4, save_strategy="no", bema_ref_model=True, bema_ref_model_update_freq=2,
                     bema_update_freq=2, bema_lag=10)
    trainer = DPOTrainer(model=copy.deepcopy(model64), args=args, train_dataset=make_tiny_datasets(16)["preference"],
                         processing_class=tiny_tokenizer, callbacks=[reference])
    before = {k: v.clone() for k, v in trainer.ref_model.state_dict().items()}
    trainer.train()
    expected = dict(reference.running_model.named_parameters())
    ref = dict(trainer.ref_model.named_parameters())
    assert any(not torch.equal(before[n], ref[n]) for n in ref), "the reference never changed"
    for name, value in expected.items():
        _assert_equals_trl(ref[name].detach(), value.detach(), name)


def test_dpo_bema_ref_model_refuses_conflicts():
    from posttrain import ConfigError
    from posttrain_dpo import DPOConfig

    with pytest.raises(ConfigError, match="bema_ref_model=True conflicts with sync_ref_model=True"):
        DPOConfig(output_dir="x", bema_ref_model=True, sync_ref_model=True)
    with pytest.raises(ConfigError, match="bema_update_freq=0 is invalid"):
        BEMA(torch.nn.Linear(2, 2), update_freq=0)
