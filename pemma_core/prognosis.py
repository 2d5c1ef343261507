"""Training and scoring the survival head of a PEMMA model (groups ``prognosis``, ``ehr``).

A site's cohort is small, and the Cox partial likelihood compares every patient with
everyone still at risk, so a step uses the whole cohort (full-batch gradient). With the
segmentation adapters frozen (the default) the pooled encoder tokens do not change, so
they are computed once per mode and each step only runs the head: seconds, not minutes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from pemma_core.model import MODE_GROUPS, PemmaModel
from pemma_core.survival import concordance, cox_partial_nll
from pemma_core.train import TrainResult


@dataclass
class Cohort:
    """One site's survival cases: ``image [N, 2, S, S, S]`` (crops around the tumour),
    ``time [N]``, ``event [N]`` (1 = event observed) and ``ehr [N, P]`` or None."""

    image: torch.Tensor
    time: torch.Tensor
    event: torch.Tensor
    ehr: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = self.image.shape[0]
        for name in ("time", "event"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"cohort {name} must have shape [{n}], got {tuple(getattr(self, name).shape)}")
        if self.ehr is not None and (self.ehr.ndim != 2 or self.ehr.shape[0] != n):
            raise ValueError(f"cohort ehr must have shape [{n}, P], got {tuple(self.ehr.shape)}")

    def __len__(self) -> int:
        return int(self.image.shape[0])


def _check_survival_model(model: PemmaModel) -> None:
    if not isinstance(model, PemmaModel) or not model.spec.survival:
        raise ValueError("survival training needs a PEMMA model built with survival=True")


def train_survival(
    model: PemmaModel,
    cohort: Cohort,
    modes: list[str] | tuple[str, ...],
    steps: int,
    lr: float = 1e-2,
    train_adapters: bool = False,
    weight_decay: float = 1e-3,
    ties: str = "efron",
) -> TrainResult:
    """Fit the survival head (and EHR encoder) with the negative Cox partial likelihood.

    Each step cycles through ``modes``. With ``train_adapters`` the groups of that mode
    are fine-tuned jointly; otherwise only ``prognosis`` and ``ehr`` move.
    """
    _check_survival_model(model)
    if len(cohort) < 2 or int(cohort.event.sum()) < 1:
        raise ValueError(f"a survival cohort needs >= 2 patients and >= 1 event, got {len(cohort)} / {int(cohort.event.sum())}")
    head_groups = {"prognosis"} | ({"ehr"} if model.spec.ehr_features else set())
    groups = model.param_groups
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(params.values(), lr=lr, weight_decay=weight_decay)
    cached: dict[str, torch.Tensor] = {}
    if not train_adapters:
        model.eval()
        with torch.no_grad():
            cached = {m: model.encode(cohort.image, m) for m in modes}
    model.train(train_adapters)
    start = time.perf_counter()
    total = 0.0
    examples: dict[str, int] = {}
    for step in range(steps):
        mode = modes[step % len(modes)]
        trained = head_groups | (set(MODE_GROUPS[mode]) if train_adapters else set())
        optimizer.zero_grad(set_to_none=True)
        features = cached[mode] if not train_adapters else model.encode(cohort.image, mode)
        embedding = model.ehr_encoder(cohort.ehr) if model.spec.ehr_features else None
        risk = model.survival_head(features, embedding)
        loss = cox_partial_nll(risk, cohort.time, cohort.event, ties=ties)
        loss.backward()
        for name, p in params.items():
            if groups[name] not in trained:
                p.grad = None
        optimizer.step()
        total += float(loss.detach())
        for g in trained:
            examples[g] = examples.get(g, 0) + len(cohort)
    return TrainResult(loss=total / steps, steps=steps, examples=examples, seconds=time.perf_counter() - start)


@torch.no_grad()
def predict_risk(model: PemmaModel, cohort: Cohort, mode: str) -> torch.Tensor:
    """Risk score per patient, ``[N]`` (higher = shorter expected survival)."""
    _check_survival_model(model)
    model.eval()
    return model.risk(cohort.image, mode, cohort.ehr)


def evaluate_survival(model: PemmaModel, cohort: Cohort, mode: str) -> float:
    """Harrell's C-index of the model's risk on ``cohort`` in ``mode``."""
    risk = predict_risk(model, cohort, mode)
    return concordance(risk, cohort.time, cohort.event)
