"""Hook specifications for cross-cutting plugins (entry-point group ``posttrain.plugins``).

A plugin module implements any subset of these with ``@posttrain.hookimpl`` and is listed as
``[project.entry-points."posttrain.plugins"] myplugin = "my_package.my_module"``. An
implementation may accept a subset of a hook's arguments, so hooks can gain arguments later
without breaking plugins. Built-in reward functions, rollout backends and judges register through
the same hooks.
"""

import pluggy

hookspec = pluggy.HookspecMarker("posttrain")
hookimpl = pluggy.HookimplMarker("posttrain")


@hookspec
def register_reward_functions(register):
    """Register reward functions: call ``register(name, function)`` for each one."""


@hookspec
def register_rollout_backends(register):
    """Register rollout backends: call ``register(name, factory)``; ``factory(**kwargs)`` builds one."""


@hookspec
def register_judges(register):
    """Register pairwise judges: call ``register(name, factory)``; ``factory(**kwargs)`` builds one (see ``posttrain.judges``)."""


@hookspec
def on_log(step, metrics, output_dir):
    """Receive the metrics dict logged at optimizer ``step`` (every ``logging_steps``) to act on or export them."""
