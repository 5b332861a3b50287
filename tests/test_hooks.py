"""Tests of the cross-cutting hooks (posttrain.hookspecs) and the plugin manager (posttrain._plugins)."""

import inspect

import pluggy
import pytest

import posttrain
import posttrain._plugins
from posttrain import hookimpl, hookspecs
from posttrain._plugins import collect_registrations, get_plugin_manager

HOOK_NAMES = ["on_log", "register_judges", "register_reward_functions", "register_rollout_backends"]


@pytest.fixture(autouse=True)
def fresh_shared_manager():
    """Each test builds the process-wide manager anew (some patch the entry points it reads)."""
    posttrain._plugins._reset_plugin_manager()
    yield
    posttrain._plugins._reset_plugin_manager()


@pytest.fixture
def pm():
    """A plugin manager with only the hookspecs (no built-ins, no installed plugins)."""
    manager = pluggy.PluginManager("posttrain")
    manager.add_hookspecs(hookspecs)
    return manager


class FakeEntryPoint:
    group = "posttrain.plugins"

    def __init__(self, name, obj=None, exc=None):
        self.name, self._obj, self._exc, self.loaded = name, obj, exc, False
        self.dist = type("Dist", (), {"name": f"posttrain-{name}", "version": "1.0.0"})()

    def load(self):
        self.loaded = True
        if self._exc is not None:
            raise self._exc
        return self._obj


class Recorder:
    def __init__(self):
        self.calls = []

    @hookimpl
    def on_log(self, step, metrics, output_dir):
        self.calls.append((step, metrics, output_dir))


class StepOnly:
    def __init__(self):
        self.steps = []

    @hookimpl
    def on_log(self, step):  # a subset of the hook's arguments is allowed
        self.steps.append(step)


class Registrations:
    @hookimpl
    def register_reward_functions(self, register):
        register("length", lambda completions, **kw: [float(len(c)) for c in completions])

    @hookimpl
    def register_rollout_backends(self, register):
        register("echo", lambda **kwargs: ("echo-backend", kwargs))


def test_every_hookspec_is_documented_and_follows_the_naming_rule():
    specs = {name: fn for name, fn in vars(hookspecs).items() if inspect.isfunction(fn) and hasattr(fn, "posttrain_spec")}
    assert sorted(specs) == HOOK_NAMES
    for name, fn in specs.items():
        assert fn.__doc__ and fn.__doc__.strip().endswith("."), name
        assert name.startswith(("register_", "on_")), name
        if name.startswith("register_"):
            assert list(inspect.signature(fn).parameters) == ["register"], name


def test_on_log_hook_receives_step_metrics_and_output_dir(pm):
    recorder, step_only = Recorder(), StepOnly()
    pm.register(recorder)
    pm.register(step_only)
    pm.hook.on_log(step=10, metrics={"loss": 1.5, "learning_rate": 1e-5}, output_dir="/tmp/run")
    assert recorder.calls == [(10, {"loss": 1.5, "learning_rate": 1e-5}, "/tmp/run")]
    assert step_only.steps == [10]


def test_register_reward_functions_collects_functions_by_name(pm):
    pm.register(Registrations(), name="lab-rewards")
    rewards = collect_registrations(pm, "register_reward_functions")
    assert list(rewards) == ["length"] and rewards["length"](["ab", "c"]) == [2.0, 1.0]


def test_register_rollout_backends_collects_factories_by_name(pm):
    pm.register(Registrations(), name="lab-backends")
    backends = collect_registrations(pm, "register_rollout_backends")
    assert backends["echo"](max_tokens=3) == ("echo-backend", {"max_tokens": 3})


def test_a_name_registered_by_two_plugins_raises_naming_both(pm):
    pm.register(Registrations(), name="first")
    pm.register(Registrations(), name="second")
    with pytest.raises(ValueError, match="name 'length' is registered by both 'first' and 'second'"):
        collect_registrations(pm, "register_reward_functions")


def test_default_manager_registers_the_builtin_rollout_backends_through_the_hook():
    backends = collect_registrations(get_plugin_manager(load_entrypoints=False), "register_rollout_backends")
    assert {"transformers", "vllm"} <= set(backends)


def test_broken_plugin_entry_point_is_reported_and_the_others_still_load(monkeypatch):
    recorder = Recorder()
    eps = [FakeEntryPoint("broken", exc=ImportError("No module named 'gone'")), FakeEntryPoint("recorder", obj=recorder)]
    monkeypatch.setattr(posttrain._plugins, "entry_points", lambda group: eps)
    with pytest.warns(UserWarning, match=r"plugin 'broken' \(distribution posttrain-broken\) failed to load and is skipped: ImportError: No module named 'gone'.*POSTTRAIN_DISABLE_PLUGINS=broken"):
        manager = get_plugin_manager()
    manager.hook.on_log(step=1, metrics={"loss": 0.5}, output_dir="out")
    assert recorder.calls == [(1, {"loss": 0.5}, "out")]


def test_disabled_plugin_entry_point_is_not_imported(monkeypatch):
    ep = FakeEntryPoint("noisy", exc=AssertionError("must not be loaded"))
    monkeypatch.setattr(posttrain._plugins, "entry_points", lambda group: [ep])
    monkeypatch.setenv("POSTTRAIN_DISABLE_PLUGINS", "noisy")
    get_plugin_manager()
    assert not ep.loaded


def test_misspelled_hook_name_is_reported_and_skipped_while_other_plugins_load(monkeypatch):
    class Misspelled:
        @hookimpl
        def on_logg(self, step):
            pass

    class Good:
        @hookimpl
        def on_log(self, step):
            pass

    eps = [FakeEntryPoint("typo", obj=Misspelled()), FakeEntryPoint("good", obj=Good())]
    monkeypatch.setattr(posttrain._plugins, "entry_points", lambda group: eps)
    with pytest.warns(UserWarning, match="'typo'.*on_logg"):
        pm = get_plugin_manager()
    assert not pm.has_plugin("typo") and pm.has_plugin("good")


def test_get_plugin_manager_returns_a_fresh_manager_each_call():
    assert get_plugin_manager(load_entrypoints=False) is not get_plugin_manager(load_entrypoints=False)


def test_the_shared_manager_is_one_per_process_so_run_time_registration_fires_in_training(tiny_model_dir, tmp_path):
    """As docs/writing-a-plugin.md shows: register a hook module at run time; later runs call it."""
    pytest.importorskip("posttrain_sft")
    from datasets import Dataset

    from posttrain.methods.sft import SFTConfig, SFTTrainer

    assert get_plugin_manager() is get_plugin_manager()
    seen = []

    class LossPrinter:
        @hookimpl
        def on_log(self, step, metrics):
            seen.append((step, "loss" in metrics))

    posttrain.get_plugin_manager().register(LossPrinter(), name="loss-printer")
    data = Dataset.from_dict({"text": ["a b c d e f", "g h i j k l"] * 4})
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=2, logging_steps=1, per_device_train_batch_size=2,
                     disable_tqdm=True, report_to=[], max_length=16)
    SFTTrainer(model=str(tiny_model_dir), args=args, train_dataset=data).train()
    assert (1, True) in seen and (2, True) in seen
