"""A method that trains causal LMs refuses an encoder-decoder model in one line naming its class (plugin API 1.4).

Before, T5 given to SFT/DPO/KTO died inside transformers ("You must specify exactly one of input_ids or
inputs_embeds") and GRPO/RLOO at generation. Methods that do train encoder-decoders (ORPO, CPO) set
``supports_encoder_decoder = True`` on their trainer and are not refused.
"""

from __future__ import annotations

import importlib

import pytest

from posttrain import ConfigError

CASES = [("sft", "SFT", {"text": ["a b c", "d e f"]}, {}),
         ("dpo", "DPO", {"prompt": ["a b", "c d"], "chosen": [" x", " y"], "rejected": [" z", " w"]}, {}),
         ("kto", "KTO", {"prompt": ["a b", "c d"], "completion": [" x", " y"], "label": [True, False]}, {}),
         ("grpo", "GRPO", {"prompt": ["a b", "c d"]}, {"reward_funcs": [lambda completions, **kwargs: [0.0] * len(completions)]}),
         ("rloo", "RLOO", {"prompt": ["a b", "c d"]}, {"reward_funcs": [lambda completions, **kwargs: [0.0] * len(completions)]})]


def _t5(tok):
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=len(tok), d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                      decoder_start_token_id=tok.pad_token_id, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return T5ForConditionalGeneration(config)


@pytest.mark.parametrize(("module", "prefix", "rows", "extra"), CASES, ids=[c[0] for c in CASES])
def test_a_causal_lm_method_refuses_t5_naming_the_class(module, prefix, rows, extra, tiny_tokenizer, tmp_path):
    pytest.importorskip(f"posttrain_{module}")
    from datasets import Dataset

    methods = importlib.import_module(f"posttrain.methods.{module}")
    config_cls, trainer_cls = getattr(methods, f"{prefix}Config"), getattr(methods, f"{prefix}Trainer")
    args = config_cls(output_dir=str(tmp_path / "out"), max_steps=1, report_to=[], disable_tqdm=True)
    with pytest.raises(ConfigError, match=rf"T5ForConditionalGeneration is an encoder-decoder model, but posttrain's '{module}' trains decoder-only"):
        trainer_cls(model=_t5(tiny_tokenizer), args=args, train_dataset=Dataset.from_dict(rows), processing_class=tiny_tokenizer, **extra)


def test_a_method_that_supports_encoder_decoders_is_not_refused(tiny_tokenizer, tmp_path):
    pytest.importorskip("posttrain_cpo")
    from datasets import Dataset

    from posttrain.experimental.cpo import CPOConfig, CPOTrainer

    rows = Dataset.from_dict({"prompt": ["a b", "c d"], "chosen": [" x", " y"], "rejected": [" z", " w"]})
    trainer = CPOTrainer(model=_t5(tiny_tokenizer), args=CPOConfig(output_dir=str(tmp_path / "out"), max_steps=1, report_to=[]),
                         train_dataset=rows, processing_class=tiny_tokenizer)
    assert trainer.supports_encoder_decoder and trainer.is_encoder_decoder
