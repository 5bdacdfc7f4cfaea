"""tiny://vlm knows the synthetic world's language before it is frozen, as a pretrained VLM knows its own.

A pretrained VLM reads "a cube in red" as a red cube: asked what the caption shows, it names both the colour and the
shape. A random tiny VLM does not, so its latents of a caption mix the two words in ways the aligner cannot take apart
on unseen pairs (docs/miniature.md). The recipe teaches the language model to answer "<colour> <shape>" to the chat
prompt the prompt encoder sends, on the captions of the training pairs only: no held-out pair reaches the VLM either,
and answering the held-out captions right (recorded at build time) shows it learned the words, not the pairs. The
vision tower stays random: the world's prompts are text.
"""

import itertools
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from gap3d.config import PromptEncoderConfig
from gap3d.prompt_encoder import chat_text
from miniature.checkpoints.encoders import write_tiny_vlm
from miniature.world import COLORS, HELD_OUT, SHAPES, TEMPLATES

logger = logging.getLogger(__name__)

LANGUAGE_RECORD = "language.json"


@dataclass(frozen=True)
class LanguageRecipe:
    steps: int = 400  # AdamW steps; the answer loss is below 0.01 by 200
    batch_size: int = 32  # dialogues a step, drawn with replacement
    lr: float = 3e-3
    seed: int = 0

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"LanguageRecipe needs steps >= 0, batch_size >= 1 and lr > 0, got {self}")


def world_pairs(split: str) -> list[tuple[str, str]]:
    """(shape, colour) pairs of the world's `split`: "train" or "eval" (the held-out pairs)."""
    return [(shape, color) for shape in SHAPES for color in COLORS if ((shape, color) in HELD_OUT) == (split == "eval")]


def chat_prompt(tokenizer, caption: str) -> str:
    """The text the prompt encoder sends the VLM for `caption` (the default prompt template), up to the assistant's
    turn."""
    return chat_text(tokenizer, tokenizer.chat_template, PromptEncoderConfig().prompt_template.format(caption=caption))


def dialogues(tokenizer, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every template's caption of `pairs` with its answer, left-padded: input ids, attention mask and labels (B, L);
    the labels are the answer's tokens, -100 elsewhere."""
    rows = []
    for (shape, color), template in itertools.product(pairs, TEMPLATES):
        prompt = tokenizer(chat_prompt(tokenizer, template.format(color=color, shape=shape)), add_special_tokens=False)
        answer = tokenizer(f"{color} {shape}{tokenizer.eos_token}", add_special_tokens=False)
        rows.append((prompt["input_ids"], answer["input_ids"]))
    length = max(len(p) + len(a) for p, a in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, (prompt, answer) in enumerate(rows):
        sequence = prompt + answer
        input_ids[i, length - len(sequence) :] = torch.tensor(sequence)
        mask[i, length - len(sequence) :] = 1
        labels[i, length - len(answer) :] = torch.tensor(answer)
    return input_ids, mask, labels


def teach_world_language(model, tokenizer, recipe: LanguageRecipe) -> list[dict]:
    """Train `model`'s language model in place on the training pairs' dialogues; returns the loss curve."""
    input_ids, mask, labels = dialogues(tokenizer, world_pairs("train"))
    generator = torch.Generator().manual_seed(recipe.seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.lr, weight_decay=0.0)
    model.train()
    curve = []
    for step in range(recipe.steps):
        index = torch.randint(len(input_ids), (recipe.batch_size,), generator=generator)
        rows = mask[index]
        positions = (rows.cumsum(-1) - 1).clamp(min=0).expand(3, -1, -1)  # (3, B, L): M-RoPE, real tokens counted
        loss = model(input_ids=input_ids[index], attention_mask=rows, position_ids=positions, labels=labels[index]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == recipe.steps - 1:
            curve.append({"step": step, "loss": round(loss.item(), 5)})
    model.eval()
    return curve


@torch.no_grad()
def answer_accuracy(model, tokenizer, pairs: list[tuple[str, str]]) -> float:
    """Share of `pairs`' captions (every template) that `model` answers exactly "<colour> <shape>", greedily."""
    expected = [f"{color} {shape}" for (shape, color), _ in itertools.product(pairs, TEMPLATES)]
    input_ids, mask, labels = dialogues(tokenizer, pairs)
    prompt_mask = mask * (labels == -100)  # the prompt without its answer, still left-padded per row
    right = 0
    for i, want in enumerate(expected):
        ids = input_ids[i][prompt_mask[i].bool()][None]  # (1, L_i)
        out = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        right += tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip() == want
    return right / len(expected)


def write_world_vlm(out_dir: str | Path, recipe: LanguageRecipe = LanguageRecipe()) -> Path:
    """Write the tiny VLM, taught the world's language, to `out_dir`, with its record (LANGUAGE_RECORD)."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    start = time.perf_counter()
    out_dir = write_tiny_vlm(out_dir)
    model = AutoModelForImageTextToText.from_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    torch.manual_seed(recipe.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread sums in one order: the same weights on any machine, so the same identity
    try:
        curve = teach_world_language(model, tokenizer, recipe)
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(out_dir)
    # The record is part of the checkpoint's identity (gap3d.checkpoints.fingerprint), so it holds no timing.
    record = {
        "recipe": asdict(recipe),
        "loss_curve": curve,
        "answer_accuracy": {
            split: answer_accuracy(model, tokenizer, world_pairs(split)) for split in ("train", "eval")
        },
    }
    (out_dir / LANGUAGE_RECORD).write_text(json.dumps(record, indent=2))
    logger.info(
        "tiny://vlm taught the world's language in %.0f s: %s", time.perf_counter() - start, record["answer_accuracy"]
    )
    return out_dir
