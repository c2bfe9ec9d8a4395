"""Prompt Gradient Projection, method-agnostic (see docs/pgp.md).

A method declares :class:`ProtectedGroup` s (a parameter held by reference, a view of its protected
part with the feature axis last, an eps kind) and feeds representation rows; :class:`SubspaceMemory`
grows one orthonormal basis per group (GPM); :class:`Projector` keeps gradients or the optimizer's
updates out of those bases and measures the leak. :class:`PGP` ties them to a ``PGPConfig``.
"""

from pgpcl.projection.collect import GramCollector, RepresentationCollector, SampleCollector
from pgpcl.projection.groups import Block, ProtectedGroup
from pgpcl.projection.memory import SubspaceMemory, UpdateInfo
from pgpcl.projection.pgp import PGP, resolve_eps
from pgpcl.projection.projector import Projector

__all__ = [
    "Block",
    "PGP",
    "GramCollector",
    "ProtectedGroup",
    "Projector",
    "RepresentationCollector",
    "SampleCollector",
    "SubspaceMemory",
    "UpdateInfo",
    "resolve_eps",
]
