"""posttrain.load_pretrained: one model-loading rule for every role (issue 18, item 4).

Everything loads real files with real transformers (no mocks): roles from saved tiny model
directories, the revision from a hub-cache layout read offline (``local_files_only``), remote code
from a directory with its own modules.
"""

import json
import os
import shutil
import textwrap

import pytest
import torch

from posttrain import MODEL_ROLES, ConfigError, build_reference_model, load_pretrained, load_reward_model
from posttrain.testing._toy import TOY_SPEC, ToyConfig

CAUSAL_ROLES = ("policy", "reference", "teacher", "judge")


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    """A saved tiny reward model (sequence classification, one label) whose config has no pad_token_id, and its tokenizer."""
    from posttrain.testing.tiny_model import build_reward_model, build_tokenizer

    tokenizer = build_tokenizer()
    model = build_reward_model(tokenizer, seed=3)
    model.config.pad_token_id = None
    path = str(tmp_path_factory.mktemp("reward") / "tiny-reward")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text, text
    return text


# ----------------------------------------------------------------------------------------- roles
@pytest.mark.parametrize("role", CAUSAL_ROLES)
def test_a_causal_role_loads_the_saved_causal_lm_and_its_tokenizer(role, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = load_pretrained(tiny_model_dir, role=role)
    saved = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert type(model) is type(saved) and model.dtype == torch.float32
    assert model.config._name_or_path == tiny_model_dir
    live, expected = _state(model), _state(saved)
    assert live.keys() == expected.keys() and all(torch.equal(live[k], expected[k]) for k in live)  # the same file, read twice
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(tiny_model_dir).get_vocab()


def test_the_reward_role_loads_a_one_label_classifier_and_sets_its_pad_token_id(reward_model_dir):
    from transformers import AutoModelForSequenceClassification

    model, tokenizer = load_pretrained(reward_model_dir, role="reward")
    saved = AutoModelForSequenceClassification.from_pretrained(reward_model_dir)
    assert type(model) is type(saved) and model.config.num_labels == 1
    live, expected = _state(model), _state(saved)
    assert all(torch.equal(live[k], expected[k]) for k in expected)  # the score head too: it was saved
    assert saved.config.pad_token_id is None and model.config.pad_token_id == tokenizer.pad_token_id is not None


def test_the_critic_role_is_a_one_label_value_model_even_from_a_causal_lm_checkpoint(tiny_model_dir):
    """TRL's PPO value model: AutoModelForSequenceClassification(num_labels=1) on the policy's checkpoint (a new score head)."""
    model, tokenizer = load_pretrained(tiny_model_dir, role="critic")
    assert type(model).__name__ == "Qwen2ForSequenceClassification" and model.config.num_labels == 1
    assert model.score.weight.shape == (1, model.config.hidden_size)
    assert model.config.pad_token_id == tokenizer.pad_token_id


def test_num_labels_and_auto_class_can_be_chosen(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    model, _ = load_pretrained(tiny_model_dir, role="reward", model_init_kwargs={"num_labels": 3})
    assert model.config.num_labels == 3
    model, _ = load_pretrained(tiny_model_dir, role="teacher", auto_class=AutoModelForSequenceClassification, load_tokenizer=False)
    assert type(model).__name__ == "Qwen2ForSequenceClassification"


def test_every_role_is_known_and_an_unknown_one_is_one_line(tiny_model_dir):
    assert MODEL_ROLES == ("policy", "reference", "reward", "teacher", "critic", "judge")
    with pytest.raises(ConfigError) as exc:
        load_pretrained(tiny_model_dir, role="student")
    assert "role='student' is not a model role" in _one_line(exc)


# ----------------------------------------------------------------------------------------- objects and tokenizers
def test_a_model_object_is_returned_as_is_with_its_tokenizer_from_name_or_path(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    obj = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = _state(obj)
    model, tokenizer = load_pretrained(obj, role="teacher", model_init_kwargs={"dtype": "bfloat16"})  # kwargs apply to names only
    assert model is obj and model.dtype == torch.float32 and all(torch.equal(v, before[k]) for k, v in _state(model).items())
    assert tokenizer.name_or_path == tiny_model_dir
    given = load_pretrained(obj, role="teacher", tokenizer=tiny_tokenizer)[1]
    assert given is tiny_tokenizer
    assert load_pretrained(obj, role="teacher", load_tokenizer=False) == (obj, None)
    assert load_pretrained(tiny_model_dir, role="reference", load_tokenizer=False)[1] is None


def test_a_model_object_without_a_path_needs_its_tokenizer(tiny_model):
    tiny_model.config._name_or_path = ""
    with pytest.raises(ConfigError) as exc:
        load_pretrained(tiny_model, role="judge")
    assert "the judge model object has no config._name_or_path" in _one_line(exc)


def test_a_missing_pad_token_becomes_eos_and_neither_is_one_line(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    path = tmp_path / "no-pad"
    shutil.copytree(tiny_model_dir, path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(path)
    _, loaded = load_pretrained(str(path), role="teacher")
    assert loaded.pad_token == loaded.eos_token is not None
    tokenizer.eos_token = None
    tokenizer.save_pretrained(path)
    with pytest.raises(ConfigError) as exc:
        load_pretrained(str(path), role="teacher")
    assert "(teacher) has neither a pad_token nor an eos_token" in _one_line(exc)


def test_a_directory_without_tokenizer_files_is_one_line(tiny_model_dir, tmp_path):
    """transformers 5 builds a one-token tokenizer from a directory without tokenizer files; it is refused, not trained on."""
    path = tmp_path / "weights-only"
    path.mkdir()
    for name in os.listdir(tiny_model_dir):
        if name in ("config.json", "generation_config.json") or name.endswith(".safetensors"):
            shutil.copy(os.path.join(tiny_model_dir, name), path)
    with pytest.raises(ConfigError) as exc:
        load_pretrained(str(path), role="teacher")
    assert "the tokenizer of the teacher model" in _one_line(exc) and "holds no tokenizer files" in str(exc.value)
    assert load_pretrained(str(path), role="teacher", load_tokenizer=False)[0].config._name_or_path == str(path)


# ----------------------------------------------------------------------------------------- dtype
@pytest.mark.parametrize(
    ("kwargs", "default", "expected"),
    [
        ({}, torch.float32, torch.float32),
        ({}, torch.float64, torch.float64),  # e.g. a reference in the policy's dtype
        ({"dtype": "bfloat16"}, torch.float64, torch.bfloat16),
        ({"torch_dtype": "float16"}, torch.float32, torch.float16),  # the old name
        ({"dtype": torch.float64}, torch.float32, torch.float64),
        ({"dtype": "torch.bfloat16"}, torch.float32, torch.bfloat16),
        ({"dtype": "auto"}, torch.float64, torch.float32),  # the checkpoint's own (saved in float32)
        ({"dtype": "bfloat16", "torch_dtype": torch.bfloat16}, torch.float32, torch.bfloat16),  # the same, twice
        ({"dtype": None}, torch.float16, torch.float16),
    ],
)
def test_one_dtype_rule(kwargs, default, expected, tiny_model_dir):
    given = dict(kwargs)
    model, _ = load_pretrained(tiny_model_dir, role="teacher", model_init_kwargs=kwargs, default_dtype=default, load_tokenizer=False)
    assert model.dtype == expected
    assert kwargs == given  # not modified: the caller's config is left as it was


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"dtype": "bfloat"}, "model_init_kwargs['dtype']='bfloat' of the teacher model"),
        ({"torch_dtype": "Tensor"}, "model_init_kwargs['torch_dtype']='Tensor' of the teacher model"),
        ({"dtype": 16}, "model_init_kwargs['dtype']=16 of the teacher model"),
        ({"dtype": "float16", "torch_dtype": "bfloat16"}, "set dtype=torch.float16 and torch_dtype=torch.bfloat16: keep one"),
    ],
)
def test_a_bad_dtype_is_one_line_naming_the_field(kwargs, expected, tiny_model_dir):
    with pytest.raises(ConfigError) as exc:
        load_pretrained(tiny_model_dir, role="teacher", model_init_kwargs=kwargs)
    assert expected in _one_line(exc)


def test_model_init_kwargs_must_be_a_mapping(tiny_model_dir):
    with pytest.raises(ConfigError) as exc:
        load_pretrained(tiny_model_dir, role="critic", model_init_kwargs=["dtype", "bfloat16"])
    assert "model_init_kwargs of the critic model must be a dict" in _one_line(exc)


def test_training_loop_load_model_says_which_dtype_is_bad(toy, tiny_model_dir, tmp_path):
    """It used to raise AttributeError("module 'torch' has no attribute 'bfloat'")."""
    from posttrain import TrainingLoop

    loop = TrainingLoop(ToyConfig(output_dir=str(tmp_path), model_init_kwargs={"dtype": "bfloat"}), method="toy_lm")
    with pytest.raises(ConfigError) as exc:
        loop.load_model(tiny_model_dir)
    assert "model_init_kwargs['dtype']='bfloat' of the policy model" in _one_line(exc)
    loop = TrainingLoop(ToyConfig(output_dir=str(tmp_path / "b"), model_init_kwargs={"torch_dtype": "float64"}), method="toy_lm")
    assert loop.load_model(tiny_model_dir)[0].dtype == torch.float64


def test_a_reference_by_name_loads_in_the_policy_dtype_unless_told(toy, tiny_model_dir, tmp_path):
    from posttrain import TrainingLoop
    from posttrain.testing.tiny_model import build_model

    loop = TrainingLoop(ToyConfig(output_dir=str(tmp_path)), method="toy_lm")
    policy = build_model(dtype=torch.float64)
    assert build_reference_model(policy, tiny_model_dir, loop=loop).dtype == torch.float64
    assert build_reference_model(policy, tiny_model_dir, loop=loop, model_init_kwargs={"dtype": "bfloat16"}).dtype == torch.bfloat16


@pytest.fixture
def toy(register_method):
    register_method(TOY_SPEC)


# ----------------------------------------------------------------------------------------- where from
@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A Hub cache holding 'tiny-org/tiny-model' at two revisions: 'main' and 'v1' (other weights, one more token)."""
    from posttrain.testing.tiny_model import build_model, build_tokenizer

    cache = tmp_path_factory.mktemp("hub")
    repo = cache / "models--tiny-org--tiny-model"
    states = {}
    for revision, commit, seed in (("main", "a" * 40, 0), ("v1", "b" * 40, 1)):
        tokenizer = build_tokenizer()
        if revision == "v1":
            tokenizer.add_tokens(["<v1>"])
        model = build_model(tokenizer, seed=seed)
        model.save_pretrained(repo / "snapshots" / commit)
        tokenizer.save_pretrained(repo / "snapshots" / commit)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / revision).write_text(commit)
        states[revision] = _state(model)
    return str(cache), states


@pytest.mark.parametrize("role", ["policy", "teacher", "reference"])
@pytest.mark.parametrize("revision", [None, "v1"])
def test_the_revision_reaches_the_model_and_the_tokenizer(role, revision, hub_cache):
    cache, states = hub_cache
    kwargs = {"cache_dir": cache, "local_files_only": True, **({"revision": revision} if revision else {})}
    model, tokenizer = load_pretrained("tiny-org/tiny-model", role=role, model_init_kwargs=kwargs)
    expected = states[revision or "main"]
    assert model.config._name_or_path == "tiny-org/tiny-model"
    assert all(torch.equal(v, expected[k]) for k, v in _state(model).items())  # that revision's weights
    assert ("<v1>" in tokenizer.get_vocab()) == (revision == "v1")  # and that revision's tokenizer


def test_training_loop_loads_the_tokenizer_of_the_revision(toy, hub_cache, tmp_path):
    from posttrain import TrainingLoop

    cache, _ = hub_cache
    args = ToyConfig(output_dir=str(tmp_path), model_init_kwargs={"cache_dir": cache, "local_files_only": True, "revision": "v1"})
    _, tokenizer = TrainingLoop(args, method="toy_lm").load_model("tiny-org/tiny-model")
    assert "<v1>" in tokenizer.get_vocab()


@pytest.fixture(scope="module")
def remote_code_dir(tmp_path_factory):
    """A tiny model whose config, model class and tokenizer class are the directory's own code (auto_map)."""
    from posttrain.testing.tiny_model import save_tiny_model

    path = tmp_path_factory.mktemp("remote") / "tiny_remote_code"
    save_tiny_model(str(path))
    config = json.loads((path / "config.json").read_text())
    config.update(
        model_type="tinyremote", architectures=["TinyRemoteForCausalLM"],
        auto_map={"AutoConfig": "configuration_tinyremote.TinyRemoteConfig", "AutoModelForCausalLM": "modeling_tinyremote.TinyRemoteForCausalLM"},
    )
    (path / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    tokenizer_config.update(tokenizer_class="TinyRemoteTokenizer", auto_map={"AutoTokenizer": [None, "tokenization_tinyremote.TinyRemoteTokenizer"]})
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    # A config class of its own, so the remote model class is registered for it only (not for every Qwen2 config).
    (path / "configuration_tinyremote.py").write_text(textwrap.dedent("""
        from transformers import Qwen2Config

        class TinyRemoteConfig(Qwen2Config):
            model_type = "tinyremote"
    """))
    (path / "modeling_tinyremote.py").write_text(textwrap.dedent("""
        from transformers import Qwen2ForCausalLM

        from .configuration_tinyremote import TinyRemoteConfig

        class TinyRemoteForCausalLM(Qwen2ForCausalLM):
            config_class = TinyRemoteConfig
    """))
    (path / "tokenization_tinyremote.py").write_text(textwrap.dedent("""
        from transformers import PreTrainedTokenizerFast

        class TinyRemoteTokenizer(PreTrainedTokenizerFast):
            pass
    """))
    return str(path)


@pytest.mark.parametrize("where", ["argument", "model_init_kwargs", "both"])
def test_trust_remote_code_reaches_the_model_and_the_tokenizer(where, remote_code_dir):
    # "both": a trainer that puts trust_remote_code in model_init_kwargs while the config's argument is True too (DPO does)
    options = {"argument": {"trust_remote_code": True}, "model_init_kwargs": {"model_init_kwargs": {"trust_remote_code": True}},
               "both": {"trust_remote_code": True, "model_init_kwargs": {"trust_remote_code": True}}}[where]
    model, tokenizer = load_pretrained(remote_code_dir, role="teacher", **options)
    assert type(model).__name__ == "TinyRemoteForCausalLM" and type(tokenizer).__name__ == "TinyRemoteTokenizer"


def test_untrusted_remote_code_is_one_line_naming_the_role_and_the_fix(remote_code_dir):
    with pytest.raises(ConfigError) as exc:
        load_pretrained(remote_code_dir, role="judge")
    text = _one_line(exc)
    assert f"cannot load the model {remote_code_dir!r} as the judge model" in text and "trust_remote_code=True" in text


# ----------------------------------------------------------------------------------------- quantization_config
def test_quantization_config_with_a_model_object_or_given_twice_is_one_line(tiny_model, tiny_model_dir):
    marker = object()  # never reaches from_pretrained: both cases are refused before loading
    with pytest.raises(ConfigError) as exc:
        load_pretrained(tiny_model, role="teacher", quantization_config=marker)
    assert "quantization_config= applies only to a model given by name" in _one_line(exc) and "the teacher model is already built" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        load_pretrained(tiny_model_dir, role="reward", quantization_config=marker, model_init_kwargs={"quantization_config": marker})
    assert "quantization_config is set both as a trainer argument and in args.model_init_kwargs (the reward model" in _one_line(exc)


# ----------------------------------------------------------------------------------------- errors name the role
@pytest.mark.parametrize("role", MODEL_ROLES)
def test_a_missing_directory_names_the_role_and_the_path(role, tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ConfigError) as exc:
        load_pretrained(missing, role=role)
    assert f"the {role} model {missing!r} is not a directory" in _one_line(exc)


def test_no_model_is_one_line(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_pretrained(None, role="teacher")
    assert "no teacher model given" in _one_line(exc)


def test_an_unreachable_hub_id_names_the_role(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_pretrained("surely-not-an-org/surely-not-a-model", role="teacher", model_init_kwargs={"cache_dir": str(tmp_path), "local_files_only": True})
    assert "cannot load the model 'surely-not-an-org/surely-not-a-model' as the teacher model" in _one_line(exc)


def test_an_architecture_the_auto_class_lacks_is_one_line(tiny_model_dir):
    from transformers import AutoModelForSeq2SeqLM

    with pytest.raises(ConfigError) as exc:
        load_pretrained(tiny_model_dir, role="reward", auto_class=AutoModelForSeq2SeqLM)
    assert f"cannot load the model {tiny_model_dir!r} as the reward model: Unrecognized configuration class" in _one_line(exc)


# ----------------------------------------------------------------------------------------- PEFT adapters, reward functions
def test_a_saved_peft_adapter_directory_loads_as_base_plus_adapter(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    trained = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    path = str(tmp_path / "adapter")
    trained.save_pretrained(path)
    shutil.copy(os.path.join(tiny_model_dir, "tokenizer.json"), path)
    shutil.copy(os.path.join(tiny_model_dir, "tokenizer_config.json"), path)
    model, tokenizer = load_pretrained(path, role="reference")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        # the same float32 ops on the same weights in one process; a relative tolerance covers kernel choice
        expected, got = trained(ids).logits, model(ids).logits
    assert torch.allclose(got, expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    assert len(tokenizer) > 1


def test_load_reward_model_uses_the_reward_rules(toy, reward_model_dir, tmp_path):
    from posttrain import TrainingLoop

    loop = TrainingLoop(ToyConfig(output_dir=str(tmp_path)), method="toy_lm")
    scorer = load_reward_model(reward_model_dir, loop=loop, model_init_kwargs={"dtype": "float64"})
    assert scorer.model.dtype == torch.float64 and scorer.model.config.pad_token_id == scorer.tokenizer.pad_token_id
    with pytest.raises(ConfigError) as exc:
        load_reward_model(str(tmp_path / "gone"), loop=loop)
    assert "the reward model" in _one_line(exc) and "is not a directory" in str(exc.value)
