"""CLIP LoRA learner, and CLIP-LoRA-PGP with ``pgp.enabled=true``.

The CLIP prompt learner's text side (one CoOp context per task; :mod:`pgpcl.methods.clip_prompt`) with
LoRA instead of an image prompt on the image side: rank-r factors on ``targets`` of ``blocks`` of the
image tower (``qkv``: the attention's packed q/k/v projection, by default; ``proj``: its output
projection; ``fc1`` / ``fc2``: the MLP's c_fc / c_proj; ``models/lora.py``), shared by all tasks and trained on each in turn. Without PGP this is
sequential LoRA tuning of the image tower: the baseline.

PGP protects both factors of every wrapped layer as on the ViT (``methods/lora.py``): A orthogonal to
the layer's old inputs, B to those inputs through A, so old images' features stay unchanged through the
whole image tower. Text contexts are not projected. (PEGP applies gradient projection to LoRA on CLIP;
this is pgpcl's derivation, not their code.)
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from pgpcl.methods import METHODS
from pgpcl.methods.clip_prompt import CLIPTextLearner, TextParams, TunedImageTower
from pgpcl.methods.lora import LoRAParams, LoRAPGP


@METHODS.register("clip_lora")
class CLIPLoRA(LoRAPGP, TunedImageTower, CLIPTextLearner):
    @dataclass
    class Params(LoRAParams, TextParams):
        def validate(self) -> None:
            from pgpcl.models.lora import CLIP_TARGETS

            self.check_all(CLIP_TARGETS)
            TextParams.validate(self)

    def add_modules(self, blocks, indices: list[int], width: int) -> dict[str, nn.Module]:
        from pgpcl.models.lora import add_clip_lora

        p = self.params
        return add_clip_lora(blocks, indices, p.targets, p.rank, p.scale_alpha)
