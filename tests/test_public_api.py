"""Plugin API 1.1: plugins use public names only, and everything they need is public."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import posttrain

ROOT = pathlib.Path(__file__).resolve().parents[1]
# a private module of posttrain, a private attribute of the loop or the engine, or the engine's backend internals
PRIVATE = re.compile(r"(from|import)\s+posttrain\._|posttrain\._[a-z]|\.loop\._[a-z]|\.engine\.backend\b|\.engine\._[a-z]")


def _plugin_files():
    return sorted(p for p in [*ROOT.glob("plugins/**/*.py"), *ROOT.glob("contrib/**/*.py")] if ".venv" not in p.parts)


def test_no_shipped_plugin_or_contrib_file_touches_a_private_core_name():
    hits = []
    for path in _plugin_files():
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if PRIVATE.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert not hits, "plugins must use names in posttrain.__all__ only:\n" + "\n".join(hits)


def test_every_public_name_resolves():
    for name in posttrain.__all__:
        assert getattr(posttrain, name) is not None, name


def test_plugin_api_is_1_6():
    # 1.2 added MethodSpec.data_format / tiny_run (the conformance kit); 1.3 the "triple_preference" format and
    # TrainingLoop.load_model(quantization_config=); 1.4 the error classes, plot_run, overwrite_output_dir,
    # supports_encoder_decoder; 1.1-1.4 plugins still load
    # 1.5: online core 2.0 (episodes, producers, judges, the online steps, several models); 1.6: distillation
    # (TeacherServer / TeacherServerClient / TeacherServerError, the teacher_entropy role, the distillation diagnostics)
    # 1.7: policy modules, the critic roles; 1.8: tools and environments (ToolCallingRollout, posttrain.environments entry points)
    assert posttrain.API_VERSION == "1.9"
    assert "triple_preference" in posttrain.DATA_FORMATS
    for name in ("Episode", "EpisodeBatch", "RolloutProducer", "PromptSource", "PairwiseJudge", "load_pretrained", "generate_rollout"):
        assert name in posttrain.__all__, name


def test_plugins_declare_a_literal_plugin_api():
    """``plugin_api=API_VERSION`` would claim whatever core runs, and the gate could never refuse the plugin."""
    specs = sorted((ROOT / "plugins").glob("*/posttrain_*/_spec.py")) + sorted((ROOT / "contrib").glob("*/posttrain_*/_spec.py"))
    assert len(specs) >= 10
    for path in specs:
        text = path.read_text()
        assert re.search(r'plugin_api="\d+\.\d+"', text) and "API_VERSION" not in text, f"{path.relative_to(ROOT)}: declare plugin_api as a literal"


def test_what_a_plugin_author_needs_is_public():
    needed = {
        "TrainingLoop", "TrainOutput", "TrainingState", "ensure_activated", "MethodProtocol", "OptionalMethodMembers", "check_method",
        "MethodContractError", "TrainerSurface", "as_config", "RolloutEngine", "RolloutBackend", "RolloutBatch", "SamplingParams",
        "compute_rewards", "resolve_reward_functions", "RewardModelFunction", "RewardFunctionError", "build_reference_model",
        "disable_dropout", "is_peft_model", "adapter_disabled", "prompt_completion_boundary", "tokenize_prompt", "load_reward_model",
        "build_reward_functions", "gather_across_processes", "sync_reference_model", "selective_log_softmax", "entropy_from_logits", "pad",
    }
    assert needed <= set(posttrain.__all__), sorted(needed - set(posttrain.__all__))


def test_importing_posttrain_and_the_protocol_stays_light():
    code = "import sys, posttrain; posttrain.MethodProtocol; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
