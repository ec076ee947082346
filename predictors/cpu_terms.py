"""The work terms of the CPU latency model (:mod:`dynas.predictors.cpu`) and their costs, as one table.

Each row of :data:`COST_TERMS` is one term: what the model counts (``term``, in ``work_unit``
per forward pass of the batch), the target-file field holding the fitted cost of one unit
(``cost_field``, in ``cost_unit``), which kind of cost it is (compute, memory or per-call
overhead) and how files written before the field existed read it.  Everything else -- the
order of the work vectors, the fields of :class:`CpuCosts`, the ``[cpu]`` table of a target
file (:mod:`dynas.predictors.targets`), the human reading of a fitted cost -- is derived from
it, so adding a term is adding a row (and counting it in ``cpu.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

__all__ = [
    "CostTerm",
    "COST_TERMS",
    "TERMS",
    "COST_FIELDS",
    "LATER_PART_FIELDS",
    "ABSENT_FIELDS",
    "COMPUTE_TERMS",
    "MEMORY_TERMS",
    "CALL_TERMS",
    "TERM_KINDS",
    "CpuCosts",
    "KINDS",
]

#: kinds of cost, in the order of the rows of :data:`TERM_KINDS`
KINDS: tuple[str, ...] = ("compute", "memory", "call")
#: stored unit of a cost -> its factor to milliseconds (per-call costs are stored in microseconds)
_UNIT_TO_MS = {"ms/GMAC": 1.0, "ms/Melem": 1.0, "ms/Mrow": 1.0, "us/call": 1e-3, "us/stage": 1e-3}


@dataclass(frozen=True)
class CostTerm:
    """One work term and its cost."""

    term: str  #: work term, counted in ``work_unit`` (e.g. ``pointwise_gmac``, GMAC)
    cost_field: str  #: target-file ``[cpu]`` field: the cost of one unit, in ``cost_unit``
    cost_unit: str  #: ``ms/GMAC``, ``ms/Melem``, ``ms/Mrow``, ``us/call`` or ``us/stage``
    kind: str  #: ``compute`` (MACs), ``memory`` (elements, rows) or ``call`` (per-call overhead)
    counts: str  #: what is counted
    #: files written before the field existed lack it; they meant the value of this cost field
    #: for it ("" = 0: nothing beyond the other terms); None = every file has the field
    absent_as: str | None = None
    #: a block's later channel parts: the first part's cost field that stands for this one where
    #: nothing measured it (a calibration at batch 1 only)
    first_part: str | None = None

    @property
    def work_unit(self) -> str:
        return self.cost_unit.split("/")[1]

    @property
    def to_ms(self) -> float:
        """Factor from the stored cost to milliseconds per unit."""
        return _UNIT_TO_MS[self.cost_unit]

    def reading(self, cost: float) -> str:
        """A human reading of a fitted cost: an effective throughput, a bandwidth, an overhead."""
        if self.cost_unit == "ms/GMAC":
            return f"{1e3 / cost:.1f} GMAC/s effective" if cost > 0 else "negligible in the fit"
        if self.cost_unit == "ms/Melem":
            return f"{4.0 / cost:.1f} GB/s effective (float32)" if cost > 0 else "negligible in the fit"
        if self.cost_unit == "ms/Mrow":
            return f"{cost:.1f} ns per row" if cost > 0 else "negligible in the fit"
        if self.cost_unit == "us/stage":
            return f"{cost:.2f} us per dynamic stage"
        return f"{cost:.2f} us per call"


_C, _M, _O = KINDS
#: every term, in the order of the work vectors and of :class:`CpuCosts`
COST_TERMS: tuple[CostTerm, ...] = (
    CostTerm(
        "pointwise_gmac",
        "pointwise_ms_per_gmac",
        "ms/GMAC",
        _C,
        "multiply-accumulates of 1x1 convolutions, and of row products large enough to run folded into "
        "one (cpu_paths.FOLD_MIN_ROWS, cpu_paths.FOLD_MIN_MACS)",
    ),
    CostTerm(
        "conv3x3_gmac",
        "conv3x3_ms_per_gmac",
        "ms/GMAC",
        _C,
        "... of dense 3x3 convolutions, whole maps or gathered windows",
    ),
    CostTerm("grouped_gmac", "grouped_ms_per_gmac", "ms/GMAC", _C, "... of grouped 3x3 convolutions (RegNetY)"),
    CostTerm("stem_gmac", "stem_ms_per_gmac", "ms/GMAC", _C, "... of the stem convolution"),
    CostTerm(
        "smallmap_gmac",
        "smallmap_ms_per_gmac",
        "ms/GMAC",
        _C,
        "... of convolutions (not row products) whose output per sample or patch is at most 8 x 8 "
        "positions: the threads' blocking over positions is then poorly filled (7 x 7 maps, gathered "
        "patches)",
    ),
    CostTerm(
        "mm_gmac",
        "mm_ms_per_gmac",
        "ms/GMAC",
        _C,
        "... of the other row products (matrix products of pixel or window rows), which run in the BLAS "
        "library, not oneDNN",
        absent_as="pointwise_ms_per_gmac",
    ),
    CostTerm(
        "vec_gmac",
        "vec_ms_per_gmac",
        "ms/GMAC",
        _C,
        "... of products of per-sample vectors (maskers, SE, head: one row per sample, so bound by "
        "reading the weights, not by arithmetic)",
        absent_as="mm_ms_per_gmac",
    ),
    CostTerm(
        "w_pointwise_melem",
        "w_pointwise_ms_per_melem",
        "ms/Melem",
        _M,
        "weight elements per 1x1-convolution call: the library re-lays the weights out on every call, "
        "so each call reads and writes them",
    ),
    CostTerm(
        "w_conv3x3_melem",
        "w_conv3x3_ms_per_melem",
        "ms/Melem",
        _M,
        "... per 3x3 (dense, grouped or stem) convolution call",
    ),
    CostTerm(
        "w_mm_melem",
        "w_mm_ms_per_melem",
        "ms/Melem",
        _M,
        "... per matrix-product / linear call (no re-layout; read once)",
    ),
    CostTerm(
        "conv_io_melem",
        "conv_io_ms_per_melem",
        "ms/Melem",
        _M,
        "input + output elements of convolutions and row products",
    ),
    CostTerm(
        "stream_melem",
        "stream_ms_per_melem",
        "ms/Melem",
        _M,
        "elements read + written by element-wise ops (BN, ReLU, add, pooling)",
    ),
    CostTerm(
        "gather_melem",
        "gather_ms_per_melem",
        "ms/Melem",
        _M,
        "elements moved by row gathers/scatters, zero fills and padding copies",
    ),
    CostTerm(
        "index_melem",
        "index_ms_per_melem",
        "ms/Melem",
        _M,
        "elements moved by multi-dimensional advanced indexing (patch regions of the input, windows of "
        "the zero-padded buffer)",
    ),
    CostTerm(
        "index_mrows",
        "index_ms_per_mrow",
        "ms/Mrow",
        _M,
        "contiguous runs (pixel rows of channels) those copies move: the indexing kernel costs per run as "
        "well as per element",
        absent_as="",
    ),
    CostTerm(
        "regather_melem",
        "regather_ms_per_melem",
        "ms/Melem",
        _M,
        "weight elements that a block's second and later channel parts gather (samples with other "
        "channel selections, at batch > 1): the same cached weight matrix read again right after the "
        "part before, from cache; the first part's count as gather_melem",
        absent_as="gather_ms_per_melem",
        first_part="gather_ms_per_melem",
    ),
    CostTerm("conv_calls", "conv_call_us", "us/call", _O, "convolution calls"),
    CostTerm(
        "repeat_conv_calls",
        "repeat_conv_call_us",
        "us/call",
        _O,
        "... of those later parts: the same shapes as the part just before, back to back (fitted at "
        "about a third of a first call's cost)",
        absent_as="conv_call_us",
        first_part="conv_call_us",
    ),
    CostTerm("mm_calls", "mm_call_us", "us/call", _O, "matrix-product / linear calls of unfolded row products"),
    CostTerm(
        "op_calls",
        "op_call_us",
        "us/call",
        _O,
        "every other dispatched operator (index arithmetic, element-wise, masker budgets, and the "
        "products of per-sample vectors: a vector-matrix product costs ~2 us, like an element-wise call, "
        "not a row product's ~40), counted as the fast path dispatches them (tests/test_cpu_work_model.py "
        "compares the counts with a dispatch counter)",
    ),
    CostTerm(
        "masker_calls",
        "masker_call_us",
        "us/call",
        _O,
        "gate evaluations: the Python around each masker (its module call, the decisions the fast path "
        "derives from it) that no operator count sees",
        absent_as="",
    ),
    CostTerm(
        "dynamic_stages",
        "dynamic_stage_us",
        "us/stage",
        _O,
        "stages with gates: the first gated block of a stage runs the dynamic path's operators and "
        "Python after other code has evicted them from the instruction caches and branch predictors "
        "(timed per block by dynas validate: ResNet-18's first gated block took 0.1-0.4 ms more than its "
        "identical second one at batch 1, each of its operators about twice as long), counted once per "
        "stage, on its first block",
        absent_as="",
    ),
)

#: work terms, in the order of :data:`COST_FIELDS`
TERMS: tuple[str, ...] = tuple(r.term for r in COST_TERMS)
#: target-file field holding the cost of one unit of each term
COST_FIELDS: tuple[str, ...] = tuple(r.cost_field for r in COST_TERMS)
#: costs of a block's later channel parts, and the first part's cost that stands for each where
#: nothing measured it (a calibration at batch 1 only; target files written before them)
LATER_PART_FIELDS: dict[str, str] = {r.cost_field: r.first_part for r in COST_TERMS if r.first_part}
#: cost fields that files written before them lack -> the field whose value such a file meant
#: (None: 0).  Row products were counted at the 1x1-convolution rate, per-sample products at the
#: row products' rate; indexing per element only; gate evaluations and dynamic stages nothing
#: beyond their counted operators; a block's later channel parts like its first.
ABSENT_FIELDS: dict[str, str | None] = {
    r.cost_field: r.absent_as or None for r in COST_TERMS if r.absent_as is not None
}


def _span(kind: str) -> slice:
    """The terms of one kind, which are contiguous in the table."""
    at = [i for i, r in enumerate(COST_TERMS) if r.kind == kind]
    assert at == list(range(at[0], at[-1] + 1)), f"terms of kind {kind!r} are not contiguous"
    return slice(at[0], at[-1] + 1)


#: which terms are compute (MACs), memory (elements) and per-call overhead
COMPUTE_TERMS, MEMORY_TERMS, CALL_TERMS = (_span(k) for k in KINDS)
#: [3, len(TERMS)] 0/1 rows selecting the compute, memory and call terms
TERM_KINDS = np.array([[float(r.kind == k) for r in COST_TERMS] for k in KINDS])
TERM_KINDS.setflags(write=False)
_TO_MS = np.array([r.to_ms for r in COST_TERMS])  # [len(TERMS)] stored cost -> ms per unit


class CpuCosts(NamedTuple("CpuCostFields", [(f, float) for f in COST_FIELDS])):  # type: ignore[misc]
    """Cost of one unit of each work term (fields as in :data:`COST_FIELDS`, units as in
    :data:`COST_TERMS`; >= 0)."""

    __slots__ = ()

    def vector_ms(self) -> np.ndarray:
        """[len(TERMS)] milliseconds per unit of each term."""
        return np.asarray(self, dtype=np.float64) * _TO_MS

    @classmethod
    def from_vector_ms(cls, ms: np.ndarray) -> "CpuCosts":
        """The costs whose :meth:`vector_ms` is ``ms`` ([len(TERMS)] milliseconds per unit)."""
        return cls(*(float(c) for c in np.asarray(ms) / _TO_MS))

    def readings(self) -> dict[str, str]:
        """A human reading of each cost, by field (see :meth:`CostTerm.reading`)."""
        return {r.cost_field: r.reading(v) for r, v in zip(COST_TERMS, self)}
