"""Patient-level differential privacy (DP-SGD) for a site's adapter training.

A site that trains with a :class:`DpPlan` draws patients by Poisson sampling each step,
clips every patient's gradient and adds Gaussian noise
(:func:`pemma_core.training.local.train_local` with ``dp=``). The privacy accounting is
Opacus' RDP accountant, never computed here: :func:`plan_dp` calibrates the noise with
``opacus.accountants.utils.get_noise_multiplier`` and :func:`epsilon_spent` asks
``opacus.accountants.RDPAccountant``.

The unit of privacy is a patient (a training case), not a crop: one draw includes a
patient at most once, and that patient's whole gradient is clipped.

A site keeps a :class:`PrivacyLedger` on disk so that the budget survives restarts and
resumed runs: the steps already taken under a run's plan, from which the epsilon spent
follows.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

__all__ = ["DpPlan", "PrivacyLedger", "epsilon_spent", "plan_dp", "steps_within_budget"]

_LEDGER_VERSION = 1

# The fields that fix what a step costs and what the budget is; a run keeps them for its life.
_BUDGET_FIELDS = ("target_epsilon", "delta", "clip", "sample_rate", "noise_multiplier")


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _whole(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class DpPlan:
    """What DP-SGD a site runs and the budget it may spend.

    ``clip`` bounds one patient's gradient L2 norm (all trained tensors together) per step;
    ``sample_rate`` is each patient's Poisson inclusion probability per step;
    ``noise_multiplier`` is the noise's standard deviation in units of ``clip``;
    ``planned_steps`` is the number of steps the noise was calibrated for (at most
    ``target_epsilon`` at ``delta`` after them). A zero ``noise_multiplier`` is allowed
    (tests, ablations) and spends an infinite epsilon in one step.
    """

    target_epsilon: float
    delta: float
    clip: float
    sample_rate: float
    noise_multiplier: float
    planned_steps: int

    def __post_init__(self) -> None:
        if _number("dp-target-epsilon", self.target_epsilon) <= 0:
            raise ValueError(f"dp-target-epsilon must be > 0, got {self.target_epsilon}")
        if not 0 < _number("dp-delta", self.delta) < 1:
            raise ValueError(f"dp-delta must be in (0, 1), got {self.delta}")
        if _number("dp-clip", self.clip) <= 0:
            raise ValueError(f"dp-clip must be > 0, got {self.clip}")
        if not 0 < _number("sample_rate", self.sample_rate) <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if _number("noise_multiplier", self.noise_multiplier) < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        _whole("planned-steps", self.planned_steps, 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> DpPlan:
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) != names:
            raise ValueError(f"a DP plan needs exactly the keys {sorted(names)}, got {data!r}")
        return cls(**data)


def plan_dp(
    target_epsilon: float, delta: float, clip: float, batch_size: int, n_patients: int, planned_steps: int,
    recorded: DpPlan | None = None,
) -> DpPlan:
    """The plan whose noise lets ``planned_steps`` steps, each drawing patients at rate
    ``batch_size / n_patients`` (at most 1), spend at most ``target_epsilon`` at ``delta``.

    The noise multiplier is Opacus' RDP calibration (``get_noise_multiplier``), which stops
    within its tolerance below the target. ``recorded`` (a site's ledger: the plan of an earlier
    round of the run) is returned instead when it is the plan of these arguments and its noise
    still keeps ``planned_steps`` within the target: a deployed site answers each message in a
    fresh process, where calibrating again would cost seconds every round. Raises ``ValueError``
    naming the field for a bad argument, or the target when no noise level reaches it.
    """
    if _number("dp-target-epsilon", target_epsilon) <= 0:
        raise ValueError(f"dp-target-epsilon must be > 0, got {target_epsilon}")
    if not 0 < _number("dp-delta", delta) < 1:
        raise ValueError(f"dp-delta must be in (0, 1), got {delta}")
    if _number("dp-clip", clip) <= 0:
        raise ValueError(f"dp-clip must be > 0, got {clip}")
    _whole("batch-size", batch_size, 1)
    _whole("n-patients", n_patients, 1)
    _whole("planned-steps", planned_steps, 1)
    sample_rate = min(1.0, batch_size / n_patients)
    asked = (float(target_epsilon), float(delta), float(clip), sample_rate, planned_steps)
    if recorded is not None and (recorded.target_epsilon, recorded.delta, recorded.clip, recorded.sample_rate,
                                 recorded.planned_steps) == asked:
        # One accounting (milliseconds), not a calibration: an edited ledger cannot lower the noise.
        if epsilon_spent(recorded, planned_steps) <= target_epsilon:
            return recorded
    return DpPlan(
        target_epsilon=float(target_epsilon),
        delta=float(delta),
        clip=float(clip),
        sample_rate=sample_rate,
        noise_multiplier=_noise_multiplier(float(target_epsilon), float(delta), sample_rate, planned_steps),
        planned_steps=planned_steps,
    )


# Calibration and accounting are pure and cost seconds (a bisection over RDP orders): a site asks
# for the same plan every round and the same epsilon several times a round, so each is computed
# once per process. A few dozen entries: a process serves a handful of sites and runs.
@functools.lru_cache(maxsize=64)
def _noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, planned_steps: int) -> float:
    with _quiet_accountant():
        try:
            return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                              sample_rate=sample_rate, steps=planned_steps, accountant="rdp"))
        except ValueError as exc:  # Opacus: "The privacy budget is too low."
            raise ValueError(
                f"dp-target-epsilon {target_epsilon} cannot be reached at dp-delta {delta} over "
                f"{planned_steps} steps at sample rate {sample_rate:g}: {exc}"
            ) from None


@contextlib.contextmanager
def _quiet_accountant() -> Iterator[None]:
    """Opacus warns when the best RDP order is the largest one it tries; the epsilon it
    returns is still a valid upper bound, and the warning would repeat every step."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha", category=UserWarning)
        yield


def epsilon_spent(plan: DpPlan, steps: int) -> float:
    """Epsilon (at ``plan.delta``) after ``steps`` steps of ``plan``, by Opacus' RDP accountant
    (``inf`` for a plan without noise)."""
    _whole("steps", steps, 0)
    if steps == 0:
        return 0.0
    if plan.noise_multiplier == 0:  # no noise, no privacy (and no RDP order to report)
        return math.inf
    return _rdp_epsilon(plan.noise_multiplier, plan.sample_rate, steps, plan.delta)


@functools.lru_cache(maxsize=256)
def _rdp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    with _quiet_accountant():
        return float(accountant.get_epsilon(delta=delta))


def steps_within_budget(plan: DpPlan, steps_taken: int, steps_wanted: int) -> int:
    """How many of ``steps_wanted`` more steps fit after ``steps_taken`` before the epsilon
    spent would exceed ``plan.target_epsilon`` (0 once the budget is spent).

    Epsilon grows with the number of steps, so the largest fitting count is found by
    bisection over :func:`epsilon_spent`.
    """
    _whole("steps_taken", steps_taken, 0)
    _whole("steps_wanted", steps_wanted, 0)

    def fits(k: int) -> bool:
        return epsilon_spent(plan, steps_taken + k) <= plan.target_epsilon

    if steps_wanted == 0 or not fits(0):
        return 0
    if fits(steps_wanted):
        return steps_wanted
    lo, hi = 0, steps_wanted  # fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


class PrivacyLedger:
    """The DP steps a site has taken, per run key, in a small JSON file at ``path``.

    Each run key holds the plan it was first recorded with and its step count; the epsilon
    spent follows from them. The file is rewritten atomically (temporary file, then
    ``os.replace``), so a crash leaves the old record or the new one. A file that cannot be
    read as a ledger raises ``ValueError`` naming it: starting afresh would forget the
    budget already spent.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    # ------------------------------------------------------------- reading

    def _read(self) -> dict[str, dict[str, Any]]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"privacy ledger {self.path} is unreadable ({exc}); it is not reset, fix or restore it") from None
        runs = data.get("runs") if isinstance(data, dict) else None
        if not isinstance(data, dict) or data.get("version") != _LEDGER_VERSION or not isinstance(runs, dict):
            raise ValueError(f"privacy ledger {self.path} is not a version-{_LEDGER_VERSION} ledger; it is not reset")
        for key, entry in runs.items():
            steps = entry.get("steps") if isinstance(entry, dict) else None
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
                raise ValueError(f"privacy ledger {self.path}: run {key!r} has no valid step count; it is not reset")
            try:
                DpPlan.from_dict(entry.get("plan"))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"privacy ledger {self.path}: run {key!r} has a bad plan ({exc})") from None
        return runs

    def plan(self, run_key: str) -> DpPlan | None:
        """The plan ``run_key`` was recorded with (None: nothing recorded)."""
        entry = self._read().get(str(run_key))
        return None if entry is None else DpPlan.from_dict(entry["plan"])

    def steps_taken(self, run_key: str) -> int:
        """DP steps recorded for ``run_key`` (0 when none)."""
        entry = self._read().get(str(run_key))
        return 0 if entry is None else int(entry["steps"])

    def epsilon(self, run_key: str) -> float:
        """Epsilon spent by ``run_key``'s recorded steps under its plan (0.0 when none)."""
        entry = self._read().get(str(run_key))
        return 0.0 if entry is None else epsilon_spent(DpPlan.from_dict(entry["plan"]), int(entry["steps"]))

    # ------------------------------------------------------------- writing

    def record(self, run_key: str, plan: DpPlan, steps_added: int) -> int:
        """Add ``steps_added`` steps taken under ``plan`` to ``run_key``; returns its new total.

        Steps already taken are recorded even past the budget (they happened); callers ask
        :func:`steps_within_budget` before training. Raises ``ValueError`` when ``plan``
        differs from the run's recorded plan in noise, sample rate, clip, delta or target:
        a budget cannot be re-planned mid-run.
        """
        if not isinstance(plan, DpPlan):
            raise ValueError(f"plan must be a DpPlan, got {type(plan).__name__}")
        _whole("steps_added", steps_added, 0)
        key = str(run_key)
        runs = self._read()
        entry = runs.get(key)
        if entry is None:
            entry = {"plan": plan.to_dict(), "steps": 0}
        else:
            recorded = DpPlan.from_dict(entry["plan"])
            changed = [f for f in _BUDGET_FIELDS if getattr(recorded, f) != getattr(plan, f)]
            if changed:
                detail = ", ".join(f"{f} {getattr(recorded, f)} -> {getattr(plan, f)}" for f in changed)
                raise ValueError(
                    f"privacy ledger {self.path}: run {key!r} was planned differently ({detail}); "
                    "a DP budget cannot be re-planned mid-run"
                )
        entry["steps"] = int(entry["steps"]) + steps_added
        runs[key] = entry
        self._write(runs)
        return entry["steps"]

    def _write(self, runs: dict[str, dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"version": _LEDGER_VERSION, "runs": runs}, indent=2, sort_keys=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

