"""Size presets of the library's config sections: the one registry of what `tiny` and `paper` mean.

`paper` is the authors' recipe, which is every section's dataclass defaults (PolyannaG/GAP3D). `tiny` keeps the
same code paths at toy sizes, on tiny random checkpoints built locally (gap3d.tiny), and is the embedded
default of every job, test and benchmark. Each job's Ray resources have their own presets beside the job.
"""

DEFAULT_PRESET = "tiny"

TINY = {
    # init_scale 0.1: soft tokens start near the mean embedding, so the prompt rather than each token's own
    # random embedding dominates what the soft positions carry (between-prompt spread 0.27 of the latents' std,
    # against 0.12 at 1.0).
    "vlm": {"path": "tiny://vlm", "num_soft_tokens": 8, "dtype": "float32", "init_scale": 0.1},
    # 112 px (8 x 8 patches): the object fills the frame, and 69 tokens train three times faster than 261.
    "dino": {"path": "tiny://dino", "image_size": 112, "dtype": "float32"},
    # Open cross-attention gates and absolute positions: see AlignerConfig and benchmarks/conditioning.py.
    "aligner": {
        "token_dim": 64, "grid_size": 8, "cond_dim": 64, "num_cond_tokens": 8,
        "hidden_size": 128, "depth": 4, "num_heads": 4, "null_condition": "learned",
        "cross_gate_init": 1.0, "absolute_positions": True,
    },
    # Uniform t, as the authors train: logit-normal t rarely lands near t = 1, where sampling starts, and a
    # 300-step run then samples far from its targets (token cosine 0.63 against 0.86 with uniform t, both at
    # lr 1e-3; lr 3e-3 reaches 0.93).
    "flow": {"time_schedule": "uniform", "sample_steps": 10, "cfg_scale": 2.0},
    # lr 3e-3 is ten times the authors' 2.8e-4, which suits the small aligner but not the soft tokens: Adam moves
    # every parameter by about lr per step, and the soft tokens live at the embedding table's scale (std 0.02),
    # so at 3e-3 they drift by a sixth of that each step and the aligner chases a moving condition. Scaled by
    # 0.1 they move at the authors' absolute rate.
    "train": {
        "global_batch_size": 16, "lr": 3e-3, "soft_token_lr_scale": 0.1, "min_lr": 1e-4, "warmup_ratio": 0.05,
        "max_steps": 1800, "ema_decay": 0.99, "precision": "fp32", "checkpoint_every": 600, "eval_every": 300,
        "log_every": 50, "eval_samples": 64,
    },
    "data": {"min_image_side": 64},
}

PRESETS = {"tiny": TINY, "paper": {}}
