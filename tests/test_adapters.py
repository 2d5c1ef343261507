"""Adapter and backbone files: round trip, refusal of foreign backbones and bad tensors."""

from __future__ import annotations

import json

import pytest
import torch

from pemma_core.model.files import (
    AdapterMismatchError,
    backbone_fingerprint,
    load_adapters,
    load_backbone,
    read_adapter_file,
    save_adapters,
    save_backbone,
    trainable_state,
)
from pemma_core.model.factory import build_model
from pemma_core.model.spec import ModelSpec, build_backbone


def _perturb(model, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("adapter", ["lora", "dora"])
def test_save_fresh_build_load_gives_bit_identical_outputs(tmp_path, adapter):
    spec = ModelSpec(adapter=adapter)
    torch.manual_seed(0)
    backbone = build_backbone(spec)
    model = build_model(spec, backbone).eval()
    _perturb(model)
    path = save_adapters(tmp_path / "a.safetensors", model, provenance={"round": 3, "sites": ["s1"]})
    tensors, metadata = read_adapter_file(path)
    assert set(tensors) == set(model.param_groups)  # exactly the trainable tensors
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert not set(tensors) & frozen
    assert metadata["fingerprint"] == backbone_fingerprint(backbone)
    assert json.loads(metadata["groups"]) == model.param_groups
    assert metadata["adapter"] == adapter and metadata["rank"] == "8"

    fresh = build_model(spec, backbone).eval()
    image = torch.randn(1, 2, *spec.roi_size)
    with torch.no_grad():
        assert not torch.equal(fresh(image, "ctpet"), model(image, "ctpet"))
        assert load_adapters(path, fresh) == {"round": 3, "sites": ["s1"]}
        for mode in ("ct", "pet", "ctpet"):
            assert torch.equal(fresh(image, mode), model(image, mode))


def test_adapter_for_another_backbone_is_refused(tmp_path):
    spec = ModelSpec()
    torch.manual_seed(0)
    model = build_model(spec)
    path = save_adapters(tmp_path / "a.safetensors", model)
    torch.manual_seed(1)
    other = build_model(spec)  # same architecture, other backbone weights
    before = trainable_state(other)
    with pytest.raises(AdapterMismatchError, match="refusing to load adapters across backbones"):
        load_adapters(path, other)
    assert all(torch.equal(before[k], v) for k, v in trainable_state(other).items())  # nothing loaded


def test_missing_extra_shape_and_dtype_mismatches_name_the_tensor(tmp_path):
    from safetensors.torch import save_file

    spec = ModelSpec()
    model = build_model(spec)
    state = trainable_state(model)
    name = sorted(state)[0]
    meta = {"fingerprint": model.fingerprint}

    def write(tensors):
        path = tmp_path / "bad.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), meta)
        return path

    missing = dict(state)
    del missing[name]
    with pytest.raises(AdapterMismatchError, match=f"tensor '{name}' is missing"):
        load_adapters(write(missing), model)
    with pytest.raises(AdapterMismatchError, match="tensor 'net.extra' is not a trainable tensor"):
        load_adapters(write({**state, "net.extra": torch.zeros(2)}), model)
    with pytest.raises(AdapterMismatchError, match=f"tensor '{name}' has shape"):
        load_adapters(write({**state, name: torch.zeros(3, 3, 3)}), model)
    with pytest.raises(AdapterMismatchError, match=f"tensor '{name}' has dtype torch.float16"):
        load_adapters(write({**state, name: state[name].half()}), model)
    # a different rank on the same backbone is a shape mismatch too
    torch.manual_seed(0)
    backbone = build_backbone(spec)
    rank8, rank4 = build_model(spec, backbone), build_model(spec.with_(rank=4), backbone)
    with pytest.raises(AdapterMismatchError, match="has shape"):
        load_adapters(save_adapters(tmp_path / "r4.safetensors", rank4), rank8)


def test_corrupt_and_missing_files_get_clear_errors(tmp_path):
    model = build_model(ModelSpec())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapters(tmp_path / "nope.safetensors", model)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01not a safetensors file")
    with pytest.raises(AdapterMismatchError, match="not a readable safetensors file"):
        load_adapters(bad, model)


def test_backbone_file_round_trip_keeps_fingerprint(tmp_path):
    spec = ModelSpec(backbone="unetr")
    backbone = build_backbone(spec)
    fingerprint = save_backbone(tmp_path / "backbone.safetensors", backbone, spec)
    loaded, loaded_spec = load_backbone(tmp_path / "backbone.safetensors")
    assert loaded_spec == spec
    assert backbone_fingerprint(loaded) == fingerprint == backbone_fingerprint(backbone)
    with pytest.raises(AdapterMismatchError, match="not a pemma backbone file"):
        load_backbone(save_adapters(tmp_path / "a.safetensors", build_model(spec, backbone)))


def test_backbone_file_whose_tensors_do_not_match_its_fingerprint_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    spec = ModelSpec()
    path = tmp_path / "backbone.safetensors"
    save_backbone(path, build_backbone(spec), spec)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    name = next(n for n, t in tensors.items() if t.is_floating_point())
    tensors[name] = tensors[name] + 1e-3  # altered after it was written; metadata kept
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(AdapterMismatchError, match="do not match the fingerprint"):
        load_backbone(path)


def test_fingerprint_depends_on_every_tensor():
    backbone = build_backbone(ModelSpec())
    before = backbone_fingerprint(backbone)
    with torch.no_grad():
        next(iter(backbone.parameters())).view(-1)[0] += 1e-6
    assert backbone_fingerprint(backbone) != before


def test_backbone_file_with_a_bad_spec_names_the_field(tmp_path):
    from safetensors.torch import save_file

    spec = ModelSpec()
    backbone = build_backbone(spec)
    path = tmp_path / "backbone.safetensors"
    metadata = {"format": "pemma-backbone/1", "fingerprint": backbone_fingerprint(backbone), "spec": '{"rank": "8"}'}
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(path), metadata)
    with pytest.raises(AdapterMismatchError, match="model spec field 'rank' must be int"):
        load_backbone(path)
