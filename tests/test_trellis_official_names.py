"""The release's architecture args build modules whose state-dict names and shapes are those of the
official TRELLIS checkpoints, so the released safetensors load unchanged.

The expected names below were written out by hand from the public TRELLIS model code
(trellis/models/sparse_structure_flow.py, sparse_structure_vae.py, modules/transformer/modulated.py,
modules/attention/modules.py), independently of our implementation. Built on the meta device.
"""

from gap3d.trellis.factory import OFFICIAL_SPARSE_STRUCTURE_DECODER_ARGS, OFFICIAL_SPARSE_STRUCTURE_FLOW_ARGS
from gap3d.trellis.loading import build_model


def shapes(model) -> dict[str, tuple[int, ...]]:
    return {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}


def official_flow_shapes(width=1024, cond=1024, blocks=24, heads=16, channels=8, grid=16, mlp=4096) -> dict:
    expected = {
        "pos_emb": (grid**3, width),
        "t_embedder.mlp.0.weight": (width, 256),
        "t_embedder.mlp.0.bias": (width,),
        "t_embedder.mlp.2.weight": (width, width),
        "t_embedder.mlp.2.bias": (width,),
        "input_layer.weight": (width, channels),
        "input_layer.bias": (width,),
        "out_layer.weight": (channels, width),
        "out_layer.bias": (channels,),
    }
    head_dim = width // heads
    for i in range(blocks):
        block = {
            "norm2.weight": (width,),
            "norm2.bias": (width,),
            "self_attn.to_qkv.weight": (3 * width, width),
            "self_attn.to_qkv.bias": (3 * width,),
            "self_attn.q_rms_norm.gamma": (heads, head_dim),
            "self_attn.k_rms_norm.gamma": (heads, head_dim),
            "self_attn.to_out.weight": (width, width),
            "self_attn.to_out.bias": (width,),
            "cross_attn.to_q.weight": (width, width),
            "cross_attn.to_q.bias": (width,),
            "cross_attn.to_kv.weight": (2 * width, cond),
            "cross_attn.to_kv.bias": (2 * width,),
            "cross_attn.to_out.weight": (width, width),
            "cross_attn.to_out.bias": (width,),
            "mlp.mlp.0.weight": (mlp, width),
            "mlp.mlp.0.bias": (mlp,),
            "mlp.mlp.2.weight": (width, mlp),
            "mlp.mlp.2.bias": (width,),
            "adaLN_modulation.1.weight": (6 * width, width),
            "adaLN_modulation.1.bias": (6 * width,),
        }
        expected.update({f"blocks.{i}.{key}": shape for key, shape in block.items()})
    return expected


def resblock(prefix: str, width: int) -> dict:
    return {
        f"{prefix}.norm1.weight": (width,),
        f"{prefix}.norm1.bias": (width,),
        f"{prefix}.conv1.weight": (width, width, 3, 3, 3),
        f"{prefix}.conv1.bias": (width,),
        f"{prefix}.norm2.weight": (width,),
        f"{prefix}.norm2.bias": (width,),
        f"{prefix}.conv2.weight": (width, width, 3, 3, 3),
        f"{prefix}.conv2.bias": (width,),
    }


def official_decoder_shapes() -> dict:
    expected = {
        "input_layer.weight": (512, 8, 3, 3, 3),
        "input_layer.bias": (512,),
        **resblock("middle_block.0", 512),
        **resblock("middle_block.1", 512),
        **resblock("blocks.0", 512),
        **resblock("blocks.1", 512),
        "blocks.2.conv.weight": (128 * 8, 512, 3, 3, 3),
        "blocks.2.conv.bias": (128 * 8,),
        **resblock("blocks.3", 128),
        **resblock("blocks.4", 128),
        "blocks.5.conv.weight": (32 * 8, 128, 3, 3, 3),
        "blocks.5.conv.bias": (32 * 8,),
        **resblock("blocks.6", 32),
        **resblock("blocks.7", 32),
        "out_layer.0.weight": (32,),
        "out_layer.0.bias": (32,),
        "out_layer.2.weight": (1, 32, 3, 3, 3),
        "out_layer.2.bias": (1,),
    }
    return expected


def test_official_sparse_structure_flow_args_give_the_official_state_dict():
    model = build_model({"name": "SparseStructureFlowModel", "args": OFFICIAL_SPARSE_STRUCTURE_FLOW_ARGS}, device="meta")
    assert shapes(model) == official_flow_shapes()


def test_official_sparse_structure_decoder_args_give_the_official_state_dict():
    model = build_model({"name": "SparseStructureDecoder", "args": OFFICIAL_SPARSE_STRUCTURE_DECODER_ARGS}, device="meta")
    assert shapes(model) == official_decoder_shapes()

