"""Unimodal training: one modality with its own linear head; `pdmp rank` trains one per modality."""
from pdmp_cli.methods.base import Method, register


@register
class Unimodal(Method):
    name = "unimodal"
    description = "one modality, own linear head (what `pdmp rank` trains)"
    unimodal = True
