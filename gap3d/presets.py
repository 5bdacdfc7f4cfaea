"""Size presets of the library's config sections: the one registry of what `tiny` and `paper` mean.

`paper` is the authors' recipe, which is every section's dataclass defaults (PolyannaG/GAP3D). `tiny` keeps the
same code paths at toy sizes on tiny checkpoints (`tiny://`, a scheme the miniature package registers) and is the
embedded default of every job, test and benchmark. Shapes the encoders determine are not stated here (see
gap3d.build.derive_shapes). Each job's Ray resources have their own presets beside the job. Why the tiny values
are what they are, with the runs that chose them: docs/miniature.md.
"""

DEFAULT_PRESET = "tiny"

TINY = {
    # A small init_scale lets the prompt, not each soft token's own random embedding, dominate the soft positions.
    "vlm": {"path": "tiny://vlm", "num_soft_tokens": 8, "dtype": "float32", "init_scale": 0.1},
    # 112 px (8 x 8 patches): the object fills the frame, and 69 tokens train three times faster than 261.
    "dino": {"path": "tiny://dino", "image_size": 112, "dtype": "float32"},
    # Open cross-attention gates and absolute positions: a short CPU run cannot wait for closed gates to open.
    "aligner": {
        "hidden_size": 128,
        "depth": 4,
        "num_heads": 4,
        "null_condition": "learned",
        "cross_gate_init": 1.0,
        "absolute_positions": True,
    },
    # The patch grid carries the silhouette, so it gets most of the loss (the authors' weights give 60% to 5 tokens).
    "flow": {
        "time_schedule": "uniform",
        "sample_steps": 10,
        "cfg_scale": 2.0,
        "loss_weights": {"patches": 0.8, "cls": 0.1, "registers": 0.1},
    },
    # lr ten times the authors' suits the small aligner; the soft tokens keep the authors' absolute rate (x 0.1).
    # 1800 steps: with tiny://vlm taught the world's language, every shape composes on unseen pairs (docs/miniature.md).
    "train": {
        "global_batch_size": 16,
        "lr": 3e-3,
        "soft_token_lr_scale": 0.1,
        "min_lr": 1e-4,
        "warmup_ratio": 0.05,
        "max_steps": 1800,
        "ema_decay": 0.99,
        "precision": "fp32",
        "checkpoint_every": 600,
        "eval_every": 300,
        "log_every": 50,
        "eval_samples": 64,
    },
    "data": {"min_image_side": 64},
}

PRESETS = {"tiny": TINY, "paper": {}}
