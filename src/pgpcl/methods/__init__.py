"""Continual-learning methods, registered by name.

Adding a method means one new file here (a :class:`Method` subclass decorated with
``@METHODS.register("name")``) and one preset in ``configs/``.
"""

from pgpcl.methods.base import Method, MethodOutput
from pgpcl.registry import Registry

METHODS: Registry[type[Method]] = Registry("method")

# Importing the modules registers them.
from pgpcl.methods import (  # noqa: E402,F401
    adapter,
    clip_adapter,
    clip_lora,
    clip_prefix,
    clip_prompt,
    coda_prompt,
    dualprompt,
    l2p,
    lora,
    prefix,
)

__all__ = ["METHODS", "Method", "MethodOutput"]
