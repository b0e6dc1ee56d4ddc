"""pdmp: an experiment runner for imbalanced multimodal learning (PDMP, OGM-GE, joint training)."""

__version__ = "0.1.0"
