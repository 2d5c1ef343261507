"""A site's audit log: what record() writes, reading it back (also cut short), the summary, `pemma audit`."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pemma_core.audit import AUDIT_FILE, audit_path, read_audit, record, summarise
from pemma_core.cli import main
from pemma_core.protocol import Reply, reply_meta

REPO = Path(__file__).resolve().parents[1]
EHR_STATS = json.dumps({"n": 12, "sums": {"age": 700.5}, "categories": {"grade": ["1", "2"]}})


def train_reply(loss: float = 0.25, scale: int = 1) -> Reply:
    arrays = {
        "encoder.lora_A.weight": np.zeros((4 * scale, 16), np.float16),
        "ct_adapter.down.weight": np.ones((8, 16, 1, 1, 1), np.float16),
    }
    metrics = {"loss": loss, "num-examples": 3, "examples-shared": 3, "steps": [1, 2]}
    return Reply(arrays, metrics, reply_meta("site-a", "f" * 64, ehr_stats=EHR_STATS))


def strict_json(line: str) -> object:
    """json.loads refusing NaN / Infinity, which are not JSON."""
    def refuse(token: str) -> None:
        raise ValueError(f"not JSON: {token}")

    return json.loads(line, parse_constant=refuse)


def test_a_train_reply_and_an_error_read_back_equal(tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "site-a"  # does not exist yet: record creates it
    reply = train_reply()
    sent = record(cache, site="site-a", message_type="train", phase="adapt", round=3, reply=reply, run_id=42)
    failed = record(cache, site="site-a", message_type="train.prognosis", phase="prognosis", round=4, reply=None,
                    error="RuntimeError: no usable case", run_id=42)

    assert audit_path(cache) == cache / AUDIT_FILE
    tensors = {t["name"]: t for t in sent["tensors"]}
    assert set(tensors) == set(reply.arrays)
    for name, array in reply.arrays.items():
        assert tensors[name] == {"name": name, "shape": list(array.shape), "dtype": "float16", "bytes": array.nbytes}
    assert sent["bytes"] == sum(a.nbytes for a in reply.arrays.values())
    assert sent["metrics"] == reply.metrics and sent["meta"] == reply.meta  # every value, ehr-stats JSON included
    assert (sent["site"], sent["run_id"], sent["message_type"], sent["phase"], sent["round"], sent["error"]) == (
        "site-a", 42, "train", "adapt", 3, None)
    assert failed["error"] == "RuntimeError: no usable case"
    assert failed["tensors"] == [] and failed["bytes"] == 0 and failed["metrics"] == {} and failed["meta"] == {}

    lines = audit_path(cache).read_text().splitlines()
    assert len(lines) == 2  # one line per message
    assert read_audit(audit_path(cache)) == ([sent, failed], [])


def test_nan_inf_and_odd_values_still_write_valid_json(tmp_path: Path) -> None:
    reply = Reply({"w": np.zeros(3, np.float32)},
                  {"loss": math.nan, "c-index": [math.inf, 0.5, -math.inf], "steps": np.int64(5), "lr": np.float32(0.5)},
                  {"site": "s", "odd": {1, 2}})
    entry = record(tmp_path, site="s", message_type="train", phase="adapt", round=1, reply=reply)
    line = audit_path(tmp_path).read_text()
    assert line.endswith("\n") and line.count("\n") == 1
    written = strict_json(line)
    assert written == entry
    assert written["metrics"] == {"loss": "nan", "c-index": ["inf", 0.5, "-inf"], "steps": 5, "lr": 0.5}
    assert written["meta"]["odd"] == repr({1, 2})


def test_a_log_cut_by_a_crash_keeps_its_readable_lines(tmp_path: Path) -> None:
    first = record(tmp_path, site="s", message_type="train", phase="adapt", round=1, reply=train_reply())
    path = audit_path(tmp_path)
    with path.open("a") as log:
        log.write("[1, 2]\n")  # JSON, but not an entry
    second = record(tmp_path, site="s", message_type="evaluate", phase="adapt", round=1, reply=Reply(metrics={"x": 1}))
    whole = json.dumps(second)
    with path.open("a") as log:
        log.write(whole[: len(whole) // 2])  # the site died while writing
    entries, problems = read_audit(path)
    assert entries == [first, second]
    assert problems[0] == "line 2: not a JSON object"
    assert problems[1].startswith("line 4: not JSON") and "cut short" in problems[1]
    assert len(problems) == 2


def test_concurrent_appends_from_processes_stay_whole_lines(tmp_path: Path) -> None:
    """Large lines (200 kB each) from three processes at once: every line is whole."""
    code = (
        "import sys\nfrom pathlib import Path\nfrom pemma_core.audit import record\nfrom pemma_core.protocol import Reply\n"
        "for i in range(15):\n"
        "    record(Path(sys.argv[1]), site=sys.argv[2], message_type='query.ehr_stats', phase=None, round=None,\n"
        "           reply=Reply(meta={'ehr-stats': sys.argv[2] * 200_000}))\n"
    )
    writers = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), name], cwd=REPO) for name in "abc"]
    assert [w.wait(timeout=120) for w in writers] == [0, 0, 0]
    entries, problems = read_audit(audit_path(tmp_path))
    assert problems == []
    assert sorted(e["site"] for e in entries) == sorted("abc" * 15)
    assert all(e["meta"]["ehr-stats"] == e["site"] * 200_000 for e in entries)


def test_summarise_gives_bytes_tensor_counts_metric_ranges_and_errors(tmp_path: Path) -> None:
    entries = [
        record(tmp_path, site="site-a", message_type="train", phase="adapt", round=r, reply=train_reply(loss, scale=r),
               run_id=7)
        for r, loss in ((1, 0.9), (2, 0.4), (4, 0.3))
    ]
    entries.append(record(tmp_path, site="site-a", message_type="train", phase="adapt", round=5, reply=None,
                          error="ValueError: bad crop", run_id=7))
    entries.append(record(tmp_path, site="site-a", message_type="query.ehr_stats", phase=None, round=None,
                          reply=Reply(meta=reply_meta("site-a", ehr_stats=EHR_STATS)), run_id=7))
    text = summarise(entries)
    total = sum(e["bytes"] for e in entries)
    assert f"{total:,} bytes" in text.splitlines()[0] and "5 message(s)" in text
    assert "runs: 7" in text and entries[0]["time"] in text and entries[-1]["time"] in text
    adapt = text[text.index("train (adapt)"): text.index("query.ehr_stats")]
    assert "4 message(s), rounds 1-2, 4-5" in adapt
    assert "2 distinct name(s), 6 sent" in adapt
    biggest = entries[2]["tensors"][0]  # round 4's lora tensor: the largest of all
    assert f"{biggest['name']} {biggest['shape']}" in adapt.split("largest:")[1].split(";")[0]
    assert "loss 0.3..0.9" in adapt and "steps 1..2" in adapt
    assert "errors sent: 1: 'ValueError: bad crop'" in adapt
    assert "meta: ehr-stats, fingerprint, site" in adapt
    assert "query.ehr_stats: 1 message(s), 0 bytes up" in text


def test_summarise_counts_values_that_are_not_finite(tmp_path: Path) -> None:
    entries = [record(tmp_path, site="s", message_type="train", phase="adapt", round=r, reply=Reply(metrics={"loss": v}))
               for r, v in ((1, math.nan), (2, 0.5), (3, 2.0))]
    assert "loss 0.5..2 (1 not finite)" in summarise(read_audit(audit_path(tmp_path))[0])


def test_pemma_audit_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site_yaml = tmp_path / "site.yaml"
    site_yaml.write_text("name: s\ndata_root: data\nmodalities: [ct, pet]\nmanifest: m.csv\n")
    log = tmp_path / "cache" / "s" / AUDIT_FILE  # the default cache folder: cache/<name> beside the YAML

    assert main(["audit", str(site_yaml)]) == 0
    assert capsys.readouterr().out.strip() == f"no audit log at {log.resolve()}: this site has sent nothing yet"

    sent = [record(log.parent, site="s", message_type="train", phase="adapt", round=1, reply=train_reply(), run_id=3),
            record(log.parent, site="s", message_type="train", phase="adapt", round=2, reply=None, error="boom")]
    assert main(["audit", str(site_yaml)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"audit log {log.resolve()}"
    assert summarise(sent) in out

    with log.open("a") as handle:
        handle.write('{"time": "2025')  # cut short
    assert main(["audit", "--json", str(site_yaml)]) == 0
    captured = capsys.readouterr()
    assert [json.loads(line) for line in captured.out.splitlines()] == sent
    assert "pemma audit: warning:" in captured.err and "line 3: not JSON" in captured.err


def test_pemma_audit_of_a_bad_yaml_is_one_error_line(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "pemma_core.cli", "audit", str(tmp_path / "nope.yaml")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip() == f"pemma audit: error: site config not found: {tmp_path / 'nope.yaml'}"
