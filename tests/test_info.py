"""`pemma info` numbers come from the real model."""

from __future__ import annotations

import json

from pemma_core.cli import main
from pemma_core.model.factory import build_model, count_parameters
from pemma_core.model.spec import ModelSpec


def test_info_json_matches_the_model(capsys):
    assert main(["info", "--backbone", "unetr", "--adapter", "dora", "--preset", "tiny", "--rank", "4", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    model = build_model(ModelSpec(backbone="unetr", adapter="dora", preset="tiny", rank=4))
    total, trainable = count_parameters(model)
    assert info["total_params"] == total and info["trainable_params"] == trainable
    assert info["adapter_bytes_fp32"] == 4 * trainable and info["adapter_bytes_fp16"] == 2 * trainable
    assert info["full_model_bytes_fp32"] == 4 * total
    assert abs(info["trainable_fraction"] - trainable / total) < 1e-12
    assert sum(info["groups"].values()) == trainable
    assert set(info["groups"]) == {"shared", "ct", "pet", "fusion"}


def test_info_rejects_unknown_preset(capsys):
    assert main(["info", "--preset", "huge"]) == 2
    assert "unknown preset 'huge'" in capsys.readouterr().err


def test_info_wire_bytes_count_int8_values_and_their_scales(capsys):
    from pemma_core.protocol import INT8_BLOCK

    assert main(["info", "--preset", "tiny", "--wire-dtype", "int8", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    model = build_model(ModelSpec(preset="tiny"))
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    assert info["wire_dtype"] == "int8"
    assert info["adapter_bytes_wire"] == sum(n + 4 * -(-n // INT8_BLOCK) for n in sizes)  # 1 byte each + a float32 per block
    assert info["upload_ratio_wire"] == info["full_model_bytes_fp32"] / info["adapter_bytes_wire"]
    assert main(["info", "--preset", "tiny", "--wire-dtype", "float16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["adapter_bytes_wire"] == info["adapter_bytes_fp16"]
