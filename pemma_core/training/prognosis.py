"""Training and scoring the survival head of a PEMMA model (groups ``prognosis``, ``ehr``).

A site's cohort is small, and the Cox partial likelihood compares every patient with
everyone still at risk, so a step uses the whole cohort (full-batch gradient). With the
segmentation adapters frozen (the default) the pooled encoder tokens do not change, so
they are computed once per mode and each step only runs the head.

A site without EHR on a model with an EHR branch (the federation's rule, see
:func:`ehr_term`): the head is additive, ``risk = w_img . f + w_ehr . e``, and such a
site omits the EHR term (a zero embedding). It trains only the ``prognosis`` group;
the EHR columns of the head get no gradient from it, the EHR encoder is not touched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from pemma_core.aggregation import SiteUpdate, aggregate_round
from pemma_core.model.files import load_trainable_state, trainable_state
from pemma_core.model.pemma import MODE_GROUPS, PemmaModel
from pemma_core.training.local import TrainResult
from pemma_core.training.survival import concordance, cox_partial_nll



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


def ehr_term(model: PemmaModel, cohort: Cohort, omit_ehr: bool = False) -> torch.Tensor | None:
    """The EHR embedding fed to the head: the encoder's output when the cohort has EHR;
    with ``omit_ehr``, zeros ("the EHR term omitted") when the model has an EHR branch
    but the cohort has none; ``None`` when the model has no EHR branch."""
    if not model.spec.ehr_features:
        return None
    if cohort.ehr is None:
        if not omit_ehr:
            raise ValueError(
                f"this model's survival head needs EHR covariates [B, {model.spec.ehr_features}] "
                "(or omit_ehr=True to leave the EHR term out)"
            )
        return torch.zeros(len(cohort), model.spec.ehr_embedding)
    return model.ehr_encoder(cohort.ehr)


def train_survival(
    model: PemmaModel,
    cohort: Cohort,
    modes: list[str] | tuple[str, ...],
    steps: int,
    lr: float = 1e-2,
    train_adapters: bool = False,
    weight_decay: float = 1e-3,
    ties: str = "efron",
    omit_ehr: bool = False,
) -> TrainResult:
    """Fit the survival head (and EHR encoder) with the negative Cox partial likelihood.

    Each step cycles through ``modes``. With ``train_adapters`` the groups of that mode
    are fine-tuned jointly; otherwise only ``prognosis`` and ``ehr`` move. With
    ``omit_ehr`` a cohort without EHR trains a model with an EHR branch on the image
    term alone (group ``prognosis`` only; see the module docstring).
    """
    _check_survival_model(model)
    if len(cohort) < 2 or int(cohort.event.sum()) < 1:
        raise ValueError(f"a survival cohort needs >= 2 patients and >= 1 event, got {len(cohort)} / {int(cohort.event.sum())}")
    head_groups = {"prognosis"} | ({"ehr"} if model.spec.ehr_features and cohort.ehr is not None else set())
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
        risk = model.survival_head(features, ehr_term(model, cohort, omit_ehr))
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
def predict_risk(model: PemmaModel, cohort: Cohort, mode: str, omit_ehr: bool = False) -> torch.Tensor:
    """Risk score per patient, ``[N]`` (higher = shorter expected survival)."""
    _check_survival_model(model)
    model.eval()
    embedding = ehr_term(model, cohort, omit_ehr)
    return model.survival_head(model.encode(cohort.image, mode), embedding)


def evaluate_survival(model: PemmaModel, cohort: Cohort, mode: str, omit_ehr: bool = False) -> float:
    """Harrell's C-index of the model's risk on ``cohort`` in ``mode``."""
    risk = predict_risk(model, cohort, mode, omit_ehr)
    return concordance(risk, cohort.time, cohort.event)


# ------------------------------------------------------------------ cohorts from site data


def crop_around_tumour(image: torch.Tensor, label: torch.Tensor | None, roi_size: tuple[int, int, int]) -> torch.Tensor:
    """``[C, X, Y, Z]`` -> ``[C, *roi_size]`` centred on the label's centroid (the volume's
    centre when there is no label or it is empty), zero-padded where the volume is smaller."""
    from monai.transforms import SpatialCrop, SpatialPad

    if label is not None and label.sum() > 0:
        center = [int(round(float(c))) for c in torch.nonzero(label[0] > 0).float().mean(dim=0)]
    else:
        center = [s // 2 for s in image.shape[1:]]
    cropped = SpatialCrop(roi_center=center, roi_size=roi_size)(image)
    return torch.as_tensor(SpatialPad(spatial_size=roi_size)(cropped))


def load_cohort(cfg, roi_size: tuple[int, int, int], split: str = "train", preprocessor=None) -> tuple[Cohort, list[str]]:
    """A site's survival cohort: tumour-centred crops of its ``split`` cases joined with the
    time/event of its clinical CSV (and, with ``preprocessor``, its EHR covariates).

    Cases without a usable clinical row are left out (``read_clinical`` reports them).
    Returns the cohort and its case ids (which stay at the site).
    """
    from pemma_core.data.clinical import read_clinical
    from pemma_core.data.pipeline import eval_loader

    if cfg.clinical is None:
        raise ValueError(f"site {cfg.name} ({cfg.path}) has no clinical CSV: no survival labels")
    table, _problems = read_clinical(
        cfg.clinical.path, cfg.clinical.id_column, cfg.clinical.time, cfg.clinical.event,
        cfg.clinical.covariates, on_bad_case=cfg.on_bad_case,
    )
    images, ids = [], []
    for batch in eval_loader(cfg, split):
        case_id = str(batch["case_id"][0])
        if case_id in table.index:
            images.append(crop_around_tumour(batch["image"][0], batch["label"][0], roi_size))
            ids.append(case_id)
    if not ids:
        raise ValueError(f"site {cfg.name}: no {split} case has a clinical row in {cfg.clinical.path}")
    rows = table.loc[ids]
    ehr = torch.as_tensor(preprocessor.transform(rows)) if preprocessor is not None else None
    cohort = Cohort(
        image=torch.stack(images).float(),
        time=torch.as_tensor(rows["time"].astype(float).to_numpy(), dtype=torch.float32),
        event=torch.as_tensor(rows["event"].astype(float).to_numpy(), dtype=torch.float32),
        ehr=ehr,
    )
    return cohort, ids


def check_site_covariates(cfg, preprocessor) -> None:
    """Raise naming every covariate the federation's preprocessor needs that the site's
    YAML (``clinical.covariates``) does not declare, or declares with another type."""
    declared = dict(cfg.clinical.covariates) if cfg.clinical is not None else {}
    wrong = [f"{name!r} ({kind})" for name, kind in preprocessor.spec.items() if declared.get(name) != kind]
    if wrong:
        raise ValueError(
            f"site {cfg.name} holds EHR but its clinical covariates lack {', '.join(wrong)} "
            f"(declared {declared}, the federation's EHR spec is {preprocessor.spec}; config {cfg.path})"
        )


def federated_survival(
    model: PemmaModel,
    cohorts: dict[str, Cohort],
    modes: dict[str, list[str]],
    rounds: int,
    local_steps: int = 1,
    lr: float = 1e-2,
) -> dict[str, torch.Tensor]:
    """Train the survival head (and EHR encoder) over sites, each round aggregated by
    :func:`pemma_core.aggregation.aggregate_round`, weights = each site's event count.

    The same maths as a Flower run, without the transport: what each site sends is its
    head (and EHR encoder) tensors; the model ends holding the global result. Raises
    :class:`~pemma_core.aggregation.RejectedUpdateError` if a site's update fails validation.
    """
    groups = model.param_groups
    head_groups = {"prognosis", "ehr"}
    global_state = {n: t.numpy() for n, t in trainable_state(model).items() if groups[n] in head_groups}
    for _ in range(rounds):
        updates = []
        for site, cohort in cohorts.items():
            load_trainable_state(model, {n: torch.from_numpy(a.copy()) for n, a in global_state.items()}, partial=True)
            result = train_survival(model, cohort, modes[site], steps=local_steps, lr=lr)
            sent = {n: t.numpy() for n, t in trainable_state(model).items() if groups[n] in result.examples}
            weight = max(1, int(cohort.event.sum()))
            updates.append(SiteUpdate(site=site, tensors=sent, examples={g: weight for g in result.examples}))
        global_state = aggregate_round(global_state, updates, {n: groups[n] for n in global_state}).raise_for_rejected().state
    final = {n: torch.from_numpy(np.asarray(a).copy()) for n, a in global_state.items()}
    load_trainable_state(model, final, partial=True)
    return final
