"""Is the run still training? Non-finite steps and divergence, judged from the losses the loop sees.

- A step whose loss or gradients are NaN/inf is skipped by the engine (NonFiniteStep: no update is applied). A few in
  a row are survivable (one bad batch); `max_skipped` in a row stop the run.
- Divergence: a causal LM that predicts the uniform distribution has loss ln(vocab). A run whose loss reached below
  90% of that and then climbs back to 98% of it or above has destroyed its adapters (e.g. --lr 1e9 pins the loss at
  ln(vocab)). While the loss is there the run is `unhealthy`: nothing is saved; `patience` such steps in a row stop
  the run. A model that starts near ln(vocab) (random weights) is never judged, as it has nothing to lose. A step's
  loss measures the adapters of the step before, so the loop quarantines the checkpoint saved just before a
  divergence shows, and checks the final adapters with one more forward pass before saving them. The best loss is
  kept in each checkpoint's state, so a resumed run goes on judging.
"""

from __future__ import annotations

import math

from lars_artifacts import LarsError


class TrainingHealth:
    def __init__(self, vocab_size: int, max_skipped: int = 5, patience: int = 10) -> None:
        self.uniform_loss = math.log(vocab_size)
        self.max_skipped, self.patience = max_skipped, patience
        self.best = math.inf
        self.skipped_total = 0
        self._skipped_streak: list[int] = []
        self._diverged_since: int | None = None
        self._diverged_steps = 0
        self._last_loss = math.nan

    @property
    def healthy(self) -> bool:
        """False while the loss looks diverged: such adapters are not saved."""
        return self._diverged_since is None

    def skipped(self, step: int, reason: str, last_saved: str) -> None:
        """Record a step the engine skipped; raises once `max_skipped` were skipped in a row."""
        self.skipped_total += 1
        self._skipped_streak.append(step)
        if len(self._skipped_streak) >= self.max_skipped:
            first, last = self._skipped_streak[0], self._skipped_streak[-1]
            raise LarsError(f"steps {first}-{last}: {reason} was NaN or inf {len(self._skipped_streak)} times in a "
                            f"row (updates skipped); lower --lr; {last_saved}")

    @property
    def judging(self) -> bool:
        """Whether the loss has been low enough that a return to ln(vocab) would mean divergence."""
        return self.best < 0.9 * self.uniform_loss

    def looks_diverged(self, loss: float) -> bool:
        return self.judging and loss >= 0.98 * self.uniform_loss

    def observe(self, step: int, loss: float) -> bool:
        """Record a finite loss of an applied step (it measures the adapters of the step before). True when this
        step starts a divergence: the checkpoint of the step before, if one was saved, holds the damage."""
        self._skipped_streak.clear()
        if self.looks_diverged(loss):
            started = self._diverged_since is None
            if started:
                self._diverged_since, self._diverged_steps = step, 0
            self._diverged_steps += 1
            self._last_loss = loss
            return started
        self._diverged_since = None
        self.best = min(self.best, loss)
        return False

    def raise_if_diverged_too_long(self, last_saved: str) -> None:
        if self._diverged_since is not None and self._diverged_steps >= self.patience:
            raise LarsError(f"training diverged at step {self._diverged_since}: the loss rose from {self.best:.3f} "
                            f"to {self._last_loss:.3f} (ln(vocab) = {self.uniform_loss:.3f}, a uniform guess) and "
                            f"stayed there {self._diverged_steps} steps; lower --lr; {last_saved}")

    def unhealthy_reason(self, last_saved: str) -> str:
        return (f"the loss has been near or above ln(vocab) = {self.uniform_loss:.3f} since step "
                f"{self._diverged_since} (diverged); these adapters are not saved; lower --lr; {last_saved}")
