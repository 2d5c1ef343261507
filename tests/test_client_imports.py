"""A deployed SuperNode starts a fresh ``flwr-clientapp`` process per message, which imports
``client.client_app``: the messages that need no model (the queries, four of a secure round's
five stages) must not wait for PyTorch, MONAI and peft (seconds)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "monai", "peft", "transformers")

# Run in a fresh interpreter: import the ClientApp, then answer query.secagg_keys, query.join and
# query.ehr_stats for the site argv[1] as a SuperNode would (no InProcessGrid: it imports torch),
# printing which heavy packages were loaded after each step.
_CHILD = """
import json, sys, uuid
from flwr.app import Context, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

HEAVY = {heavy!r}
loaded = lambda: sorted(name for name in HEAVY if name in sys.modules)
seen = {{"before": loaded()}}
from client.client_app import app
seen["import"] = loaded()

from pemma_core import protocol
from server import records

TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
context = Context(run_id=1, node_id=1, node_config={{"site-config": sys.argv[1]}}, state=RecordDict(), run_config={{}})
config = {{protocol.SECAGG: json.dumps({{"round": 1, "you": "site-3"}})}}
msg = Message(records.instruction({{}}, config), dst_node_id=1, message_type=protocol.SECAGG_KEYS.name)
msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
reply, problems = records.read_reply(app(msg, context))
seen["secagg_keys"] = loaded()
seen["reply"] = {{"site": reply.meta.get(protocol.SITE), "keys": sorted(json.loads(reply.meta[protocol.SECAGG])),
                  "problems": problems}}
for query in (protocol.JOIN, protocol.EHR_STATS):
    msg = Message(records.instruction({{}}, {{}}), dst_node_id=1, message_type=query.name)
    msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
    reply, problems = records.read_reply(app(msg, context))
    seen[query.name] = {{"loaded": loaded(), "site": reply.meta.get(protocol.SITE), "problems": problems,
                        "meta": sorted(reply.meta), "metrics": sorted(reply.metrics)}}
print(json.dumps(seen))
"""


def test_the_client_app_the_queries_and_a_secure_aggregation_stage_import_no_torch(
        copy_phantom_site: Callable[[int], Path]) -> None:
    site_yaml = copy_phantom_site(2)  # CT, PET and EHR: ehr_stats reads its clinical table
    done = subprocess.run([sys.executable, "-c", _CHILD.format(heavy=HEAVY), str(site_yaml)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["before"] == []
    assert seen["import"] == [], f"importing client.client_app loads {seen['import']}"
    assert seen["reply"] == {"site": "site-3", "keys": ["pk-enc", "pk-mask"], "problems": []}
    assert seen["secagg_keys"] == [], f"answering query.secagg_keys loads {seen['secagg_keys']}"
    from pemma_core import protocol

    join, ehr = seen[protocol.JOIN.name], seen[protocol.EHR_STATS.name]
    assert join["site"] == ehr["site"] == "site-3" and join["problems"] == ehr["problems"] == []
    assert protocol.PREPROCESSING in join["meta"] and join["metrics"]  # the declared cases came back
    assert protocol.EHR_STATS_KEY in ehr["meta"] or protocol.WITHHELD in ehr["meta"]  # the table was read
    assert join["loaded"] == [], f"answering query.join loads {join['loaded']}"
    assert ehr["loaded"] == [], f"answering query.ehr_stats loads {ehr['loaded']}"
