"""Built-in hook implementations: rollout backends and reward functions shipped with the core."""

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
