"""Which attention kernel to use where: shared by the ViT and CLIP wrappers."""

from __future__ import annotations

import torch
from torch import Tensor

LOW_PRECISION = (torch.bfloat16, torch.float16)


def plain_product_preferred(t: Tensor) -> bool:
    """Whether attention on ``t``'s device and precision should be the plain softmax(QK^T)V product
    rather than F.scaled_dot_product_attention: in bf16 / fp16 on the CPU (a low-precision tensor, or
    CPU autocast to one). There torch's fused CPU kernel measured 2.3x slower than the plain product for
    forward + backward and 1.4x for forward alone, while the plain product's matmuls run in bf16
    (BENCHMARKS.md, section 6). Elsewhere the fused kernel is the better choice.
    """
    if t.device.type != "cpu":
        return False
    return t.dtype in LOW_PRECISION or (
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in LOW_PRECISION
    )
