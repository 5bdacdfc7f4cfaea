"""Size presets of the library's config sections: the one registry of what `tiny` and `paper` mean.

`paper` is the authors' recipe, which is every section's dataclass defaults (PolyannaG/GAP3D). `tiny` keeps the
same code paths at toy sizes, on tiny random checkpoints built locally (gap3d.tiny), and is the embedded
default of every job, test and benchmark. Each job's Ray resources have their own presets beside the job.
"""

DEFAULT_PRESET = "tiny"

TINY = {
    "vlm": {"path": "tiny://vlm", "num_soft_tokens": 8, "dtype": "float32"},
    "dino": {"path": "tiny://dino", "image_size": 224, "dtype": "float32"},
    "aligner": {
        "token_dim": 64, "grid_size": 16, "cond_dim": 64, "num_cond_tokens": 8,
        "hidden_size": 128, "depth": 4, "num_heads": 4, "null_condition": "learned",
    },
    # Uniform t, as the authors train: logit-normal t rarely lands near t = 1, where sampling starts, and a
    # 300-step run then samples far from its targets (token cosine 0.63 against 0.86 with uniform t, both at
    # lr 1e-3; lr 3e-3 reaches 0.93).
    "flow": {"time_schedule": "uniform", "sample_steps": 10, "cfg_scale": 2.0},
    "train": {
        "global_batch_size": 16, "lr": 3e-3, "min_lr": 1e-4, "warmup_ratio": 0.05, "max_steps": 300, "ema_decay": 0.99,
        "precision": "fp32", "checkpoint_every": 100, "eval_every": 100, "log_every": 10, "eval_samples": 64,
    },
    "data": {"min_image_side": 64},
}

PRESETS = {"tiny": TINY, "paper": {}}
