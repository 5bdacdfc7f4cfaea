"""The one FLOP count of the benchmarks: an aligner training step's matrix work, and the GPUs' bf16 peaks.

Counted, not estimated: torch's FlopCounterMode runs one forward and backward of the real AlignerDiT on the meta
device (no memory, no compute), so the count follows the model code. A `6 x parameters x tokens` rule would
overcount this model by about 40%: its adaLN modulation runs once per sample, not per token, and the
cross-attention keys and values come from the s condition tokens. Attention counts once, as model FLOPs, whatever
kernel runs it (activation checkpointing's recompute is not counted either). Optimiser and elementwise work are
not matrix FLOPs and are not counted.
"""

import torch
from torch.utils.flop_counter import FlopCounterMode

from gap3d.aligner import AlignerDiT
from gap3d.config import AlignerConfig

# Dense bf16 tensor-core peaks (no sparsity), by substring of torch.cuda.get_device_name().
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def aligner_train_flops(config: AlignerConfig, batch: int) -> int:
    """FLOPs of one training step's forward and backward of the aligner at `batch` samples."""
    with torch.device("meta"):
        model = AlignerDiT(config)
        x = torch.randn(batch, config.num_tokens, config.token_dim)
        cond = torch.randn(batch, config.num_cond_tokens, config.cond_dim)
        t = torch.rand(batch)
        with FlopCounterMode(display=False) as counter:
            model(x, t, cond).float().pow(2).mean().backward()
    return counter.get_total_flops()


def bf16_peak_tflops(device: torch.device | str) -> float | None:
    """The dense bf16 peak of `device`'s GPU, or None (a CPU, or a GPU not in BF16_PEAK_TFLOPS)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def utilisation(flops_per_step: float, step_s: float, peak_tflops: float | None) -> dict:
    """Achieved TFLOP/s of a step and its fraction of the peak (None without a known peak): the MFU."""
    achieved = flops_per_step / step_s / 1e12
    return {
        "tflops": round(achieved, 4),
        "bf16_peak_tflops": peak_tflops,
        "mfu": round(achieved / peak_tflops, 4) if peak_tflops else None,
    }
