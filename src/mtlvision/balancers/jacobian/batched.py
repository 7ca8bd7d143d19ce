"""``jacobian="batched"``: the per-task gradients of the shared parameters from one vmapped backward.

Without a representation, one backward from the T losses (identity ``grad_outputs``, ``is_grads_batched``)
into the shared and task-specific parameters. With one, each task's head is differentiated on its own first
(the T calls together cost one backward through the heads when ``losses`` is a ``torch.stack`` of the task
losses), then one vmapped backward from the trunk, with the T stacked representation gradients as batched
``grad_outputs``, into the shared parameters.
"""

from __future__ import annotations

from torch import Tensor

from mtlvision.balancers.jacobian.base import ParameterGradients


class BatchedGradients(ParameterGradients):
    """The Jacobian's blocks from one vmapped backward into the shared parameters."""

    def _compute_blocks(self) -> list[Tensor]:
        grads = self._batched_backward(self._shared, retain_graph=True)
        return [self._reduce(g.float()) for g in self._zeros_where_none(grads, self._shared)]
