"""An in-process Flower ``Grid``: a ServerApp's messages go straight to ClientApps in
this process, one site at a time, no Ray and no SuperLink.

``pemma simulate``'s default engine (:mod:`simulation.simulate`), and the tests' (a
breakpoint in a client handler just works). The grid
behaves like Flower's on the points the pemma apps rely on: a ClientApp that raises
becomes an error reply (as the simulation engine does), a node can be marked
``disconnected`` (no reply, as after a timeout), and every message in both directions
is kept in :attr:`InProcessGrid.transcript` so tests can inspect what crossed the wire.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

CLIENT_APP_RAISED_EXCEPTION = 2  # flwr.common.constant.ErrorCode.CLIENT_APP_RAISED_EXCEPTION


@dataclass
class Exchange:
    """One message and its reply, as they crossed the (in-process) wire."""

    instruction: Message
    reply: Message | None


class InProcessGrid(Grid):
    """Nodes ``1..N`` each running ``client_app`` with its own node config and context."""

    def __init__(
        self,
        client_app: ClientApp,
        node_configs: Sequence[Mapping[str, Any]],
        run_config: Mapping[str, Any] | None = None,
        keep_transcript: bool = True,
    ) -> None:
        self.client_app = client_app
        self.keep_transcript = keep_transcript  # a run (pemma simulate) keeps none: replies hold tensors
        self.contexts: dict[int, Context] = {
            i + 1: Context(
                run_id=1,
                node_id=i + 1,
                node_config=dict(cfg),
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for i, cfg in enumerate(node_configs)
        }
        self.disconnected: set[int] = set()
        self.transcript: list[Exchange] = []
        self._replies: dict[str, Message] = {}
        self._run = Run.create_empty(run_id=1)
        # Who is sending: Flower's Message() reads this (the simulation engine sets it the same way).
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = 1
        TaskIdentity.node_id = SUPERLINK_NODE_ID

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return sorted(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = message_id = str(uuid.uuid4())
            node = msg.metadata.dst_node_id
            reply: Message | None = None
            if node not in self.disconnected:
                try:
                    reply = self.client_app(msg, self.contexts[node])
                except Exception as exc:  # the simulation engine turns this into an error reply too
                    reply = Message(Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc).__name__}: {exc}"),
                                    reply_to=msg)
                reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())
                self._replies[message_id] = reply
            if self.keep_transcript:
                self.transcript.append(Exchange(msg, reply))
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return list(self.pull_messages(self.push_messages(messages)))
