"""TRELLIS image-to-3D in plain PyTorch, used as GAP3D's decoder: condition tokens (B, N, D) -> meshes.

Loads the TRELLIS-image-large release layout (pipeline.json + ckpts/) unchanged, from a directory or
an s3:// URI. `Decoder.generate` runs stage 1 (sparse structure) and, when the checkpoint has them,
stage 2 (structured latent -> coloured mesh). miniature.checkpoints.trellis writes the same architectures at toy sizes.
"""

from gap3d.trellis.decoder import Decoder, EmptyStructureError, SparseStructure
from gap3d.trellis.loading import CheckpointMismatchError
from gap3d.trellis.mesh_export import DEFAULT_TARGET_FACES, EXPORT_FORMATS, MEDIA_TYPES, export_mesh, load_mesh
from gap3d.trellis.stage2_inputs import TooManyVoxelsError

__all__ = [
    "CheckpointMismatchError",
    "DEFAULT_TARGET_FACES",
    "Decoder",
    "EXPORT_FORMATS",
    "EmptyStructureError",
    "MEDIA_TYPES",
    "SparseStructure",
    "TooManyVoxelsError",
    "export_mesh",
    "load_mesh",
]
