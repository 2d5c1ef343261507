"""Adapter and backbone files: exactly the trainable tensors, in safetensors, with the
fingerprint of the frozen backbone they belong to.

A file's metadata (all strings, as safetensors requires) holds ``fingerprint``,
``spec`` (:meth:`~pemma_core.model.spec.ModelSpec.to_json`), ``groups`` (JSON tensor ->
group) and ``provenance`` (free-form JSON: round, sites...). Loading into a model whose
backbone differs, or with missing/extra keys, other shapes or dtypes, raises
:class:`AdapterMismatchError` naming the tensor and the reason; nothing is loaded then.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from pemma_core.model.pemma import SegmentationModel
from pemma_core.model.spec import ModelSpec, build_backbone


class AdapterMismatchError(ValueError):
    """An adapter or backbone file does not fit the model it is loaded into."""


def backbone_fingerprint(backbone: nn.Module) -> str:
    """SHA-256 over the backbone's tensors (names, dtypes, shapes and bytes, sorted by name)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(backbone.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of exactly the trainable tensors, keyed by parameter name (the model stays where it is)."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def check_state(model: nn.Module, state: Mapping[str, torch.Tensor], partial: bool = False) -> None:
    """Raise AdapterMismatchError unless ``state`` fits ``model``'s trainable tensors.

    With ``partial`` a subset of the keys is allowed (a site's reply), never an extra key.
    """
    expected = {n: p for n, p in model.named_parameters() if p.requires_grad}
    extra = sorted(set(state) - set(expected))
    if extra:
        raise AdapterMismatchError(f"tensor {extra[0]!r} is not a trainable tensor of this model ({len(extra)} unknown)")
    missing = sorted(set(expected) - set(state))
    if missing and not partial:
        raise AdapterMismatchError(f"tensor {missing[0]!r} is missing ({len(missing)} missing)")
    for name, tensor in state.items():
        param = expected[name]
        if tuple(tensor.shape) != tuple(param.shape):
            raise AdapterMismatchError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, the model expects {tuple(param.shape)}"
            )
        if tensor.dtype != param.dtype:
            raise AdapterMismatchError(f"tensor {name!r} has dtype {tensor.dtype}, the model expects {param.dtype}")


def load_trainable_state(model: nn.Module, state: Mapping[str, torch.Tensor], partial: bool = False) -> None:
    """Copy ``state`` into the model's trainable tensors after checking every one."""
    check_state(model, state, partial=partial)
    params = dict(model.named_parameters())
    names = list(state)
    with torch.no_grad():
        # one call for every tensor (as PyTorch's own optimisers copy): each separate copy_ lets go of
        # the interpreter lock and waits to get it back while other sites' threads train
        torch._foreach_copy_([params[n] for n in names],
                             [state[n] if state[n].device == params[n].device else state[n].to(params[n].device) for n in names])


def adapter_metadata(model: SegmentationModel, provenance: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The metadata of ``model``'s adapter file (all strings, as safetensors requires)."""
    return {
        "format": "pemma-adapter/1",
        "fingerprint": model.fingerprint,
        "spec": model.spec.to_json(),
        "backbone": model.spec.backbone,
        "preset": model.spec.preset,
        "adapter": model.spec.adapter,
        "rank": str(model.spec.rank),
        "groups": json.dumps(model.param_groups),
        "provenance": json.dumps(dict(provenance or {})),
    }


def save_adapters(
    path: str | Path,
    model: SegmentationModel,
    state: Mapping[str, torch.Tensor] | None = None,
    provenance: Mapping[str, Any] | None = None,
    extra_metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``state`` (default: the model's trainable tensors) with the model's metadata
    (plus ``extra_metadata``, e.g. the run's EHR preprocessor, ``EhrPreprocessor.to_metadata()``)."""
    state = trainable_state(model) if state is None else state
    check_state(model, state)
    return _write_file(path, state, {**dict(extra_metadata or {}), **adapter_metadata(model, provenance)})


def _write_file(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata)
    tmp.replace(path)  # never leave a half-written file under the final name
    return path


def read_adapter_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of an adapter or backbone file, with a clear error if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterMismatchError(f"{path} is not a readable safetensors file: {exc}") from exc
    return tensors, metadata


def load_adapters(path: str | Path, model: SegmentationModel) -> dict[str, Any]:
    """Load an adapter file into ``model``; returns its provenance. Refuses another backbone."""
    tensors, metadata = read_adapter_file(path)
    fingerprint = metadata.get("fingerprint")
    if fingerprint != model.fingerprint:
        raise AdapterMismatchError(
            f"{path} was made for backbone {str(fingerprint)[:12]}..., this model's backbone is "
            f"{model.fingerprint[:12]}...: refusing to load adapters across backbones"
        )
    try:
        load_trainable_state(model, tensors)
    except AdapterMismatchError as exc:
        raise AdapterMismatchError(f"{path}: {exc}") from exc
    return json.loads(metadata.get("provenance", "{}"))


def save_backbone(path: str | Path, backbone: nn.Module, spec: ModelSpec, provenance: Mapping[str, Any] | None = None) -> str:
    """Write the CT backbone's full state; returns its fingerprint (also in the metadata)."""
    fingerprint = backbone_fingerprint(backbone)
    metadata = {
        "format": "pemma-backbone/1",
        "fingerprint": fingerprint,
        "spec": spec.with_(kind="pemma").to_json(),
        "provenance": json.dumps(dict(provenance or {})),
    }
    _write_file(path, backbone.state_dict(), metadata)
    return fingerprint


def load_backbone(path: str | Path) -> tuple[nn.Module, ModelSpec]:
    """Rebuild the CT backbone stored at ``path`` and verify its fingerprint."""
    tensors, metadata = read_adapter_file(path)
    if metadata.get("format") != "pemma-backbone/1":
        raise AdapterMismatchError(f"{path} is not a pemma backbone file (format {metadata.get('format')!r})")
    try:
        spec = ModelSpec.from_json(metadata.get("spec", ""))
    except ValueError as exc:
        raise AdapterMismatchError(f"{path}: {exc}") from exc
    backbone = build_backbone(spec)
    expected = backbone.state_dict()
    for name, tensor in tensors.items():
        if name not in expected:
            raise AdapterMismatchError(f"{path}: tensor {name!r} is not part of a {spec.backbone}/{spec.preset} backbone")
        if tensor.shape != expected[name].shape:
            raise AdapterMismatchError(
                f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}"
            )
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise AdapterMismatchError(f"{path}: tensor {missing[0]!r} is missing")
    backbone.load_state_dict(tensors)
    if backbone_fingerprint(backbone) != metadata.get("fingerprint"):
        raise AdapterMismatchError(f"{path}: tensors do not match the fingerprint in its metadata (file altered?)")
    return backbone, spec
