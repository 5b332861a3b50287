"""GMPO on a vision-language model (GRPO's image path, copied): a run-through, and the images reach every forward."""

from __future__ import annotations

import pytest
import torch

from posttrain import DataError, completion_logps
from posttrain.testing.tiny_vlm import COLOURS, build_vlm, colour_rows

from posttrain_gmpo import GMPOConfig, GMPOTrainer


def colour_reward(completions, answer, **kwargs):
    """1.0 when the completion names the image's colour and no other colour."""
    return [1.0 if [c for c in COLOURS if c in completion[0]["content"]] == [a] else 0.0 for completion, a in zip(completions, answer)]


def _trainer(tmp_path, **overrides):
    model, processor = build_vlm(family="idefics3")
    fields = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2, max_completion_length=4, max_steps=2,
                  report_to="none", save_strategy="no", logging_steps=1)
    return GMPOTrainer(model=model, reward_funcs=colour_reward, args=GMPOConfig(**{**fields, **overrides}), train_dataset=colour_rows(8, format="prompt"),
                       processing_class=processor, allow_experimental=True)


def test_vision_run_through_and_the_images_reach_the_forwards(tmp_path):
    # top_k: pi_old is a forward of its own; beta: a reference forward too
    trainer = _trainer(tmp_path, beta=0.1, num_iterations=2, top_k=400)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))

    rows = colour_rows(2, seed=5, format="prompt")
    (batch,) = trainer._generate_and_score(rows, seed=0, indices=[0, 1])
    assert batch["model_inputs"]["pixel_values"].shape[0] == 4  # one per completion, a group sharing its prompt's image
    with torch.no_grad():
        with_images = completion_logps(trainer.model, batch, 1.0, compute_entropy=False)[0]
        swapped = dict(batch, model_inputs={**batch["model_inputs"], "pixel_values": batch["model_inputs"]["pixel_values"].flip(0)})
        other = completion_logps(trainer.model, swapped, 1.0, compute_entropy=False)[0]
    mask = batch["completion_mask"].bool()
    assert (with_images - other)[mask].abs().max() > 1e-5  # the images matter
    torch.testing.assert_close(batch["old_per_token_logps"][mask], with_images[mask], rtol=0, atol=1e-5)  # pi_old saw them


def test_image_column_on_a_text_only_model_names_the_row(tmp_path):
    from posttrain.testing.tiny_model import build_model, build_tokenizer

    tok = build_tokenizer()
    args = GMPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2, report_to="none")
    with pytest.raises(DataError, match=r"train_dataset row 0 has an image column 'images' \(vision-related data\) but the model .* is text-only"):
        GMPOTrainer(model=build_model(tok), reward_funcs=colour_reward, args=args, train_dataset=colour_rows(4, format="prompt"), processing_class=tok,
                    allow_experimental=True)
