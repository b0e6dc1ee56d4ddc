"""Training methods, each one small module hooked into the shared loop (see base.py)."""
from pdmp_cli.methods import agm, gblending, joint, mla, mmpareto, ogm, opm, pdmp, pmr, ume, umt, unimodal  # noqa: F401  (registration)
from pdmp_cli.methods.base import METHODS, Batch, Method, Trainer

get_method = METHODS.get

__all__ = ["METHODS", "Batch", "Method", "Trainer", "get_method"]
