"""Differential privacy with adaptive clipping (Andrew et al., 2021): Flower's
``DifferentialPrivacy{Server,Client}SideAdaptiveClipping`` wrappers, with three things added.

- **Accounting.** Flower 1.42's adaptive wrappers take no accountant. Each released round is
  composed into the run's RDP accountant here as a Gaussian release at the configured
  ``noise_multiplier`` z: the wrapper splits z between the update (z_update) and the noisy count
  of clipped sites (std sigma_b), z_update^-2 + (2 sigma_b)^-2 = z^-2, which makes the pair as
  private as one Gaussian release at z (the paper's Theorem 1). A round that would exceed
  ``max_epsilon`` is not started.
- **The direction of the adaptation.** Flower counts a site as 1 when its update *was clipped*
  and multiplies the norm by exp(-lr (clipped fraction - target)): with more sites clipped than
  the target the norm shrinks, so more are clipped, and it runs off to zero (or, from above, to
  infinity). Andrew et al.'s rule on that count is exp(+lr (clipped fraction - target)), which
  settles where ``target_clipped_quantile`` of the updates are clipped; that is what runs here.
- **Resume.** The adapted norm of each phase is kept in the privacy ledger that travels in every
  global checkpoint, so a resumed run continues from it rather than from the initial norm.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
)
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

from fedmae.config import PrivacyConfig
from fedmae.typed_yaml import ConfigError


class AccountedAdaptiveClipping:
    """Mixin placed before one of Flower's adaptive-clipping wrappers (see the module's text)."""

    def setup_accounting(self, privacy: PrivacyConfig, ledger: Any, phase: str) -> None:
        self.configured_noise, self.ledger, self.ledger_phase = privacy.noise_multiplier, ledger, phase
        self.clipping_norm = ledger.clipping_norms.get(phase, self.clipping_norm)
        self.pending: GaussianPrivacyEvent | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        accountant = self.ledger.accountant
        event = GaussianPrivacyEvent(noise_multiplier=self.configured_noise, sample_size=len(messages),
                                     population_size=accountant.config.population_size)
        if accountant.config.max_epsilon is not None and accountant.would_exceed(event):
            spent = accountant.get_privacy_spent()
            raise PrivacyBudgetExhausted(f"The next private release would exceed max_epsilon (current epsilon: "
                                         f"{spent.epsilon}, delta: {spent.delta}).")
        self.pending = event
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        if arrays is not None and self.pending is not None:
            self.ledger.accountant.compose(self.pending)
        self.pending = None
        return arrays, metrics

    def _geometric_update(self, clipped_fraction: float) -> None:
        self.clipping_norm *= math.exp(self.clip_norm_lr * (clipped_fraction - self.target_clipped_quantile))
        self.ledger.clipping_norms[self.ledger_phase] = self.clipping_norm


ADAPTIVE_WRAPPERS = {"server": DifferentialPrivacyServerSideAdaptiveClipping,
                     "client": DifferentialPrivacyClientSideAdaptiveClipping}


def adaptive_wrapper_args(privacy: PrivacyConfig, sampled: int) -> dict[str, Any]:
    """The wrapper's settings; a noise multiplier the clipped count's noise cannot leave room for
    is refused in one line (Flower's own error would name its argument, not fedmae's key)."""
    count_std = privacy.clipped_count_stddev if privacy.clipped_count_stddev is not None else sampled / 20
    if privacy.noise_multiplier >= 2 * count_std:
        raise ConfigError(
            f"federated.privacy.clipped_count_stddev: adaptive clipping with noise_multiplier {privacy.noise_multiplier} "
            f"needs the clipped count's noise above {privacy.noise_multiplier / 2:g} (now {count_std:g}"
            + (f", i.e. {sampled} sampled sites / 20" if privacy.clipped_count_stddev is None else "")
            + "); set clipped_count_stddev higher or lower the noise multiplier")
    return {"initial_clipping_norm": privacy.clipping_norm, "target_clipped_quantile": privacy.target_clipped_quantile,
            "clip_norm_lr": privacy.clip_norm_lr, "clipped_count_stddev": count_std}
