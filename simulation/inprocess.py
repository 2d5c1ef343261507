"""An in-process Flower ``Grid``: a ServerApp's messages go straight to ClientApps in
this process, no Ray and no SuperLink.

``pemma simulate``'s default engine (:mod:`simulation.simulate`), and the tests' (a
breakpoint in a client handler just works). With ``workers`` > 1 the sites of one
round answer side by side, in threads, each node always on the same worker
(:meth:`InProcessGrid.worker_of`) and PyTorch's intra-op threads shared out between the
workers (PyTorch runs its kernels outside the GIL; what it gains: BENCHMARKS.md, the
default demo's wall time). The replies are the same bit for bit as with one worker:
every random draw that reaches a reply comes from the site's own seeded generators, not
PyTorch's global one (the secure aggregation's rounding, which must use numpy's global
generator, holds a lock while it does). The grid
behaves like Flower's on the points the pemma apps rely on: a ClientApp that raises
becomes an error reply (as the simulation engine does), a node can be marked
``disconnected`` (no reply, as after a timeout), and every message in both directions
is kept in :attr:`InProcessGrid.transcript` so tests can inspect what crossed the wire.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

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
    """Nodes ``1..N`` each running ``client_app`` with its own node config and context,
    ``workers`` of them at a time."""

    def __init__(
        self,
        client_app: ClientApp,
        node_configs: Sequence[Mapping[str, Any]],
        run_config: Mapping[str, Any] | None = None,
        keep_transcript: bool = True,
        workers: int = 1,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.client_app = client_app
        self.workers = workers
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
        messages = list(messages)
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
        live = [m for m in messages if m.metadata.dst_node_id not in self.disconnected]
        queues: dict[int, list[Message]] = {}
        for msg in live:  # a node is always served by the same worker, its messages in order
            queues.setdefault(self.worker_of(msg.metadata.dst_node_id), []).append(msg)
        if len(queues) > 1:
            with _intra_op_threads(max(1, torch.get_num_threads() // len(queues))), \
                    ThreadPoolExecutor(len(queues), thread_name_prefix="pemma-site") as pool:
                answered = list(pool.map(lambda queue: [self._answer(m) for m in queue], queues.values()))
        else:
            answered = [[self._answer(m) for m in queue] for queue in queues.values()]
        replies = {m.metadata.message_id: r for queue, rs in zip(queues.values(), answered) for m, r in zip(queue, rs)}
        for msg in messages:
            reply = replies.get(msg.metadata.message_id)
            if reply is not None:
                self._replies[msg.metadata.message_id] = reply
            if self.keep_transcript:
                self.transcript.append(Exchange(msg, reply))
        return [m.metadata.message_id for m in messages]

    def worker_of(self, node_id: int) -> int:
        """The worker thread that serves ``node_id``: nodes are dealt to the workers in turn."""
        return (node_id - 1) % self.workers

    def _answer(self, msg: Message) -> Message:
        try:
            reply = self.client_app(msg, self.contexts[msg.metadata.dst_node_id])
        except Exception as exc:  # the simulation engine turns this into an error reply too
            reply = Message(Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
        reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())
        return reply

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return list(self.pull_messages(self.push_messages(messages)))


@contextlib.contextmanager
def _intra_op_threads(n: int) -> Iterator[None]:
    """PyTorch's intra-op threads set to ``n`` for the block (sites running side by side share the cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
