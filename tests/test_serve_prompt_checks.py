"""What the Gateway checks before admission, in-process: the VLM's token count of a prompt (with an image's size,
not the image) and a face budget that never empties a mesh."""

import pytest
import trimesh
from PIL import Image

from gap3d.export import load_export
from gap3d.generation import load_prompt_encoder
from gap3d.trellis.mesh_export import export_mesh, load_mesh


@pytest.fixture(scope="module")
def prompt_encoder(serve_artifacts):
    encoder = load_prompt_encoder(load_export(serve_artifacts["export"], with_aligner=False))
    encoder.config.max_prompt_tokens = 10**6  # tokenize() refuses long prompts; count them here instead
    return encoder


@pytest.mark.parametrize(
    "prompt, size",
    [("a cone", None), ("word " * 100, None), ("a cube like this", (64, 48)), ("x", (640, 480)), ("y", (30, 2000))],
)
def test_the_token_count_is_what_tokenize_makes_of_the_prompt_and_image(prompt_encoder, prompt, size):
    images = None if size is None else [Image.new("RGB", size)]
    assert prompt_encoder.count_tokens(prompt, size) == prompt_encoder.tokenize([prompt], images).input_ids.shape[1]


@pytest.mark.parametrize("target_faces", [4, 8])
def test_a_face_budget_below_what_the_shape_keeps_still_exports_faces(target_faces):
    # Quadric decimation collapses this torus to no faces at all at these budgets.
    mesh = trimesh.creation.torus(1.0, 0.3, major_sections=32, minor_sections=16)
    assert len(load_mesh(export_mesh(mesh, "obj", target_faces), "obj").faces) > 0
