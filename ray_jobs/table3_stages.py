"""The Ray Data stages of the 3D evaluation (ray_jobs/evaluate_3d.py) and the job's config section, `table3`.

GenerateArms turns each eval-set row into one asset per arm (the same seed for every arm, from the row's index) and
renders it per the protocol; ExtractFeatures turns the ground-truth renders and each arm's into Inception-v3 and
DINOv2 features of the FD views and CLIP cosines of every view with the caption. Both are actor classes: each
actor loads its models once and runs on a GPU where the section asks for one.
"""

import io
from dataclasses import dataclass

import numpy as np
import torch

from gap3d.build import build_aligner
from gap3d.evalset import decode_png, png, row_targets
from gap3d.export import AlignerExport, apply_soft_tokens, load_export
from gap3d.fidelity import ClipScorer, DinoExtractor, InceptionExtractor
from gap3d.generation import align, check_decoder_matches
from gap3d.prompt_encoder import PromptEncoder
from gap3d.render import Protocol, mesh_colors, render_views
from gap3d.text_conditioning import load_text_trellis
from gap3d.trellis import Decoder

THUMBNAIL = 160  # contact-sheet cell side in pixels


@dataclass
class Table3Settings:
    """The `table3` section: metric extractors (checkpoints by hub name, URI or tiny://), arms and resources."""

    inception: str = "timm/inception_v3.tv_in1k"  # torchvision's Inception-v3 weights; "" skips Inception FD/KD
    dino: str = "facebook/dinov2-large"  # DINOv2 ViT-L/14 (no registers), CLS after the final norm
    dino_image_size: int = 518  # DINOv2 feature input side
    clip: str = "openai/clip-vit-base-patch32"  # open_clip ViT-B-32 `openai`'s weights; "" skips the CLIP score
    untrained_arm: bool = False  # also decode an untrained aligner's tokens (what training adds)
    trellis_text: str = ""  # a TRELLIS-text release: the TRELLIS-text arm; "" leaves it out
    text_encoder: str = ""  # overrides the text release's text_cond_model
    decoder_stages: str = "auto"  # TRELLIS stages per asset, as Decoder.from_pretrained(stages=): auto, coarse, full
    actors: int = 1  # actors per stage; both stages' actors and the Parquet reads must fit the cluster's CPUs together
    num_cpus: float = 1.0  # CPUs per actor
    num_gpus: float = 0.0  # GPUs per actor
    batch_size: int = 4  # eval-set rows an actor takes at a time
    supersample: int = 2  # render at this multiple of the protocol's side, then filter down
    sheet_rows: int = 8  # assets shown in the contact sheet

    def __post_init__(self):
        for name in ("actors", "batch_size", "supersample", "dino_image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"table3.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_gpus < 0 or self.num_cpus <= 0 or self.sheet_rows < 0:
            raise ValueError(
                f"table3.num_gpus and table3.sheet_rows must be >= 0, got {self.num_gpus}, {self.sheet_rows}"
            )
        if self.decoder_stages not in ("auto", "coarse", "full"):
            raise ValueError(f"table3.decoder_stages must be auto, coarse or full, got {self.decoder_stages!r}")
        if not self.dino:
            raise ValueError(
                "table3.dino must name a DINOv2 checkpoint: FD and KD on DINOv2 features are always reported"
            )

    def arms(self) -> list[str]:
        """The arms this run generates, the reference first."""
        return ["reference", "gap3d"] + ["untrained"] * self.untrained_arm + ["trellis_text"] * bool(self.trellis_text)


TABLE3_PRESETS = {
    # The miniature: tiny encoders' features, a tiny random CLIP (plumbing only), the untrained arm as a floor;
    # stage 1 alone, as three arms' full decodes and renders of their 10-55k-face meshes take minutes on 2 cores.
    # Two actors a stage at half a CPU each: generating and rendering is nearly all of the work, one per core.
    "tiny": Table3Settings(
        inception="",
        dino="tiny://dino",
        dino_image_size=112,
        clip="tiny://clip",
        untrained_arm=True,
        decoder_stages="coarse",
        actors=2,
        num_cpus=0.5,
    ),
    "paper": Table3Settings(actors=8, num_gpus=1.0, batch_size=8),
}
TABLE3_SECTION = {"table3": (Table3Settings, TABLE3_PRESETS)}


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class GenerateArms:
    """Eval-set rows -> each arm's renders (PNG per protocol view) and whether its asset came out empty."""

    def __init__(self, checkpoint: str, trellis: str, settings: Table3Settings, protocol: dict, seed: int):
        device = _device()
        self.export = load_export(checkpoint, device)
        config = self.export.config
        self.encoder = PromptEncoder.from_pretrained(config.vlm, device).eval()
        self.initial_tokens = self.encoder.soft_tokens.detach().clone()  # what an untrained run starts from
        self.decoder = Decoder.from_pretrained(trellis, device, stages=settings.decoder_stages)
        check_decoder_matches(self.export, self.decoder)
        self.untrained = None
        if settings.untrained_arm:
            aligner = build_aligner(config, seed=config.train.seed).to(device).eval()
            self.untrained = AlignerExport(config, step=0, soft_tokens=None, aligner=aligner)
        self.text = (
            load_text_trellis(settings.trellis_text, settings.text_encoder or None, device)
            if settings.trellis_text
            else None
        )
        self.protocol, self.settings, self.seed = Protocol(**protocol), settings, seed

    def _aligned(self, export: AlignerExport, soft_tokens: torch.Tensor, captions: list[str], seeds: list[int]):
        apply_soft_tokens(self.encoder, soft_tokens)
        with torch.no_grad():
            latents = self.encoder(captions)
        flow = self.export.config.flow
        return align(export, latents, seeds, flow.sample_steps, flow.cfg_scale)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        captions = [str(c) for c in batch["caption"]]
        seeds = [self.seed + int(index) for index in batch["index"]]
        trained_tokens = self.export.soft_tokens if self.export.soft_tokens is not None else self.initial_tokens
        conds = {
            "reference": torch.stack(
                [
                    torch.from_numpy(row_targets({"dino": d, "dino_shape": s}))
                    for d, s in zip(batch["dino"], batch["dino_shape"])
                ]
            ),
            "gap3d": self._aligned(self.export, trained_tokens, captions, seeds),
        }
        if self.untrained is not None:
            conds["untrained"] = self._aligned(self.untrained, self.initial_tokens, captions, seeds)
        meshes = {arm: self.decoder.generate(cond, seed=seeds, allow_empty=True) for arm, cond in conds.items()}
        if self.text is not None:
            conditioner, decoder = self.text
            meshes["trellis_text"] = decoder.generate(conditioner(captions), seed=seeds, allow_empty=True)
        out = {key: batch[key] for key in ("index", "key", "caption", "renders")}
        for arm, arm_meshes in meshes.items():
            out[f"{arm}_renders"] = np.array(
                [[png(image) for image in self._render(mesh)] for mesh in arm_meshes], dtype=object
            )
            out[f"{arm}_empty"] = np.array([len(mesh.faces) == 0 for mesh in arm_meshes])
        return out

    def _render(self, mesh) -> list[np.ndarray]:
        return render_views(mesh.vertices, mesh.faces, mesh_colors(mesh), self.protocol, self.settings.supersample)


class ExtractFeatures:
    """Rendered rows -> per source (ground truth and each arm): Inception and DINOv2 features of the FD views,
    CLIP cosines of every view with the caption, and a thumbnail of view 0 for the contact sheet's rows."""

    def __init__(self, settings: Table3Settings, arms: list[str], protocol: dict):
        device = _device()
        self.inception = InceptionExtractor(settings.inception, device) if settings.inception else None
        self.dino = DinoExtractor(settings.dino, settings.dino_image_size, device)
        self.clip = ClipScorer(settings.clip, device) if settings.clip else None
        self.sources = ["ground_truth", *arms]
        self.protocol, self.settings = Protocol(**protocol), settings

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {key: batch[key] for key in batch if key.endswith("_empty") or key in ("index", "key", "caption")}
        for source in self.sources:
            views = [
                [decode_png(data) for data in row]
                for row in batch["renders" if source == "ground_truth" else f"{source}_renders"]
            ]
            fd_views = [image for row in views for image in (row[i] for i in self.protocol.fd_views)]
            per_row = len(self.protocol.fd_views)
            out[f"{source}_dino"] = self.dino(fd_views).astype(np.float32).reshape(len(views), per_row, -1)
            if self.inception is not None:
                out[f"{source}_inception"] = (
                    self.inception(fd_views).astype(np.float32).reshape(len(views), per_row, -1)
                )
            if self.clip is not None:
                out[f"{source}_clip"] = np.stack(
                    [self.clip.cosines(row, str(caption)) for row, caption in zip(views, batch["caption"])]
                )
            out[f"{source}_thumb"] = np.array(
                [
                    _thumbnail(row[0]) if int(index) < self.settings.sheet_rows else b""
                    for row, index in zip(views, batch["index"])
                ],
                dtype=object,
            )
        return out


def _thumbnail(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).resize((THUMBNAIL, THUMBNAIL), Image.Resampling.LANCZOS).save(buffer, format="PNG")
    return buffer.getvalue()
