"""Patient-level DP-SGD: Opacus' accounting, the site's budget ledger and the DP training step."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from test_training import _model

from pemma_core import privacy
from pemma_core.config.site import load_site_config
from pemma_core.data.pipeline import train_loader
from pemma_core.phantoms.writer import Federation
from pemma_core.privacy import DpPlan, PrivacyLedger, epsilon_spent, plan_dp, steps_within_budget
from pemma_core.training.local import segmentation_loss, train_local, train_step

# --------------------------------------------------------------------------- accounting


def test_plan_dp_spends_close_to_the_target_and_epsilon_orders_as_expected():
    plan = plan_dp(target_epsilon=2.0, delta=1e-5, clip=1.0, batch_size=2, n_patients=20, planned_steps=30)
    assert plan.sample_rate == pytest.approx(0.1) and plan.planned_steps == 30 and plan.clip == 1.0
    spent = epsilon_spent(plan, 30)
    assert 0.8 * 2.0 < spent <= 2.0
    assert epsilon_spent(plan, 0) == 0.0
    assert 0 < epsilon_spent(plan, 10) < spent < epsilon_spent(plan, 60)
    noisier = dataclasses.replace(plan, noise_multiplier=2 * plan.noise_multiplier)
    assert epsilon_spent(noisier, 30) < spent
    assert epsilon_spent(dataclasses.replace(plan, noise_multiplier=0.0), 1) == math.inf
    # More patients at the same batch size: each is drawn less often, so less noise is needed.
    assert plan_dp(2.0, 1e-5, 1.0, 2, 200, 30).noise_multiplier < plan.noise_multiplier
    assert plan_dp(2.0, 1e-5, 1.0, 8, 3, 30).sample_rate == 1.0  # batch larger than the cohort


def test_the_largest_alpha_warning_is_silenced_only_inside_the_accountant():
    plan = DpPlan(target_epsilon=1.0, delta=1e-5, clip=1.0, sample_rate=0.01, noise_multiplier=50.0, planned_steps=1)
    filters = list(warnings.filters)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning escaping the accountant fails the test
        assert 0 < epsilon_spent(plan, 1) < 0.5  # so little spent that the best order is the largest one
    assert warnings.filters == filters
    with pytest.warns(UserWarning, match="largest alpha"):  # it does warn when not silenced
        from opacus.accountants import RDPAccountant

        accountant = RDPAccountant()
        accountant.history = [(50.0, 0.01, 1)]
        accountant.get_epsilon(delta=1e-5)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"target_epsilon": 0.0}, "dp-target-epsilon"),
        ({"target_epsilon": float("nan")}, "dp-target-epsilon"),
        ({"delta": 1.0}, "dp-delta"),
        ({"delta": 0.0}, "dp-delta"),
        ({"clip": -1.0}, "dp-clip"),
        ({"batch_size": 0}, "batch-size"),
        ({"n_patients": 0}, "n-patients"),
        ({"planned_steps": 0}, "planned-steps"),
        ({"planned_steps": 2.5}, "planned-steps"),
        ({"target_epsilon": 1e-9}, "dp-target-epsilon"),  # no noise level reaches it
    ],
)
def test_plan_dp_names_the_bad_argument(change, field):
    args = dict(target_epsilon=1.0, delta=1e-5, clip=1.0, batch_size=2, n_patients=10, planned_steps=10)
    with pytest.raises(ValueError, match=field):
        plan_dp(**{**args, **change})


def test_a_hand_built_plan_is_checked_too():
    with pytest.raises(ValueError, match="sample_rate"):
        DpPlan(1.0, 1e-5, 1.0, sample_rate=1.5, noise_multiplier=1.0, planned_steps=1)
    with pytest.raises(ValueError, match="noise_multiplier"):
        DpPlan(1.0, 1e-5, 1.0, sample_rate=0.5, noise_multiplier=-1.0, planned_steps=1)


def test_steps_within_budget_stops_exactly_where_the_target_would_be_exceeded():
    plan = plan_dp(1.0, 1e-5, 1.0, batch_size=4, n_patients=40, planned_steps=50)
    assert steps_within_budget(plan, 0, 50) == 50  # the calibrated steps always fit
    assert steps_within_budget(plan, 0, 0) == 0
    taken, wanted = 20, 120
    linear = max(k for k in range(wanted + 1) if epsilon_spent(plan, taken + k) <= plan.target_epsilon)
    cutoff = steps_within_budget(plan, taken, wanted)
    assert 0 < cutoff == linear < wanted
    assert epsilon_spent(plan, taken + cutoff) <= 1.0 < epsilon_spent(plan, taken + cutoff + 1)
    assert steps_within_budget(plan, taken + cutoff, 10) == 0
    assert steps_within_budget(plan, 10 * taken + cutoff, 10) == 0  # already past the budget
    with pytest.raises(ValueError, match="steps_taken"):
        steps_within_budget(plan, -1, 3)


def test_a_budget_is_calibrated_and_accounted_once_per_process(monkeypatch):
    """Opacus' calibration is a bisection over RDP orders (seconds per call on a 2-core machine);
    a site asks for the same plan every round, and the same epsilon several times a round."""
    privacy._noise_multiplier.cache_clear()  # whatever other tests planned in this process
    privacy._rdp_epsilon.cache_clear()
    calibrations, accountings = [], []
    calibrate, account = privacy.get_noise_multiplier, privacy.RDPAccountant.get_epsilon
    monkeypatch.setattr(privacy, "get_noise_multiplier", lambda **kw: calibrations.append(kw) or calibrate(**kw))
    monkeypatch.setattr(privacy.RDPAccountant, "get_epsilon",
                        lambda self, **kw: accountings.append(kw) or account(self, **kw))
    args = (5.0, 1e-5, 1.0, 2, 17, 3)
    first = plan_dp(*args)
    assert plan_dp(*args) == first and len(calibrations) == 1
    assert plan_dp(5.0, 1e-5, 0.5, 2, 17, 3).noise_multiplier == first.noise_multiplier  # the clip scales the noise only
    assert len(calibrations) == 1
    assert plan_dp(5.0, 1e-5, 1.0, 2, 18, 3).noise_multiplier != first.noise_multiplier
    assert len(calibrations) == 2
    accountings.clear()  # the calibration asks the accountant too
    spent = epsilon_spent(first, 2)
    assert epsilon_spent(dataclasses.replace(first, clip=3.0), 2) == spent and len(accountings) == 1
    assert epsilon_spent(first, 3) > spent and len(accountings) == 2
    with pytest.raises(ValueError, match="dp-clip"):  # the arguments are still checked on every call
        plan_dp(5.0, 1e-5, -1.0, 2, 17, 3)


def test_a_recorded_plan_is_used_again_unless_it_is_another_budget_or_too_little_noise(monkeypatch):
    """A deployed site answers each round's train message in a fresh process: the plan its ledger
    recorded in an earlier round of the run is used again, not calibrated again (seconds a round)."""
    args = (5.0, 1e-5, 1.0, 2, 17, 3)
    first = plan_dp(*args)
    privacy._noise_multiplier.cache_clear()  # as in a fresh process
    calibrations = []
    calibrate = privacy.get_noise_multiplier
    monkeypatch.setattr(privacy, "get_noise_multiplier", lambda **kw: calibrations.append(kw) or calibrate(**kw))
    assert plan_dp(*args, recorded=first) is first and calibrations == []
    other = plan_dp(5.0, 1e-5, 1.0, 2, 18, 3, recorded=first)  # another cohort size: another sample rate
    assert other.sample_rate == 2 / 18 and len(calibrations) == 1
    weaker = dataclasses.replace(first, noise_multiplier=first.noise_multiplier / 2)  # an edited ledger
    assert plan_dp(*args, recorded=weaker) == first and len(calibrations) == 2


def test_a_sites_second_round_plans_from_its_ledger(phantom_federation: Federation, tmp_path: Path, monkeypatch):
    from client.task import PrivateSteps
    from pemma_core.model.spec import ModelSpec
    from pemma_core.protocol import Instruction

    site = dataclasses.replace(load_site_config(phantom_federation.site_yamls[1]), cache_dir=tmp_path / "cache")
    instruction = Instruction(local_steps=2, lr=0.01, batch_size=2, seed=0, spec=ModelSpec(preset="tiny"),
                              fingerprint="f" * 64, phase="adapt", round=1, run="run-1",
                              dp={"target_epsilon": 4.0, "delta": 1e-5, "clip": 1.0, "planned_steps": 6})
    privacy._noise_multiplier.cache_clear()
    calibrations = []
    calibrate = privacy.get_noise_multiplier
    monkeypatch.setattr(privacy, "get_noise_multiplier", lambda **kw: calibrations.append(kw) or calibrate(**kw))
    first = PrivateSteps(site, instruction, n_patients=3)
    first.record(2)
    privacy._noise_multiplier.cache_clear()  # round 2: a fresh ClientApp process on a deployed SuperNode
    second = PrivateSteps(site, dataclasses.replace(instruction, round=2), n_patients=3)
    assert second.plan == first.plan and len(calibrations) == 1
    second.record(2)
    assert second.epsilon() == pytest.approx(epsilon_spent(first.plan, 4))


# --------------------------------------------------------------------------- ledger


def _plan() -> DpPlan:
    return plan_dp(3.0, 1e-5, 1.0, batch_size=2, n_patients=10, planned_steps=40)


def test_ledger_round_trip(tmp_path: Path):
    path = tmp_path / "site" / "privacy.json"
    ledger, plan = PrivacyLedger(path), _plan()
    assert ledger.steps_taken("run-a") == 0 and ledger.epsilon("run-a") == 0.0 and ledger.plan("run-a") is None
    assert ledger.record("run-a", plan, 5) == 5
    assert ledger.record("run-a", plan, 7) == 12
    ledger.record("run-b", plan, 0)
    again = PrivacyLedger(path)  # a restarted site reads what was written
    assert again.steps_taken("run-a") == 12 and again.steps_taken("run-b") == 0
    assert again.plan("run-a") == plan
    assert again.epsilon("run-a") == epsilon_spent(plan, 12) > 0
    assert json.loads(path.read_text())["runs"]["run-a"]["steps"] == 12


def test_ledger_writes_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "privacy.json"
    ledger, plan = PrivacyLedger(path), _plan()
    ledger.record("run", plan, 3)
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(privacy.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        ledger.record("run", plan, 4)
    assert path.read_bytes() == before  # the old record is whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["privacy.json"]  # no temporary file left
    monkeypatch.undo()
    assert ledger.steps_taken("run") == 3


@pytest.mark.parametrize("text", ["{not json", '{"version": 1, "runs": []}', '{"version": 1, "runs": {"r": {"steps": -1}}}'])
def test_a_corrupt_ledger_is_an_error_naming_the_file_and_is_not_reset(tmp_path: Path, text: str):
    path = tmp_path / "privacy.json"
    path.write_text(text)
    ledger = PrivacyLedger(path)
    with pytest.raises(ValueError, match="privacy.json"):
        ledger.steps_taken("r")
    with pytest.raises(ValueError, match=str(path)):
        ledger.record("r", _plan(), 1)
    assert path.read_text() == text


def test_a_run_cannot_be_re_planned(tmp_path: Path):
    ledger, plan = PrivacyLedger(tmp_path / "privacy.json"), _plan()
    ledger.record("run", plan, 4)
    for change in ({"noise_multiplier": plan.noise_multiplier * 0.5}, {"clip": 2.0}, {"sample_rate": 0.5},
                   {"delta": 1e-6}, {"target_epsilon": 10.0}):
        with pytest.raises(ValueError, match="re-planned"):
            ledger.record("run", dataclasses.replace(plan, **change), 1)
    assert ledger.steps_taken("run") == 4
    ledger.record("other-run", dataclasses.replace(plan, clip=2.0), 1)  # another run may plan anew


# --------------------------------------------------------------------------- DP training


class _Patients(torch.utils.data.Dataset):
    """Case ``i`` as a pipeline item: a list of one crop ``{"image": [2, ...], "label": [1, ...]}``."""

    def __init__(self, n: int, size: int, seed: int = 1, nan: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = [
            {"image": torch.randn(2, size, size, size, generator=g), "label": (torch.rand(1, size, size, size, generator=g) > 0.7).float()}
            for _ in range(n)
        ]
        if nan:
            self.items[0]["image"][:] = float("nan")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> list[dict]:
        return [self.items[i]]


def _loader(n: int, model, **kw) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(_Patients(n, model.roi_size[0], **kw), batch_size=2)


def _dp(sample_rate: float, clip: float, noise: float) -> DpPlan:
    return DpPlan(target_epsilon=1.0, delta=1e-5, clip=clip, sample_rate=sample_rate, noise_multiplier=noise, planned_steps=1)


def _sgd(model, lr: float) -> torch.optim.SGD:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)


def _change(before: dict, model) -> dict[str, torch.Tensor]:
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}


def _norm(delta: dict[str, torch.Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(d) for d in delta.values()])))


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_without_clipping_or_noise_a_full_draw_is_plain_sgd_on_the_batch():
    dp_model, plain = _model(), _model()
    loader = _loader(3, dp_model)
    before = _params(dp_model)
    result = train_local(dp_model, loader, ["ct"], steps=1, seed=0, optimizer=_sgd(dp_model, 0.5), dp=_dp(1.0, 1e6, 0.0))
    assert result.dp_steps == 1 and result.epsilon is None
    assert result.examples == {"shared": 3, "ct": 3}

    items = [loader.dataset[i][0] for i in range(3)]
    image, label = torch.stack([x["image"] for x in items]), torch.stack([x["label"] for x in items])
    plain.train()
    loss = train_step(plain, image, label, "ct", _sgd(plain, 0.5), segmentation_loss(), "cpu")
    assert result.loss == pytest.approx(loss, rel=1e-5)
    groups = dp_model.param_groups
    moved = 0
    for (name, a), b in zip(dp_model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
        if groups.get(name) in {"pet", "fusion"}:
            assert torch.equal(a, before[name]), name
        moved += not torch.equal(a, before[name])
    assert moved > 0


def test_each_patients_gradient_is_clipped():
    lr = 1.0
    # One patient drawn for sure: the step is lr * clipped gradient / 1.
    tiny, huge = _model(), _model()
    start = _params(tiny)
    train_local(tiny, _loader(1, tiny), ["ct"], steps=1, optimizer=_sgd(tiny, lr), dp=_dp(1.0, 1e-3, 0.0))
    train_local(huge, _loader(1, huge), ["ct"], steps=1, optimizer=_sgd(huge, lr), dp=_dp(1.0, 1e6, 0.0))
    unclipped = _norm(_change(start, huge)) / lr
    assert unclipped > 1e-2  # the raw gradient is far above the tiny clip
    assert _norm(_change(start, tiny)) == pytest.approx(lr * 1e-3, rel=1e-2)

    # Poisson draws over 6 patients: at most clip per sampled patient, over the expected batch.
    for seed in (0, 1):
        model = _model()
        before = _params(model)
        plan = _dp(0.5, 1e-3, 0.0)
        result = train_local(model, _loader(6, model), ["ct"], steps=1, seed=seed, optimizer=_sgd(model, lr), dp=plan)
        sampled = result.examples.get("shared", 0)
        assert result.examples.get("ct", 0) == sampled <= 6
        assert _norm(_change(before, model)) <= lr * plan.clip * sampled / (0.5 * 6) * (1 + 1e-3) + 1e-7


def test_noise_is_seeded_added_to_the_trained_tensors_only_and_an_empty_draw_is_a_step():
    def run(seed: int, mode: str = "ct"):
        model = _model()
        before = _params(model)
        # A negligible rate: no patient is drawn, the step is noise alone.
        result = train_local(model, _loader(2, model), [mode], steps=1, seed=seed, optimizer=_sgd(model, 1.0), dp=_dp(1e-9, 0.5, 2.0))
        return result, _change(before, model), model

    result, delta, model = run(0)
    assert result.examples == {"shared": 0, "ct": 0} and result.loss == 0.0 and result.dp_steps == 1
    same, other = run(0)[1], run(1)[1]
    assert all(torch.equal(delta[n], same[n]) for n in delta)
    assert any(not torch.equal(delta[n], other[n]) for n in delta)
    groups = model.param_groups
    trained = {n: d for n, d in delta.items() if groups.get(n) in {"shared", "ct"}}
    assert all(d.abs().sum() > 0 for d in trained.values())  # noise on every trained tensor
    assert all(torch.equal(d, torch.zeros_like(d)) for n, d in delta.items() if n not in trained)
    # Per element, std noise_multiplier * clip / expected batch (2e-9), times lr 1.
    flat = torch.cat([d.flatten() for d in trained.values()])
    assert float(flat.std()) == pytest.approx(2.0 * 0.5 / (1e-9 * 2), rel=0.1)


def test_dp_changes_exactly_the_tensors_a_plain_step_in_that_mode_would_have_a_gradient_for():
    for mode in ("ctpet", "pet"):
        probe = _model()
        probe.train()
        image = torch.rand(1, 2, *probe.roi_size)
        label = (torch.rand(1, 1, *probe.roi_size) > 0.7).float()
        train_step(probe, image, label, mode, _sgd(probe, 0.0), segmentation_loss(), "cpu")
        with_grad = {n for n, p in probe.named_parameters() if p.grad is not None}

        model = _model()
        before = _params(model)
        train_local(model, _loader(2, model), [mode], steps=1, optimizer=_sgd(model, 1.0), dp=_dp(0.5, 1.0, 1.0))
        changed = {n for n, d in _change(before, model).items() if d.abs().sum() > 0}
        assert changed == with_grad, mode
        assert all(model.param_groups[n] in model.groups_for_mode(mode) for n in changed)


def test_dp_training_refuses_a_loader_without_patients_and_a_non_finite_loss():
    model = _model()
    with pytest.raises(ValueError, match="loader.dataset"):
        train_local(model, [{"image": torch.zeros(1, 2, 4, 4, 4)}], ["ct"], steps=1, dp=_dp(0.5, 1.0, 1.0))
    before = _params(model)
    with pytest.raises(FloatingPointError, match="in mode ct"):
        train_local(model, _loader(1, model, nan=True), ["ct"], steps=1, dp=_dp(1.0, 1.0, 1.0))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_dp_training_on_a_site_loader(phantom_federation: Federation, tmp_path: Path):
    cfg = dataclasses.replace(load_site_config(phantom_federation.site_yamls[1]), cache_dir=tmp_path / "cache")
    model = _model()
    loader = train_loader(cfg, roi_size=model.roi_size, batch_size=2, seed=0, num_workers=0)
    n_patients = len(loader.dataset)
    plan = plan_dp(4.0, 1e-5, 1.0, batch_size=2, n_patients=n_patients, planned_steps=3)
    before = _params(model)
    result = train_local(model, loader, ["ct", "pet", "ctpet"], steps=3, seed=0, dp=plan)
    assert result.dp_steps == result.steps == 3 and sum(result.mode_steps.values()) == 3
    assert 0 <= result.examples["shared"] <= 3 * n_patients and math.isfinite(result.loss)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    plain = train_local(_model(), loader, ["ct"], steps=1)
    assert plain.dp_steps == 0 and plain.epsilon is None
