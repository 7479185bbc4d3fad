"""fedmae's log lines in a Flower run go where Flower's own go.

Inside Flower's ServerApp and ClientApp processes only Flower's logger has a handler (its console
handler, whose output the SuperLink collects for `flwr run --stream` and `flwr log`); fedmae's
INFO lines ("sites: …", "resuming pre-training after round 2 of 4", per-round validation) would
otherwise be dropped, and its warnings (a site left out of a round) printed without context.
The handlers are taken from Flower's logger by name (``flwr``), so this module needs no Flower
import: it is called from the apps in ``server/`` and ``sites/``, once Flower has set them up.
"""

from __future__ import annotations

import logging

FLOWER_LOGGER = "flwr"


def log_through_flower() -> None:
    fedmae = logging.getLogger("fedmae")
    added = [h for h in logging.getLogger(FLOWER_LOGGER).handlers if h not in fedmae.handlers]
    for handler in added:
        fedmae.addHandler(handler)
    if added:
        fedmae.setLevel(logging.INFO)
        fedmae.propagate = False  # a handler on the root logger would print every line twice
