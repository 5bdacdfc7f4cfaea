"""How training wraps the plain-PyTorch model from outside: activation checkpointing and DeepSpeed.

The model code (gap3d/) knows nothing of either; ray_jobs/train.py calls these on every worker.
"""

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from gap3d.config import Gap3DConfig
from gap3d.training import EMA, AlignerTrainModule, LRContinuation, build_optimizer, lr_schedule, trainable_parameters


def apply_activation_checkpointing(aligner: nn.Module) -> None:
    """Recompute each aligner block in backward instead of keeping its activations.

    The blocks' forwards are wrapped in place, so parameter names (EMA, export, DeepSpeed state) stay unchanged;
    PyTorch's checkpoint_wrapper would rename every block parameter (`_checkpoint_wrapped_module.`).
    """
    for block in aligner.blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def build_engine(
    module: AlignerTrainModule,
    config: Gap3DConfig,
    scaling,
    micro_batch: int,
    continuation: LRContinuation | None = None,
):
    """DeepSpeed engine over the trainable parameters (torch AdamW + warmup/cosine schedule) -> (engine, scheduler).

    `scaling` is the job's ray_jobs.train.TrainScaling (ZeRO stage, activation checkpointing); `continuation` the
    LR curve of a run resumed with a changed schedule (ray_jobs/resume.py).
    """
    import deepspeed

    train = config.train
    if scaling.gradient_checkpointing:
        apply_activation_checkpointing(module.aligner)
    optimizer = build_optimizer(module, train)
    engine, _, _, scheduler = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        lr_scheduler=lr_schedule(optimizer, train, continuation),
        config=deepspeed_config(config, scaling.zero_stage, micro_batch),
        dist_init_required=False,
    )
    return engine, scheduler


def load_engine_state(engine, scheduler, directory: str, tag: str) -> dict:
    """Load a DeepSpeed checkpoint into `engine`, keeping this run's LR schedule -> the checkpoint's client state.

    DeepSpeed restores the optimiser's param-group LRs and the scheduler's base LRs of the run that saved the
    checkpoint; a resumed run whose train.lr changed would then follow neither schedule. The base LRs of this
    run's optimiser are put back and the LR set for the checkpoint's step.
    """
    base_lrs = list(scheduler.base_lrs)
    _, client_state = engine.load_checkpoint(directory, tag=tag)
    if client_state is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint '{tag}' in {directory}")
    scheduler.base_lrs = base_lrs
    step = scheduler.last_epoch
    for group, base_lr, multiplier in zip(scheduler.optimizer.param_groups, base_lrs, scheduler.lr_lambdas):
        group["initial_lr"], group["lr"] = base_lr, base_lr * multiplier(step)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
    return client_state


def deepspeed_config(config: Gap3DConfig, zero_stage: int, micro_batch: int) -> dict:
    """The DeepSpeed JSON config of a run: batch sizes, clipping, ZeRO stage, precision."""
    train = config.train
    return {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": train.precision == "bf16"},
        "zero_allow_untested_optimizer": True,  # torch AdamW (fused): no extra C++ op to build on CPU
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def global_grad_norm(engine) -> float:
    """Global gradient norm after the all-reduce (ZeRO 0 does not compute one itself)."""
    grads = [p.grad.float() for p in engine.module.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads).item() if grads else 0.0


def update_ema(ema: EMA, engine, zero_stage: int) -> None:
    """EMA step from the engine's parameters, gathered first where ZeRO-3 partitions them."""
    parameters = trainable_parameters(engine.module)
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(parameters.values())):
            ema.update(parameters)
    else:
        ema.update(parameters)
