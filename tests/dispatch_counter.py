"""Counting the operators a forward pass dispatches (convolutions, matrix products, the rest), for
the tests that compare the CPU work model's call counts with the kernels' (tests/test_cpu_work_*.py)."""

from __future__ import annotations

import collections
from typing import Callable

#: operators that launch no kernel (views); everything else the fast path dispatches is counted
VIEW_OPS = {
    "view",
    "_unsafe_view",
    "permute",
    "select",
    "slice",
    "expand",
    "as_strided",
    "t",
    "detach",
    "alias",
    "unsqueeze",
    "squeeze",
    "reshape",
    "_reshape_alias",
    "transpose",
    "split",
    "unbind",
    "flatten",
    "view_as",
    "unflatten",
    "expand_as",
    "narrow",
}
CONV_OPS = {"conv2d", "convolution", "mkldnn_convolution", "_convolution_transpose_pointwise"}
MM_OPS = {"linear", "mm", "addmm", "matmul", "bmm"}  # bmm: the batched products of differing selections


def dispatched(run: Callable[[], object]) -> tuple[tuple[int, int, int], collections.Counter]:
    """((convolution, matrix-product, other) operators ``run()`` dispatches, every non-view op by name)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    count = Count()
    with count:
        run()
    ops = collections.Counter({k: v for k, v in count.ops.items() if k not in VIEW_OPS})
    conv = sum(v for k, v in ops.items() if k in CONV_OPS)
    mm = sum(v for k, v in ops.items() if k in MM_OPS)
    return (conv, mm, sum(ops.values()) - conv - mm), ops
