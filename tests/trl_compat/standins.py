"""Offline stand-ins for the Hub repositories that TRL's trainer tests load.

Nothing here is downloaded. Models are tiny random networks of the right architecture, built
from ``transformers`` config classes; tokenizers are posttrain's in-repo byte-level BPE
(:func:`posttrain.testing.tiny_model.build_tokenizer`) given each family's special tokens and,
where the installed ``trl`` package ships one, that family's real chat template (read from
``trl/chat_templates/*.jinja`` at build time, so TRL's template-matching code paths behave as they
do with the real checkpoints). Everything is written into a private Hugging Face hub cache
(``models--org--name/refs/main`` + ``snapshots/<hash>/``) so ``from_pretrained("org/name")``
resolves with ``HF_HUB_OFFLINE=1``.

Vision-language models (:data:`VLM_MODELS`: Gemma 3, LLaVA 1.5, LLaVA-NeXT, Idefics2, Idefics3 -- the families whose
processor works without torchvision) are tiny configs with PIL image processors, saved with their processor.

Datasets (``trl-internal-testing/zen``, ``zen-image``, ``zen-multi-image``, ``toolcall``, ``harmony``) are produced by running the
generator scripts that ship in the TRL source tree (``scripts/generate_*_dataset.py``) with
``push_to_hub`` captured: each config is written as parquet files into a local dataset folder
whose ``README.md`` declares the configs, so ``datasets.load_dataset(folder, config, split=...,
streaming=...)`` behaves like the Hub repo. The suite's conftest maps the ids to those folders.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

#: Bump when the stand-ins change, so stale caches are rebuilt.
BUILDER_VERSION = "6"

TINY = dict(hidden_size=8, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=32)


@dataclass
class TokSpec:
    """How to dress the in-repo BPE tokenizer up as one model family's tokenizer."""

    template: str | None  # name of a jinja file in trl/chat_templates, "chatml", "mistral", or None
    eos: str
    pad: str | None
    bos: str | None = None
    unk: str | None = None
    add_bos: bool = False  # prepend bos when tokenizing plain text (Llama 3, Gemma, Mistral, ...)
    special: list[str] = field(default_factory=list)  # extra special tokens beyond those found in the template
    plain: list[str] = field(default_factory=list)  # added but non-special tokens (<think>, <tool_call>, ...)


QWEN_PLAIN = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
QWEN3_PLAIN = QWEN_PLAIN + ["<think>", "</think>"]
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"]

TOKENIZERS = {
    "qwen2_5": TokSpec("qwen2_5", eos="<|im_end|>", pad="<|endoftext|>", special=["<|endoftext|>"], plain=QWEN_PLAIN),
    "qwen3": TokSpec("qwen3", eos="<|im_end|>", pad="<|endoftext|>", special=["<|endoftext|>"], plain=QWEN3_PLAIN),
    "llama3": TokSpec("llama3", eos="<|eot_id|>", pad=None, bos="<|begin_of_text|>", add_bos=True, special=LLAMA3_SPECIAL),
    "llama3_1": TokSpec("llama3_1", eos="<|eot_id|>", pad=None, bos="<|begin_of_text|>", add_bos=True, special=LLAMA3_SPECIAL),
    "llama3_2": TokSpec("llama3_2", eos="<|eot_id|>", pad=None, bos="<|begin_of_text|>", add_bos=True, special=LLAMA3_SPECIAL),
    "mistral": TokSpec("mistral", eos="</s>", pad=None, bos="<s>", unk="<unk>", add_bos=True, special=["[INST]", "[/INST]"]),
    "gemma": TokSpec("gemma", eos="<eos>", pad="<pad>", bos="<bos>", add_bos=True, special=["<start_of_turn>", "<end_of_turn>"]),
    "gptoss": TokSpec("gptoss", eos="<|return|>", pad="<|endoftext|>", bos="<|startoftext|>", special=["<|startoftext|>", "<|endoftext|>"]),
    "cohere": TokSpec("cohere", eos="<|END_OF_TURN_TOKEN|>", pad="<PAD>", bos="<BOS_TOKEN>", add_bos=True),
    "cohere2": TokSpec("cohere2", eos="<|END_OF_TURN_TOKEN|>", pad="<PAD>", bos="<BOS_TOKEN>", add_bos=True),
    "glm4moe": TokSpec("glm4moe", eos="<|endoftext|>", pad="<|endoftext|>", special=["<|endoftext|>", "[gMASK]", "<sop>"], plain=["<think>", "</think>", "<tool_call>", "</tool_call>"]),
    "lfm2": TokSpec("lfm2", eos="<|im_end|>", pad="<|pad|>", bos="<|startoftext|>", add_bos=True),
    "lfm2_2_5": TokSpec("lfm2_2_5", eos="<|im_end|>", pad="<|pad|>", bos="<|startoftext|>", add_bos=True, plain=["<think>", "</think>"]),
    "olmo3": TokSpec("chatml", eos="<|endoftext|>", pad="<|pad|>", special=["<|im_start|>", "<|im_end|>"]),
    "phi3": TokSpec("phi3", eos="<|endoftext|>", pad="<|endoftext|>", bos="<s>"),
    "deepseekv3": TokSpec("deepseekv3", eos="<｜end▁of▁sentence｜>", pad="<｜end▁of▁sentence｜>", bos="<｜begin▁of▁sentence｜>", add_bos=True, plain=["<think>", "</think>"]),
    "nemotron_3_nano": TokSpec("nemotron_3_nano", eos="<|im_end|>", pad="<|endoftext|>", special=["<|endoftext|>"], plain=["<think>", "</think>", "<tool_call>", "</tool_call>"]),
    "gpt_neox": TokSpec(None, eos="<|endoftext|>", pad=None, bos="<|endoftext|>"),
    "t5": TokSpec(None, eos="</s>", pad="<pad>", unk="<unk>"),
}

MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported') }}{% endif %}"
    "{% endfor %}"
)


@dataclass
class ModelSpec:
    repo_id: str
    arch: str  # transformers class name
    tok: str  # key of TOKENIZERS
    dtype: str = "bfloat16"
    config: dict = field(default_factory=dict)
    remote: bool = False


def _m(name, arch, tok, dtype="bfloat16", org="trl-internal-testing", **config):
    return ModelSpec(f"{org}/{name}", arch, tok, dtype, config)


MODELS: list[ModelSpec] = [
    _m("tiny-Qwen2ForCausalLM-2.5", "Qwen2ForCausalLM", "qwen2_5", **TINY),
    _m("tiny-Qwen3ForCausalLM", "Qwen3ForCausalLM", "qwen3", **TINY),
    _m("tiny-Qwen3MoeForCausalLM", "Qwen3MoeForCausalLM", "qwen3", **TINY, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True, head_dim=8),
    _m("tiny-LlamaForCausalLM-3", "LlamaForCausalLM", "llama3", **TINY),
    _m("tiny-LlamaForCausalLM-3.1", "LlamaForCausalLM", "llama3_1", **TINY),
    _m("tiny-LlamaForCausalLM-3.2", "LlamaForCausalLM", "llama3_2", **TINY),
    _m("tiny-MistralForCausalLM-0.1", "MistralForCausalLM", "mistral", **TINY),
    _m("tiny-MistralForCausalLM-0.2", "MistralForCausalLM", "mistral", **TINY),
    _m("tiny-GemmaForCausalLM", "GemmaForCausalLM", "gemma", **TINY),
    _m("tiny-Gemma2ForCausalLM", "Gemma2ForCausalLM", "gemma", **TINY),
    _m("tiny-GptOssForCausalLM", "GptOssForCausalLM", "gptoss", **TINY, num_local_experts=4, num_experts_per_tok=2),
    _m("tiny-CohereForCausalLM", "CohereForCausalLM", "cohere", "float16", **TINY),
    _m("tiny-Cohere2ForCausalLM", "Cohere2ForCausalLM", "cohere2", **TINY, logit_scale=1.0),
    _m("tiny-Glm4MoeForCausalLM", "Glm4MoeForCausalLM", "glm4moe", **TINY, moe_intermediate_size=32, head_dim=2, n_routed_experts=4, num_experts_per_tok=2, attention_bias=True, use_qk_norm=True, first_k_dense_replace=1, n_group=1, topk_group=1),
    _m("tiny-Lfm2ForCausalLM", "Lfm2ForCausalLM", "lfm2", **TINY, full_attn_idxs=[1], block_multiple_of=8, conv_L_cache=3, conv_bias=False, use_cache=False),
    _m("tiny-Lfm2ForCausalLM-2.5", "Lfm2ForCausalLM", "lfm2_2_5", **TINY, layer_types=["conv", "full_attention"], block_multiple_of=8, conv_L_cache=3, conv_bias=False, use_cache=False),
    _m("tiny-Olmo3ForCausalLM", "Olmo3ForCausalLM", "olmo3", **TINY, use_cache=False),
    _m("tiny-Phi3ForCausalLM", "Phi3ForCausalLM", "phi3", **TINY),
    _m("tiny-DeepseekV3ForCausalLM", "DeepseekV3ForCausalLM", "deepseekv3", **{**TINY, "num_attention_heads": 2, "num_key_value_heads": 2}),
    _m("tiny-DeepseekV3ForCausalLM-0528", "DeepseekV3ForCausalLM", "deepseekv3", **{**TINY, "num_attention_heads": 2, "num_key_value_heads": 2}),
    _m(
        "tiny-NemotronHForCausalLM-nano", "NemotronHForCausalLM", "nemotron_3_nano",
        hidden_size=16, num_attention_heads=4, num_key_value_heads=2, intermediate_size=32,
        layers_block_type=["mamba", "attention", "moe"], mamba_num_heads=8, mamba_head_dim=4, mamba_n_groups=1,
        ssm_state_size=16, mamba_d_conv=4, mamba_expand=2, n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, moe_shared_expert_intermediate_size=32, use_mamba_kernels=False,
    ),
    _m("tiny-GPTNeoXForCausalLM", "GPTNeoXForCausalLM", "gpt_neox", "float16", **TINY),
    # encoder-decoder (TRL's ORPO/CPO/BCO tests train it with is_encoder_decoder=True)
    _m("tiny-T5ForConditionalGeneration", "T5ForConditionalGeneration", "t5", "float32", d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=4),
    # sequence classification (reward models)
    _m("tiny-Qwen2ForSequenceClassification-2.5", "Qwen2ForSequenceClassification", "qwen2_5", **{**TINY, "hidden_size": 16}, num_labels=1),
    _m("tiny-Qwen3ForSequenceClassification", "Qwen3ForSequenceClassification", "qwen3", **{**TINY, "hidden_size": 16}, num_labels=1),
    _m("tiny-LlamaForSequenceClassification-3.2", "LlamaForSequenceClassification", "llama3_2", **{**TINY, "hidden_size": 16}, num_labels=1),
    # tokenizer source used by `chat_template_path="Qwen/Qwen3-4B"` (a tiny model, not the real one)
    _m("Qwen3-4B", "Qwen3ForCausalLM", "qwen3", org="Qwen", **TINY),
]
REMOTE_MODEL = ModelSpec("trl-internal-testing/tiny-RemoteForCausalLM", "RemoteForCausalLM", "llama3_2", config=dict(TINY), remote=True)

DATASET_SCRIPTS = {
    "trl-internal-testing/zen": "scripts/generate_zen_dataset.py",
    "trl-internal-testing/zen-image": "scripts/generate_zen_image_dataset.py",
    "trl-internal-testing/zen-multi-image": "scripts/generate_zen_multi_image_dataset.py",
    "trl-internal-testing/toolcall": "scripts/generate_toolcall_dataset.py",
    "trl-internal-testing/harmony": "scripts/generate_harmony_dataset.py",
}


# ----------------------------------------------------------------------------------------------
# tokenizers
# ----------------------------------------------------------------------------------------------
_SPECIAL_RE = re.compile(r"<\|[A-Za-z0-9_]+\|>|<｜[^<>｜]+｜>|<(?:start|end)_of_turn>|\[gMASK\]|<sop>")


def _template_text(name: str | None) -> str | None:
    if name is None:
        return None
    if name == "chatml":
        from posttrain.testing.tiny_model import CHATML_TEMPLATE

        return CHATML_TEMPLATE
    if name == "mistral":
        return MISTRAL_TEMPLATE
    if name.startswith("parts:"):
        return _parts_template(name[len("parts:"):])
    import trl

    path = Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja"
    return path.read_text(encoding="utf-8")


def build_tokenizer(key: str):
    """The in-repo BPE tokenizer with family ``key``'s special tokens and chat template."""
    from tokenizers import AddedToken, processors
    from posttrain.testing.tiny_model import build_tokenizer as base_tokenizer

    spec = TOKENIZERS[key]
    tok = base_tokenizer()
    template = _template_text(spec.template)
    specials = list(dict.fromkeys(spec.special + (_SPECIAL_RE.findall(template) if template else [])))
    named = [t for t in (spec.bos, spec.eos, spec.pad, spec.unk) if t]
    specials = [t for t in dict.fromkeys(named + specials)]
    existing = set(tok.get_vocab())
    new_specials = [AddedToken(t, special=True, normalized=False) for t in specials if t not in existing]
    if new_specials:
        tok.add_special_tokens({"additional_special_tokens": new_specials}, replace_extra_special_tokens=False)
    if spec.plain:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec.plain])
    # role assignment: reset the base tokenizer's defaults first
    tok.bos_token = spec.bos
    tok.eos_token = spec.eos
    tok.pad_token = spec.pad
    tok.unk_token = spec.unk
    tok.chat_template = template
    if spec.add_bos and spec.bos:
        bos_id = tok.convert_tokens_to_ids(spec.bos)
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos}:0 $A:0", pair=f"{spec.bos}:0 $A:0 {spec.bos}:1 $B:1", special_tokens=[(spec.bos, bos_id)]
        )
    return tok


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------
def _init_weights(model) -> None:
    """Deterministic, NaN-free init (random weights of tiny configs sometimes produce NaNs)."""
    import torch
    from torch import nn

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d)):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                if module.weight is not None:
                    nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)


def _token_ids(tok, spec: TokSpec) -> dict:
    ids = dict(
        vocab_size=len(tok),
        eos_token_id=tok.convert_tokens_to_ids(spec.eos),
        pad_token_id=tok.convert_tokens_to_ids(spec.pad) if spec.pad else None,
        bos_token_id=tok.convert_tokens_to_ids(spec.bos) if spec.bos else None,
    )
    return ids


def _build_model(spec: ModelSpec, tok, remote_pkg: Path | None = None):
    import torch
    import transformers

    ids = _token_ids(tok, TOKENIZERS[spec.tok])
    kwargs = {**spec.config, **ids}
    if spec.remote:
        sys.path.insert(0, str(remote_pkg.parent))
        try:
            from _remote_code.configuration_remote import RemoteConfig  # type: ignore
            from _remote_code.modeling_remote import RemoteForCausalLM, RemoteForSequenceClassification, RemoteModel  # type: ignore
        finally:
            sys.path.remove(str(remote_pkg.parent))
        RemoteConfig.register_for_auto_class()
        RemoteModel.register_for_auto_class("AutoModel")
        RemoteForCausalLM.register_for_auto_class("AutoModelForCausalLM")
        RemoteForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
        config = RemoteConfig(**kwargs)
        config.auto_map = {
            "AutoModel": "modeling_remote.RemoteModel",
            "AutoModelForSequenceClassification": "modeling_remote.RemoteForSequenceClassification",
        }
        cls = RemoteForCausalLM
    else:
        cls = getattr(transformers, spec.arch)
        config = cls.config_class(**kwargs)
        if getattr(config, "is_encoder_decoder", False):  # T5 starts decoding from the pad token
            config.decoder_start_token_id = ids["pad_token_id"]
        if getattr(config, "layer_types", None) is not None and "num_hidden_layers" in spec.config:
            config.layer_types = list(config.layer_types)[: spec.config["num_hidden_layers"]]
    config.architectures = [spec.arch]
    with torch.random.fork_rng():
        torch.manual_seed(int(hashlib.sha1(spec.repo_id.encode()).hexdigest()[:8], 16))
        model = cls(config)
        _init_weights(model)
    model = model.to(dtype=getattr(torch, spec.dtype))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.eos_token_id = ids["eos_token_id"]
        gen.pad_token_id = ids["pad_token_id"]
        gen.bos_token_id = ids["bos_token_id"]
    return model


# ----------------------------------------------------------------------------------------------
# vision-language models
# ----------------------------------------------------------------------------------------------
# Tiny VLMs of the families whose processor works without torchvision (PIL image processors). The
# text side is the in-repo BPE tokenizer with the family's special tokens; the chat template is the
# real one where the installed trl ships it (gemma3, idefics3, llava_next), else a ChatML template
# rendering content parts (Llava 1.5, Idefics2). Images are resized to 32 x 32 pixels; the vision
# towers are 2 layers of width 16 over 8 x 8 patches, so an image costs 4-17 tokens.
# Not built (their processors need torchvision, whose PyPI wheel is CUDA-built and fails beside CPU
# torch): Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5 (video processors), SmolVLM and Gemma 4 (video processors).

def _parts_template(image: str) -> str:
    """ChatML whose contents may be strings or lists of ``image`` / ``text`` parts (Llava 1.5, Idefics2 stand-ins)."""
    content = (
        "{%- if message['content'] is string %}{{- message['content'] }}"
        "{%- else %}{%- for part in message['content'] %}"
        "{%- if part['type'] == 'image' %}{{- '" + image + "' }}"
        "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
        "{%- endfor %}{%- endif %}"
    )
    return (
        "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}" + content + "{{- '<|im_end|>\\n' }}"
        "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )


TOKENIZERS.update({
    "gemma3_vlm": TokSpec("gemma3", eos="<eos>", pad="<pad>", bos="<bos>", add_bos=True,
                          special=["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]),
    "llava": TokSpec("parts:<image>", eos="</s>", pad="<pad>", bos="<s>", unk="<unk>", add_bos=True,
                     special=["<image>", "<|im_start|>", "<|im_end|>"]),
    "llava_next": TokSpec("llava_next", eos="</s>", pad="<pad>", bos="<s>", unk="<unk>", add_bos=True, special=["<image>", "[INST]", "[/INST]"]),
    "idefics2": TokSpec("parts:<image>", eos="<end_of_utterance>", pad="<unk>", bos="<s>", unk="<unk>", add_bos=True,
                        special=["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<|im_start|>", "<|im_end|>"]),
    "idefics3": TokSpec("idefics3", eos="<end_of_utterance>", pad="<|end_of_text|>", bos="<|begin_of_text|>",
                        special=["<|end_of_text|>", "<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"]),
})


@dataclass
class VLMSpec:
    repo_id: str
    family: str  # key of _VLM_BUILDERS and TOKENIZERS
    dtype: str  # as the real tiny checkpoint


VLM_MODELS: list[VLMSpec] = [
    VLMSpec("trl-internal-testing/tiny-Gemma3ForConditionalGeneration", "gemma3_vlm", "bfloat16"),
    VLMSpec("trl-internal-testing/tiny-LlavaForConditionalGeneration", "llava", "float16"),
    VLMSpec("trl-internal-testing/tiny-LlavaNextForConditionalGeneration", "llava_next", "bfloat16"),
    VLMSpec("trl-internal-testing/tiny-Idefics2ForConditionalGeneration", "idefics2", "float32"),
    VLMSpec("trl-internal-testing/tiny-Idefics3ForConditionalGeneration", "idefics3", "bfloat16"),
]

_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)


def _vlm_text_config(tok, spec: TokSpec, **extra) -> dict:
    return {**TINY, "hidden_size": 16, "max_position_embeddings": 1024, "tie_word_embeddings": False, **_token_ids(tok, spec), **extra}


def _build_gemma3(tok, spec):
    import transformers
    from transformers.models.gemma3 import Gemma3ImageProcessorPil, Gemma3Processor

    template = tok.chat_template
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok.backend_tokenizer, bos_token=spec.bos, eos_token=spec.eos, pad_token=spec.pad, model_max_length=4096,
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
    )
    tok.chat_template = template
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tok,
                                image_seq_length=4, chat_template=template)
    config = transformers.Gemma3Config(
        text_config=_vlm_text_config(tok, spec, head_dim=4, sliding_window=64), mm_tokens_per_image=4,
        vision_config={**_VISION, "vision_use_head": False},  # as google/gemma-3: the pooling head is unused
        image_token_id=tok.image_token_id, boi_token_index=tok.boi_token_id, eoi_token_index=tok.eoi_token_id,
    )
    return transformers.Gemma3ForConditionalGeneration, config, processor


def _build_llava(tok, spec, next_: bool = False):
    import transformers
    from transformers import CLIPImageProcessorPil, LlavaNextImageProcessorPil

    image_token = tok.convert_tokens_to_ids("<image>")
    text = {"model_type": "llama", **_vlm_text_config(tok, spec)}
    vision = {"model_type": "clip_vision_model", **_VISION}
    common = dict(patch_size=8, vision_feature_select_strategy="default", chat_template=tok.chat_template, num_additional_image_tokens=1)
    if next_:
        pinpoints = [[32, 32], [32, 64], [64, 32]]
        image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                     image_grid_pinpoints=pinpoints)
        processor = transformers.LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, **common)
        config = transformers.LlavaNextConfig(text_config=text, vision_config=vision, image_token_index=image_token,
                                              image_grid_pinpoints=pinpoints)
        return transformers.LlavaNextForConditionalGeneration, config, processor
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tok, **common)
    config = transformers.LlavaConfig(text_config=text, vision_config=vision, image_token_index=image_token)
    return transformers.LlavaForConditionalGeneration, config, processor


def _build_idefics(tok, spec, version: int):
    import transformers

    if version == 2:
        from transformers.models.idefics2 import Idefics2ImageProcessorPil, Idefics2Processor

        image_processor = Idefics2ImageProcessorPil(do_image_splitting=False, size={"longest_edge": 32, "shortest_edge": 32})
        processor = Idefics2Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=4, chat_template=tok.chat_template)
        config = transformers.Idefics2Config(
            text_config={"model_type": "mistral", **_vlm_text_config(tok, spec)}, vision_config=dict(_VISION),
            perceiver_config={"hidden_size": 16, "resampler_n_latents": 4, "resampler_depth": 1, "resampler_n_heads": 2,
                              "resampler_head_dim": 8, "num_key_value_heads": 1},
            image_token_id=tok.convert_tokens_to_ids("<image>"), tie_word_embeddings=False,
        )
        return transformers.Idefics2ForConditionalGeneration, config, processor
    from transformers.models.idefics3 import Idefics3ImageProcessorPil, Idefics3Processor

    image_processor = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": 32}, max_image_size={"longest_edge": 32})
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=4, chat_template=tok.chat_template)
    config = transformers.Idefics3Config(
        text_config={"model_type": "llama", **_vlm_text_config(tok, spec)}, vision_config=dict(_VISION), scale_factor=2,
        image_token_id=processor.image_token_id, tie_word_embeddings=False,
    )
    return transformers.Idefics3ForConditionalGeneration, config, processor


_VLM_BUILDERS = {
    "gemma3_vlm": _build_gemma3,
    "llava": _build_llava,
    "llava_next": lambda tok, spec: _build_llava(tok, spec, next_=True),
    "idefics2": lambda tok, spec: _build_idefics(tok, spec, 2),
    "idefics3": lambda tok, spec: _build_idefics(tok, spec, 3),
}


def _build_vlm(spec: VLMSpec):
    """``(model, processor)`` of a VLM stand-in."""
    import torch

    tok_spec = TOKENIZERS[spec.family]
    cls, config, processor = _VLM_BUILDERS[spec.family](build_tokenizer(spec.family), tok_spec)
    tok = processor.tokenizer
    ids = _token_ids(tok, tok_spec)
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        setattr(config, key, ids[key])
    config.architectures = [cls.__name__]
    with torch.random.fork_rng():
        torch.manual_seed(int(hashlib.sha1(spec.repo_id.encode()).hexdigest()[:8], 16))
        model = cls(config)
        _init_weights(model)
    model = model.to(dtype=getattr(torch, spec.dtype))
    gen = model.generation_config
    gen.eos_token_id, gen.pad_token_id, gen.bos_token_id = ids["eos_token_id"], ids["pad_token_id"], ids["bos_token_id"]
    return model, processor


def _snapshot_dir(hub_cache: Path, repo_id: str, kind: str = "models") -> Path:
    folder = hub_cache / f"{kind}--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(f"{repo_id}:{BUILDER_VERSION}".encode()).hexdigest()
    snap = folder / "snapshots" / commit
    return folder, commit, snap


def _write_repo(hub_cache: Path, repo_id: str, save) -> None:
    folder, commit, snap = _snapshot_dir(hub_cache, repo_id)
    if folder.exists():
        shutil.rmtree(folder)
    snap.mkdir(parents=True)
    save(str(snap))
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)


def build_models(hub_cache: Path, trl_source=None, log=print) -> list[str]:
    """Write every model stand-in into ``hub_cache`` (skips those already built). Returns repo ids."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    built = []
    stamp = hub_cache / ".standins.json"
    done = json.loads(stamp.read_text()) if stamp.exists() else {}
    specs = list(MODELS)
    remote_pkg = None
    if trl_source is not None:
        remote_pkg = _materialize_remote_code(trl_source, hub_cache.parent / "remote_code_src")
        if remote_pkg is not None:
            specs.append(REMOTE_MODEL)
    specs += VLM_MODELS
    for spec in specs:
        key = f"{BUILDER_VERSION}:{spec}"
        if done.get(spec.repo_id) == key and _snapshot_dir(hub_cache, spec.repo_id)[2].exists():
            built.append(spec.repo_id)
            continue
        try:
            if isinstance(spec, VLMSpec):
                model, tok = _build_vlm(spec)  # tok: the processor (saves its tokenizer, image processor, chat template)
            else:
                tok = build_tokenizer(spec.tok)
                model = _build_model(spec, tok, remote_pkg)
        except Exception as exc:  # an architecture this transformers lacks: tests on it will fail on both sides
            log(f"  stand-in {spec.repo_id}: not built ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
            continue

        def save(path, model=model, tok=tok):
            model.save_pretrained(path)
            tok.save_pretrained(path)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(path)

        _write_repo(hub_cache, spec.repo_id, save)
        done[spec.repo_id] = key
        built.append(spec.repo_id)
    stamp.write_text(json.dumps(done, indent=1))
    return built


def _materialize_remote_code(trl_source, dest: Path) -> Path | None:
    pkg = dest / "_remote_code"
    files = {
        "__init__.py": "",
        "configuration_remote.py": trl_source.read("scripts/generate_tiny_models/for_causal_lm/_remote_code/configuration_remote.py"),
        "modeling_remote.py": trl_source.read("scripts/generate_tiny_models/for_causal_lm/_remote_code/modeling_remote.py"),
    }
    if files["configuration_remote.py"] is None or files["modeling_remote.py"] is None:
        return None
    pkg.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (pkg / name).write_text(text)
    return pkg


# ----------------------------------------------------------------------------------------------
# datasets
# ----------------------------------------------------------------------------------------------
def build_datasets(data_root: Path, trl_source, log=print) -> dict[str, str]:
    """Run TRL's dataset generator scripts with ``push_to_hub`` captured; returns ``{repo_id: folder}``.

    Image columns (``zen-image``, ``zen-multi-image``) keep their ``datasets.Image`` feature: the parquet files
    embed the encoded images and the schema, so ``load_dataset`` returns PIL images as from the Hub."""
    import datasets
    import numpy as np

    datasets.disable_progress_bars()
    out: dict[str, str] = {}
    for repo_id, script in DATASET_SCRIPTS.items():
        folder = data_root / repo_id.replace("/", "--")
        stamp = folder / ".built"
        src = trl_source.read(script)
        if src is None:
            log(f"  dataset {repo_id}: generator {script} not in the TRL source; not built")
            continue
        key = hashlib.sha1((BUILDER_VERSION + src).encode()).hexdigest()
        if stamp.exists() and stamp.read_text() == key:
            out[repo_id] = str(folder)
            continue
        captured: dict[str, object] = {}

        def fake_push(self, repo, config_name="default", *args, **kwargs):
            captured[config_name] = self

        module = types.ModuleType(f"_trl_gen_{folder.name.replace('-', '_')}")
        sys.modules[module.__name__] = module
        try:
            exec(compile(src, script, "exec"), module.__dict__)
        finally:
            sys.modules.pop(module.__name__, None)
        saved = datasets.DatasetDict.push_to_hub, datasets.Dataset.push_to_hub
        datasets.DatasetDict.push_to_hub = fake_push
        datasets.Dataset.push_to_hub = fake_push
        np_state = np.random.get_state()
        np.random.seed(0)  # the image generators draw random pixels and sizes from the global numpy RNG
        try:
            module.main(test_size=0.1, push_to_hub=True, repo_id=repo_id)
        except Exception as exc:
            log(f"  dataset {repo_id}: generator failed ({type(exc).__name__}: {exc}); not built")
            continue
        finally:
            datasets.DatasetDict.push_to_hub, datasets.Dataset.push_to_hub = saved
            np.random.set_state(np_state)
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        yaml = ["---", "configs:"]
        for config_name, dd in captured.items():
            if isinstance(dd, datasets.Dataset):
                dd = datasets.DatasetDict({"train": dd})
            yaml.append(f"- config_name: {config_name}")
            yaml.append("  data_files:")
            for split, ds in dd.items():
                rel = f"{config_name}/{split}-00000-of-00001.parquet"
                (folder / config_name).mkdir(exist_ok=True)
                ds.to_parquet(str(folder / rel))
                yaml.append(f"  - split: {split}")
                yaml.append(f"    path: {rel}")
        yaml.append("---")
        (folder / "README.md").write_text("\n".join(yaml) + f"\n\nLocal stand-in for {repo_id}, generated from TRL's {script}.\n")
        stamp.write_text(key)
        out[repo_id] = str(folder)
    return out
