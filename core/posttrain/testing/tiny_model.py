"""Build tiny causal LMs and tokenizers in-process (no downloads) for tests, demos and benchmarks.

Usage as a script: ``python -m posttrain.testing.tiny_model OUT_DIR [--arch qwen2|qwen3|llama]``
writes a model + tokenizer directory that loads with ``from_pretrained(OUT_DIR)``;
``python -m posttrain.testing.tiny_model OUT_DIR --teacher`` writes the tiny *trained* teacher of the
distillation examples instead (same tokenizer and vocabulary, trained for a few seconds).
"""

from __future__ import annotations

import argparse
import random

__all__ = ["CHATML_TEMPLATE", "TOOL_CHATML_TEMPLATE", "TOOL_TOKENS", "build_tokenizer", "build_model", "build_reward_model", "synthetic_corpus", "save_tiny_model",
           "save_tiny_teacher", "train_teacher", "main"]

#: ChatML template with ``{% generation %}`` markers so ``return_assistant_tokens_mask`` works.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

#: The tool markers of the Hermes / Qwen2.5 format, added as plain (not special) tokens by
#: ``build_tokenizer(tools=True)``, as Qwen's tokenizers have them: decoding keeps them.
TOOL_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]

#: :data:`CHATML_TEMPLATE` plus tools, as Qwen2.5's template renders them: the tools' JSON schemas
#: in a system block, an assistant's ``tool_calls`` as ``<tool_call>`` JSON blocks, and consecutive
#: ``tool`` messages as ``<tool_response>`` blocks in one user turn.
TOOL_CHATML_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\nCall a tool with <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and loop.first and tools %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}"
    "{{- message['content'] or '' }}"
    "{%- for call in message.get('tool_calls') or [] %}"
    "{%- if (message['content'] or '') or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' + call['function']['name'] + '\", \"arguments\": ' + (call['function']['arguments'] | tojson) + '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>' }}"
    "{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + (message['content'] if message['content'] is string else (message['content'] | tojson)) + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_WORDS = (
    "the a cat dog sat on mat red blue green what is plus minus times answer yes no good bad "
    "hello world please think step question number sum equals user assistant system helpful"
).split()


def synthetic_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Return ``n`` short synthetic lines (words, arithmetic, chat markup) to train a tokenizer on."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 10)))
        lines.append(f"{words} {a} + {b} = {a + b}. <think>{a}+{b}</think> \\boxed{{{a + b}}}")
    return lines


def build_tokenizer(vocab_size: int = 512, seed: int = 0, *, tools: bool = False):
    """Return a byte-level BPE ``PreTrainedTokenizerFast`` with a ChatML template (about 0.1 s).

    With ``tools=True`` the template is :data:`TOOL_CHATML_TEMPLATE` and the :data:`TOOL_TOKENS` are
    added (ids ``vocab_size`` and up; :func:`build_model` sizes the model to ``len(tokenizer)``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(synthetic_corpus(seed=seed), trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        model_max_length=2048,
    )
    hf_tok.chat_template = CHATML_TEMPLATE
    if tools:
        hf_tok.add_tokens(TOOL_TOKENS)
        hf_tok.chat_template = TOOL_CHATML_TEMPLATE
    return hf_tok


def _config(arch: str, vocab_size: int, hidden_size: int, num_layers: int, pad_token_id: int, eos_token_id: int, num_labels: int | None = None):
    import transformers

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
    )
    if num_labels is not None:
        common["num_labels"] = num_labels
    if arch == "qwen2":
        return transformers.Qwen2Config(**common)
    if arch == "qwen3":
        return transformers.Qwen3Config(head_dim=hidden_size // 4, **common)
    if arch == "llama":
        return transformers.LlamaConfig(**common)
    raise ValueError(f"arch={arch!r} is not supported: use 'qwen2', 'qwen3' or 'llama'.")


def build_model(tokenizer=None, *, arch: str = "qwen2", hidden_size: int = 32, num_layers: int = 2, seed: int = 0, dtype=None):
    """Return a randomly initialised tiny causal LM matching ``tokenizer``'s vocabulary.

    ``dtype`` defaults to float32; ``torch.float64`` gives a model whose two computations of the same
    quantity (chunked vs unchunked, accumulated vs not, ...) agree to ~1e-12 on any machine, so a test
    can compare them tightly. The initial weights are drawn in float32 whatever the dtype (the same
    model, upcast). A float64 model's RMSNorm layers compute in float64 (transformers' compute in
    float32 whatever the input); that holds for this object and its deep copies, not for a copy saved
    and reloaded with ``from_pretrained``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer or build_tokenizer()
    config = _config(arch, len(tokenizer), hidden_size, num_layers, tokenizer.pad_token_id, tokenizer.eos_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = _to_dtype(model, dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def build_reward_model(tokenizer=None, *, arch: str = "qwen2", hidden_size: int = 32, num_layers: int = 2, seed: int = 0, dtype=None):
    """Return a tiny ``AutoModelForSequenceClassification`` with one label (a reward model); ``dtype`` as in :func:`build_model`."""
    import torch
    from transformers import AutoModelForSequenceClassification

    tokenizer = tokenizer or build_tokenizer()
    config = _config(arch, len(tokenizer), hidden_size, num_layers, tokenizer.pad_token_id, tokenizer.eos_token_id, num_labels=1)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    return _to_dtype(model, dtype)


def _to_dtype(model, dtype):
    """``model`` cast to ``dtype`` (None: float32, unchanged), its config saying so; a float64 model's RMSNorms compute in float64."""
    import types

    import torch

    if dtype is None:
        return model
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is not a floating-point torch dtype: pass e.g. torch.float64 (or leave it None for float32).")
    if resolved == torch.float32:
        return model
    model = model.to(resolved)
    model.config.dtype = resolved
    if resolved == torch.float64:
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
                module.forward = types.MethodType(_rms_norm_forward, module)
    return model


def _rms_norm_forward(self, hidden_states):
    """Qwen2/Qwen3/Llama ``RMSNorm.forward``, computed in ``promote_types(input, float32)`` (transformers' casts to float32).

    Bit-identical to transformers' for float32 and lower-precision inputs (``tests/test_chunked.py`` checks it);
    for a float64 input it stays float64, so a float64 tiny model has no float32 step whose rounding
    two equivalent computations could land on either side of.
    """
    import torch

    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.promote_types(input_dtype, torch.float32))
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)


def save_tiny_model(out_dir: str, *, arch: str = "qwen2", hidden_size: int = 32, num_layers: int = 2, seed: int = 0) -> str:
    """Write a tiny model + tokenizer to ``out_dir`` (safetensors) and return the path.

    ``AutoTokenizer.from_pretrained(out_dir)`` (what a trainer given the path uses) reloads the tokenizer
    as transformers' ``Qwen2Tokenizer`` (for ``arch="qwen2"``/``"qwen3"``), whose pre-tokenizer splits
    digits one by one: "what is 1 + 1 =" is 6 tokens in-process and 8 after the reload. Compare token
    streams with the reloaded tokenizer (or pass ``processing_class=``), or reload it verbatim with
    ``transformers.PreTrainedTokenizerFast.from_pretrained(out_dir)``.
    """
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, arch=arch, hidden_size=hidden_size, num_layers=num_layers, seed=seed)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def save_tiny_teacher(out_dir: str, *, hidden_size: int = 64, num_layers: int = 2, steps: int = 300, seed: int = 0) -> str:
    """Write the tiny *trained* teacher of the distillation tests and examples (see :mod:`posttrain.testing._teacher`)."""
    from posttrain.testing._teacher import save_tiny_teacher as _save

    return _save(out_dir, hidden_size=hidden_size, num_layers=num_layers, steps=steps, seed=seed)


def train_teacher(tokenizer, *, hidden_size: int = 64, num_layers: int = 2, steps: int = 300, batch_size: int = 32,
                  learning_rate: float = 3e-3, seed: int = 0, arch: str = "qwen2"):
    """A tiny causal LM trained on the arithmetic answer format with ``tokenizer`` (see :mod:`posttrain.testing._teacher`)."""
    from posttrain.testing._teacher import train_teacher as _train

    return _train(tokenizer, hidden_size=hidden_size, num_layers=num_layers, steps=steps, batch_size=batch_size,
                  learning_rate=learning_rate, seed=seed, arch=arch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m posttrain.testing.tiny_model", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--arch", default="qwen2", choices=["qwen2", "qwen3", "llama"])
    parser.add_argument("--hidden-size", type=int, default=32)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teacher", action="store_true",
                        help="write the tiny trained teacher of the distillation examples (hidden size 64 unless given)")
    args = parser.parse_args(argv)
    if args.teacher:
        hidden = 64 if args.hidden_size == 32 else args.hidden_size
        path = save_tiny_teacher(args.out_dir, hidden_size=hidden, num_layers=args.num_layers, seed=args.seed)
        print(f"wrote the tiny trained teacher (qwen2, hidden {hidden}) and its tokenizer to {path}")
        return 0
    path = save_tiny_model(args.out_dir, arch=args.arch, hidden_size=args.hidden_size, num_layers=args.num_layers, seed=args.seed)
    print(f"wrote a tiny {args.arch} model and tokenizer to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
