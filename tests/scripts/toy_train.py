"""Train the toy method from a JSON config (used by the core's subprocess and multi-process tests).

Usage: python toy_train.py MODEL_DIR CONFIG_JSON [--slow-save-at STEP] [--critic]
``--slow-save-at`` makes the save of that step pause inside the temporary directory (it prints
SAVING and sleeps) so a test can SIGKILL the process mid-save.
"""

import json
import sys
import time

from posttrain._registry import temporary_method
from posttrain.testing._toy import (TOY_CRITIC_SPEC, TOY_SPEC, TOY_VALUE_HEAD_SPEC, ToyConfig, ToyCriticConfig, ToyCriticTrainer, ToyLMTrainer,
                                     ToyValueHeadTrainer, toy_sequences)


def main() -> None:
    model_dir, config_json = sys.argv[1], sys.argv[2]
    if "--slow-save-at" in sys.argv:
        slow_step = int(sys.argv[sys.argv.index("--slow-save-at") + 1])
        import posttrain._checkpoint as ckpt

        original = ckpt._fsync_tree

        def slow_fsync(path):
            if path.endswith(f"tmp-checkpoint-{slow_step}"):
                print("SAVING", flush=True)
                time.sleep(60)
            original(path)

        ckpt._fsync_tree = slow_fsync
    critic = "--critic" in sys.argv  # the toy LM plus a critic trained beside it (its own optimizer)
    spec, config_class, trainer_class = (TOY_CRITIC_SPEC, ToyCriticConfig, ToyCriticTrainer) if critic else (TOY_SPEC, ToyConfig, ToyLMTrainer)
    if "--value-head" in sys.argv:  # the toy LM plus a value head trained as part of the policy (add_policy_module)
        spec, config_class, trainer_class = TOY_VALUE_HEAD_SPEC, ToyConfig, ToyValueHeadTrainer
    config = config_class(**json.loads(config_json))
    with temporary_method(spec):
        trainer = trainer_class(model=model_dir, args=config, train_dataset=toy_sequences(32, vocab=500))
        out = trainer.train()
    if trainer.loop.is_main_process:
        print("RESULT", json.dumps({"global_step": out.global_step, "training_loss": out.training_loss}), flush=True)


if __name__ == "__main__":
    main()
