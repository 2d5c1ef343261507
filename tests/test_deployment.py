"""A real Flower deployment on loopback: TLS, SuperNode authentication, the pemma app.

What deploy/DEPLOYMENT.md tells the coordinator and hospital IT to do, done here with
the same commands, every process on 127.0.0.1:

1. ``deploy/make_certs.py``: a local CA, the SuperLink certificate (localhost/127.0.0.1),
   one SuperNode key pair per hospital plus one nobody registers;
2. ``flower-superlink`` with TLS and ``--enable-supernode-auth``;
3. ``flwr supernode register KEY.pub`` for the three hospitals (Control API, over TLS);
4. three ``flower-supernode`` with ``--root-certificates``, their own
   ``--auth-supernode-private-key`` and ``--node-config 'site-config="SITE.yaml"'``
   (a phantom federation written into the test folder), and a fourth with the
   unregistered key;
5. ``flwr run`` of the project's app with run-config overrides (tiny model, 1 round,
   1 local step);
6. meanwhile: the fourth SuperNode was refused (non-zero exit, no node id);
7. one hospital is killed after its masked update left; the run finishes anyway:
   ``RUN/adapters/round-1.safetensors`` exists, aggregated over the two survivors (each node
   serving the site its node config named), the victim recorded as dropped before unmasking;
8. every process started here (and whatever it started) is stopped by PID / process
   group, and ``ps`` must show none of them left.

``flwr`` reads its SuperLink connection from ``$FLWR_HOME/config.toml``; the test points
``FLWR_HOME`` at its own folder, so the user's ``~/.flwr`` is neither read nor written.
``flwr run`` is given a copy of the app (code + pyproject.toml without
``[tool.flwr.federations]``): flwr 1.42 migrates such a section into ``config.toml`` and
comments it out of the pyproject.toml it was run on, which must not happen to the repo.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from project_files import copy_project

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # installed with flwr

REPO = Path(__file__).resolve().parents[1]
CONNECTION = "pemma-test"  # SuperLink connection name in the test's $FLWR_HOME/config.toml
HOSPITALS = ("hospital-1", "hospital-2", "hospital-3")
ROGUE = "rogue"
# One secure round: it holds every stage of the protocol, and a hospital lost in the middle of it.
# (A second round cost about 90 s of the suite's 15 minutes and checked nothing the first does not.)
ROUNDS = 1
# Everything the run needs, on 2 shared CPU cores: tiny model, no CT pretraining, one
# optimiser step per round, no federated evaluation. Each message a SuperNode receives
# starts a fresh ClientApp process: the train message (and, once per run, query.join and
# query.install_backbone) imports torch + MONAI (seconds), which is what a round costs here;
# the four secure-aggregation stages of a round import neither (about a second each).
# Evaluation would add one more torch message per site and round.
RUN_CONFIG = {
    "preset": "tiny",
    "num-server-rounds": ROUNDS,
    "local-steps": 1,
    "pretrain-rounds": 0,
    "batch-size": 1,
    "min-sites": 2,  # the round completes without the hospital that vanishes in it
    # The longest a stage waits for a reply. A train message starts a fresh ClientApp process
    # (imports, model, data, a DP plan and step), three at once on 2 cores beside the other test
    # worker (tests/conftest.py): 90 s let live sites time out on a loaded CI machine. A longer
    # timeout costs nothing when all is well: the stages after the victim's death end once the
    # SuperLink, missing its heartbeats, answers for it.
    "round-timeout": 360.0,
    "evaluate": False,
    "prognosis-rounds": 0,  # the prognosis phase is covered in-process (test_simulation_federation.py)
    "secure-aggregation": True,  # the server sees only sums...
    "dp-target-epsilon": 8.0,  # ...of DP-SGD updates
}
# Killed in the last round once its masked update has left (its SuperNode logs "Sent successfully" after
# "Sending: train message"), before the unmasking stages: the round completes with the survivors' sum.
VICTIM = "hospital-1"
# Waits time out on a stall (nothing written for this long), not on total time.
STARTUP_TIMEOUT = 45.0
RUN_TIMEOUT = 180.0
CEILING = 1800.0  # and on this total, whatever happens
STOP_TIMEOUT = 10.0



def _load_make_certs():
    spec = importlib.util.spec_from_file_location("pemma_deploy_make_certs", REPO / "deploy" / "make_certs.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


make_certs = _load_make_certs()


# --------------------------------------------------------------------------- processes


def _executable(name: str) -> str:
    """The console script of the running interpreter's environment (not a pyenv shim)."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found next to {sys.executable} nor on PATH: is flwr installed?")
    return found


def _start_time(pid: int) -> int | None:
    """Kernel start time of ``pid`` (guards against killing a recycled PID)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def _descendants(pid: int) -> list[int]:
    children, out, todo = _children_map(), [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@dataclass
class Started:
    name: str
    popen: subprocess.Popen
    log: Path
    # every process seen below it, (pid, start time): the SuperLink starts its
    # SuperExec in a session of its own, which a process-group kill would miss.
    seen: dict[int, int | None] = field(default_factory=dict)

    def snapshot(self) -> None:
        if self.popen.poll() is None:
            for pid in _descendants(self.popen.pid):
                self.seen.setdefault(pid, _start_time(pid))

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        text = re.sub(r"\x1b\[[0-9;]*m", "", text)
        return "\n".join(text.splitlines()[-lines:])


class Deployment:
    """Processes of one loopback federation; :meth:`stop_all` leaves none running."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.home = root / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.home),
            "PYTHONUNBUFFERED": "1",
            "NO_COLOR": "1",
            # 4 Python processes doing torch on 2 cores: one thread each
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "FLWR_TELEMETRY_ENABLED": "0",  # no events to telemetry.flower.ai
            "FLWR_DISABLE_UPDATE_CHECK": "1",  # no PyPI look-up at start
        }
        self.started: list[Started] = []

    def start(self, name: str, argv: list[str], cwd: Path | None = None) -> Started:
        log = self.logs / f"{name}.log"
        with log.open("wb") as stream:
            popen = subprocess.Popen(
                argv, cwd=cwd or self.root, env=self.env, stdout=stream, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        proc = Started(name, popen, log)
        self.started.append(proc)
        return proc

    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """A ``flwr`` CLI call (short-lived; killed with its group on timeout)."""
        popen = subprocess.Popen(
            [_executable("flwr"), *args], cwd=self.root, env=self.env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True, text=True,
        )
        try:
            out, err = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            out, err = popen.communicate()
            pytest.fail(f"flwr {' '.join(args)} did not finish in {timeout:.0f} s\n{out}\n{err}")
        return subprocess.CompletedProcess(popen.args, popen.returncode, out, err)

    def flwr_json(self, *args: str, timeout: float = 60.0) -> dict:
        result = self.flwr(*args, "--format", "json", timeout=timeout)
        start = result.stdout.find("{")
        try:
            return json.loads(result.stdout[start:]) if start >= 0 else {}
        except json.JSONDecodeError:
            return {"success": False, "error-message": result.stdout + result.stderr}

    def snapshot(self) -> None:
        for proc in self.started:
            proc.snapshot()

    def activity(self) -> tuple:
        """A value that changes whenever the deployment makes progress: the size and time of
        every file under the test folder (process logs, run folder, site caches)."""
        stamps = []
        for path in self.root.rglob("*"):
            try:
                stat = path.stat()
            except OSError:
                continue
            stamps.append((str(path), stat.st_size, stat.st_mtime_ns))
        return tuple(sorted(stamps))

    def diagnostics(self) -> str:
        return "\n".join(f"----- {p.name} (exit {p.popen.poll()}) -----\n{p.tail()}" for p in self.started)

    def _alive(self, pid: int, start: int | None) -> bool:
        now = _start_time(pid)
        if now is None:
            return False
        if start is not None and now != start:
            return False  # the PID now belongs to someone else
        try:  # a zombie is dead for our purposes
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    def _ours(self) -> list[tuple[int, int | None]]:
        pids: dict[int, int | None] = {}
        for proc in self.started:
            if proc.popen.poll() is None:
                pids[proc.popen.pid] = _start_time(proc.popen.pid)
            proc.snapshot()
            pids.update(proc.seen)
        return [(pid, start) for pid, start in pids.items() if self._alive(pid, start)]

    def stop_all(self) -> list[str]:
        """SIGTERM every process group and every descendant seen, then SIGKILL what is left.

        Returns a description of any process still alive afterwards (should be empty)."""
        self.snapshot()
        for sig, grace in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, 5.0)):
            targets = self._ours()
            if not targets:
                break
            for proc in self.started:
                if proc.popen.poll() is None:
                    try:
                        os.killpg(proc.popen.pid, sig)  # own session: pgid == pid
                    except ProcessLookupError:
                        pass
            for pid, start in targets:
                if self._alive(pid, start):
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and self._ours():
                for proc in self.started:
                    proc.popen.poll()  # reap
                time.sleep(0.2)
        for proc in self.started:
            try:
                proc.popen.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        return [f"{pid}: {_cmdline(pid)}" for pid, _ in self._ours()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"


def _free_ports(count: int) -> list[int]:
    sockets, ports = [], []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in sockets:
            s.close()
    return ports


def _wait(predicate, stall_timeout: float, what: str, deployment: Deployment, poll: float = 0.5):
    """Poll ``predicate`` until it returns something true.

    Fails only when nothing has moved for ``stall_timeout`` seconds (no process wrote to its
    log, no file changed under the test folder) or after :data:`CEILING` seconds in all: a
    busy machine slows the run down, it does not fail it.
    """
    start = time.monotonic()
    last_change, last_seen = start, deployment.activity()
    while True:
        deployment.snapshot()
        value = predicate()
        if value:
            return value
        now = time.monotonic()
        seen = deployment.activity()
        if seen != last_seen:
            last_change, last_seen = now, seen
        if now - last_change > stall_timeout or now - start > CEILING:
            stalled = now - last_change > stall_timeout
            pytest.fail(
                f"gave up waiting for {what} after {now - start:.0f} s "
                f"({'no progress for ' + format(now - last_change, '.0f') + ' s' if stalled else 'ceiling reached'})"
                f"\n{deployment.diagnostics()}"
            )
        time.sleep(poll)


def _log_has(proc: Started, text: str) -> bool:
    try:
        return text in proc.log.read_text(errors="replace")
    except OSError:
        return False


def _ps_flower_lines(needles: list[str]) -> list[str]:
    """``ps`` lines of flower processes whose command line holds one of ``needles``."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    return [
        line for line in out.splitlines()[1:]
        if re.search(r"flower-|flwr-", line) and any(n in line for n in needles)
    ]


# --------------------------------------------------------------------------- the app


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _copy_app(dest: Path) -> Path:
    """The project's Flower app as ``flwr run`` sees it, minus ``[tool.flwr.federations]``."""
    text = (REPO / "pyproject.toml").read_text()
    kept, skipping = [], False
    for line in text.splitlines(keepends=True):
        header = re.match(r"\s*\[+([^\]]+)\]+\s*$", line)
        if header:
            skipping = header.group(1).strip().startswith("tool.flwr.federations")
        if not skipping:
            kept.append(line)
    copy_project(dest)  # as a fresh clone holds it: `flwr run` applies the app's fab-exclude to it
    (dest / "pyproject.toml").write_text("".join(kept))
    return dest


def _app_config_keys() -> set[str]:
    return set(_pyproject()["tool"]["flwr"]["app"].get("config", {}))


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def _site_name(site_yaml: Path) -> str:
    import yaml

    return str(yaml.safe_load(site_yaml.read_text())["name"])


def _phantom_sites(root: Path) -> list[Path]:
    from pemma_core.phantoms.writer import make_federation

    federation = make_federation(root, n_sites=len(HOSPITALS), cases_per_site=3, seed=0, test_cases=0)
    return [Path(p) for p in federation.site_yamls]


# --------------------------------------------------------------------------- the test


@pytest.mark.slow
def test_tls_authenticated_deployment_survives_a_lost_hospital_and_refuses_unknown_supernode(tmp_path: Path) -> None:
    t0 = time.monotonic()
    needed = set(RUN_CONFIG) | {"run-dir"}
    missing = sorted(needed - _app_config_keys())
    assert not missing, (
        f"pyproject.toml [tool.flwr.app.config] lacks {missing}: `flwr run --run-config` can only override keys "
        "declared there (flwr 1.42 rejects the run otherwise), so a coordinator could not set them either"
    )

    # 1. key material (what the coordinator and each hospital generate)
    certs = make_certs.make_ca(tmp_path / "certs")
    server = make_certs.make_server_cert(tmp_path / "certs", tmp_path / "certs")
    keys = {name: make_certs.make_supernode_key(tmp_path / "keys", name) for name in (*HOSPITALS, ROGUE)}
    assert oct(keys[ROGUE].private.stat().st_mode & 0o777) == "0o600"

    sites = dict(zip(HOSPITALS, _phantom_sites(tmp_path / "federation")))
    app = _copy_app(tmp_path / "app" / "pemma")
    run_dir = tmp_path / "run"

    link_port, *node_ports = _free_ports(1 + len(HOSPITALS) + 1)
    superlink_address = f"127.0.0.1:{link_port}"

    d = Deployment(tmp_path)
    (d.home / "config.toml").write_text(
        "[superlink]\n"
        f'default = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\n"
        f'address = "{superlink_address}"\n'
        f'root-certificates = "{certs.cert}"\n'
    )
    coordinator = tmp_path / "coordinator"
    coordinator.mkdir()
    try:
        # 2. SuperLink: TLS on every API, SuperNode authentication, no `uv sync` at runtime
        link = d.start("superlink", [
            _executable("flower-superlink"),
            "--ssl-ca-certfile", str(certs.cert),
            "--ssl-certfile", str(server.cert),
            "--ssl-keyfile", str(server.key),
            "--enable-supernode-auth",
            "--host", "127.0.0.1", "--port", str(link_port),
            "--database", str(coordinator / "state.db"),
            "--disable-runtime-dependency-installation",
        ], cwd=coordinator)
        _wait(lambda: _log_has(link, f"Uvicorn running on https://127.0.0.1:{link_port}") or link.popen.poll() is not None,
              STARTUP_TIMEOUT, "the SuperLink to listen", d)
        assert link.popen.poll() is None, f"SuperLink exited\n{d.diagnostics()}"

        # 3. register the three hospitals' public keys (Control API over TLS)
        node_ids: dict[str, int] = {}
        for name in HOSPITALS:
            reply = d.flwr_json("supernode", "register", str(keys[name].public), CONNECTION, "--name", name)
            assert reply.get("success"), f"register {name}: {reply}\n{d.diagnostics()}"
            node_ids[name] = int(reply["node-id"])
        listed = d.flwr_json("supernode", "list", CONNECTION)
        assert {int(n["node-id"]) for n in listed["nodes"]} == set(node_ids.values())
        assert {n["status"] for n in listed["nodes"]} == {"registered"}

        # 4. three SuperNodes, each with its own key and site YAML
        nodes = {}
        for (name, site), port in zip(sites.items(), node_ports):
            nodes[name] = d.start(name, [
                _executable("flower-supernode"),
                "--superlink", superlink_address,
                "--root-certificates", str(certs.cert),
                "--auth-supernode-private-key", str(keys[name].private),
                "--node-config", f'site-config="{site}"',
                "--port", str(port),
            ])
        # ... and one whose key nobody registered (bounded retries: it must give up)
        rogue = d.start(ROGUE, [
            _executable("flower-supernode"),
            "--superlink", superlink_address,
            "--root-certificates", str(certs.cert),
            "--auth-supernode-private-key", str(keys[ROGUE].private),
            "--node-config", f'site-config="{sites[HOSPITALS[0]]}"',
            "--port", str(node_ports[-1]),
            "--max-retries", "2", "--max-wait-time", "20",
        ])

        def all_online():
            reply = d.flwr_json("supernode", "list", CONNECTION)
            status = {int(n["node-id"]): n["status"] for n in reply.get("nodes", [])}
            return all(status.get(i) == "online" for i in node_ids.values())

        _wait(all_online, STARTUP_TIMEOUT, "the three registered SuperNodes to be online", d, poll=1.0)
        for name, proc in nodes.items():
            assert _log_has(proc, f"SuperNode ID: {node_ids[name]}"), f"{name} has not its registered node id\n{proc.tail()}"

        # 5. the run: the project's app with run-config overrides
        overrides = {**RUN_CONFIG, "run-dir": str(run_dir)}
        submitted = d.flwr_json(
            "run", str(app), CONNECTION, "--run-config", " ".join(f"{k}={_toml_value(v)}" for k, v in overrides.items()),
            timeout=120.0,
        )
        assert submitted.get("success"), f"flwr run: {submitted}\n{d.diagnostics()}"
        run_id = submitted["run-id"]

        # 6. (while the run starts) the unregistered SuperNode was turned away
        _wait(lambda: rogue.popen.poll() is not None, STARTUP_TIMEOUT, "the unregistered SuperNode to be refused", d)
        assert rogue.popen.returncode != 0, rogue.tail()
        assert "Failed to activate SuperNode" in rogue.tail(200), rogue.tail()
        assert "SuperNode ID:" not in rogue.tail(200), rogue.tail()
        assert _log_has(link, "No SuperNode found with the given public key"), link.tail()
        listed = d.flwr_json("supernode", "list", CONNECTION)
        assert {int(n["node-id"]) for n in listed["nodes"]} == set(node_ids.values()), listed

        def run_status() -> str:
            reply = d.flwr_json("list", CONNECTION, "--run-id", run_id)
            runs = reply.get("runs") or [{}]
            return str(runs[0].get("status", ""))

        killed: list[str] = []
        stop_watching = threading.Event()

        def kill_victim_after_its_masked_update() -> None:
            # Its own thread, polling only the victim's log: the window between its masked update
            # leaving and its answer to the confirm stage is a few seconds, which the main loop
            # (a `flwr list` process per poll) can miss on a loaded machine.
            while not stop_watching.wait(0.05):
                text = nodes[VICTIM].log.read_text(errors="replace")
                sends = [m.start() for m in re.finditer(r"Sending: train message", text)]
                if len(sends) >= ROUNDS and "Sent successfully" in text[sends[ROUNDS - 1]:]:
                    nodes[VICTIM].snapshot()
                    killed.append(VICTIM)  # before the kill: the main loop must not see it die unlisted
                    os.killpg(nodes[VICTIM].popen.pid, signal.SIGKILL)
                    return

        watcher = threading.Thread(target=kill_victim_after_its_masked_update, daemon=True)
        watcher.start()

        asked = [0.0]

        def progressed():
            # A `flwr list` is a Python process (a CPU-second or two) competing with the hospitals'
            # training on 2 cores: asked once the run folder has its report, else every 20 s.
            if (run_dir / "report.md").exists() or time.monotonic() - asked[0] > 20.0:
                asked[0] = time.monotonic()
                status = run_status()
                if status.startswith("finished"):
                    return status
            dead = [p.name for p in (link, *nodes.values()) if p.popen.poll() is not None and p.name not in killed]
            assert not dead, f"{dead} exited during the run\n{d.diagnostics()}"
            return None

        # 7. the run completes: every round but the last with the three hospitals, the last with the two survivors
        try:
            final = _wait(progressed, RUN_TIMEOUT, f"run {run_id} to finish", d, poll=2.0)
        finally:
            stop_watching.set()
            watcher.join()
        run_log = d.flwr("log", run_id, CONNECTION, "--show", timeout=60.0)
        (d.logs / "run.log").write_text(run_log.stdout + run_log.stderr)
        assert final == "finished:completed", f"run {run_id}: {final}\n{run_log.stdout[-4000:]}\n{d.diagnostics()}"
        for r in range(1, ROUNDS + 1):
            assert (run_dir / "adapters" / f"round-{r}.safetensors").is_file(), sorted(run_dir.rglob("*"))
        # every round aggregated all three hospitals, each node (authenticated by its key)
        # serving the site its --node-config named
        expected = {node_ids[h]: _site_name(sites[h]) for h in HOSPITALS}
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert [r["round"] for r in metrics["rounds"]] == list(range(1, ROUNDS + 1)), metrics["rounds"]
        assert killed == [VICTIM]
        for record in metrics["rounds"]:
            survivors = expected if record["round"] < ROUNDS else {n: s for n, s in expected.items()
                                                                   if n != node_ids[VICTIM]}
            served = {int(s["node_id"]): s["name"] for s in record["sites"] if s["status"] == "ok"}
            assert served == survivors and record["aggregated"], record
            secure = record["secure_aggregation"]
            assert secure["final"] == sorted(survivors.values()), secure
            assert all(0 < s["dp_epsilon"] <= RUN_CONFIG["dp-target-epsilon"] for s in record["sites"]
                       if s["status"] == "ok"), record
        assert metrics["rounds"][-1]["secure_aggregation"]["dropped"] == {
            _site_name(sites[VICTIM]): "after its masked update, before unmasking"}
        for name in HOSPITALS:  # what each hospital sent: masked integers only, never a float tensor
            from pemma_core.config.site import load_site_config

            audit = Path(load_site_config(sites[name]).cache_dir) / "audit.jsonl"
            entries = [json.loads(line) for line in audit.read_text().splitlines()]
            dtypes = {t["dtype"] for e in entries for t in e["tensors"]}
            assert dtypes == {"uint32"}, (name, dtypes)
        for name, proc in nodes.items():
            assert _log_has(proc, f"[RUN {run_id}"), f"{name} took no part in run {run_id}\n{proc.tail()}"
    finally:
        # 8. stop everything, by PID / process group, and check nothing is left
        left = d.stop_all()
    assert not left, f"processes still running after stop: {left}"
    needles = [str(tmp_path), f":{link_port}", *(f":{p}" for p in node_ports)]
    needles += [f"--parent-pid {p.popen.pid}" for p in d.started]
    assert not _ps_flower_lines(needles), _ps_flower_lines(needles)
    print(f"deployment test: {time.monotonic() - t0:.1f} s")
