"""Prompt encoder: a frozen transformers VLM with `s` learnable soft tokens appended after the prompt.

The condition for the aligner is the VLM's last-layer hidden states at the soft-token positions,
(B, s, d_vlm). Prompts are left-padded so the soft tokens sit at the same last `s` positions of every row;
position ids count only real tokens, so a batched prompt gives the same latents as the prompt alone.

The VLM is causal and the soft tokens come after the prompt, so the prompt's hidden states never depend on
them. `encode_prompt_cache` runs the prompt once and keeps its per-layer key/value cache; `soft_latents`
runs only the soft tokens on top of stored caches. That is exact, and lets training backpropagate into the
soft tokens without re-encoding prompts every epoch.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gap3d.checkpoints import require_files, resolve
from gap3d.config import PromptEncoderConfig
from gap3d.dino import resolve_dtype

logger = logging.getLogger(__name__)


class PromptTooLongError(ValueError):
    """A prompt tokenises to more than vlm.max_prompt_tokens."""


@dataclass
class PromptCache:
    """One prompt's per-layer key/value cache, storable per sample."""

    key_values: torch.Tensor  # (layers, 2, kv_heads, L, head_dim): keys then values, RoPE already applied
    next_position: int  # position id of the first soft token (prompt length, or more after image tokens)


@dataclass
class PromptBatch:
    """Tokenised, left-padded prompts ready for the VLM."""

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L), 0 on left padding
    pixel_values: torch.Tensor | None = None  # processor-specific layout (Qwen-VL: flattened patches)
    image_grid_thw: torch.Tensor | None = None  # (num_images, 3) for Qwen-VL-family processors


class PromptEncoder(nn.Module):
    """Frozen VLM + soft tokens -> (B, s, d_vlm) condition."""

    def __init__(
        self, vlm: nn.Module, tokenizer, image_processor, chat_template: str | None, config: PromptEncoderConfig
    ):
        super().__init__()
        self.config = config
        self.vlm = vlm.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        if not self.chat_template:
            raise ValueError(
                "the VLM checkpoint has no chat template (tokenizer_config.json, chat_template.jinja or "
                "chat_template.json)"
            )
        table = self.embed_tokens.weight.detach().float()
        # Start at the statistics of the vocabulary embeddings, like newly added tokens; a smaller spread lets the
        # prompt, rather than each soft token's own embedding, dominate what the soft positions carry.
        noise = torch.randn(
            config.num_soft_tokens, table.shape[1], generator=torch.Generator().manual_seed(config.init_seed)
        )
        init = table.mean(0) + config.init_scale * table.std(0) * noise
        self.soft_tokens = nn.Parameter(init.to(table.dtype), requires_grad=config.trainable)  # (s, d_vlm)
        self.hidden_size = table.shape[1]
        self.uses_mrope = hasattr(self.vlm.model, "get_rope_index")

    @classmethod
    def from_pretrained(cls, config: PromptEncoderConfig, device: str | torch.device = "cpu") -> "PromptEncoder":
        """Load the VLM, tokenizer and image processor from config.path (local dir or s3:// URI)."""
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        path = resolve(config.path)
        require_files(path, ["config.json", "tokenizer_config.json"], what="VLM checkpoint")
        device = torch.device(device)
        vlm = AutoModelForImageTextToText.from_pretrained(path, dtype=resolve_dtype(config.dtype, device))
        tokenizer = AutoTokenizer.from_pretrained(path)
        image_processor = (
            AutoImageProcessor.from_pretrained(path) if (path / "preprocessor_config.json").is_file() else None
        )
        return cls(vlm, tokenizer, image_processor, _read_chat_template(path), config).to(device)

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.vlm.get_input_embeddings()

    @property
    def num_layers(self) -> int:
        return self.vlm.config.get_text_config().num_hidden_layers

    def tokenize(self, prompts: list[str], images: list | None = None) -> PromptBatch:
        """Chat-template, tokenise and left-pad prompts; `images[i]` (PIL or None) joins prompt i."""
        images = images if images is not None else [None] * len(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(images)} images")
        texts, pixel_values, grids = [], [], []
        for prompt, image in zip(prompts, images):
            text = self._chat_text(prompt, with_image=image is not None)
            if image is not None:
                text, pixels, grid = self._expand_image(text, image)
                pixel_values.append(pixels)
                grids.append(grid)
            texts.append(text)
        ids = [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
        too_long = [len(row) for row in ids if len(row) > self.config.max_prompt_tokens]
        if too_long:
            raise PromptTooLongError(
                f"prompt of {too_long[0]} tokens exceeds vlm.max_prompt_tokens={self.config.max_prompt_tokens}"
            )
        length = max(len(row) for row in ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(ids), length), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), length), dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, length - len(row) :] = torch.tensor(row)
            attention_mask[i, length - len(row) :] = 1
        return PromptBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=torch.cat(pixel_values) if pixel_values else None,
            image_grid_thw=torch.cat(grids) if grids else None,
        )

    def count_tokens(self, prompt: str, image_size: tuple[int, int] | None = None) -> int:
        """Tokens `tokenize` makes of `prompt` (with an image of `image_size` = (width, height)), without the image
        itself: what a server checks against vlm.max_prompt_tokens before it accepts a request."""
        text = self._chat_text(prompt, with_image=image_size is not None)
        count = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if image_size is None:
            return count
        if self.image_processor is None or not hasattr(self.image_processor, "get_number_of_image_patches"):
            raise ValueError("image prompts need a Qwen-VL-family image processor")
        width, height = image_size
        patches = self.image_processor.get_number_of_image_patches(height, width, {})
        return count - 1 + patches // self.image_processor.merge_size**2  # the one placeholder becomes the image's

    def _chat_text(self, prompt: str, with_image: bool) -> str:
        text = self.config.prompt_template.format(caption=prompt)
        return chat_text(self.tokenizer, self.chat_template, text, with_image)

    def _expand_image(self, text: str, image) -> tuple[str, torch.Tensor, torch.Tensor]:
        """Replace the one image placeholder by as many tokens as the vision tower emits (Qwen-VL family)."""
        if self.image_processor is None:
            raise ValueError(
                "this VLM checkpoint has no image processor (preprocessor_config.json); prompts must be text-only"
            )
        pixels = self.image_processor(images=[image], return_tensors="pt")
        if "image_grid_thw" not in pixels:
            raise ValueError(
                f"image prompts need a Qwen-VL-family image processor; got {type(self.image_processor).__name__}"
            )
        grid = pixels["image_grid_thw"]  # (1, 3)
        num_tokens = int(grid.prod()) // self.image_processor.merge_size**2
        image_token = self.tokenizer.convert_ids_to_tokens(self.vlm.config.image_token_id)
        if text.count(image_token) != 1:
            raise ValueError(f"the chat template must place exactly one {image_token} per image")
        return text.replace(image_token, image_token * num_tokens), pixels["pixel_values"], grid

    def _prompt_positions(self, batch: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Position ids of the prompt tokens ((3, B, L) with M-RoPE, else (B, L)) and each row's next position (B,)."""
        mask = batch.attention_mask
        if self.uses_mrope:
            token_types = (batch.input_ids == self.vlm.config.image_token_id).int()
            positions, _ = self.vlm.model.get_rope_index(
                batch.input_ids, token_types, image_grid_thw=batch.image_grid_thw, attention_mask=mask
            )
            next_position = positions.amax(dim=(0, 2)) + 1
            return positions, next_position
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return positions, mask.sum(-1)

    def _soft_positions(self, next_position: torch.Tensor) -> torch.Tensor:
        """Position ids of the soft tokens, following each prompt: (3, B, s) with M-RoPE, else (B, s)."""
        positions = next_position[:, None] + torch.arange(self.config.num_soft_tokens, device=next_position.device)
        return positions.expand(3, -1, -1) if self.uses_mrope else positions

    def _soft_embeds(self, batch_size: int) -> torch.Tensor:
        return self.soft_tokens[None].expand(batch_size, -1, -1)  # (B, s, d_vlm)

    def forward(self, prompts: list[str], images: list | None = None) -> torch.Tensor:
        """Full forward of prompt + soft tokens -> (B, s, d_vlm) condition."""
        batch = self.tokenize(prompts, images)
        device = self.soft_tokens.device
        ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        batch = PromptBatch(ids, mask, _to(batch.pixel_values, device), _to(batch.image_grid_thw, device))
        prompt_positions, next_position = self._prompt_positions(batch)
        soft = self._soft_embeds(len(prompts))
        out = self.vlm.model(
            inputs_embeds=torch.cat([self.embed_tokens(ids), soft], dim=1),  # (B, L + s, d_vlm)
            attention_mask=torch.cat(
                [mask, torch.ones(mask.shape[0], soft.shape[1], dtype=mask.dtype, device=device)], dim=1
            ),
            position_ids=torch.cat([prompt_positions, self._soft_positions(next_position)], dim=-1),
            pixel_values=batch.pixel_values,
            image_grid_thw=batch.image_grid_thw,
            use_cache=False,
        )
        return out.last_hidden_state[:, -soft.shape[1] :]  # (B, s, d_vlm)

    @torch.no_grad()
    def encode_prompt_cache(self, prompts: list[str], images: list | None = None) -> list[PromptCache]:
        """Run prompts alone through the VLM; return each one's key/value cache without padding."""
        batch = self.tokenize(prompts, images)
        device = self.soft_tokens.device
        ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        batch = PromptBatch(ids, mask, _to(batch.pixel_values, device), _to(batch.image_grid_thw, device))
        positions, next_position = self._prompt_positions(batch)
        out = self.vlm.model(
            inputs_embeds=self.embed_tokens(ids),
            attention_mask=mask,
            position_ids=positions,
            pixel_values=batch.pixel_values,
            image_grid_thw=batch.image_grid_thw,
            use_cache=True,
        )
        layers = [
            torch.stack([layer.keys, layer.values], dim=1) for layer in out.cache.layers
        ]  # each (B, 2, kv, L, hd)
        stacked = torch.stack(layers, dim=1)  # (B, layers, 2, kv_heads, L, head_dim)
        lengths = mask.sum(-1).tolist()
        return [
            PromptCache(
                key_values=stacked[i, :, :, :, stacked.shape[4] - n :].clone(), next_position=int(next_position[i])
            )
            for i, n in enumerate(lengths)
        ]

    def soft_latents(self, caches: list[PromptCache]) -> torch.Tensor:
        """Run only the soft tokens on top of stored prompt caches -> (B, s, d_vlm), differentiable in soft_tokens."""
        from transformers import DynamicCache

        device = self.soft_tokens.device
        length = max(c.key_values.shape[3] for c in caches)
        padded = torch.stack([_left_pad(c.key_values.to(device), length) for c in caches])  # (B, layers, 2, kv, L, hd)
        cache = DynamicCache(config=self.vlm.config.get_text_config())
        for layer in range(padded.shape[1]):
            cache.update(padded[:, layer, 0], padded[:, layer, 1], layer)
        prompt_mask = torch.stack([_left_pad_mask(c.key_values.shape[3], length) for c in caches]).to(device)
        batch_size, s = len(caches), self.config.num_soft_tokens
        next_position = torch.tensor([c.next_position for c in caches], device=device)
        out = self.vlm.model.language_model(
            inputs_embeds=self._soft_embeds(batch_size),
            attention_mask=torch.cat([prompt_mask, torch.ones(batch_size, s, dtype=torch.long, device=device)], dim=1),
            position_ids=self._soft_positions(next_position),
            cache=cache,
            use_cache=True,
        )
        return out.last_hidden_state  # (B, s, d_vlm)


def _to(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device)


def _left_pad(key_values: torch.Tensor, length: int) -> torch.Tensor:
    """(layers, 2, kv, L, hd) -> (layers, 2, kv, length, hd) with zeros on the left."""
    return torch.nn.functional.pad(key_values, (0, 0, length - key_values.shape[3], 0))


def chat_text(tokenizer, chat_template: str, text: str, with_image: bool = False) -> str:
    """The VLM's input for one user turn of `text` (an image placeholder first if `with_image`), up to the
    assistant's turn: what the prompt encoder sends, and what a VLM taught for it must read."""
    content = [{"type": "text", "text": text}]
    if with_image:
        content.insert(0, {"type": "image"})
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], chat_template=chat_template, tokenize=False, add_generation_prompt=True
    )


def _left_pad_mask(true_length: int, length: int) -> torch.Tensor:
    return torch.cat([torch.zeros(length - true_length, dtype=torch.long), torch.ones(true_length, dtype=torch.long)])


def _read_chat_template(path: Path) -> str | None:
    """The processor-level chat template of a checkpoint, if it ships one beside the tokenizer's."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").is_file():
        return json.loads((path / "chat_template.json").read_text())["chat_template"]
    return None
