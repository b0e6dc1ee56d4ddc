"""The built-in dataset does what its default preset promises, at full size with the default model."""
from __future__ import annotations

from pdmp_cli.experiments import Session, data_config, rank
from pdmp_cli.layout import Layout


def test_default_preset_makes_audio_dominant_by_at_least_15_points(tmp_path):
    session = Session(Layout(tmp_path / "runs"), quiet=True)
    data = data_config(session, "av-digits", root=str(tmp_path / "datasets"))  # default preset, 3000 clips
    out = rank(session, data, seeds=[0])
    test_acc = {m: out["modalities"][m]["test"]["0"]["accuracy"] for m in ("audio", "visual")}
    assert out["dominant"] == "audio" and out["ranking"] == ["audio", "visual"]
    assert test_acc["audio"] - test_acc["visual"] >= 0.15, test_acc
