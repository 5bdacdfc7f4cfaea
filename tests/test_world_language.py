"""tiny://vlm has learned the world's language from the training pairs only, and reads held-out captions right."""

import json

import pytest
from transformers import AutoModelForImageTextToText, AutoTokenizer

from miniature.checkpoints.encoders import write_tiny_vlm
from miniature.checkpoints.world_language import (
    LANGUAGE_RECORD,
    LanguageRecipe,
    answer_accuracy,
    dialogues,
    world_pairs,
)
from miniature.world import HELD_OUT, TEMPLATES


def _load(path):
    return AutoModelForImageTextToText.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def test_the_recipe_shows_the_vlm_no_held_out_pair(tiny_checkpoints):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints["vlm"])
    input_ids, _, labels = dialogues(tokenizer, world_pairs("train"))
    answers = {tokenizer.decode(row[row != -100], skip_special_tokens=True) for row in labels}
    assert answers == {f"{color} {shape}" for shape, color in world_pairs("train")}
    assert not answers & {f"{color} {shape}" for shape, color in HELD_OUT}
    assert set(world_pairs("eval")) == HELD_OUT and len(input_ids) == len(answers) * len(TEMPLATES)


def test_the_taught_vlm_names_colour_and_shape_of_held_out_captions(tiny_checkpoints):
    model, tokenizer = _load(tiny_checkpoints["vlm"])
    assert answer_accuracy(model, tokenizer, world_pairs("eval")) >= 0.95


def test_a_random_vlm_cannot_name_them(tmp_path):
    model, tokenizer = _load(write_tiny_vlm(tmp_path / "random"))
    assert answer_accuracy(model, tokenizer, world_pairs("eval")) <= 0.05


def test_the_record_holds_the_recipe_the_curve_and_the_held_out_answers(tiny_checkpoints):
    record = json.loads((tiny_checkpoints["vlm"] / LANGUAGE_RECORD).read_text())
    assert record["recipe"] == LanguageRecipe().__dict__
    losses = [entry["loss"] for entry in record["loss_curve"]]
    assert losses[-1] < 0.05 < losses[0]
    assert record["answer_accuracy"]["eval"] >= 0.95


@pytest.mark.parametrize("field", [dict(steps=-1), dict(batch_size=0), dict(lr=0.0)])
def test_a_recipe_out_of_range_is_refused(field):
    with pytest.raises(ValueError, match="LanguageRecipe"):
        LanguageRecipe(**field)
