"""Built-in hook implementations: rollout backends, reward functions and pairwise judges shipped with the core."""

from posttrain.hookspecs import hookimpl


@hookimpl
def register_rollout_backends(register):
    from posttrain._rollout import TransformersBackend

    register("transformers", TransformersBackend)

    def vllm_factory(**kwargs):
        from posttrain._rollout_vllm import VLLMBackend

        return VLLMBackend(**kwargs)

    register("vllm", vllm_factory)


@hookimpl
def register_reward_functions(register):
    from posttrain import rewards

    for name, func in rewards.BUILTIN_REWARDS.items():
        register(name, func)


@hookimpl
def register_judges(register):
    from posttrain import judges

    for name, factory in judges.BUILTIN_JUDGES.items():
        register(name, factory)
