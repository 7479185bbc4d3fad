"""Differential-privacy accounting for a federated run: one Flower RDP accountant per run.

Pre-training and federated fine-tuning rounds release models computed from the same sites' data,
so both phases compose into one budget. The accountant's ledger travels in every global
checkpoint (``metrics["privacy"]``), so a resumed run continues the count instead of restarting
it. The guarantee is the one Flower's fixed-clipping wrappers give: (epsilon, delta)-DP with
respect to adding or removing one *site* (all of a hospital's data), for the released weights
only, with every site taking part in every round (no sub-sampling amplification).
"""

from __future__ import annotations

import json
from typing import Any

from flwr.supercore.privacy_accounting import NeighboringRelation, SamplingMethod
from flwr.supercore.privacy_accounting import PrivacyConfig as FlowerPrivacyConfig
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from fedmae.config import PrivacyConfig

GUARANTEE = ("(epsilon, delta)-DP for adding or removing one whole site, covering the released weights only; "
             "validation/test metrics and the sites' names are not covered")


def new_accountant(privacy: PrivacyConfig, num_sites: int, ledger: str | None = None) -> RdpAccountant:
    """An accountant for ``num_sites`` sites that all train every round; ``ledger`` (from
    :func:`ledger`) restores the releases of a stopped run."""
    accountant = RdpAccountant(FlowerPrivacyConfig(
        target_delta=privacy.delta, population_size=num_sites, neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION, max_epsilon=privacy.max_epsilon))
    state, _ = read_ledger(ledger)
    if state is not None:
        accountant.load_state_dict(state)
    return accountant


def ledger(accountant: RdpAccountant, clipping_norms: dict[str, float] | None = None) -> str:
    if not clipping_norms:
        return json.dumps(accountant.state_dict())
    return json.dumps({"rdp": accountant.state_dict(), "clipping_norms": clipping_norms})


def read_ledger(saved: str | None) -> tuple[dict[str, Any] | None, dict[str, float]]:
    """The accountant's state and the adapted clipping norm of each phase (adaptive clipping) of
    a saved ledger; a fixed-clipping ledger is the accountant's state alone."""
    if not saved:
        return None, {}
    state = json.loads(saved)
    if "rdp" in state:
        return state["rdp"], {k: float(v) for k, v in state.get("clipping_norms", {}).items()}
    return state, {}


def spent(accountant: RdpAccountant, privacy: PrivacyConfig) -> dict[str, Any]:
    """What the run has spent so far, for logs and summary.json."""
    used = accountant.get_privacy_spent()
    return {"dp": privacy.dp, "noise_multiplier": privacy.noise_multiplier, "clipping_norm": privacy.clipping_norm,
            "clipping": privacy.clipping, "epsilon": round(used.epsilon, 4), "delta": used.delta,
            "releases": used.num_releases, "guarantee": GUARANTEE}


class Accountant:
    """The run's accountant as :class:`fedmae.federated.federation.PrivacyLedger`; ``accountant``
    is Flower's, which the DP strategy wrappers spend."""

    def __init__(self, privacy: PrivacyConfig, num_sites: int, saved_ledger: str | None = None):
        self.privacy = privacy
        self.accountant = new_accountant(privacy, num_sites, saved_ledger)
        # Adaptive clipping: each phase's current clipping norm, so a resumed run continues from it.
        self.clipping_norms = read_ledger(saved_ledger)[1]

    def ledger(self) -> str:
        return ledger(self.accountant, self.clipping_norms)

    def spent(self) -> dict[str, Any]:
        return {**spent(self.accountant, self.privacy),
                **({"adapted_clipping_norms": dict(self.clipping_norms)} if self.clipping_norms else {})}
