"""The interface every continual-learning method implements.

The engine drives a method through a task sequence; the method owns its prompts, head and backbone.
For PGP a method declares which parameters are protected (``protected_groups``) and which features
span their old space (``representations`` / ``extra_representations``); the projection component does
the rest and knows nothing of the method.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from pgpcl.config import Config
    from pgpcl.data import Scenario
    from pgpcl.projection import ProtectedGroup


@dataclass
class MethodOutput:
    logits: Tensor
    """(B, num_classes) over all classes of the scenario."""
    aux_loss: Tensor | None = None
    """Extra scalar loss (e.g. the pull constraint), already weighted."""
    info: dict = field(default_factory=dict)


class Method(nn.Module):
    """Base class. Subclasses set ``Params`` (a dataclass of hyper-parameters) and implement forward."""

    Params: ClassVar[type]
    default_eps: ClassVar[dict[str, float]] = {}
    """eps per protected-group kind, as released; ``pgp.eps`` overrides it."""
    basis_timing: ClassVar[Literal["task_start", "task_end"]] = "task_end"
    """When PGP builds a task's basis: before training it on that task's data (L2P as released) or after.
    A basis built at task t's start protects tasks t+1 on: task t is projected with the earlier ones'."""
    extra_from_task: ClassVar[int] = 0
    """The first task whose basis pass adds ``extra_representations`` (L2P: 1, as released: at task 0's
    start the pool is its random initialisation, which no old input attends to)."""
    own_task_basis_in_force: ClassVar[bool] = False
    """With ``task_start``: project task t with the basis that already holds task t's own directions
    (pgpcl's L2P before 2026-12-03, kept for its runs: ``method.pgp_basis=v0.1``)."""
    ddp_find_unused_parameters: ClassVar[bool] = True
    """Multi-GPU: False when every trainable parameter takes part in every training step (saves DDP a
    graph traversal per step); True when some may not (DDP must then find them)."""

    def __init__(self, params, num_classes: int, task_classes: list[list[int]]):
        super().__init__()
        self.params = params
        self.num_classes = num_classes
        self.task_classes = task_classes
        self.current_task = 0

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def build(cls, cfg: Config, scenario: Scenario) -> Method:
        """Build the method and its backbone from a config; records ``self.weights_info``."""
        raise NotImplementedError

    # -- task boundaries ----------------------------------------------------------------------------
    def begin_task(self, task: int) -> None:
        self.current_task = task

    def end_task(self, task: int) -> None:
        pass

    # -- training and evaluation --------------------------------------------------------------------
    def forward(self, x: Tensor, task: Tensor | None = None) -> MethodOutput:
        """x: (B, C, H, W); task: (B,) true task ids during training, None at test time."""
        raise NotImplementedError

    def loss(self, out: MethodOutput, y: Tensor, class_mask: Tensor) -> Tensor:
        """Cross-entropy over the current task's classes ("train mask"), plus the method's aux loss."""
        logits = out.logits.masked_fill(~class_mask.to(out.logits.device), float("-inf"))
        loss = F.cross_entropy(logits, y)
        if out.aux_loss is not None:
            loss = loss + out.aux_loss
        return loss

    @torch.no_grad()
    def predict(self, x: Tensor, query: Tensor | None = None) -> Tensor:
        """(B, num_classes) logits without task identity (CIL); the engine masks as the setting needs.

        ``query``: this batch's :meth:`frozen_query`, when the engine has it from an earlier evaluation.
        """
        return self.forward(x, None).logits

    @torch.no_grad()
    def frozen_query(self, x: Tensor) -> Tensor | None:
        """What ``predict`` computes with frozen weights only and can take back as ``query``: (B, D), or
        None. A test image's value never changes during a run, so the engine computes it once per test
        batch and reuses it in every later evaluation (L2P / DualPrompt: the query feature)."""
        return None

    def whole_batch(self, x: Tensor, task: Tensor) -> contextlib.AbstractContextManager:
        """Context around the forward passes of one training step's pieces (``train.micro_batches`` > 1):
        what training decides for a batch as a whole (L2P's batch-wise prompt vote) is decided here, on
        the whole of ``x`` (B, C, H, W), and each piece's forward uses it, so that the pieces train what
        the whole batch trains. Default: nothing is decided for the batch as a whole."""
        return contextlib.nullcontext()

    def task_optimizer_settings(self, task: int, lr: float, weight_decay: float) -> tuple[float, float]:
        """(lr, weight decay) for ``task``; methods with per-task schedules (CLIP) override this."""
        return lr, weight_decay

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Only what training changes: the frozen backbone is rebuilt from its weights file."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v.detach().clone() for k, v in self.state_dict().items() if k in names}

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        copy_trainable_state({n: p for n, p in self.named_parameters() if p.requires_grad}, state)

    # -- PGP hooks ----------------------------------------------------------------------------------
    def protected_groups(self, eps: dict[str, float]) -> list[ProtectedGroup]:
        """Parameters PGP protects, by reference. ``eps``: threshold per group kind."""
        return []

    @torch.no_grad()
    def representations(self, x: Tensor, task: Tensor) -> dict[str, Tensor]:
        """Per protected group, the rows spanning its old input space for this batch: (B, n, D)."""
        return {}

    @torch.no_grad()
    def extra_representations(self) -> dict[str, Tensor]:
        """Per group, rows added once per task (e.g. the prompt pool, for the sum space): (m, D)."""
        return {}


def copy_trainable_state(own: dict[str, Tensor], state: dict[str, Tensor]) -> None:
    """Copy ``state`` into the parameters ``own`` (same names); CheckpointError for a missing or extra
    name, another shape, or a tensor that is not floating point (copy_ would convert it silently)."""
    from pgpcl.errors import CheckpointError

    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        kind, name = ("missing", missing[0]) if missing else ("unexpected", unexpected[0])
        raise CheckpointError(f"{kind} parameter '{name}'")
    for n, p in own.items():
        if p.shape != state[n].shape:
            raise CheckpointError(f"parameter '{n}' has shape {tuple(state[n].shape)}, the model's is {tuple(p.shape)}")
        if not state[n].is_floating_point():
            raise CheckpointError(f"parameter '{n}' is {state[n].dtype}, not floating point")
    with torch.no_grad():
        for n, p in own.items():
            p.copy_(state[n])


def check_blocks_exist(value: list[int], depth: int, key: str) -> None:
    """ConfigError naming ``method.<key>`` when one of its blocks is not in a ``depth``-block backbone."""
    from pgpcl.errors import ConfigError
    from pgpcl.models.frozen import check_blocks_exist as check

    try:
        check(value, depth)
    except ValueError as e:
        raise ConfigError(f"method.{key}: {e}") from None


def check_block_list(value: list[int] | None, key: str, *, empty_ok: bool = False, null_ok: bool = True) -> None:
    """ConfigError unless ``value`` (``method.<key>``) is None (all blocks; where ``null_ok``) or distinct
    block indices, at least one unless ``empty_ok``. An empty list would leave the method nothing to
    train there."""
    from pgpcl.errors import ConfigError

    if value is None:
        return
    if (not value and not empty_ok) or len(set(value)) != len(value):
        what = "distinct block indices" + ("" if empty_ok else ", at least one")
        raise ConfigError(f"method.{key} must be {what}{', or null for all' if null_ok else ''}, got {value}")


def check_at_least(params, minimum: float, *keys: str) -> None:
    """ConfigError naming the first ``method.<key>`` of ``params`` below ``minimum`` (None is skipped: it
    means the default), with the value received."""
    from pgpcl.errors import ConfigError

    for key in keys:
        value = getattr(params, key)
        if value is not None and not value >= minimum:  # 'not >=' also catches NaN
            raise ConfigError(f"method.{key} must be >= {minimum}, got {value}")
