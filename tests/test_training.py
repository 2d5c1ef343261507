"""The one training step and the one Dice evaluation that training, sites and the bench share."""

from __future__ import annotations

import itertools

import pytest
import torch
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot

from pemma_core.model.factory import build_model
from pemma_core.model.spec import ModelSpec, build_backbone
from pemma_core.training.local import (evaluate, evaluate_cases, mode_sampler, on_device, predict_volume,
                                       segmentation_loss, train_local, train_step)
from pemma_core.training.optimizer import make_optimizer

MODES = ["ct", "pet", "ctpet"]


def _model(seed: int = 0):
    torch.manual_seed(seed)
    spec = ModelSpec(preset="tiny")
    return build_model(spec, build_backbone(spec))


def _batches(spec: ModelSpec, n: int, batch_size: int = 1, extra: int = 0, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    s = spec.roi_size[0]
    out = []
    for i in range(n):
        image = torch.randn(batch_size, 2, s + extra, s, s, generator=g)
        label = (torch.rand(batch_size, 1, s + extra, s, s, generator=g) > 0.7).long()
        out.append({"image": image, "label": label, "case_id": [f"case{i}-{j}" for j in range(batch_size)]})
    return out


def test_train_local_is_a_loop_over_train_step():
    steps, seed = 4, 3
    looped, stepped = _model(), _model()
    batches = _batches(looped.spec, 2, batch_size=2)
    result = train_local(looped, batches, MODES, steps=steps, lr=1e-2, seed=seed)

    stepped.train()
    torch.manual_seed(seed)
    optimizer = make_optimizer(stepped, lr=1e-2)
    loss_fn = segmentation_loss()
    draws = mode_sampler(MODES, None, seed)
    losses = [
        train_step(stepped, b["image"], b["label"], next(draws), optimizer, loss_fn, "cpu")
        for b in itertools.islice(itertools.cycle(batches), steps)
    ]
    assert result.loss == sum(losses) / steps
    for (name, a), b in zip(looped.state_dict().items(), stepped.state_dict().values()):
        assert torch.equal(a, b), name


def test_training_and_prediction_leave_a_model_on_its_device_where_it_is(monkeypatch: pytest.MonkeyPatch):
    # A site keeps its model between rounds: Module.to walks every module even when nothing moves.
    model = _model()
    batches = _batches(model.spec, 1)
    moved: list[str] = []
    apply = torch.nn.Module._apply
    monkeypatch.setattr(torch.nn.Module, "_apply",
                        lambda self, *a, **k: moved.append(type(self).__name__) or apply(self, *a, **k))
    train_local(model, batches, MODES, steps=1)
    predict_volume(model, batches[0]["image"], "ct")
    assert moved == []
    assert on_device(model, "meta") is model and moved and {p.device.type for p in model.parameters()} == {"meta"}


def test_the_loss_does_not_reward_a_model_that_misses_a_small_tumour():
    # One tumour voxel in 1,000, the model sure it is all background: the Dice term must read
    # that as a miss (about 1). With the background channel in it (MONAI's default) half of it
    # would be the background's near-perfect Dice, and the tumour's gradient half as strong.
    label = torch.zeros(1, 1, 10, 10, 10, dtype=torch.long)
    label[0, 0, 5, 5, 5] = 1
    logits = torch.zeros(1, 2, 10, 10, 10, requires_grad=True)
    with torch.no_grad():
        logits[:, 0] = 6.0  # background, confidently
    loss = segmentation_loss()(logits, label)
    assert float(loss) > 0.99
    loss.backward()
    tumour_pull = -float(logits.grad[0, 1, 5, 5, 5])  # raising the tumour logit at the tumour voxel lowers the loss
    assert tumour_pull > 0


def test_train_step_refuses_a_non_finite_loss_before_touching_the_weights():
    model = _model()
    batch = _batches(model.spec, 1)[0]
    before = {n: t.clone() for n, t in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with pytest.raises(FloatingPointError, match="in mode ct"):
        train_step(model, batch["image"], batch["label"], "ct", optimizer, lambda out, y: out.sum() * float("nan"), "cpu")
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())


def test_evaluate_reports_monais_aggregate_and_batches_do_not_change_a_case():
    model = _model()
    singles = _batches(model.spec, 4, extra=4)
    pairs = [
        {k: (a[k] + b[k] if k == "case_id" else torch.cat([a[k], b[k]])) for k in a} for a, b in zip(singles[::2], singles[1::2])
    ]
    one = evaluate_cases(model, singles, ["ct", "ctpet"], keep_predictions=True)
    two = evaluate_cases(model, pairs, ["ct", "ctpet"], keep_predictions=True)
    assert one.per_case == two.per_case and one.dice == two.dice
    assert set(one.predictions["ct"]) == {f"case{i}-0" for i in range(4)}
    assert all((one.predictions[m][c] == two.predictions[m][c]).all() for m in one.predictions for c in one.predictions[m])

    metric = DiceMetric(include_background=False, reduction="mean", ignore_empty=False)
    for batch in singles:
        pred = predict_volume(model, batch["image"], "ctpet")
        metric(one_hot(pred, 2), one_hot(batch["label"], 2))
    summary = evaluate(model, singles, ["ct", "ctpet"])
    assert summary.per_case == one.per_case
    assert summary.dice["ctpet"] == float(metric.aggregate().item())
    assert summary.dice["ctpet"] == pytest.approx(one.dice["ctpet"], abs=1e-6)


def test_evaluation_predicts_same_shape_cases_together_and_keeps_each_cases_score():
    from pemma_core.training import local

    model = _model()
    s = model.spec.roi_size[0]
    small, wide = _batches(model.spec, 3), _batches(model.spec, 1, extra=4, seed=2)
    batches = small[:2] + wide + small[2:]
    shapes: list[tuple[int, ...]] = []
    real = local._predict
    local_predict = lambda m, image, *a: shapes.append(tuple(image.shape)) or real(m, image, *a)  # noqa: E731
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(local, "_predict", local_predict)
        together = evaluate_cases(model, batches, ["ct"], keep_predictions=True)
    assert shapes == [(2, 2, s, s, s), (1, 2, s + 4, s, s), (1, 2, s, s, s)]  # order kept, shapes never mixed
    alone = {}
    for batch in batches:
        alone |= evaluate_cases(model, [batch], ["ct"], keep_predictions=True).per_case["ct"]
    assert together.per_case["ct"] == alone and list(together.per_case["ct"]) == list(alone)
    capped = list(local._stacked(small, max_voxels=2 * s**3))
    assert [len(b["case_id"]) for b in capped] == [2, 1]
    assert [c for b in capped for c in b["case_id"]] == [c for b in small for c in b["case_id"]]


def test_evaluation_errors_are_clear():
    model = build_model(ModelSpec(preset="tiny", kind="ct-only"))
    with pytest.raises(ValueError, match="runs modes"):
        evaluate_cases(model, [], ["pet"])
    with pytest.raises(ValueError, match="no case to evaluate"):
        evaluate(model, [], ["ct"])
