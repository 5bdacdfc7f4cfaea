"""The method in miniature, as a test that can fail: a short in-process run on the tiny world must learn to use
the prompt on held-out shape x colour pairs, and the same run with captions shuffled across images must not.

Recall@5 is text->image retrieval on centred embeddings (chance 5 / eval rows); see gap3d.metrics.
"""

from miniature.experiment import score, train_in_process


def chance(world) -> float:
    return 5 / len(world.eval)


def test_a_short_run_retrieves_held_out_prompts_at_three_times_chance(short_run):
    config, world, trained = short_run
    metrics = score(config, world, trained)
    assert metrics["centred_recall@5"] >= 3 * chance(world), metrics
    assert metrics["prompt_cosine_mean"] > 0.2, metrics


def test_the_same_run_with_captions_shuffled_across_images_stays_near_chance(short_run):
    config, world, _ = short_run
    shuffled = world.train.shuffled_captions(seed=0)
    metrics = score(config, world, train_in_process(config, shuffled, config.train.max_steps))
    assert metrics["centred_recall@5"] < 2 * chance(world), metrics
    assert abs(metrics["prompt_cosine_mean"]) < 0.1, metrics
