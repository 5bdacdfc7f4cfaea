"""What features depend on: the encoders and settings that wrote them, and the shapes that follow from them."""

from gap3d.build import encoder_shapes
from gap3d.checkpoints import fingerprint, transformers_config
from gap3d.config import Gap3DConfig
from gap3d.features.format import FeatureManifest


def soft_token_mode(config: Gap3DConfig) -> str:
    """The soft-token mode: "prompt_cache" when the soft tokens train, "soft_latents" when they are frozen."""
    return "prompt_cache" if config.vlm.trainable else "soft_latents"


def encoder_identity(config: Gap3DConfig) -> dict:
    """What features depend on; training refuses features whose identity differs from its config's.

    The encoders count by content (gap3d.checkpoints.fingerprint: config and weights), not by where they are stored.
    """
    identity = {
        "vlm": fingerprint(config.vlm.path),
        "prompt_template": config.vlm.prompt_template,
        "dino": fingerprint(config.dino.path),
        "dino_image_size": config.dino.image_size,
        "soft_token_mode": soft_token_mode(config),
    }
    if not config.vlm.trainable:
        identity.update(
            num_soft_tokens=config.vlm.num_soft_tokens,
            soft_token_init_seed=config.vlm.init_seed,
            soft_token_init_scale=config.vlm.init_scale,
        )
    return identity


def expected_manifest(config: Gap3DConfig) -> FeatureManifest:
    """The manifest (encoder identity and tensor shapes, no shards yet) of the features `config` produces.

    Shapes come from the checkpoints' config.json; the identity hashes their files (no weights are loaded).
    """
    shapes = encoder_shapes(config)
    tokens = shapes["num_special_tokens"] + shapes["grid_size"] ** 2
    manifest = FeatureManifest(encoders=encoder_identity(config), dino_shape=[tokens, shapes["token_dim"]])
    if soft_token_mode(config) == "prompt_cache":
        text = transformers_config(config.vlm.path).get_text_config()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        manifest.cache_shape = [text.num_hidden_layers, 2, text.num_key_value_heads, head_dim]
    else:
        manifest.latents_shape = [shapes["num_cond_tokens"], shapes["cond_dim"]]
    return manifest


def check_compatible(manifest: FeatureManifest, config: Gap3DConfig) -> None:
    """Raise ValueError naming every encoder setting that differs between these features and `config`."""
    expected = expected_manifest(config)
    paths = {"vlm": config.vlm.path, "dino": config.dino.path}
    differences = [
        f"{key}: features have {manifest.encoders.get(key)!r}, config has {value!r}"
        + (f" (the checkpoint at {paths[key]})" if key in paths else "")
        for key, value in expected.encoders.items()
        if manifest.encoders.get(key) != value
    ]
    if differences:
        raise ValueError("features were written by different encoders than configured; " + "; ".join(differences))
    if list(manifest.dino_shape) != expected.dino_shape:
        raise ValueError(
            f"features hold DINOv2 targets of shape {manifest.dino_shape} but the configured encoders give "
            f"{expected.dino_shape}"
        )
