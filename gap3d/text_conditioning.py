"""TRELLIS-text's condition: captions -> CLIP text tokens, and the release loaded with its negative condition.

TRELLIS's text pipeline encodes each caption with the CLIP text model its pipeline.json names (`text_cond_model`,
openai/clip-vit-large-patch14 for the releases): the tokenizer pads or cuts to 77 tokens and the condition is the
text model's last hidden state (B, 77, 768). Its classifier-free guidance contrasts with the empty caption's
encoding, not with zeros, so the Decoder gets that encoding as its negative condition.
"""

import torch

from gap3d.checkpoints import require_files, resolve
from gap3d.trellis import Decoder
from gap3d.trellis.config import PipelineConfig


class TextConditioner:
    """A CLIP text encoder (transformers CLIPTextModel + its tokenizer) from a checkpoint URI or hub name."""

    def __init__(self, uri: str, device: str | torch.device = "cpu"):
        from transformers import AutoTokenizer, CLIPTextModel

        directory = resolve(uri)
        require_files(directory, ["config.json"], what="CLIP text checkpoint")
        self.device = torch.device(device)
        self.model = CLIPTextModel.from_pretrained(directory).eval().requires_grad_(False).to(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        self.length = self.model.config.max_position_embeddings  # 77: TRELLIS pads every caption to it

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        """Captions -> (B, length, hidden) float32 condition tokens."""
        tokens = self.tokenizer(
            captions, max_length=self.length, padding="max_length", truncation=True, return_tensors="pt"
        )
        return self.model(input_ids=tokens["input_ids"].to(self.device)).last_hidden_state.float()


def load_text_trellis(
    uri: str, text_encoder: str | None = None, device: str | torch.device = "cpu", stages: str = "auto"
) -> tuple[TextConditioner, Decoder]:
    """A TRELLIS-text release and its text encoder (pipeline.json's text_cond_model unless `text_encoder` names
    another), the Decoder guided against the empty caption as TRELLIS's text pipeline is."""
    pipeline = PipelineConfig.load(resolve(uri))
    if pipeline.text_cond_model is None and text_encoder is None:
        raise ValueError(
            f"{uri} is a {pipeline.name} release, not a text-to-3D one (pipeline.json has no text_cond_model)"
        )
    conditioner = TextConditioner(text_encoder or pipeline.text_cond_model, device)
    decoder = Decoder.from_pretrained(uri, device, stages=stages, neg_cond=conditioner([""]))
    if decoder.cond_dim != conditioner.model.config.hidden_size:
        raise ValueError(
            f"{uri} takes {decoder.cond_dim}-dim condition tokens but its text encoder makes "
            f"{conditioner.model.config.hidden_size}-dim ones"
        )
    return conditioner, decoder
