"""RLOO on vision-language models (TRL 1.16's ``image`` / ``images`` columns, a processor as ``processing_class``).

Parity. TRL's own ``_generate_and_score_completions`` builds a batch from the colour task (its
prompts through the processor with the images, its completions, its pixel inputs); our trainer
encodes the same rows (``_encode_prompt``: the same prompt ids, checked) and batches the same
completions with its per-completion ``model_inputs`` (``posttrain.rollout_micro_batches``). TRL's
``_get_per_token_logps_and_entropies`` / ``_compute_loss`` and ours then score the batch. The models
are float64, but TRL's fused LM head computes its log-probs in float32 (see test_rloo_parity.py), so
a token log-prob carries a few float32 ulps of log(V) ~ 6: ~1e-6 absolute; the loss (a mean of
sequence terms, exp of sums of ~4 log-probs, times |advantage| <= 1) agrees to ~1e-6 (measured: <= 2e-7 on this CPU).

Learning. The tiny Idefics3 (SmolVLM's architecture) is first taught the answer format with
*random* colour words (30 supervised steps: it then names a colour, one of three at random,
whatever the image), then RLOO trains it with reward 1 when the completion names the image's colour
(and no other). The image is the only signal, so the held-out probability of the right colour
(among the three) rises only if the images reach generation and every forward. Measured (run seeds
0, 1, 2, 60 steps): 0.343 -> 0.663, 0.387 -> 0.570, 0.350 -> 0.733; the test asserts a rise of
0.09, about half the smallest gain.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from posttrain import ConfigError, DataError, RolloutBatch, completion_logps, rollout_micro_batches, vision_tower_of
from posttrain.testing.tiny_vlm import COLOURS, build_vlm, colour_rows

from posttrain_rloo import RLOOConfig, RLOOTrainer
from posttrain_rloo.trainer import per_token_logps_and_entropies


def colour_reward(completions, answer, **kwargs):
    """1.0 when the completion names the image's colour and no other colour."""
    return [1.0 if [c for c in COLOURS if c in completion[0]["content"]] == [a] else 0.0 for completion, a in zip(completions, answer)]


def _config(tmp_path, **overrides) -> RLOOConfig:
    fields = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=6, num_generations=2, max_completion_length=4,
                  report_to="none", save_strategy="no", logging_steps=1)
    return RLOOConfig(**{**fields, **overrides})


# ----------------------------------------------------------------------------- parity with TRL 1.16
@pytest.mark.parametrize("family", ["idefics3", "gemma3"])
def test_vision_logps_and_loss_match_trl(family, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    model, processor = build_vlm(family=family, dtype=torch.float64)
    dataset = Dataset.from_list(colour_rows(3, format="prompt"))
    trl_args = trl.RLOOConfig(output_dir=str(tmp_path / "trl"), bf16=False, report_to="none", use_cpu=True, per_device_train_batch_size=6,
                              num_generations=2, max_completion_length=4, epsilon=0.05, beta=0.0)
    theirs = trl.RLOOTrainer(model=copy.deepcopy(model), reward_funcs=colour_reward, args=trl_args, train_dataset=dataset, processing_class=processor)
    theirs.current_gradient_accumulation_steps = 1
    ours = RLOOTrainer(model=copy.deepcopy(model), reward_funcs=colour_reward, args=_config(tmp_path, epsilon=0.05, beta=0.0),
                       train_dataset=dataset, processing_class=processor)
    torch.manual_seed(0)
    inputs = theirs._generate_and_score_completions([dict(dataset[i]) for i in (0, 0, 1, 1, 2, 2)])  # TRL's batch, with its pixel inputs

    # the same completions through our pipeline: our prompt ids and per-completion model inputs
    encoded = [ours._encode_prompt(dict(dataset[i]), f"row {i}") for i in (0, 0, 1, 1, 2, 2)]
    for (ids, _, _), p, m in zip(encoded, inputs["prompt_ids"], inputs["prompt_mask"]):
        assert ids == p[m.bool()].tolist()
    completions = [c[m.bool()].tolist() for c, m in zip(inputs["completion_ids"], inputs["completion_mask"])]
    rollout = RolloutBatch([ids for ids, _, _ in encoded], completions, [[0.0] * len(c) for c in completions], [False] * 6, 0,
                           extras={"model_inputs": [inputs_ for _, inputs_, _ in encoded]})
    (batch,) = rollout_micro_batches(rollout, 6, ours.pad_token_id)
    assert torch.equal(batch["prompt_ids"], inputs["prompt_ids"]) and torch.equal(batch["completion_mask"], inputs["completion_mask"])

    forward_kwargs = {k: v for k, v in inputs.items() if k in ("pixel_values", "pixel_attention_mask", "token_type_ids", "num_images", "image_sizes")}
    with torch.no_grad():
        trl_logps, trl_entropies, _ = theirs._get_per_token_logps_and_entropies(
            theirs.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1), torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1),
            inputs["completion_ids"].shape[1], compute_entropy=True, **forward_kwargs)
        our_logps, our_entropies = per_token_logps_and_entropies(ours.model, batch, 1.0)
    mask = inputs["completion_mask"].bool()
    print(f"{family}: max |logp diff| {(our_logps - trl_logps)[mask].abs().max().item():.2e}")
    torch.testing.assert_close(our_logps[mask], trl_logps[mask].to(our_logps.dtype), rtol=0, atol=1e-5)
    torch.testing.assert_close(our_entropies[mask], trl_entropies[mask].to(our_entropies.dtype), rtol=0, atol=1e-5)

    # the loss, with ratios != 1 (old log-probs perturbed) and fixed advantages
    advantages = torch.tensor([1.0, -1.0, 0.7, -0.7, 0.2, -0.2])
    old = (our_logps + 0.05 * torch.randn(our_logps.shape, generator=torch.Generator().manual_seed(1), dtype=our_logps.dtype)).float() * mask
    trl_loss = theirs._compute_loss(theirs.model, dict(inputs, advantages=advantages, old_logps=(old * mask).sum(1)))
    our_loss, metrics = ours.compute_loss(ours.model, dict(batch, advantages=advantages, old_per_token_logps=old),
                                          torch.tensor(6.0))
    print(f"{family}: loss ours {our_loss.item():.10f} trl {trl_loss.item():.10f}")
    # the sequence ratio moves by at most C x the log-prob tolerance above, times |A| * ratio (TRL's side is float32)
    ratio = torch.exp(((our_logps.float() - old) * mask).sum(1))
    bound = float(advantages.abs().max() * ratio.max()) * mask.sum(1).max().item() * 1e-5
    torch.testing.assert_close(our_loss.to(trl_loss.dtype), trl_loss, rtol=0, atol=bound)
    assert torch.isfinite(metrics["entropy"])


def test_old_and_reference_forwards_see_the_images(tmp_path):
    model, processor = build_vlm(family="idefics3")
    rows = colour_rows(4, format="prompt")
    # top_k: pi_old is a forward (not the sampler's log-probs); beta: a reference forward too
    args = _config(tmp_path, per_device_train_batch_size=4, num_iterations=2, beta=0.1, top_k=400)
    trainer = RLOOTrainer(model=model, reward_funcs=colour_reward, args=args, train_dataset=rows, processing_class=processor)
    (batch,) = trainer._generate_and_score(rows[:2], seed=0, indices=[0, 1])
    assert set(batch["model_inputs"]) == {"pixel_values", "pixel_attention_mask"} and batch["model_inputs"]["pixel_values"].shape[0] == 4
    assert torch.equal(batch["model_inputs"]["pixel_values"][0], batch["model_inputs"]["pixel_values"][1])  # a group shares its prompt's image
    with torch.no_grad():
        with_images = completion_logps(trainer.model, batch, 1.0, compute_entropy=False)[0]
        swapped = dict(batch, model_inputs={**batch["model_inputs"], "pixel_values": batch["model_inputs"]["pixel_values"].flip(0)})
        other_images = completion_logps(trainer.model, swapped, 1.0, compute_entropy=False)[0]
    mask = batch["completion_mask"].bool()
    assert (with_images - other_images)[mask].abs().max() > 1e-5  # the images matter to the tiny model
    torch.testing.assert_close(batch["old_per_token_logps"][mask], with_images[mask], rtol=0, atol=1e-5)
    torch.testing.assert_close(batch["ref_per_token_logps"][mask], with_images[mask], rtol=0, atol=1e-5)  # the reference = the initial policy


# ----------------------------------------------------------------------------- learning
def _prime_answer_format(model, processor, rows, seed: int, steps: int = 30) -> None:
    """Teach the answer format only: a colour word drawn at random (not the image's), then the end token."""
    rng = random.Random(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        chosen = rng.sample(rows, 16)
        batch = _answer_batch(processor, chosen, [rng.choice(list(COLOURS)) for _ in chosen])
        logps = completion_logps(model, batch, 1.0, compute_entropy=False)[0]
        loss = -(logps * batch["completion_mask"]).sum() / batch["completion_mask"].sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _answer_batch(processor, rows, answers) -> dict:
    from posttrain import row_images, vision_prompt_inputs

    tok = processor.tokenizer
    encoded = [vision_prompt_inputs(processor, row["prompt"], row_images(row)) for row in rows]
    completions = [tok(a + tok.eos_token, add_special_tokens=False)["input_ids"] for a in answers]
    rollout = RolloutBatch([ids for ids, _ in encoded], completions, [[0.0] * len(c) for c in completions], [False] * len(rows), 0,
                           extras={"model_inputs": [inputs for _, inputs in encoded]})
    return rollout_micro_batches(rollout, len(rows), tok.pad_token_id)[0]


@torch.no_grad()
def _p_right_colour(model, processor, rows) -> float:
    """Mean over ``rows`` of the probability of the right colour among the three (each answer's sequence probability, normalized)."""
    scores = []
    for colour in COLOURS:
        batch = _answer_batch(processor, rows, [colour] * len(rows))
        scores.append((completion_logps(model, batch, 1.0, compute_entropy=False)[0] * batch["completion_mask"]).sum(-1))
    target = torch.tensor([list(COLOURS).index(row["answer"]) for row in rows])
    return torch.stack(scores, 1).softmax(1).gather(1, target[:, None]).mean().item()


def test_rloo_learns_to_name_the_image_colour(tmp_path):
    seed = 0
    model, processor = build_vlm(family="idefics3", seed=2)
    train, held_out = colour_rows(64, seed=seed, format="prompt"), colour_rows(30, seed=1000 + seed, format="prompt")
    torch.manual_seed(seed)
    model.train()
    _prime_answer_format(model, processor, train, seed)
    model.eval()
    before = _p_right_colour(model, processor, held_out)
    args = _config(tmp_path, per_device_train_batch_size=32, num_generations=8, max_completion_length=3, max_steps=60, learning_rate=6e-3,
                   seed=seed, beta=0.0, logging_steps=10)
    trainer = RLOOTrainer(model=model, reward_funcs=colour_reward, args=args, train_dataset=colour_rows(64, seed=seed, format="prompt"),
                          processing_class=processor)
    trainer.train()
    trainer.model.eval()
    after = _p_right_colour(trainer.model, processor, held_out)
    rewards = [round(h["reward"], 2) for h in trainer.state.log_history if "reward" in h]
    print(f"p(right colour) {before:.3f} -> {after:.3f}; rewards {rewards}")
    assert after >= before + 0.09, (before, after, rewards)


# ----------------------------------------------------------------------------- Gemma 3 run-through, rewards see the images
def test_gemma3_trains_and_rewards_receive_the_images(tmp_path):
    model, processor = build_vlm(family="gemma3")
    seen = {}

    def reward(prompts, completions, images, answer, **kwargs):
        seen.update(prompt=prompts[0], images=images, n=len(completions))
        return colour_reward(completions, answer)

    args = _config(tmp_path, per_device_train_batch_size=4, num_generations=2, max_steps=2, beta=0.1, num_iterations=2, top_k=400,
                   freeze_vision_tower=True)
    trainer = RLOOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=colour_rows(8, format="prompt"), processing_class=processor)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    image_part = next(p for p in seen["prompt"][0]["content"] if p["type"] == "image")
    assert image_part["image"].size == (32, 32)  # TRL: the prompt's image parts carry the images
    assert seen["n"] == 4 and len(seen["images"]) == 4 and seen["images"][0] == seen["images"][1]  # the column, shared by a group
    assert all(not p.requires_grad for p in vision_tower_of(trainer.model).parameters())


# ----------------------------------------------------------------------------- bad input
def test_image_column_on_a_text_only_model_names_the_row(tmp_path):
    from posttrain.testing.tiny_model import build_model, build_tokenizer

    tok = build_tokenizer()
    with pytest.raises(DataError, match=r"train_dataset row 0 has an image column 'images' \(vision-related data\) but the model .* is text-only") as info:
        RLOOTrainer(model=build_model(tok), reward_funcs=colour_reward, args=_config(tmp_path), train_dataset=colour_rows(4, format="prompt"),
                    processing_class=tok)
    assert "\n" not in str(info.value)


def test_missing_unreadable_and_mismatched_images_name_the_row(tmp_path):
    model, processor = build_vlm(family="idefics3")
    rows = colour_rows(6, format="prompt")
    missing = [dict(rows[0], images=[None])] + rows[1:]
    with pytest.raises(DataError, match=r"train_dataset row 0, column 'images': the image is missing"):
        RLOOTrainer(model=model, reward_funcs=colour_reward, args=_config(tmp_path), train_dataset=missing, processing_class=processor)
    bad_file = tmp_path / "broken.png"
    bad_file.write_bytes(b"not an image")
    trainer = RLOOTrainer(model=model, reward_funcs=colour_reward, args=_config(tmp_path), train_dataset=rows, processing_class=processor)
    with pytest.raises(DataError, match=r"train_dataset row 4, column 'images': the image cannot be read"):
        trainer._generate_and_score([rows[3], dict(rows[4], images=[str(bad_file)])], seed=0, indices=[3, 4])
    with pytest.raises(DataError, match=r"train_dataset row 5, column 'images': the image file .* does not exist"):
        trainer._generate_and_score([dict(rows[5], images=[str(tmp_path / "nowhere.png")])], seed=0, indices=[5])
    two_placeholders = dict(rows[1], prompt=[{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "?"}]}])
    with pytest.raises(DataError, match=r"train_dataset row 1: the messages have 2 image placeholder\(s\) .* but the row has 1 image") as info:
        trainer._generate_and_score([two_placeholders], seed=0, indices=[1])
    assert "\n" not in str(info.value)


def test_images_need_a_processor_and_no_tools(tmp_path):
    model, processor = build_vlm(family="idefics3")
    rows = colour_rows(4, format="prompt")
    with pytest.raises(ConfigError, match="not a processor: pass the model's processor"):
        RLOOTrainer(model=model, reward_funcs=colour_reward, args=_config(tmp_path), train_dataset=rows, processing_class=processor.tokenizer)

    def lookup(name: str) -> str:
        """Look a colour up.

        Args:
            name: The colour.
        """
        return name

    with pytest.raises(ConfigError, match="image column 'images' and tools="):
        RLOOTrainer(model=model, reward_funcs=colour_reward, args=_config(tmp_path), train_dataset=rows, processing_class=processor, tools=[lookup])


def test_text_rows_with_a_processor_train(tmp_path):
    """A processor for text-only prompts: '...Processor' object has no attribute 'pad_token_id' is gone (TRL's symptom)."""
    model, processor = build_vlm(family="idefics3")
    rows = [{"prompt": [{"role": "user", "content": "Name a colour."}], "answer": "red"} for _ in range(4)]
    trainer = RLOOTrainer(model=model, reward_funcs=colour_reward, args=_config(tmp_path, per_device_train_batch_size=4, max_steps=1),
                          train_dataset=rows, processing_class=processor)
    assert trainer.pad_token_id == processor.tokenizer.pad_token_id
    trainer.train()
    assert any("loss" in h for h in trainer.state.log_history)


def test_resume_with_queued_image_rollouts(tmp_path):
    """num_iterations=2 keeps a rollout (its pixel inputs included) in the producer's checkpointed queue; a resume loads it."""
    def make(max_steps):
        model, processor = build_vlm(family="idefics3")
        args = _config(tmp_path, per_device_train_batch_size=4, max_steps=max_steps, num_iterations=2, save_strategy="steps", save_steps=1)
        return RLOOTrainer(model=model, reward_funcs=colour_reward, args=args, train_dataset=colour_rows(8, format="prompt"), processing_class=processor)

    make(1).train()
    resumed = make(3)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 3
