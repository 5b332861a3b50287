"""Tests of the posttrain command line: list, info, train (argument parsing and precedence), env, doctor."""

import importlib
import json
import os
import subprocess
import sys
import textwrap

import pytest

from posttrain import ConfigError, MethodSpec, Preset
from posttrain._registry import Registry, get_activation
from posttrain.cli import build_config, main, parse_field_args
from _plugin_fakes import FakeEntryPoint, clean_gate, entry_point_for, make_plugin  # noqa: F401

pytestmark = pytest.mark.usefixtures("clean_gate")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def registry(make_plugin):
    """A registry with a stable 'sft', an experimental 'orpo' and a broken 'broken' method."""
    eps = [
        entry_point_for(make_plugin("sft"), "sft", dist="posttrain-sft", version="1.0.0"),
        entry_point_for(make_plugin("orpo", maturity="experimental"), "orpo", dist="posttrain-orpo", version="0.2.0"),
        FakeEntryPoint("broken", "gone._spec:SPEC", dist="posttrain-broken", exc=ImportError("No module named 'gone'")),
    ]
    return Registry(entry_points=eps)


@pytest.fixture
def ok_registry(make_plugin):
    return Registry(entry_points=[entry_point_for(make_plugin("sft"), "sft", dist="posttrain-sft")])


def config_cls_of(registry, name):
    spec = registry.get_info(name).spec
    module, _, attr = spec.config.partition(":")
    return getattr(importlib.import_module(module), attr), spec


# -- list ---------------------------------------------------------------------------------------


def test_list_table_shows_every_method_with_status_and_broken_ones_with_their_error(registry, capsys):
    assert main(["list"], registry=registry) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "distribution", "version", "maturity", "status", "summary"]
    assert [line.split()[0] for line in lines[1:]] == ["broken", "orpo", "sft"]
    assert lines[1].split()[:5] == ["broken", "posttrain-broken", "1.0.0", "-", "error"]
    assert "ImportError: No module named 'gone'" in lines[1]
    assert lines[2].split()[:5] == ["orpo", "posttrain-orpo", "0.2.0", "experimental", "experimental"]
    assert lines[3].endswith("Demo method sft.")


def test_list_json_prints_exactly_the_documented_schema(registry, capsys):
    assert main(["list", "--format", "json"], registry=registry) == 0
    payload = json.loads(capsys.readouterr().out)
    assert list(payload) == ["schema_version", "methods"] and payload["schema_version"] == 1
    keys = ["name", "distribution", "version", "maturity", "plugin_api", "status", "summary", "error"]
    assert all(list(m) == keys for m in payload["methods"])
    sft = payload["methods"][2]
    assert sft == {"name": "sft", "distribution": "posttrain-sft", "version": "1.0.0", "maturity": "stable", "plugin_api": "1.0", "status": "ok", "summary": "Demo method sft.", "error": None}


def test_list_json_with_presets_adds_a_presets_list_per_method(registry, capsys):
    main(["list", "--format", "json", "--presets"], registry=registry)
    methods = json.loads(capsys.readouterr().out)["methods"]
    assert [m["presets"] for m in methods] == [[], ["fast"], ["fast"]]


def test_list_with_presets_counts_the_presets_that_cite_a_paper(capsys):
    from posttrain import MethodSpec, Preset
    from posttrain.cli import paper_backed_count

    reg = Registry(entry_points=[])
    reg.add_spec(MethodSpec(name="a", summary="A.", maturity="stable", plugin_api="1.0", trainer="m.t:T", config="m.c:C", presets={"p1": Preset(summary="x", overrides={}, paper="Doe et al. 2024, arXiv:2401.01234"),
                                                              "p2": Preset(summary="y", overrides={}, paper="https://example.org/report"),
                                                              "p3": Preset(summary="z", overrides={}, paper="folklore")}))
    reg.add_spec(MethodSpec(name="b", summary="B.", maturity="stable", plugin_api="1.0", trainer="m.t:T", config="m.c:C", presets={"q": Preset(summary="q", overrides={}, paper="")}), distribution="y")
    assert paper_backed_count(reg.list_methods()) == (2, 1)
    main(["list", "--format", "json", "--presets"], registry=reg)
    assert json.loads(capsys.readouterr().out)["paper_backed"] == {"methods": 2, "families": 1}
    main(["list", "--presets"], registry=reg)
    assert capsys.readouterr().out.splitlines()[-1] == "2 paper-backed methods (presets citing a paper) across 1 method families."


def test_list_strict_exits_nonzero_only_when_a_method_is_not_ok_or_experimental(registry, ok_registry, capsys):
    assert main(["list", "--strict"], registry=registry) == 1
    assert main(["list", "--strict"], registry=ok_registry) == 0


def test_list_with_no_methods_installed_says_how_to_install_one(capsys):
    assert main(["list"], registry=Registry(entry_points=[])) == 0
    assert "pip install posttrain-sft" in capsys.readouterr().out


def test_list_in_a_fresh_process_never_imports_torch_and_python_m_works():
    code = "import runpy, sys; sys.argv = ['posttrain', 'list', '--format', 'json']; rc = 0\ntry:\n    runpy.run_module('posttrain', run_name='__main__')\nexcept SystemExit as e:\n    rc = e.code\nprint('HEAVY', sorted(m for m in ('torch', 'transformers', 'datasets', 'accelerate', 'peft') if m in sys.modules), rc)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "HEAVY [] 0"
    assert json.loads(out.stdout[: out.stdout.rindex("HEAVY")])["schema_version"] == 1


def test_list_console_script_imports_nothing_heavy():
    """``posttrain list`` is fast because its console script imports no torch/transformers/datasets/... (-X importtime
    names every module imported; a wall-clock bound would depend on the machine's load)."""
    script = os.path.join(os.path.dirname(sys.executable), "posttrain")
    command = [sys.executable, "-X", "importtime"] + ([script, "list"] if os.path.exists(script) else ["-m", "posttrain", "list"])
    out = subprocess.run(command, capture_output=True, text=True, timeout=60, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "posttrain" in imported  # the check can fail: importtime saw the CLI's imports
    heavy = {"torch", "transformers", "datasets", "accelerate", "peft", "trl", "numpy", "tokenizers"} & imported
    assert not heavy, sorted(heavy)


# -- info ---------------------------------------------------------------------------------------


def test_info_prints_spec_presets_papers_and_every_config_field(registry, capsys):
    assert main(["info", "sft"], registry=registry) == 0
    out = capsys.readouterr().out
    for expected in (
        "sft: Demo method sft.",
        "maturity:     stable",
        "distribution: posttrain-sft 1.0.0",
        "plugin api:   1.0",
        "family:       demo",
        "- Doe et al. 2024, A Demo Paper",
        "fast: Few steps.",
        "overrides: learning_rate=0.1, max_steps=5",
        "paper: arXiv:0000.0001",
        "--beta (float, default 0.1)",
        "KL weight.",
        "--tags (list[str], default [])",
        "--learning_rate (float, default 5e-05)",
        "Peak learning rate of AdamW.",
    ):
        assert expected in out, expected


def test_info_of_a_broken_method_shows_its_status_and_exits_one(registry, capsys):
    assert main(["info", "broken"], registry=registry) == 1
    assert "status:       error (loading spec 'gone._spec:SPEC' failed" in capsys.readouterr().out


def test_info_of_an_unknown_method_prints_one_line_with_a_suggestion_and_exits_two(registry, capsys):
    assert main(["info", "sfd"], registry=registry) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("posttrain info: error: No posttrain method named 'sfd'. Did you mean 'sft'?")


# -- train: field parsing and precedence ---------------------------------------------------------


def test_parse_field_args_converts_values_by_type_hint(registry):
    config_cls, _ = config_cls_of(registry, "sft")
    values = parse_field_args(
        config_cls,
        ["--learning_rate", "1e-5", "--max_steps=7", "--gradient_checkpointing", "--use_peft", "no", "--bf16", "yes",
         "--run_name", "none", "--tags", "a", "b", "--lora_target_modules", '["q_proj", "v_proj"]', "--extra", '{"k": 1}',
         "--num-generations", "4", "--report_to", "wandb", "--resume_from_checkpoint", "true", "--loss_type=--odd"],
    )
    assert values == {
        "learning_rate": 1e-5, "max_steps": 7, "gradient_checkpointing": True, "use_peft": False, "bf16": True, "run_name": None,
        "tags": ["a", "b"], "lora_target_modules": ["q_proj", "v_proj"], "extra": {"k": 1}, "num_generations": 4,
        "report_to": "wandb", "resume_from_checkpoint": True, "loss_type": "--odd",
    }


def test_parse_field_args_accepts_negative_numbers_and_repeated_list_values(registry):
    config_cls, _ = config_cls_of(registry, "sft")
    assert parse_field_args(config_cls, ["--max_steps", "-1", "--report_to", "wandb", "tensorboard"]) == {"max_steps": -1, "report_to": ["wandb", "tensorboard"]}


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        (["--learning_rat", "1e-5"], "unknown config field --learning_rat for DemoConfig. Did you mean --learning_rate"),
        (["--max_steps", "ten"], "--max_steps: 'ten' is not a valid int"),
        (["--use_peft", "maybe"], "--use_peft: 'maybe' is not a valid bool"),
        (["--max_steps"], "--max_steps needs a value"),
        (["--extra", "{bad"], "--extra: '{bad' is not valid JSON"),
        (["stray"], "unexpected argument 'stray'"),
    ],
)
def test_parse_field_args_rejects_user_mistakes_with_the_field_and_fix(registry, tokens, message):
    config_cls, _ = config_cls_of(registry, "sft")
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("{", r"\{")):
        parse_field_args(config_cls, tokens)


def test_build_config_precedence_is_defaults_then_yaml_then_preset_then_command_line(registry):
    """A preset is named on the command line: the user's latest explicit choice, so it wins over the YAML (1.4)."""
    config_cls, spec = config_cls_of(registry, "sft")
    config = build_config(
        config_cls,
        presets={"fast": Preset(summary="x", overrides={"learning_rate": 0.1, "max_steps": 5})},
        preset="fast",
        yaml_values={"max_steps": 9, "beta": "0.25", "learning_rate": "2e-5", "seed": 7},  # PyYAML reads 2e-5 as a string
        cli_values={"max_steps": 6},
    )
    assert (config.seed, config.learning_rate, config.max_steps, config.beta) == (7, 0.1, 6, 0.25)
    assert build_config(config_cls, presets=spec.presets, preset="fast").max_steps == 5


def test_build_config_unknown_preset_lists_the_available_ones(registry):
    config_cls, spec = config_cls_of(registry, "sft")
    with pytest.raises(ConfigError, match="unknown preset 'slow' for DemoConfig; available presets: fast"):
        build_config(config_cls, presets=spec.presets, preset="slow")


def test_build_config_unknown_yaml_field_suggests_the_closest_names(registry):
    config_cls, _ = config_cls_of(registry, "sft")
    with pytest.raises(ConfigError, match="the YAML file: unknown config field bta for DemoConfig. Did you mean beta"):
        build_config(config_cls, yaml_values={"bta": 1.0})


def test_build_config_wrong_yaml_type_names_the_field(registry):
    config_cls, _ = config_cls_of(registry, "sft")
    with pytest.raises(ConfigError, match=r"max_steps: \[1, 2\] \(list\) is not a valid int"):
        build_config(config_cls, yaml_values={"max_steps": [1, 2]})


# -- train: end to end with a recording trainer ---------------------------------------------------


@pytest.fixture
def fake_data(monkeypatch):
    import posttrain._data

    seen = []

    def load(config):
        seen.append(config)
        return ["train-rows"], None

    monkeypatch.setattr(posttrain._data, "load_dataset_from_config", load)
    return seen


def test_train_builds_config_from_yaml_and_flags_and_runs_the_trainer(registry, fake_data, tmp_path, monkeypatch):
    monkeypatch.delenv("POSTTRAIN_TEST_FROM_YAML", raising=False)
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(textwrap.dedent("""\
        model_name_or_path: tiny-model
        dataset_name: data.jsonl
        learning_rate: 2.0e-5
        max_steps: 3
        beta: 0.2
        env:
          POSTTRAIN_TEST_FROM_YAML: "yes"
        """))
    assert main(["train", "sft", "--config", str(yaml_file), "--preset", "fast", "--max_steps", "4", "--beta=0.3"], registry=registry) == 0
    trainer = get_activation("sft").trainer_cls.__module__
    trainer = sys.modules[trainer].CALLS[-1]
    assert trainer.trained and trainer.model == "tiny-model" and trainer.train_dataset == ["train-rows"] and trainer.eval_dataset is None
    assert (trainer.args.learning_rate, trainer.args.max_steps, trainer.args.beta) == (0.1, 4, 0.3)  # the preset over the YAML, flags over both
    assert os.environ["POSTTRAIN_TEST_FROM_YAML"] == "yes"
    monkeypatch.delenv("POSTTRAIN_TEST_FROM_YAML")


def test_train_experimental_method_without_flag_exits_two_naming_the_opt_ins(registry, fake_data, capsys):
    assert main(["train", "orpo", "--model_name_or_path", "m", "--dataset_name", "d"], registry=registry) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    assert "--allow-experimental orpo" in err
    assert not fake_data  # refused before loading anything


def test_train_experimental_method_with_the_cli_flag_is_allowed_via_cli(registry, fake_data):
    with pytest.warns(UserWarning, match="allowed via cli --allow-experimental"):
        assert main(["train", "orpo", "--allow-experimental", "orpo", "--model_name_or_path", "m", "--dataset_name", "d"], registry=registry) == 0
    assert get_activation("orpo").allowed_via == "cli --allow-experimental"


def test_train_flag_for_another_method_does_not_opt_in(registry, fake_data):
    assert main(["train", "orpo", "--allow-experimental", "kto", "--model_name_or_path", "m"], registry=registry) == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "sft", "--learning_rat", "1"], "Did you mean --learning_rate"),
        (["train", "sft", "--max_steps", "many"], "--max_steps: 'many' is not a valid int"),
        (["train", "sft", "--per_device_train_batch_size", "0"], "per_device_train_batch_size=0 is invalid"),
        (["train", "sft", "--dataset_name", "d"], "model_name_or_path is not set"),
        (["train", "sft", "--preset", "slow"], "unknown preset 'slow'"),
        (["train", "sft", "--config", "/no/such.yaml"], "--config /no/such.yaml: No such file or directory"),
        (["train", "broken"], "cannot be used: status error"),
        (["train", "nope"], "No posttrain method named 'nope'"),
    ],
)
def test_train_user_mistakes_print_one_line_and_exit_two(registry, fake_data, capsys, argv, message):
    assert main(argv, registry=registry) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_train_help_after_the_method_lists_its_fields(registry, capsys):
    assert main(["train", "sft", "--help"], registry=registry) == 0
    assert "--beta (float, default 0.1)" in capsys.readouterr().out


# -- env and doctor -------------------------------------------------------------------------------


def test_env_reports_versions_devices_and_posttrain_variables(monkeypatch, capsys):
    monkeypatch.setenv("POSTTRAIN_STABLE_ONLY", "1")
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for expected in ("python: 3.", "posttrain: ", "torch: ", "transformers: ", "pluggy: ", "vllm: ", "cpu count: ", "cuda: ", "POSTTRAIN_STABLE_ONLY=1", "HF_HUB_OFFLINE"):
        assert expected in out, expected


def test_doctor_passes_for_healthy_plugins(ok_registry, capsys):
    assert main(["doctor"], registry=ok_registry) == 0
    out = capsys.readouterr().out
    assert "ok    sft (posttrain-sft 1.0.0, stable)" in out and "hook plugins" in out


def test_doctor_reports_each_problem_and_exits_nonzero(make_plugin, capsys):
    eps = [
        entry_point_for(make_plugin("needs", requires=("surely_not_installed_pkg",)), "needs"),
        entry_point_for(make_plugin("plain", config_base="object"), "plain"),
        entry_point_for(make_plugin("ghost", trainer_module="missing"), "ghost"),
        entry_point_for(make_plugin("typo", presets={"fast": {"summary": "x", "overrides": {"betta": 1.0}}}), "typo"),
        FakeEntryPoint("future", obj=MethodSpec(name="future", maturity="stable", plugin_api="2.0", summary="x", trainer="a:B", config="a:C")),
        entry_point_for(make_plugin("fine"), "fine"),
    ]
    assert main(["doctor"], registry=Registry(entry_points=eps)) == 1
    out = capsys.readouterr().out
    assert "requires 'surely_not_installed_pkg', which is not importable" in out
    assert "status error: its config" in out and "does not subclass posttrain.TrainingConfig" in out
    assert "trainer module" in out and ".missing' does not exist" in out
    assert "preset 'fast' overrides unknown field 'betta' (did you mean beta" in out
    assert "status incompatible: built for plugin API 2.0" in out
    assert "ok    fine" in out


def test_train_reports_a_bad_reward_function_path_in_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch):
    pytest.importorskip("posttrain_grpo")
    from posttrain.cli import main

    monkeypatch.delenv("POSTTRAIN_DEBUG", raising=False)
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "what is 1 + 1 ="}\n{"prompt": "what is 2 + 2 ="}\n')
    argv = ["train", "grpo", "--model_name_or_path", tiny_model_dir, "--dataset_name", str(data),
            "--output_dir", str(tmp_path / "out"), "--reward_funcs", "no_such_module:nope", "--max_steps", "1"]
    code = main(argv, registry=Registry())  # the installed plugins
    err = capsys.readouterr().err
    assert code == 2
    assert "no_such_module" in err and "Traceback" not in err


# -- the gate imports no plugin module before the opt-in (plugin API 1.1) ----------------------


def _plugin_modules(package):
    return sorted(name for name in sys.modules if name.startswith(package + ".") and not name.endswith("._spec"))


def test_train_experimental_with_a_config_file_and_no_opt_in_imports_no_plugin_module(make_plugin, fake_data, tmp_path, capsys):
    package = make_plugin("orpo", maturity="experimental")
    registry = Registry(entry_points=[entry_point_for(package, "orpo", dist="posttrain-orpo", version="0.2.0")])
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("model_name_or_path: m\ndataset_name: d\nbeta: 0.2\n")
    assert main(["train", "orpo", "--config", str(yaml_file)], registry=registry) == 2
    assert "--allow-experimental orpo" in capsys.readouterr().err
    assert _plugin_modules(package) == []  # neither config nor trainer was imported
    assert not fake_data


@pytest.mark.parametrize("how", ["yaml", "flag"])
def test_train_experimental_opted_in_through_the_raw_yaml_or_field_flag_passes_the_gate(make_plugin, fake_data, tmp_path, how):
    package = make_plugin("orpo", maturity="experimental")
    registry = Registry(entry_points=[entry_point_for(package, "orpo", dist="posttrain-orpo", version="0.2.0")])
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("model_name_or_path: m\ndataset_name: d\n" + ("allow_experimental: true\n" if how == "yaml" else ""))
    argv = ["train", "orpo", "--config", str(yaml_file)] + (["--allow_experimental", "true"] if how == "flag" else [])
    with pytest.warns(UserWarning, match="is experimental"):
        assert main(argv, registry=registry) == 0
    assert get_activation("orpo").allowed_via == "python allow_experimental=True"


@pytest.mark.parametrize(("kind", "message"), [("not_a_subclass", "does not subclass posttrain.TrainingConfig"), ("not_a_dataclass", "is not a dataclass")])
def test_invalid_config_class_is_status_error_in_info_doctor_and_train(make_plugin, fake_data, capsys, tmp_path, kind, message):
    package = make_plugin("sft", config_base="NotAConfig")
    if kind == "not_a_dataclass":
        with open(tmp_path / package / "config.py", "a") as fh:
            fh.write("\nDemoConfig = NotAConfig\n")
    registry = Registry(entry_points=[entry_point_for(package, "sft", dist="posttrain-sft")])
    # `list` stops at the spec (tier 2, DESIGN.md section 3): it never imports a config module
    assert main(["list"], registry=registry) == 0
    assert f"{package}.config" not in sys.modules and "ok" in capsys.readouterr().out
    assert main(["info", "sft"], registry=registry) == 1
    config_module = sys.modules[f"{package}.config"]
    assert message in capsys.readouterr().out
    assert main(["doctor"], registry=registry) == 1
    assert message in capsys.readouterr().out
    assert main(["train", "sft", "--model_name_or_path", "m"], registry=registry) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert config_module  # imported for the check (a light module), the trainer never was
    assert f"{package}.trainer" not in sys.modules


def test_new_class_prefix_names_the_classes_and_a_bad_one_is_one_line(tmp_path, capsys):
    assert main(["new", "lab_bco", "--family", "preference", "--dir", str(tmp_path), "--class-prefix", "BCO"], registry=Registry(entry_points=[])) == 0
    package = tmp_path / "posttrain-lab-bco" / "posttrain_lab_bco"
    assert "class BCOTrainer(TrainerSurface)" in (package / "trainer.py").read_text()
    assert 'config="posttrain_lab_bco.config:BCOConfig"' in (package / "_spec.py").read_text()
    capsys.readouterr()
    assert main(["new", "other", "--dir", str(tmp_path), "--class-prefix", "bco"], registry=Registry(entry_points=[])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--class-prefix 'bco' is invalid" in err[0] and not (tmp_path / "posttrain-other").exists()
