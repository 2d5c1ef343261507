"""Mutation check: do the tests catch realistic bugs?

Each mutation below is one realistic bug (a line of the real code changed the way a
hurried edit would change it). For each, this script copies the project to a temporary
folder, applies the mutation there (the checkout is never touched), runs the tests that
should catch it, and reports whether they failed (caught) or passed (missed)::

    python tests/mutation_check.py            # every mutation
    python tests/mutation_check.py -k resume  # those whose name contains "resume"
    python tests/mutation_check.py --list

Exit status 0 when every mutation is caught, 1 when one is missed, 2 when a mutation no
longer applies (its text is gone from the code: update it with the code it mutates).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from project_files import REPO, copy_project

@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # file, relative to the repository
    find: str  # exact text, present once
    replace: str
    tests: tuple[str, ...]  # pytest arguments (files or node ids) that must catch it


FED = "tests/test_simulation_federation.py"
MUTATIONS: tuple[Mutation, ...] = (
    # --- the seven bugs the layout issue found missed by the suite --------------------------
    Mutation("pet mode: CT channel fed to the first skip", "pemma_core/model/layers.py",
             'primary = x[:, 0:1] if "ct" in REQUIRED_MODALITIES[mode] else x[:, 1:2]', "primary = x[:, 0:1]",
             ("tests/test_model.py::test_every_mode_equals_the_backbone_on_its_channel_at_init",)),
    Mutation("ctpet also claims group ct", "pemma_core/model/pemma.py",
             '"ctpet": frozenset({"shared", "pet", "fusion"})', '"ctpet": frozenset({"shared", "pet", "fusion", "ct"})',
             ("tests/test_model.py::test_per_mode_exactly_its_groups_receive_gradients_and_are_counted",)),
    Mutation("metric names matched by prefix", "pemma_core/protocol.py",
             "        if key not in allowed.metrics:  # exact names",
             "        if not any(key.startswith(m) for m in allowed.metrics):  # exact names",
             ("tests/test_protocol.py::test_a_metric_name_that_only_starts_like_an_allowed_one_is_refused",)),
    Mutation("case ids searched in metric names only", "pemma_core/protocol.py",
             "    texts = [*reply.metrics, *(str(v) for v in reply.meta.values())]", "    texts = [*reply.metrics]",
             ("tests/test_protocol.py::test_a_case_id_is_found_in_any_config_value_and_metric_name",)),
    Mutation("resume recomputes every adapt round", "server/phases.py",
             '    offset = run.last_finished_round("adapt") if settings.resume else 0', "    offset = 0",
             (f"{FED}::test_resume_ends_with_the_same_adapters",)),
    Mutation("load_backbone skips its fingerprint check", "pemma_core/model/files.py",
             '    if backbone_fingerprint(backbone) != metadata.get("fingerprint"):', "    if False:",
             ("tests/test_adapters.py::test_backbone_file_whose_tensors_do_not_match_its_fingerprint_is_refused",)),
    Mutation("resume accepts another model spec", "server/server_app.py",
             '        check_same_spec(run, previous.get("model_spec"), settings.model_spec())', "        pass",
             (f"{FED}::test_resume_with_another_model_spec_is_refused",)),
    # --- further realistic bugs -----------------------------------------------------------
    Mutation("client searches its reply for no case id", "client/site_work.py",
             "roi_size, site_case_ids(site), where=", "roi_size, (), where=",
             ("tests/test_client_app.py::test_every_reply_is_searched_for_the_sites_case_ids",)),
    Mutation("aggregation ignores the example counts", "pemma_core/aggregation.py",
             "        weights = [float(u.examples.get(group, 0)) for u in senders]",
             "        weights = [1.0 for u in senders]",
             ("tests/test_aggregation.py",)),
    Mutation("single modes routed through the fusion projection", "pemma_core/model/layers.py",
             "            return self.ct_adapter(self.ct_conv(x[:, 0:1]))",
             "            return self.fusion(self.ct_adapter(self.ct_conv(x[:, 0:1])), torch.zeros_like(self.ct_conv(x[:, 0:1])))",
             ("tests/test_model.py::test_single_modes_do_not_depend_on_the_fusion_projection",)),
)


def _copy_project(dest: Path) -> None:
    copy_project(dest)
    shared = REPO.parent / "shared"
    if shared.exists():  # tests find the real data beside the project
        (dest.parent / "shared").symlink_to(shared)


def apply(mutation: Mutation, root: Path) -> None:
    path = root / mutation.path
    text = path.read_text()
    count = text.count(mutation.find)
    if count != 1:
        raise LookupError(f"{mutation.name}: expected the text once in {mutation.path}, found it {count} times")
    path.write_text(text.replace(mutation.find, mutation.replace))


def run_one(mutation: Mutation, timeout: float) -> tuple[str, float]:
    """'caught', 'missed' or 'stale' (the text to mutate is gone), and the seconds taken."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pemma-mutation-") as tmp:
        root = Path(tmp) / "project"
        _copy_project(root)
        try:
            apply(mutation, root)
        except LookupError as exc:
            print(f"  {exc}", file=sys.stderr)
            return "stale", time.monotonic() - start
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONDONTWRITEBYTECODE": "1"}
        # `python -m pytest` from the copy: the copy's packages come first on sys.path,
        # ahead of the editable install of the checkout.
        cmd = [sys.executable, "-m", "pytest", "-n", "0", "-x", "-q", "-p", "no:cacheprovider", *mutation.tests]
        try:
            result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "caught", time.monotonic() - start  # a hang counts as a failing test
        return ("missed" if result.returncode == 0 else "caught"), time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", dest="pattern", help="only mutations whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mutation's test run")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.pattern or args.pattern in m.name]
    if args.list:
        for m in chosen:
            print(f"{m.name:<48} {m.path}  -> {' '.join(m.tests)}")
        return 0
    outcomes: dict[str, list[str]] = {"caught": [], "missed": [], "stale": []}
    for i, m in enumerate(chosen, start=1):
        outcome, seconds = run_one(m, args.timeout)
        outcomes[outcome].append(m.name)
        print(f"[{i}/{len(chosen)}] {outcome:<7} {m.name} ({seconds:.0f} s)", flush=True)
    print(f"\n{len(outcomes['caught'])} of {len(chosen)} mutations caught"
          + (f"; missed: {', '.join(outcomes['missed'])}" if outcomes["missed"] else "")
          + (f"; stale: {', '.join(outcomes['stale'])}" if outcomes["stale"] else ""))
    if outcomes["stale"]:
        return 2
    return 1 if outcomes["missed"] else 0


if __name__ == "__main__":
    sys.exit(main())
