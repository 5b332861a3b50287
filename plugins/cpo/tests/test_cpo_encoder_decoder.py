"""Encoder-decoder models (T5): TRL 1.16's CPO on the same tiny T5 and rows, learning, and the is_encoder_decoder flag.

As TRL: the prompt is the encoder's input, each completion the decoder's labels (decoder inputs: the labels
shifted right after ``decoder_start_token_id``), the log-probs and the NLL cover the completion tokens only.
"""

from __future__ import annotations

import copy

import pytest
import torch

from cpo_helpers import build_t5, make_ours, make_trl

CASES = [
    {"loss_type": "sigmoid"},  # CPO: the NLL term on (cpo_alpha=1.0)
    {"loss_type": "hinge", "cpo_alpha": 0.5},
    {"loss_type": "ipo", "cpo_alpha": 0.0},
    {"loss_type": "simpo", "cpo_alpha": 0.0, "beta": 2.5, "simpo_gamma": 1.375},
    {"loss_type": "alphapo", "alpha": 0.25, "beta": 2.5, "simpo_gamma": 0.1},
]


@pytest.fixture(scope="module")
def t5_64(tiny_tokenizer):
    """The tiny T5 in float64: TRL's loss and ours are then the same float64 numbers up to summation order."""
    return build_t5(tiny_tokenizer, dtype=torch.float64)


def _both(tokenizer, model, tmp_path, dataset, **cfg):
    theirs = make_trl(tokenizer, model, tmp_path, dataset, **cfg)
    ours = make_ours(tokenizer, model, tmp_path, dataset, **cfg)
    assert theirs.is_encoder_decoder and ours.is_encoder_decoder  # read from model.config in both
    # T5's attention dropout is a float (config.dropout_rate), not an nn.Dropout: disable_dropout (ours and TRL's) leaves it,
    # so both compare in eval mode (no dropout anywhere; the gradients are the same functions)
    theirs.model.eval()
    ours.model.eval()
    their_rows = [theirs.train_dataset[i] for i in range(len(theirs.train_dataset))]
    their_batch = theirs.data_collator(their_rows)
    concatenated = theirs.concatenated_inputs(their_batch, is_encoder_decoder=True, padding_value=theirs.pad_token_id)
    our_batch = ours.collate(list(ours.train_dataset))
    # TRL's columns and values, then the same encoder inputs and labels
    for column in ("prompt_input_ids", "prompt_attention_mask", "chosen_labels", "rejected_labels"):
        assert [r[column] for r in ours.train_dataset] == [r[column] for r in their_rows], column
    assert torch.equal(our_batch["input_ids"], concatenated["concatenated_input_ids"])
    assert torch.equal(our_batch["attention_mask"], concatenated["concatenated_attention_mask"])
    assert torch.equal(our_batch["labels"], concatenated["concatenated_labels"])
    assert torch.equal(ours._decoder_input_ids(our_batch["labels"]), theirs._shift_right(concatenated["concatenated_labels"]))
    return theirs, their_batch, ours, our_batch


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_t5_loss_gradients_and_metrics_match_trl(case, tiny_tokenizer, t5_64, uneven_data, tmp_path):
    theirs, their_batch, ours, our_batch = _both(tiny_tokenizer, t5_64, tmp_path, uneven_data["conversational_preference"], **case)
    assert (our_batch["labels"] == -100).any()  # uneven completions: the label padding is exercised
    their_loss, their_metrics = theirs.get_batch_loss_metrics(theirs.model, their_batch)
    their_loss.backward()
    our_loss, metrics = ours.compute_loss(ours.model, our_batch, ours.count_items(our_batch))
    our_loss.backward()
    print(f"{case}: ours={our_loss.item():.12f} trl={their_loss.item():.12f}")
    assert abs(their_loss.item()) > 1e-4  # not degenerate
    # float64 throughout (CPO casts nothing to float32): only the summation order differs
    assert our_loss.item() == pytest.approx(their_loss.item(), rel=1e-9)
    their_grads = dict(theirs.model.named_parameters())
    for name, p in ours.model.named_parameters():
        g_ours, g_theirs = p.grad, their_grads[name].grad
        assert g_ours is not None and g_theirs is not None, name
        assert (g_ours - g_theirs).norm() <= 1e-9 * g_theirs.norm() + 1e-15, name
    assert set(metrics) == set(their_metrics)
    for key, value in their_metrics.items():
        if not key.startswith("logits/"):  # ours: the mean over completion tokens (docs/methods/cpo.md)
            assert metrics[key].item() == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_t5_log_probs_use_the_chunked_helpers(tiny_tokenizer, t5_64, uneven_data, tmp_path):
    """The core's chunked log-probs (hidden states x LM head) serve T5's decoder too, and equal the scores from its logits."""
    from posttrain import causal_lm_states

    data = uneven_data["preference"]
    chunked = make_ours(tiny_tokenizer, t5_64, tmp_path, data, name="chunked", logprob_chunk_size=4)
    full = make_ours(tiny_tokenizer, t5_64, tmp_path, data, name="full", logprob_chunk_size=0)
    chunked.model.eval(), full.model.eval()  # no attention dropout (see _both)
    batch = chunked.collate(list(chunked.train_dataset))
    _, states = causal_lm_states(chunked.model, chunk_size=4, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 decoder_input_ids=chunked._decoder_input_ids(batch["labels"]), use_cache=False)
    assert states.is_chunked  # T5's lm_head is a plain nn.Linear whose output the model returns unchanged
    a, ma = chunked.compute_loss(chunked.model, batch, 8)
    b, mb = full.compute_loss(full.model, batch, 8)
    # both paths score a float64 model in float64 (posttrain 1.4): they differ only by summation order, ~1e-15 relative
    assert a.item() == pytest.approx(b.item(), rel=1e-10)
    for key in ma:
        assert ma[key].item() == pytest.approx(mb[key].item(), rel=1e-10, abs=1e-12), key


def test_t5_learns_the_preference(tiny_tokenizer, tmp_path):
    """A few steps on a tiny T5: held-out margin and accuracy rise (prefer the sum over a word on unseen prompts)."""
    from datasets import Dataset

    from posttrain.testing import make_tiny_datasets

    words = ["cat", "dog", "tree", "blue", "house", "river", "green", "stone"]
    pairs = make_tiny_datasets(n=48, seed=1)["preference"]
    data = Dataset.from_dict({"prompt": pairs["prompt"], "chosen": pairs["chosen"], "rejected": [" " + words[i % 8] for i in range(48)]})
    trainer = make_ours(tiny_tokenizer, build_t5(tiny_tokenizer, seed=1), tmp_path, data.select(range(40)), eval_dataset=data.select(range(40, 48)),
                        loss_type="simpo", cpo_alpha=0.0, beta=2.0, max_steps=30, learning_rate=1e-2, logging_steps=10)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    print(f"T5 held-out margin {before['eval_rewards/margins']:.3f} -> {after['eval_rewards/margins']:.3f}, "
          f"accuracy {before['eval_rewards/accuracies']:.3f} -> {after['eval_rewards/accuracies']:.3f}, loss {before['eval_loss']:.3f} -> {after['eval_loss']:.3f}")
    assert after["eval_rewards/margins"] > before["eval_rewards/margins"] + 1.0
    assert after["eval_rewards/accuracies"] > before["eval_rewards/accuracies"]
    assert after["eval_loss"] < 0.5 * before["eval_loss"]


def test_is_encoder_decoder_set_after_the_config_and_contradictions(tiny_tokenizer, cpo_policy, pref_data, tmp_path):
    import posttrain

    posttrain.activate("cpo", allow_experimental=True)
    from posttrain.experimental.cpo import CPOConfig, CPOTrainer

    t5 = build_t5(tiny_tokenizer)
    args = CPOConfig(output_dir=str(tmp_path), report_to="none", gradient_checkpointing=False)
    args.is_encoder_decoder = True  # set after construction, as TRL's tests do: checked when the trainer is built
    trainer = CPOTrainer(model=t5, args=args, train_dataset=pref_data["preference"], processing_class=tiny_tokenizer)
    assert trainer.is_encoder_decoder and trainer.train_dataset.column_names == ["prompt_input_ids", "prompt_attention_mask", "chosen_labels", "rejected_labels"]
    with pytest.raises(posttrain.ConfigError, match=r"is_encoder_decoder=True contradicts the model: Qwen2ForCausalLM is a decoder-only model"):
        CPOTrainer(model=copy.deepcopy(cpo_policy), args=args, train_dataset=pref_data["preference"], processing_class=tiny_tokenizer)
    args.is_encoder_decoder = False
    with pytest.raises(posttrain.ConfigError, match=r"is_encoder_decoder=False contradicts the model: T5ForConditionalGeneration is an encoder-decoder"):
        CPOTrainer(model=t5, args=args, train_dataset=pref_data["preference"], processing_class=tiny_tokenizer)
    t5.config.decoder_start_token_id = None
    args.is_encoder_decoder = None
    with pytest.raises(posttrain.ConfigError, match=r"config has no decoder_start_token_id: set model.config.decoder_start_token_id"):
        CPOTrainer(model=t5, args=args, train_dataset=pref_data["preference"], processing_class=tiny_tokenizer)


def test_t5_by_directory_is_loaded_as_seq2seq(tiny_tokenizer, pref_data, tmp_path):
    """A model named by path whose config is encoder-decoder loads with AutoModelForSeq2SeqLM (TRL would try AutoModelForCausalLM and fail)."""
    import posttrain

    posttrain.activate("cpo", allow_experimental=True)
    from posttrain.experimental.cpo import CPOConfig, CPOTrainer

    build_t5(tiny_tokenizer).save_pretrained(tmp_path / "t5")
    tiny_tokenizer.save_pretrained(tmp_path / "t5")
    args = CPOConfig(output_dir=str(tmp_path / "out"), report_to="none", gradient_checkpointing=False, max_steps=1, save_strategy="no", disable_tqdm=True)
    trainer = CPOTrainer(model=str(tmp_path / "t5"), args=args, train_dataset=pref_data["preference"])
    assert type(trainer.model).__name__ == "T5ForConditionalGeneration" and trainer.is_encoder_decoder
    assert trainer.train().global_step == 1
