"""What the trainers of both TRELLIS stages share (stage1_training.py, stage2_training.py): VAE steps, then flow
steps that also step the flow's LR schedule and EMA, one loss history, and a progress line every LOG_EVERY steps."""

import logging

logger = logging.getLogger(__name__)

LOG_EVERY = 100  # steps between progress lines


class PhasedTrainer:
    """A subclass sets `config` (with vae_steps and flow_steps), `step`, `history`, `latents` (None until the VAE is
    done), `vae_optimizer`, `flow_optimizer`, `flow_schedule` and `ema`, and defines `flow`, `vae_step`, `flow_step`
    (each returns its loss terms, "loss" among them) and `_finish_vae`."""

    stage: str  # how progress lines name the stage ("stage 1"), set by the subclass

    @property
    def total_steps(self) -> int:
        return self.config.vae_steps + self.config.flow_steps

    def train_step(self) -> dict[str, float]:
        """One optimiser step of the current phase (VAE, then flow); returns its loss terms."""
        vae_phase = self.step < self.config.vae_steps
        terms = self.vae_step() if vae_phase else self.flow_step()
        optimizer = self.vae_optimizer if vae_phase else self.flow_optimizer
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()
        if not vae_phase:
            self.flow_schedule.step()
            self.ema.update(dict(self.flow.named_parameters()))
        self.step += 1
        values = {name: float(value.detach()) for name, value in terms.items()}
        self.history.append({"step": self.step, **values})
        if self.step % LOG_EVERY == 0 or self.step == self.total_steps:
            logger.info(
                "%s step %d/%d %s",
                self.stage,
                self.step,
                self.total_steps,
                " ".join(f"{k} {v:.4f}" for k, v in values.items()),
            )
        return values

    def fit(self) -> list[dict]:
        """Run to vae_steps + flow_steps from wherever the trainer stands; returns the per-step losses."""
        while self.step < self.total_steps:
            self.train_step()
        if self.latents is None:
            self._finish_vae()
        return self.history
