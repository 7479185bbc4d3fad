"""fedmae's log lines in a Flower run go where Flower's own go.

Inside Flower's ServerApp and ClientApp processes only Flower's logger has a handler (its console
handler, whose output the SuperLink collects for `flwr run --stream` and `flwr log`); fedmae's
INFO lines ("sites: …", "resuming pre-training after round 2 of 4", per-round validation) would
otherwise be dropped, and its warnings (a site left out of a round) printed without context.
"""

from __future__ import annotations

import logging

from flwr.supercore.logger import console_handler


def log_through_flower() -> None:
    fedmae = logging.getLogger("fedmae")
    if console_handler not in fedmae.handlers:
        fedmae.addHandler(console_handler)
        fedmae.setLevel(logging.INFO)
        fedmae.propagate = False  # a handler on the root logger would print every line twice
