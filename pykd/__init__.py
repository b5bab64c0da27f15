"""pykd: fused kernels for knowledge distillation of Transformers.

CUDA tensors run Triton kernels, CPU tensors run C++ kernels (``pykd._C``); every op is a
``torch.library`` custom op with a fake kernel, so ``torch.compile(fullgraph=True)`` traces it.
"""

from ._backend import set_debug
from .attention_kd import (
    attention,
    attention_divergence,
    attention_kd,
    quantized_attention,
    relation_kd,
    sparse_attention,
)
from .capture import AttentionCapture
from .fused_linear_kd import fused_linear_kd_loss, fused_linear_topk_kd_loss
from .kd_loss import kd_loss
from .sparse_quant import AttentionSpec
from .topk_kd_loss import topk_kd_loss

__version__ = "0.1.0"

from . import masks, nn, reference  # noqa: E402  (after the ops they wrap)

__all__ = [
    "AttentionCapture",
    "AttentionSpec",
    "attention",
    "attention_divergence",
    "attention_kd",
    "fused_linear_kd_loss",
    "fused_linear_topk_kd_loss",
    "kd_loss",
    "masks",
    "quantized_attention",
    "relation_kd",
    "nn",
    "reference",
    "set_debug",
    "sparse_attention",
    "topk_kd_loss",
    "__version__",
]
