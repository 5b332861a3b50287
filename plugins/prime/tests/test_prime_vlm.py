"""PRIME on a vision-language model (RLOO's image path, copied): a run-through; the images reach the policy, reference and PRM forwards."""

from __future__ import annotations

import pytest
import torch

from posttrain import ConfigError, completion_logps
from posttrain.testing.tiny_vlm import COLOURS, build_vlm, colour_rows

from posttrain_prime import PRIMEConfig, PRIMETrainer


def colour_reward(completions, answer, **kwargs):
    """1.0 when the completion names the image's colour and no other colour."""
    return [1.0 if [c for c in COLOURS if c in completion[0]["content"]] == [a] else 0.0 for completion, a in zip(completions, answer)]


def _args(tmp_path, **overrides) -> PRIMEConfig:
    fields = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2, max_completion_length=4, max_steps=2,
                  report_to="none", save_strategy="no", logging_steps=1)
    return PRIMEConfig(**{**fields, **overrides})


def test_vision_run_through_and_the_images_reach_the_forwards(tmp_path):
    model, processor = build_vlm(family="idefics3")
    trainer = PRIMETrainer(model=model, reward_funcs=colour_reward, args=_args(tmp_path, num_iterations=2, top_k=400),
                           train_dataset=colour_rows(8, format="prompt"), processing_class=processor, allow_experimental=True)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))

    (batch,) = trainer._generate_and_score(colour_rows(2, seed=5, format="prompt"), seed=0, indices=[0, 1])
    assert batch["model_inputs"]["pixel_values"].shape[0] == 4
    swapped = dict(batch, model_inputs={**batch["model_inputs"], "pixel_values": batch["model_inputs"]["pixel_values"].flip(0)})
    mask = batch["completion_mask"].bool()
    with torch.no_grad():
        for stored, scorer in (("old_per_token_logps", trainer.model), ("ref_per_token_logps", trainer.ref_model), ("prm_per_token_logps", trainer.prm)):
            with_images = completion_logps(scorer, batch, 1.0, compute_entropy=False)[0]
            other = completion_logps(scorer, swapped, 1.0, compute_entropy=False)[0]
            assert (with_images - other)[mask].abs().max() > 1e-5, stored  # the images matter
            torch.testing.assert_close(batch[stored][mask], with_images[mask], rtol=0, atol=1e-5)  # ... and this forward saw them


def test_a_text_only_prm_is_refused_with_image_rows(tmp_path):
    from posttrain.testing.tiny_model import build_model, build_tokenizer

    model, processor = build_vlm(family="idefics3")
    with pytest.raises(ConfigError, match=r"train_dataset has an image column 'images' but PRIME's implicit PRM .* is text-only") as info:
        PRIMETrainer(model=model, reward_funcs=colour_reward, args=_args(tmp_path), train_dataset=colour_rows(4, format="prompt"),
                     processing_class=processor, prm_model=build_model(build_tokenizer()), allow_experimental=True)
    assert "\n" not in str(info.value)
