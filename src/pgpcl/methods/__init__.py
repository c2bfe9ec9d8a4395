"""Continual-learning methods, registered by name.

Adding a method means one new file here (a :class:`Method` subclass decorated with
``@METHODS.register("name")``), its name in the imports below, and its presets in ``configs/`` (a
baseline beside each ``*_pgp``); a method outside pgpcl needs only its file and a preset that lists it
under ``imports`` (docs/adding-a-method.md).
"""

import dataclasses

from pgpcl.methods.base import Method, MethodOutput
from pgpcl.registry import Registry


def _check_method(name: str, cls: type) -> None:
    """A method's Params must be a dataclass whose every field has a default: resume, eval and reports
    rebuild a run's config over ``Params()`` (a field without one made them fail after training)."""
    params = getattr(cls, "Params", None)
    if params is None or not dataclasses.is_dataclass(params):
        raise TypeError(f"method '{name}': {cls.__name__}.Params must be a dataclass of its hyper-parameters")
    bare = [f.name for f in dataclasses.fields(params)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if bare:
        raise TypeError(f"method '{name}': {cls.__name__}.Params.{bare[0]} has no default; give every field one")


METHODS: Registry[type[Method]] = Registry("method", check=_check_method)

# Importing the modules registers them.
from pgpcl.methods import (  # noqa: E402,F401
    adapter,
    clip_adapter,
    clip_dual_prompt,
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
