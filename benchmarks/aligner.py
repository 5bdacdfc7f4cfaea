"""Aligner benchmark: training-step throughput and sampling latency, one JSON line per figure.

python benchmarks/aligner.py                      # tiny preset on CPU
python benchmarks/aligner.py --preset paper       # paper-scale DiT (meant for a GPU: bf16, TFLOP/s vs peak)
"""

import argparse
import json
import statistics
import tempfile
import time

import torch

from benchmarks.flops import aligner_train_flops, bf16_peak_tflops, utilisation
from gap3d.aligner import AlignerDiT
from gap3d.build import derive_shapes
from gap3d.config import load_config
from gap3d.flow import flow_matching_loss, sample
from miniature.checkpoints.paper_widths import paper_config_without_weights


def emit(name: str, value: float, unit: str, **extra) -> None:
    print(
        json.dumps({"benchmark": "aligner", "figure": name, "value": round(value, 4), "unit": unit, **extra}),
        flush=True,
    )


def timed(fn, repeats: int, device: torch.device) -> list[float]:
    """Wall-clock seconds of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=["tiny", "paper"])
    parser.add_argument(
        "--batch-size", type=int, default=None, help="default: 16 (the authors' per-GPU batch) or 8 on CPU"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sample-steps", type=int, default=None, help="default: the preset's flow.sample_steps")
    args = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="gap3d-aligner-bench-")
    config = (
        paper_config_without_weights(workdir) if args.preset == "paper" else derive_shapes(load_config(args.preset))
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch = args.batch_size or (16 if device.type == "cuda" else 8)
    aligner_config = config.aligner
    torch.manual_seed(0)
    model = AlignerDiT(aligner_config).to(device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    x0 = torch.randn(batch, aligner_config.num_tokens, aligner_config.token_dim, device=device, dtype=dtype)
    cond = torch.randn(batch, aligner_config.num_cond_tokens, aligner_config.cond_dim, device=device, dtype=dtype)
    context = dict(
        preset=args.preset,
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        dtype=str(dtype).removeprefix("torch."),
        batch=batch,
        threads=torch.get_num_threads(),
        params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
    )

    def train_step():
        loss = flow_matching_loss(model, x0, cond, config.flow, aligner_config.num_special_tokens - 1)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step_times = timed(train_step, args.repeats, device)
    median = statistics.median(step_times)
    emit("train_step_samples_per_s", batch / median, "samples/s", median_step_s=round(median, 4), **context)
    peak = bf16_peak_tflops(device)
    use = utilisation(aligner_train_flops(aligner_config, batch), median, peak)
    emit("train_step_tflops", use["tflops"], "TFLOP/s", bf16_peak_tflops=peak, fraction_of_peak=use["mfu"], **context)

    model.eval()
    steps = args.sample_steps or config.flow.sample_steps
    one = cond[:1]
    sample_times = timed(
        lambda: sample(
            model,
            one,
            (aligner_config.num_tokens, aligner_config.token_dim),
            steps,
            config.flow.cfg_scale,
            config.flow.solver,
        ),
        args.repeats,
        device,
    )
    emit(
        "sampling_latency_one_prompt",
        statistics.median(sample_times),
        "s",
        steps=steps,
        cfg_scale=config.flow.cfg_scale,
        **context,
    )


if __name__ == "__main__":
    main()
