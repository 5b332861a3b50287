"""posttrain.disable_dropout also turns off the functional dropout a module reads from a float attribute (T5's attention)."""

import torch
from transformers import T5Config, T5ForConditionalGeneration

from posttrain import disable_dropout


def test_t5_trains_deterministically_after_disable_dropout():
    config = T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2, dropout_rate=0.5, decoder_start_token_id=0)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config).train()
    ids, labels = torch.randint(1, 64, (2, 6)), torch.randint(1, 64, (2, 4))
    assert not torch.equal(model(input_ids=ids, labels=labels).logits, model(input_ids=ids, labels=labels).logits)  # dropout is on
    disable_dropout(model)
    attention = model.encoder.block[0].layer[0].SelfAttention
    assert attention.dropout == 0.0
    assert torch.equal(model(input_ids=ids, labels=labels).logits, model(input_ids=ids, labels=labels).logits)
