"""pykd: fused kernels for knowledge distillation of Transformers.

CUDA tensors run Triton kernels, CPU tensors run C++ kernels (``pykd._C``); every op is a
``torch.library`` custom op with a fake kernel, so ``torch.compile(fullgraph=True)`` traces it.
"""

from ._backend import set_debug
from .attention_kd import attention, attention_divergence, attention_kd, relation_kd
from .fused_linear_kd import fused_linear_kd_loss, fused_linear_topk_kd_loss
from .kd_loss import kd_loss
from .topk_kd_loss import topk_kd_loss

__version__ = "0.1.0"

from . import nn, reference  # noqa: E402  (after the ops they wrap)

__all__ = [
    "attention",
    "attention_divergence",
    "attention_kd",
    "fused_linear_kd_loss",
    "fused_linear_topk_kd_loss",
    "kd_loss",
    "relation_kd",
    "nn",
    "reference",
    "set_debug",
    "topk_kd_loss",
    "__version__",
]
