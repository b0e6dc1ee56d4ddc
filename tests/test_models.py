"""Encoders, fusions and the classifier: shapes, per-modality logits, modality counts."""
from __future__ import annotations

import pytest
import torch

from pdmp_cli.errors import PdmpError
from pdmp_cli.models import ENCODERS, FUSIONS, MultimodalClassifier

SHAPES = {"audio": (1, 1, 40, 63), "visual": (2, 3, 28, 28), "depth": (1, 1, 28, 28)}  # [T, C, H, W]


def make_inputs(modalities, batch=4):
    torch.manual_seed(0)
    return {m: torch.randn(batch, *SHAPES[m]) for m in modalities}


def make_model(modalities, encoder="small", fusion="concat", width=4):
    torch.manual_seed(0)
    return MultimodalClassifier(modalities, {m: SHAPES[m][1] for m in modalities}, num_classes=5,
                                encoder=encoder, fusion=fusion, width=width)


@pytest.mark.parametrize("encoder", ENCODERS.names())
@pytest.mark.parametrize("fusion", FUSIONS.names())
@pytest.mark.parametrize("n_modalities", [2, 3])
def test_every_fusion_and_encoder_runs(encoder, fusion, n_modalities):
    modalities = ["audio", "visual", "depth"][:n_modalities]
    cls = FUSIONS.get(fusion)
    if cls.max_modalities is not None and n_modalities > cls.max_modalities:
        with pytest.raises(PdmpError, match="use concat or sum"):
            make_model(modalities, encoder, fusion)
        return
    model = make_model(modalities, encoder, fusion)
    out = model(make_inputs(modalities, batch=2))
    assert out.logits.shape == (2, 5)
    assert set(out.features) == set(modalities)
    assert all(z.shape == (2, model.encoders[m].out_dim) for m, z in out.features.items())
    assert all(o.shape == (2, 5) for o in out.modality_logits.values())
    out.logits.sum().backward()  # gradients reach every encoder
    for m in modalities:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoders[m].parameters())


def test_resnet18_has_the_papers_shape():
    enc = ENCODERS.get("resnet18")(in_channels=1)
    n_params = sum(p.numel() for p in enc.parameters())
    assert enc.out_dim == 512
    assert n_params == 11_170_240  # torchvision's resnet18 minus fc (11,689,512 − 513,000) with a 1-channel stem − 6,272
    assert enc(torch.randn(2, 3, 1, 64, 64)).shape == (2, 512)  # frames folded into the batch, averaged


@pytest.mark.parametrize("fusion", ["concat", "sum"])
@pytest.mark.parametrize("n_modalities", [2, 3])
def test_exact_split_sums_to_fused_logits(fusion, n_modalities):
    modalities = ["audio", "visual", "depth"][:n_modalities]
    model = make_model(modalities, fusion=fusion)
    out = model(make_inputs(modalities))
    total = torch.stack(list(out.modality_logits.values())).sum(0)
    torch.testing.assert_close(total, out.logits, rtol=1e-5, atol=1e-6)


def test_concat_split_is_the_weight_block_of_each_modality():
    model = make_model(["audio", "visual"])
    out = model(make_inputs(["audio", "visual"]))
    d = model.encoders["audio"].out_dim
    w, b = model.fusion.fc.weight, model.fusion.fc.bias
    torch.testing.assert_close(out.modality_logits["audio"], out.features["audio"] @ w[:, :d].t() + b / 2)
    torch.testing.assert_close(out.modality_logits["visual"], out.features["visual"] @ w[:, d:].t() + b / 2)


@pytest.mark.parametrize("fusion", ["film", "gated"])
def test_other_fusions_split_by_zero_masking(fusion):
    model = make_model(["audio", "visual"], fusion=fusion)
    out = model(make_inputs(["audio", "visual"]))
    za, zv = out.features["audio"], out.features["visual"]
    torch.testing.assert_close(out.modality_logits["audio"], model.fusion([za, torch.zeros_like(zv)]))
    torch.testing.assert_close(out.modality_logits["visual"], model.fusion([torch.zeros_like(za), zv]))


def test_input_normalisation_uses_the_cache_statistics():
    model = MultimodalClassifier(["audio", "visual"], {"audio": 1, "visual": 3}, 5, width=4,
                                 norm_stats={"audio": (2.0, 4.0), "visual": (100.0, 50.0)})
    x = {"audio": torch.full((1, *SHAPES["audio"]), 6.0), "visual": torch.full((1, *SHAPES["visual"]), 150.0)}
    seen = {}
    for m in ("audio", "visual"):
        model.encoders[m].register_forward_pre_hook(lambda mod, args, m=m: seen.__setitem__(m, args[0]))
    model.encode(x)
    assert torch.all(seen["audio"] == 1.0) and torch.all(seen["visual"] == 1.0)
