"""Tests of the training-loop shell, checkpoints and resume (core), with the toy method."""

import copy
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from posttrain import ConfigError
from posttrain.testing._toy import TOY_SPEC, ToyConfig, ToyLMTrainer, toy_sequences

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "toy_train.py")


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def step_losses(output_dir):
    return {m["step"]: m["loss"] for m in read_metrics(output_dir) if "loss" in m}


@pytest.fixture
def toy(register_method):
    register_method(TOY_SPEC)


def make_trainer(model, tokenizer, tmp_path, name="run", rows=None, **kw):
    kw = {"learning_rate": 1e-2, "save_strategy": "no", **kw}
    args = ToyConfig(output_dir=str(tmp_path / name), disable_tqdm=True, **kw)
    return ToyLMTrainer(model=model, args=args, train_dataset=rows or toy_sequences(32, vocab=len(tokenizer)), processing_class=tokenizer)


def test_gradient_accumulation_batch8x1_equals_batch1x8_with_uneven_lengths(toy, tiny_tokenizer, tmp_path):
    """In float64, where the two ways of summing the same per-token losses agree to ~1e-16 on any machine (float32:
    ~4e-7 of the largest update here, an amount that depends on the CPU's kernels); a wrong normalization is off by >1%."""
    from posttrain.testing.tiny_model import build_model

    model = build_model(tiny_tokenizer, dtype=torch.float64)
    rows = toy_sequences(8, vocab=len(tiny_tokenizer), min_len=2, max_len=20)
    # Adam's first step is ~lr*sign(g), blind to how the loss is scaled; with eps >> |g| it is
    # ~lr*g/eps instead, so comparing parameter updates compares the raw gradients.
    sgd_like = dict(max_steps=1, adam_epsilon=1.0, learning_rate=1.0, max_grad_norm=0.0)
    a = make_trainer(copy.deepcopy(model), tiny_tokenizer, tmp_path, "a", rows, per_device_train_batch_size=8, gradient_accumulation_steps=1, **sgd_like)
    b = make_trainer(copy.deepcopy(model), tiny_tokenizer, tmp_path, "b", rows, per_device_train_batch_size=1, gradient_accumulation_steps=8, **sgd_like)
    out_a, out_b = a.train(), b.train()
    assert out_a.training_loss == pytest.approx(out_b.training_loss, rel=1e-12)
    before = dict(model.named_parameters())
    for (name, pa), pb in zip(a.loop.unwrapped_model().named_parameters(), b.loop.unwrapped_model().parameters()):
        assert pa.dtype == torch.float64
        update_a, update_b = (pa - before[name]).detach(), (pb - before[name]).detach()
        scale = update_b.abs().max()  # relative to the largest entry: an update has near-zero entries
        assert scale > 0 and (update_a - update_b).abs().max() <= 1e-10 * scale, name
    # and the normalization is a true per-token mean: a 4x2 split gives the same loss as well
    c = make_trainer(copy.deepcopy(model), tiny_tokenizer, tmp_path, "c", rows, per_device_train_batch_size=2, gradient_accumulation_steps=4, **sgd_like)
    assert c.train().training_loss == pytest.approx(out_a.training_loss, rel=1e-12)


def test_metrics_jsonl_has_required_fields_and_manifest_is_written(toy, tiny_model, tiny_tokenizer, tmp_path):
    trainer = make_trainer(tiny_model, tiny_tokenizer, tmp_path, max_steps=3, per_device_train_batch_size=4)
    trainer.train()
    rows = read_metrics(str(tmp_path / "run"))
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert {"step", "loss", "learning_rate", "grad_norm", "epoch"} <= set(row)
        assert row["loss"] > 0 and row["grad_norm"] > 0
    manifest = json.load(open(tmp_path / "run" / "run_manifest.json"))
    assert manifest["method"] == "toy_lm" and manifest["maturity"] == "stable"
    assert manifest["distribution"] == "posttrain-test"
    assert {"posttrain", "torch", "transformers", "accelerate", "peft"} <= set(manifest["versions"])
    assert manifest["config"]["learning_rate"] == 1e-2
    # the final model loads with plain transformers
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(tmp_path / "run"))


def test_on_log_hook_receives_the_logged_metrics(toy, tiny_model, tiny_tokenizer, tmp_path):
    from posttrain.hookspecs import hookimpl

    seen = []

    class Recorder:
        @hookimpl
        def on_log(self, step, metrics):
            seen.append((step, metrics))

    trainer = make_trainer(tiny_model, tiny_tokenizer, tmp_path, max_steps=2, per_device_train_batch_size=4)
    trainer.loop.plugin_manager.register(Recorder())
    trainer.train()
    assert [s for s, _ in seen] == [1, 2]
    assert "loss" in seen[0][1]


def test_checkpoints_load_with_from_pretrained_and_rotate(toy, tiny_model, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    args = dict(max_steps=6, per_device_train_batch_size=4)
    trainer = make_trainer(tiny_model, tiny_tokenizer, tmp_path, **args)
    trainer.args.save_strategy, trainer.args.save_steps, trainer.args.save_total_limit = "steps", 2, 2
    trainer.train()
    names = sorted(os.listdir(tmp_path / "run"))
    assert [n for n in names if n.startswith("checkpoint-")] == ["checkpoint-4", "checkpoint-6"]
    assert not [n for n in names if n.startswith("tmp-")]
    ckpt = tmp_path / "run" / "checkpoint-6"
    assert (ckpt / "model.safetensors").exists() and (ckpt / "optimizer.pt").exists()
    loaded = AutoModelForCausalLM.from_pretrained(str(ckpt))
    for (name, p), q in zip(loaded.named_parameters(), trainer.loop.unwrapped_model().parameters()):
        torch.testing.assert_close(p, q, msg=name)


def test_resume_reproduces_the_uninterrupted_losses_exactly(toy, tiny_model, tiny_tokenizer, tmp_path):
    common = dict(max_steps=8, per_device_train_batch_size=3, gradient_accumulation_steps=2)  # crosses an epoch boundary
    full = make_trainer(copy.deepcopy(tiny_model), tiny_tokenizer, tmp_path, "full", **common)
    full.train()
    expected = step_losses(str(tmp_path / "full"))

    first = make_trainer(copy.deepcopy(tiny_model), tiny_tokenizer, tmp_path, "resumed", **{**common, "max_steps": 8})
    first.args.save_strategy, first.args.save_steps = "steps", 3
    first.train()
    # simulate an interruption after step 3: drop later checkpoints, resume from the latest
    for name in os.listdir(tmp_path / "resumed"):
        if name.startswith("checkpoint-") and name != "checkpoint-3":
            import shutil

            shutil.rmtree(tmp_path / "resumed" / name)
    again = make_trainer(copy.deepcopy(tiny_model), tiny_tokenizer, tmp_path, "resumed", **common)
    again.args.resume_from_checkpoint = True
    again.train()
    got = step_losses(str(tmp_path / "resumed"))
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step] == expected[step], f"step {step}: {got[step]} != {expected[step]}"


def test_fp16_on_cpu_is_refused_with_a_clear_message(toy, tiny_model, tiny_tokenizer, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    with pytest.raises(ConfigError, match="fp16=True needs a CUDA GPU"):
        make_trainer(tiny_model, tiny_tokenizer, tmp_path, fp16=True)


def test_tensorboard_tracker_writes_events(toy, tiny_model, tiny_tokenizer, tmp_path):
    pytest.importorskip("tensorboard")
    trainer = make_trainer(tiny_model, tiny_tokenizer, tmp_path, max_steps=2, per_device_train_batch_size=4, report_to="tensorboard")
    trainer.train()
    events = [f for root, _, files in os.walk(tmp_path / "run") for f in files if f.startswith("events.out.tfevents")]
    assert events


def test_no_torch_load_without_weights_only_in_the_repository():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    offenders = []
    for base in ("core", "plugins", "contrib"):
        for dirpath, _, files in os.walk(os.path.join(root, base)):
            for fname in files:
                if not fname.endswith(".py"):
                    continue
                path = os.path.join(dirpath, fname)
                for lineno, line in enumerate(open(path), 1):
                    if "torch.load(" in line and "weights_only=True" not in line:
                        offenders.append(f"{path}:{lineno}")
    assert not offenders, offenders


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return env


def test_kill_during_save_leaves_previous_checkpoint_loadable_and_resume_matches(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = str(tmp_path / "killed")
    cfg = dict(output_dir=out, max_steps=6, per_device_train_batch_size=4, save_steps=2, learning_rate=1e-2, disable_tqdm=True, seed=3)
    proc = subprocess.Popen([sys.executable, SCRIPT, tiny_model_dir, json.dumps(cfg), "--slow-save-at", "4"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    deadline = time.time() + 120
    for line in proc.stdout:
        if "SAVING" in line or time.time() > deadline:
            break
    assert os.path.isdir(os.path.join(out, "tmp-checkpoint-4")), "the save of step 4 should be in progress"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(out, "checkpoint-4"))
    AutoModelForCausalLM.from_pretrained(os.path.join(out, "checkpoint-2"))  # the previous checkpoint is intact

    # resume from the latest complete checkpoint and compare with an uninterrupted run
    subprocess.run([sys.executable, SCRIPT, tiny_model_dir, json.dumps({**cfg, "resume_from_checkpoint": True})], check=True, env=_env(), capture_output=True)
    ref_out = str(tmp_path / "reference")
    subprocess.run([sys.executable, SCRIPT, tiny_model_dir, json.dumps({**cfg, "output_dir": ref_out})], check=True, env=_env(), capture_output=True)
    assert step_losses(out) == step_losses(ref_out)
    assert not [n for n in os.listdir(out) if n.startswith("tmp-")]


def test_load_model_quantization_config_and_revision_go_to_from_pretrained(toy, tiny_model, tiny_model_dir, tmp_path, monkeypatch):
    """Plugin API 1.3: TRL's quantization_config trainer argument reaches from_pretrained of a named model; the
    tokenizer is loaded at the model's revision; a model object or a second quantization_config is one line."""
    import transformers

    from posttrain import TrainingLoop

    calls = []
    original = {cls: cls.from_pretrained for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer)}
    for cls, load in original.items():
        monkeypatch.setattr(cls, "from_pretrained", lambda name, _load=load, _cls=cls, **kw: calls.append((_cls.__name__, kw)) or _load(name, **{k: v for k, v in kw.items() if k not in ("quantization_config", "revision")}))
    marker = object()
    loop = TrainingLoop(ToyConfig(output_dir=str(tmp_path), model_init_kwargs={"revision": "v1"}), method="toy_lm")
    loop.load_model(tiny_model_dir, quantization_config=marker)
    (model_name, model_kw), (tok_name, tok_kw) = calls
    assert model_name == "AutoModelForCausalLM" and model_kw["quantization_config"] is marker and model_kw["revision"] == "v1"
    assert tok_name == "AutoTokenizer" and tok_kw["revision"] == "v1"
    with pytest.raises(ConfigError, match="quantization_config= applies only to a model given by name"):
        loop.load_model(tiny_model, quantization_config=marker)
    both = TrainingLoop(ToyConfig(output_dir=str(tmp_path / "b"), model_init_kwargs={"quantization_config": marker}), method="toy_lm")
    with pytest.raises(ConfigError, match="set both as a trainer argument and in args.model_init_kwargs"):
        both.load_model(tiny_model_dir, quantization_config=marker)


def test_dataloader_workers_collate_the_same_batches_and_resume_exactly(toy, tiny_model_dir, tmp_path):
    """dataloader_num_workers > 0 collates in DataLoader worker processes: the same micro-batches in the same order as
    in-process collation (identical losses and weights), and a run resumed mid-epoch continues from its position."""
    import shutil

    rows = toy_sequences(24, vocab=500)
    common = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=5, seed=3)
    inline = make_trainer(tiny_model_dir, None, tmp_path, "inline", rows, **common)
    inline.train()
    workers = make_trainer(tiny_model_dir, None, tmp_path, "workers", rows, dataloader_num_workers=2, save_strategy="steps", save_steps=2, **common)
    workers.train()
    assert step_losses(str(tmp_path / "workers")) == step_losses(str(tmp_path / "inline"))  # one process, the same batches: identical
    a, b = inline.loop.unwrapped_model().state_dict(), workers.loop.unwrapped_model().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "workers" / "checkpoint-2", resumed / "checkpoint-2")  # 4 of the epoch's 6 micro-batches consumed
    make_trainer(tiny_model_dir, None, tmp_path, "resumed", rows, dataloader_num_workers=2, **common).train(resume_from_checkpoint=True)
    expected = step_losses(str(tmp_path / "workers"))
    assert step_losses(str(resumed)) == {s: expected[s] for s in (3, 4, 5)}
