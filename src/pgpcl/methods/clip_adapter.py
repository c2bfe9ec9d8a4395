"""CLIP adapter learner, and CLIP-Adapter-PGP with ``pgp.enabled=true``.

The CLIP prompt learner's text side (one CoOp context of ``text_length`` tokens per task before each class
name; logits = cosine(image feature, text feature) x the logit scale; see :mod:`pgpcl.methods.clip_prompt`)
with adapters instead of an image prompt on the image side: one bias-free bottleneck beside the MLP of
each of ``blocks`` of the image tower (``models/adapter.py``), shared by all tasks and trained on each
in turn. Without PGP this is sequential adapter tuning of the image tower: the baseline.

PGP protects both maps of every adapter as on the ViT (``methods/adapter.py``): W_down orthogonal to the
adapter's old inputs, W_up to its old hidden activations, so old images' features stay unchanged through
the whole image tower. Text contexts are not projected (each task trains only its own). The follow-up
work of PGP's authors (PEGP) applies gradient projection to adapters on CLIP; this is pgpcl's
derivation of it, not their code.
"""

from __future__ import annotations

from dataclasses import dataclass

from pgpcl.methods import METHODS
from pgpcl.methods.adapter import AdapterParams, AdapterPGP
from pgpcl.methods.clip_prompt import CLIPTextLearner, TextParams, TunedImageTower


@METHODS.register("clip_adapter")
class CLIPAdapter(AdapterPGP, TunedImageTower, CLIPTextLearner):
    @dataclass
    class Params(AdapterParams, TextParams):
        def validate(self) -> None:
            AdapterParams.validate(self)
            TextParams.validate(self)
