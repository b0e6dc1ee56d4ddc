"""Joint training: CE on the fused logits, no modulation (the baseline every method is measured against)."""
from pdmp_cli.methods.base import Method, register


@register
class Joint(Method):
    name = "joint"
    description = "plain joint training: cross-entropy on the fused logits"

