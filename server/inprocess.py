"""An in-process Flower Grid: the ServerApp's strategies talk to ClientApp objects directly.

For tests, benchmarks and debugging: the very same ServerApp and ClientApp code as a Flower run,
in one process, sites one after another, no Ray, no network. A caller can make a site crash, stay
silent or send a doctored update (``crashes``, ``faults``) and inspect every message the server
sent (``sent``). Flower's own engines (Ray simulation, SuperLink + SuperNodes) are what `fedmae
simulate` and deployments use.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from types import SimpleNamespace
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.serde import array_record_to_proto
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE = 1
Fault = Callable[[Message, Message], Message | None]  # (request, reply) -> reply to deliver, or None (no reply)


def serve_as_server(run_id: int) -> None:
    """Messages built from here on are the ServerApp's (Flower reads the sender from TaskIdentity)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, SERVER_NODE, 1


class InProcessGrid(Grid):
    def __init__(self, client_app: Any, node_configs: list[dict[str, Any]], run_config: dict[str, Any], run_id: int = 7,
                 count_bytes: bool = True):
        self.client_app, self.run_id, self.count_bytes = client_app, run_id, count_bytes
        serve_as_server(run_id)
        self.contexts = {
            100 + i: Context(run_id=run_id, node_id=100 + i, node_config=dict(node), state=RecordDict(),
                             run_config=dict(run_config))
            for i, node in enumerate(node_configs)
        }
        self.faults: dict[int, Fault] = {}
        self.crashes: dict[int, Callable[[Message], str | None]] = {}  # node -> why it crashes on this message
        self.sent: list[Message] = []
        # (direction, message type, bytes of weights) as they crossed the "wire", before the server
        # converts anything: what a real deployment would transmit. Counting serialises every
        # message once more: ``count_bytes=False`` when timing.
        self.traffic: list[tuple[str, str, int]] = []
        self._next_id = 0

    # Grid's abstract interface; a Flower run sets these up, the tests do not need them.
    def set_run(self, run: Any) -> None: ...

    @property
    def run(self) -> Any:
        return SimpleNamespace(run_id=self.run_id)  # what SecAgg+ rounds read

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            self._next_id += 1
            message.metadata._message_id = f"m{self._next_id}"  # what the SuperLink assigns
            self.sent.append(message)
            if self.count_bytes:
                self.traffic.append(("down", message.metadata.message_type, weight_bytes(message)))
            TaskIdentity.node_id, TaskIdentity.task_id = node, self._next_id
            try:
                crash = self.crashes.get(node, lambda m: None)(message)
                if crash:
                    raise RuntimeError(crash)
                # The site gets its own copy, as over a network: Flower's SecAgg+ mod consumes
                # parts of the message it is handed, and its stages share one content object.
                reply = self.client_app(copy.deepcopy(message), self.contexts[node])
            except Exception as err:  # what Flower turns a ClientApp exception into
                reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=message)
            finally:
                serve_as_server(self.run_id)
            if node in self.faults:
                reply = self.faults[node](message, reply)
            if reply is not None:
                replies.append(reply)
                if self.count_bytes and not reply.has_error():
                    self.traffic.append(("up", message.metadata.message_type, weight_bytes(reply)))
        return replies


def weight_bytes(message: Message) -> int:
    """Bytes of the weights a message carries: its ArrayRecord serialised as Flower's protobuf
    (arrays with their headers, names, shapes and dtypes), 0 without one."""
    if message.has_error() or "arrays" not in message.content:
        return 0
    return array_record_to_proto(message.content["arrays"]).ByteSize()
