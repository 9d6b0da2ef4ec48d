"""Row operations on streamed token rows: LayerNorm and softmax (attention and router modes)."""

from .layernorm import LayerNormUnit
from .softmax import SoftmaxMode, SoftmaxUnit

__all__ = ["LayerNormUnit", "SoftmaxMode", "SoftmaxUnit"]
