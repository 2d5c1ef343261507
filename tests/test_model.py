"""PEMMA model core: equivalence at init, frozen backbone, modes, construction errors."""

from __future__ import annotations

import pytest
import torch

from pemma_core.model.factory import build_model, count_parameters
from pemma_core.model.pemma import MODE_GROUPS
from pemma_core.model.spec import FULL_GROUP, PRESETS, ModelSpec, build_backbone
from pemma_core.training.local import mode_sampler, train_local

ALL_MODES = ("ct", "pet", "ctpet")


def _image(spec: ModelSpec, batch: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, *spec.roi_size, generator=g)


def _label(spec: ModelSpec, batch: int = 1) -> torch.Tensor:
    label = torch.zeros(batch, 1, *spec.roi_size)
    s = spec.roi_size[0]
    label[..., s // 4 : s // 2, s // 4 : s // 2, s // 4 : s // 2] = 1
    return label


@pytest.fixture(scope="module", params=["unetr", "swin-unetr"])
def backbone_and_spec(request):
    torch.manual_seed(0)
    spec = ModelSpec(backbone=request.param)
    backbone = build_backbone(spec).eval()
    # A trained CT backbone has non-trivial weights everywhere; random init is enough here.
    return backbone, spec


@pytest.mark.parametrize("adapter", ["lora", "dora"])
def test_every_mode_equals_the_backbone_on_its_channel_at_init(backbone_and_spec, adapter):
    # Every new part starts at zero (the PET patch embedding is the CT conv + a zero delta,
    # adapters, fusion and skip gate are zero-init), so at initialisation modes ct and ctpet
    # are the CT backbone on the CT channel, and mode pet is the CT backbone applied to the
    # PET channel (channel 1, never channel 0).
    backbone, spec = backbone_and_spec
    model = build_model(spec.with_(adapter=adapter), backbone).eval()
    image = _image(spec)
    with torch.no_grad():
        reference = backbone(image[:, :1])
        torch.testing.assert_close(model(image, "ct"), reference, rtol=0, atol=1e-5)
        torch.testing.assert_close(model(image, "ctpet"), reference, rtol=0, atol=1e-5)
        # PET does change the output once the PET path is used alone.
        assert not torch.allclose(model(image, "pet"), reference, atol=1e-3)
        torch.testing.assert_close(model(image, "pet"), backbone(image[:, 1:2]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_per_mode_exactly_its_groups_receive_gradients_and_are_counted(mode):
    spec = ModelSpec()
    torch.manual_seed(0)
    model = build_model(spec)
    image, label = _image(spec), _label(spec)
    model.zero_grad(set_to_none=True)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(image, mode)[:, 1:], label)
    loss.backward()
    params = dict(model.named_parameters())
    with_gradient = {
        group for name, group in model.param_groups.items()
        if params[name].grad is not None and bool(params[name].grad.abs().sum() > 0)
    }
    # the shared LoRA is on the PET modes' path too, but only CT steps train it
    on_path = set(MODE_GROUPS[mode]) | ({"shared"} if mode != "ct" else set())
    assert with_gradient == on_path, f"mode {mode}: gradients reach {sorted(with_gradient)}"
    before = {n: p.detach().clone() for n, p in params.items() if p.requires_grad}
    result = train_local(model, [{"image": image, "label": label}], [mode], steps=1, lr=1e-3)
    changed = {model.param_groups[n] for n, p in params.items() if n in before and not torch.equal(p, before[n])}
    assert changed == set(MODE_GROUPS[mode]), f"mode {mode}: a step changed {sorted(changed)}"
    assert set(result.examples) == changed, f"mode {mode}: counted {sorted(result.examples)}"


@pytest.mark.parametrize("adapter", ["lora", "dora"])
def test_pet_training_leaves_the_ct_mode_bit_identical(backbone_and_spec, adapter):
    """PEMMA's claim by construction: steps in the modes that read PET change no tensor on
    the CT mode's path (with one shared LoRA trained by every mode they did)."""
    backbone, spec = backbone_and_spec
    model = build_model(spec.with_(adapter=adapter), backbone)
    batches = [{"image": _image(spec, seed=s), "label": _label(spec)} for s in range(2)]
    train_local(model, batches, ["ct"], steps=2, lr=1e-2)  # CT steps move the CT path first
    model.eval()
    with torch.no_grad():
        ct_before = model(batches[0]["image"], "ct").clone()
        ctpet_before = model(batches[0]["image"], "ctpet").clone()
    train_local(model, batches, ["pet", "ctpet"], steps=4, lr=1e-2)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(batches[0]["image"], "ct"), ct_before)
        assert not torch.equal(model(batches[0]["image"], "ctpet"), ctpet_before), "PET steps trained nothing"


def test_backbone_is_not_modified_and_frozen_tensors_are_bit_identical_after_training(backbone_and_spec):
    backbone, spec = backbone_and_spec
    before_backbone = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = build_model(spec, backbone)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert frozen_before and trainable_before
    batches = [{"image": _image(spec, seed=s), "label": _label(spec)} for s in range(2)]
    train_local(model, batches, ALL_MODES, steps=3, lr=1e-2, mode_weights={"ctpet": 1, "ct": 1, "pet": 1})
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[name]), f"frozen tensor {name} changed"
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trainable_before[n])]
    assert changed, "training changed no trainable tensor"
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(tensor, before_backbone[name]), f"the caller's backbone tensor {name} changed"


@pytest.mark.parametrize("adapter", ["lora", "dora"])
def test_all_modes_run_forward_and_backward(backbone_and_spec, adapter):
    backbone, spec = backbone_and_spec
    model = build_model(spec.with_(adapter=adapter), backbone).train()
    image = _image(spec)
    for mode in ALL_MODES:
        model.zero_grad(set_to_none=True)
        out = model(image, mode)
        assert out.shape == (1, spec.out_channels, *spec.roi_size)
        out.square().mean().backward()
        grads = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
        assert grads, f"no gradient reached a trainable tensor in mode {mode}"
        assert all(model.param_groups[n] in {"shared", "ct", "pet", "fusion"} for n in grads)


def test_mode_trains_only_its_groups():
    spec = ModelSpec()
    model = build_model(spec)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    result = train_local(model, [{"image": _image(spec), "label": _label(spec)}], ["ct"], steps=3, lr=1e-2)
    assert set(result.examples) == MODE_GROUPS["ct"] == {"shared", "ct"}
    for name, group in model.param_groups.items():
        moved = not torch.equal(dict(model.named_parameters())[name], before[name])
        if group not in MODE_GROUPS["ct"]:
            assert not moved, f"{name} ({group}) changed in a CT-only step"


def test_groups_tag_every_trainable_tensor_and_parts_exist():
    model = build_model(ModelSpec())
    groups = model.param_groups
    total, trainable = count_parameters(model)
    assert sum(p.numel() for n, p in model.named_parameters() if n in groups) == trainable < total
    assert set(groups.values()) == {"shared", "ct", "pet", "fusion"}
    assert any("pet_block" in n for n, g in groups.items() if g == "pet")
    assert any("pet_conv" in n for n, g in groups.items() if g == "pet")
    assert all("lora_" in n for n, g in groups.items() if g == "shared")


@pytest.mark.parametrize(
    "kind, modes", [("ct-only", ("ct",)), ("pet-only", ("pet",)), ("early-fusion", ("ctpet",))]
)
def test_baselines_train_everything_from_ct_weights(kind, modes):
    spec = ModelSpec(kind=kind)
    backbone = build_backbone(spec).eval()
    model = build_model(spec, backbone).eval()
    total, trainable = count_parameters(model)
    assert total == trainable
    assert model.modes == modes
    image = _image(spec)
    if kind != "pet-only":  # starts as the CT model (early fusion's PET weights are zero)
        with torch.no_grad():
            torch.testing.assert_close(model(image, modes[0]), backbone(image[:, :1]), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="runs modes"):
        model(image, "ct" if modes != ("ct",) else "pet")


@pytest.mark.parametrize("kind", ["ct-only", "early-fusion", "cnn-early-fusion"])
def test_fully_trained_models_put_every_tensor_in_one_group(kind):
    model = build_model(ModelSpec(kind=kind))
    groups = model.param_groups
    assert set(groups) == {n for n, p in model.named_parameters() if p.requires_grad} and set(groups.values()) == {FULL_GROUP}
    assert all(model.groups_for_mode(m) == frozenset({FULL_GROUP}) for m in model.modes)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"preset": "huge"}, "unknown preset 'huge'"),
        ({"backbone": "vnet"}, "unknown backbone 'vnet'"),
        ({"adapter": "ia3"}, "unknown adapter 'ia3'"),
        ({"targets": ("qkv", "conv9")}, r"unknown target module\(s\) \['conv9'\]"),
        ({"rank": 0}, "rank must be a positive integer"),
        ({"dropout": 1.5}, "dropout must be in"),
    ],
)
def test_bad_arguments_fail_at_construction(changes, message):
    with pytest.raises(ValueError, match=message):
        ModelSpec(**changes)


def test_wrong_input_shapes_get_clear_errors():
    spec = ModelSpec()
    model = build_model(spec)
    with pytest.raises(ValueError, match=r"expected image \[B, 2, X, Y, Z\]"):
        model(torch.zeros(1, 1, *spec.roi_size), "ct")
    with pytest.raises(ValueError, match="UNETR expects spatial size"):
        model(torch.zeros(1, 2, 48, 32, 32), "ct")
    with pytest.raises(ValueError, match="unknown mode"):
        model(torch.zeros(1, 2, *spec.roi_size), "mri")


def test_input_size_not_divisible_by_patch_is_refused(monkeypatch):
    monkeypatch.setitem(PRESETS["unetr"], "odd", dict(PRESETS["unetr"]["tiny"], img_size=40))
    with pytest.raises(ValueError, match="not divisible by 16"):
        build_backbone(ModelSpec(preset="odd"))


def test_pemma_refuses_a_multichannel_backbone():
    spec = ModelSpec()
    with pytest.raises(ValueError, match="1-channel CT backbone"):
        build_model(spec, build_backbone(spec, in_channels=2))


def test_mode_schedule_gives_every_mode_its_share_in_every_window():
    import itertools

    draws = list(itertools.islice(mode_sampler(ALL_MODES, None, seed=7), 40))  # the default weights 0.6 / 0.2 / 0.2
    for start in range(0, 40, 5):  # every 5 consecutive steps: 3 ctpet, 1 ct, 1 pet
        window = draws[start:start + 5]
        assert sorted(window) == ["ct", "ctpet", "ctpet", "ctpet", "pet"], window
    four = list(itertools.islice(mode_sampler(ALL_MODES, None, seed=0), 4))  # a site's 4 local steps of a round
    assert {"ct", "pet", "ctpet"} <= set(four)
    assert set(itertools.islice(mode_sampler(["ct"], None, seed=0), 5)) == {"ct"}  # a CT-only site
    even = list(itertools.islice(mode_sampler(ALL_MODES, {"ct": 1, "pet": 1, "ctpet": 1}, seed=1), 9))
    assert all(even.count(m) == 3 for m in ALL_MODES)
    with pytest.raises(ValueError, match="no mode"):
        next(mode_sampler([], None, seed=0))


def test_single_modes_do_not_depend_on_the_fusion_projection(backbone_and_spec):
    """Only ctpet trains the fusion group, so moving it must leave the ct and pet modes alone."""
    backbone, spec = backbone_and_spec
    model = build_model(spec, backbone).eval()
    image = _image(spec)
    with torch.no_grad():
        before = {m: model(image, m) for m in ALL_MODES}
        fusion = [p for n, p in model.named_parameters() if model.param_groups.get(n) == "fusion"]
        assert fusion
        for p in fusion:
            p.add_(torch.randn_like(p))
        after = {m: model(image, m) for m in ALL_MODES}
    torch.testing.assert_close(after["ct"], before["ct"], rtol=0, atol=0)
    torch.testing.assert_close(after["pet"], before["pet"], rtol=0, atol=0)
    assert not torch.allclose(after["ctpet"], before["ctpet"], atol=1e-4)


def _expected_pemma_groups(backbone: str, *, dora: bool = False, targets=("qkv", "proj"), pet_embed="lowrank",
                           survival: bool = False, ehr: bool = False) -> dict[str, str]:
    """The group of every trainable tensor of a tiny PEMMA model, written out by hand."""
    if backbone == "unetr":
        embed = "net.vit.patch_embedding.patch_embeddings"
        blocks = [f"net.vit.blocks.{i}" for i in range(12)]
        modules = {"qkv": ["attn.qkv"], "proj": ["attn.out_proj"], "mlp": ["mlp.linear1", "mlp.linear2"]}
    else:
        embed = "net.swinViT.patch_embed.proj"
        blocks = [f"net.swinViT.layers{i}.0.blocks.0" for i in range(1, 5)]
        modules = {"qkv": ["attn.qkv"], "proj": ["attn.proj"], "mlp": ["mlp.linear1", "mlp.linear2"]}
    parts = ["lora_A.{}.weight", "lora_B.{}.weight"] + (["lora_magnitude_vector.{}.weight"] * dora)
    expected = {
        f"{block}.{module}.{part.format(adapter)}": group
        for block in blocks for target in targets for module in modules[target]
        for adapter, group in (("default", "shared"), ("pet", "pet")) for part in parts
    }
    for adapter, group in (("ct_adapter", "ct"), ("pet_adapter", "pet"), ("fusion", "fusion")):
        for tensor in ("down.weight", "down.bias", "up.weight", "up.bias"):
            expected[f"{embed}.{adapter}.{tensor}"] = group
    pet_conv = ("lora_down", "lora_up", "bias") if pet_embed == "lowrank" else ("weight", "bias")
    expected.update({f"{embed}.pet_conv.{t}": "pet" for t in pet_conv})
    expected.update({f"net.encoder1.{t}": "pet" for t in
                     ("pet_block.conv.weight", "pet_block.conv.bias", "pet_gate.weight", "pet_gate.bias")})
    if survival:
        expected["survival_head.net.0.weight"] = "prognosis"
    if ehr:
        expected.update({"ehr_encoder.net.0.weight": "ehr", "ehr_encoder.net.0.bias": "ehr"})
    return expected


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({}, dict()),
        ({"adapter": "dora", "survival": True, "ehr_features": 3}, dict(dora=True, survival=True, ehr=True)),
        ({"pet_embed": "full", "targets": ("qkv", "proj", "mlp")}, dict(pet_embed="full", targets=("qkv", "proj", "mlp"))),
        ({"survival": True}, dict(survival=True)),
    ],
)
@pytest.mark.parametrize("backbone", ["unetr", "swin-unetr"])
def test_group_of_every_trainable_tensor_is_pinned(backbone, changes, expected):
    model = build_model(ModelSpec(backbone=backbone, **changes))
    assert model.param_groups == _expected_pemma_groups(backbone, **expected)
    # exactly the grouped tensors train, listed in parameter order (the order adapter files keep)
    assert list(model.param_groups) == [n for n, p in model.named_parameters() if p.requires_grad]


def test_spec_json_round_trip():
    spec = ModelSpec(backbone="swin-unetr", adapter="dora", rank=4, targets=("qkv", "mlp"), survival=True, ehr_features=3)
    assert ModelSpec.from_json(spec.to_json()) == spec
    assert ModelSpec.from_json('{"rank": 4}') == ModelSpec(rank=4)  # a field left out takes its default


@pytest.mark.parametrize(
    "text, message",
    [
        ("not json", "model spec is not valid JSON"),
        ("[1, 2]", "model spec must be a JSON object, got list"),
        ('{"rank": 8, "colour": "red"}', r"unknown field\(s\) \['colour'\]"),
        ('{"rank": "8"}', "model spec field 'rank' must be int, got '8'"),
        ('{"rank": true}', "model spec field 'rank' must be int"),
        ('{"survival": 1}', "model spec field 'survival' must be bool"),
        ('{"dropout": "0.1"}', "model spec field 'dropout' must be float"),
        ('{"targets": "qkv"}', "model spec field 'targets' must be a list of strings"),
        ('{"backbone": 3}', "model spec field 'backbone' must be str"),
        ('{"preset": "huge"}', "model spec: unknown preset 'huge'"),
        ('{"rank": 0}', "model spec: rank must be a positive integer"),
    ],
)
def test_spec_from_json_names_the_bad_field(text, message):
    with pytest.raises(ValueError, match=message):
        ModelSpec.from_json(text)


def test_a_tensor_declared_in_two_groups_is_refused():
    from torch import nn

    from pemma_core.model.layers import parameter_groups

    class Twice(nn.Module):
        trainable_parts = {"a": "ct", "b": "pet"}

        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(2, 2)
            self.b = self.a

    with pytest.raises(ValueError, match="declared in both group 'ct' and 'pet'"):
        parameter_groups(Twice())


@pytest.mark.parametrize("kind", ["pemma", "early-fusion", "cnn-early-fusion"])
def test_a_model_walks_its_modules_for_its_parameters_once_and_again_after_a_move(kind, monkeypatch):
    model = build_model(ModelSpec(kind=kind))
    walked = list(torch.nn.Module.named_parameters(model))
    walks = []
    named_modules = torch.nn.Module.named_modules

    def counted(self, *args, **kwargs):
        if self is model:
            walks.append(1)
        return named_modules(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "named_modules", counted)
    for _ in range(3):
        assert list(model.named_parameters()) == walked
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for _, p in walked)
    assert len(walks) <= 1  # kept from the first call on (a site asks a dozen times a round)
    # A move may give the model new parameter objects (PyTorch's swap on conversion): the list follows them.
    monkeypatch.setattr(torch.__future__, "get_swap_module_params_on_conversion", lambda: True)
    model.to(torch.float64)
    after = list(model.named_parameters())
    assert [n for n, _ in after] == [n for n, _ in walked]
    assert all(p.dtype == torch.float64 for _, p in after)
    assert after == list(torch.nn.Module.named_parameters(model))
