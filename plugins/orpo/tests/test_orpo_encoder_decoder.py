"""Encoder-decoder models (T5) as TRL 1.16's ORPO trains them: parity on the same tiny T5 and rows, learning, the flag.

The prompt is the encoder's input, each response the decoder's labels (decoder inputs: the labels shifted right
after ``decoder_start_token_id``); log-probs and the NLL cover the response tokens only.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import posttrain
from posttrain.testing import make_tiny_datasets


@pytest.fixture(autouse=True)
def _opt_in(clean_gate):
    posttrain.activate("orpo", allow_experimental=True)
    yield


def build_t5(tokenizer, seed=0, dtype=None):
    """A tiny T5 for ``tokenizer``'s vocabulary, decoding from the pad token (as T5 does); seeded weights."""
    import transformers

    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    config = transformers.T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                                   decoder_start_token_id=pad_id, pad_token_id=pad_id, eos_token_id=eos_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.T5ForConditionalGeneration(config)
    return model.to(dtype) if dtype is not None else model


@pytest.fixture(scope="module")
def t5_64(tiny_tokenizer):
    """The tiny T5 in float64: TRL's numbers and ours then differ only by summation order (and ORPO's float32 odds ratio)."""
    return build_t5(tiny_tokenizer, dtype=torch.float64)


@pytest.fixture(scope="module")
def uneven():
    """Conversational pairs whose responses have different lengths (0-3 extra words), so the label padding matters."""
    from datasets import Dataset

    rows = make_tiny_datasets(8)["conversational_preference"].to_list()
    for i, row in enumerate(rows):
        row["chosen"] = [{**m, "content": m["content"] + " yes" * (i % 4)} for m in row["chosen"]]
        row["rejected"] = [{**m, "content": m["content"] + " no" * ((3 * i) % 4)} for m in row["rejected"]]
    return Dataset.from_list(rows)


def _ours(tokenizer, model, tmp_path, dataset, name="ours", **cfg):
    from posttrain_orpo import ORPOConfig, ORPOTrainer

    cfg = {"per_device_train_batch_size": 8, "report_to": "none", "disable_tqdm": True, "gradient_checkpointing": False, "save_strategy": "no", **cfg}
    return ORPOTrainer(model=copy.deepcopy(model), args=ORPOConfig(output_dir=str(tmp_path / name), **cfg), train_dataset=dataset, processing_class=tokenizer)


def _trl(tokenizer, model, tmp_path, dataset, **cfg):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    args = ORPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=8, bf16=False, report_to="none", gradient_checkpointing=False,
                      use_cpu=True, disable_tqdm=True, **cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ORPOTrainer(model=copy.deepcopy(model), args=args, train_dataset=dataset, processing_class=tokenizer)


@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_t5_loss_gradients_and_metrics_match_trl(beta, tiny_tokenizer, t5_64, uneven, tmp_path):
    theirs, ours = _trl(tiny_tokenizer, t5_64, tmp_path, uneven, beta=beta), _ours(tiny_tokenizer, t5_64, tmp_path, uneven, beta=beta)
    assert theirs.is_encoder_decoder and ours.is_encoder_decoder  # read from model.config in both
    # T5's attention dropout is a float (config.dropout_rate), not an nn.Dropout, so disable_dropout (TRL's and ours) leaves
    # it: compare in eval mode (no dropout anywhere; the gradients are those of the same functions)
    theirs.model.eval(), ours.model.eval()
    their_rows = [theirs.train_dataset[i] for i in range(len(theirs.train_dataset))]
    for column in ("prompt_input_ids", "prompt_attention_mask", "chosen_labels", "rejected_labels"):  # TRL's columns and values
        assert [r[column] for r in ours.train_dataset] == [r[column] for r in their_rows], column
    their_batch = theirs.data_collator(their_rows)
    concatenated = theirs.concatenated_inputs(their_batch, is_encoder_decoder=True, padding_value=theirs.padding_value)
    our_batch = ours.collate(list(ours.train_dataset))
    assert torch.equal(our_batch["input_ids"], concatenated["concatenated_input_ids"])
    assert torch.equal(our_batch["attention_mask"], concatenated["concatenated_attention_mask"])
    assert torch.equal(our_batch["labels"], concatenated["concatenated_labels"]) and (our_batch["labels"] == -100).any()
    assert torch.equal(ours._decoder_input_ids(our_batch["labels"]), theirs._shift_right(concatenated["concatenated_labels"]))

    their_loss, their_metrics = theirs.get_batch_loss_metrics(theirs.model, their_batch)
    their_loss.backward()
    our_loss, metrics = ours.compute_loss(ours.model, our_batch, ours.count_items(our_batch))
    our_loss.backward()
    print(f"T5 beta={beta}: ours={our_loss.item():.12f} trl={their_loss.item():.12f}")
    # float64 model; the odds-ratio term is computed in float32 by both (TRL's .float()): float32 round-off, ~1e-7 relative
    assert our_loss.item() == pytest.approx(their_loss.item(), rel=1e-6)
    their_grads = dict(theirs.model.named_parameters())
    for name, p in ours.model.named_parameters():
        g_ours, g_theirs = p.grad, their_grads[name].grad
        assert g_ours is not None and g_theirs is not None, name
        assert (g_ours - g_theirs).norm() <= 1e-5 * g_theirs.norm() + 1e-12, name
    assert set(metrics) == set(their_metrics), set(metrics) ^ set(their_metrics)
    for key, value in their_metrics.items():  # every metric, logits/* included (TRL's mean over every decoder position)
        assert metrics[key].item() == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_t5_nll_covers_the_response_tokens_only(tiny_tokenizer, t5_64, uneven, tmp_path):
    """The chosen NLL, recomputed with a plain cross-entropy of T5's own loss over the chosen labels (no prompt token in it)."""
    import torch.nn.functional as F

    ours = _ours(tiny_tokenizer, t5_64, tmp_path, uneven)
    ours.model.eval()
    batch = ours.collate(list(ours.train_dataset))
    with torch.no_grad():
        _, metrics = ours.compute_loss(ours.model, batch, 8)
        chosen = slice(0, 8)
        logits = ours.model(input_ids=batch["input_ids"][chosen], attention_mask=batch["attention_mask"][chosen], labels=batch["labels"][chosen]).logits
        reference = F.cross_entropy(logits.flatten(0, 1), batch["labels"][chosen].flatten(), ignore_index=-100)
    assert metrics["nll_loss"].item() == pytest.approx(reference.item(), rel=1e-10)


def test_t5_learns_the_preference(tiny_tokenizer, tmp_path):
    """A few steps on a tiny T5: the held-out odds-ratio margin and accuracy rise (the sum over a word, unseen prompts)."""
    from datasets import Dataset

    words = ["cat", "dog", "tree", "blue", "house", "river", "green", "stone"]
    pairs = make_tiny_datasets(n=48, seed=1)["preference"]
    data = Dataset.from_dict({"prompt": pairs["prompt"], "chosen": pairs["chosen"], "rejected": [" " + words[i % 8] for i in range(48)]})
    trainer = _ours(tiny_tokenizer, build_t5(tiny_tokenizer, seed=1), tmp_path, data.select(range(40)), beta=0.5, max_steps=30, learning_rate=1e-2,
                    logging_steps=10)
    heldout = trainer.process_dataset(data.select(range(40, 48)), "heldout")

    def score():
        trainer.model.eval()
        with torch.no_grad():
            _, m = trainer.compute_loss(trainer.model, trainer.collate(list(heldout)), len(heldout))
        return m["rewards/margins"].item(), m["rewards/accuracies"].item(), -m["log_odds_ratio"].item()

    margin_before, acc_before, or_before = score()
    trainer.train()
    margin_after, acc_after, or_after = score()
    print(f"T5 held-out margin {margin_before:.3f} -> {margin_after:.3f}, accuracy {acc_before:.3f} -> {acc_after:.3f}, "
          f"odds-ratio loss {or_before:.3f} -> {or_after:.3f}")
    assert margin_after > margin_before + 0.5 and acc_after > acc_before and or_after < 0.5 * or_before


def test_is_encoder_decoder_is_read_from_the_model_and_checked_at_build(tiny_tokenizer, tmp_path):
    from posttrain.testing.tiny_model import build_model

    from posttrain_orpo import ORPOConfig, ORPOTrainer

    data = make_tiny_datasets(4)["preference"]
    t5 = build_t5(tiny_tokenizer)
    args = ORPOConfig(output_dir=str(tmp_path), report_to="none", gradient_checkpointing=False)
    args.is_encoder_decoder = True  # set after construction, as TRL's tests do: checked when the trainer is built
    trainer = ORPOTrainer(model=t5, args=args, train_dataset=data, processing_class=tiny_tokenizer)
    assert trainer.is_encoder_decoder and trainer.train_dataset.column_names == ["prompt_input_ids", "prompt_attention_mask", "chosen_labels", "rejected_labels"]
    with pytest.raises(posttrain.ConfigError, match=r"is_encoder_decoder=True contradicts the model: Qwen2ForCausalLM is a decoder-only model"):
        ORPOTrainer(model=build_model(tiny_tokenizer), args=args, train_dataset=data, processing_class=tiny_tokenizer)
    args.is_encoder_decoder = False
    with pytest.raises(posttrain.ConfigError, match=r"is_encoder_decoder=False contradicts the model: T5ForConditionalGeneration is an encoder-decoder"):
        ORPOTrainer(model=t5, args=args, train_dataset=data, processing_class=tiny_tokenizer)
    args.is_encoder_decoder = None
    assert not ORPOTrainer(model=build_model(tiny_tokenizer), args=args, train_dataset=data, processing_class=tiny_tokenizer).is_encoder_decoder
