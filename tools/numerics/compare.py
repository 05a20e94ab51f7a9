"""Side b's tensors against side a's (the reference): per tensor the max absolute error, the
relative error, the cosine similarity, and the first tensor past the tolerance.

The relative error is max |b - a| / max |a|: the error on the scale of the tensor. An element-wise
ratio |b - a| / |a| would be dominated by the elements that happen to be near zero, which every
activation has. The RMS relative error |b - a|_2 / |a|_2 averages over every element, so it
shows a slow growth (with the sequence length, say) that the worst element hides. Everything is
computed in float64 from the sides' own dtypes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from torchprime.errors import ConfigError


@dataclass
class TensorDiff:
    name: str
    shape: list[int]
    max_abs_a: float
    """The reference's scale: max |a|."""
    max_abs_err: float
    """max |b - a|."""
    rel_err: float
    """max |b - a| / max |a| (0 when both are zero everywhere)."""
    rms_rel_err: float
    """|b - a|_2 / |a|_2."""
    cosine: float
    """a · b / (|a| |b|) over the flattened tensors."""
    past_tolerance: bool
    """rel_err above the tolerance, or a value that is not finite."""


@dataclass
class Comparison:
    seq_len: int
    batch_size: int
    tolerance: float
    tensors: list[TensorDiff]

    @property
    def first_past(self) -> TensorDiff | None:
        """The first tensor, in forward order, past the tolerance: where the sides part."""
        return next((t for t in self.tensors if t.past_tolerance), None)

    def to_json(self) -> dict:
        first = self.first_past
        return {
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "tolerance": self.tolerance,
            "first_past_tolerance": first.name if first else None,
            "tensors": [asdict(t) for t in self.tensors],
        }


def diff(name: str, a: torch.Tensor, b: torch.Tensor, tolerance: float) -> TensorDiff:
    if a.shape != b.shape:
        raise ConfigError(f"{name}: shape {list(a.shape)} on side a but {list(b.shape)} on side b.")
    a64, b64 = a.double().flatten(), b.double().flatten()
    err = (b64 - a64).abs().max().item() if a64.numel() else 0.0
    scale = a64.abs().max().item() if a64.numel() else 0.0
    rel = err / scale if scale > 0 else (0.0 if err == 0 else math.inf)
    norm_a = a64.norm().item()
    err_norm = (b64 - a64).norm().item()
    rms = err_norm / norm_a if norm_a > 0 else (0.0 if err_norm == 0 else math.inf)
    norms = a64.norm() * b64.norm()
    if err == 0:
        cosine = 1.0  # equal tensors; the float64 dot product may still round below 1
    else:
        cosine = (a64 @ b64 / norms).item() if norms > 0 else 0.0
    finite = math.isfinite(err) and math.isfinite(scale)
    past = rel > tolerance or not finite
    return TensorDiff(name, list(a.shape), scale, err, rel, rms, cosine, past)


def compare(
    a: dict[str, torch.Tensor],
    b: dict[str, torch.Tensor],
    tolerance: float,
    seq_len: int,
    batch_size: int,
) -> Comparison:
    """Every tensor of `a` against the same name in `b`, in `a`'s order."""
    missing = [n for n in a if n not in b]
    if missing:
        raise ConfigError(f"side b did not capture {', '.join(missing[:5])}.")
    tensors = [diff(name, a[name], b[name], tolerance) for name in a]
    return Comparison(seq_len, batch_size, tolerance, tensors)


def format_table(c: Comparison) -> str:
    """The comparison as a text table, the first tensor past the tolerance marked."""
    first = c.first_past
    # 1 - cosine: a cosine of 0.9999999999 reads as 1 at any width that fits a table.
    rows = [
        ("tensor", "shape", "max |a|", "max abs err", "rel err", "rms rel err", "1 - cosine", "")
    ]
    for t in c.tensors:
        mark = ""
        if t is first:
            mark = f"<- first past {c.tolerance:g}"
        elif t.past_tolerance:
            mark = "!"
        rows.append(
            (
                t.name,
                "x".join(map(str, t.shape)) or "scalar",
                f"{t.max_abs_a:.3g}",
                f"{t.max_abs_err:.2e}",
                f"{t.rel_err:.2e}",
                f"{t.rms_rel_err:.2e}",
                f"{1 - t.cosine:.1e}",
                mark,
            )
        )
    head = f"seq len {c.seq_len}, batch {c.batch_size}: "
    head += f"first past {c.tolerance:g}: {first.name}" if first else f"all within {c.tolerance:g}"
    return head + "\n" + _layout(rows)


def format_growth(comparisons: list[Comparison]) -> str:
    """The relative errors of every tensor at each sequence length, side by side."""
    rows = [
        (
            "tensor",
            *(f"rel err @{c.seq_len}" for c in comparisons),
            *(f"rms rel @{c.seq_len}" for c in comparisons),
        )
    ]
    for i, t in enumerate(comparisons[0].tensors):
        at = [c.tensors[i] for c in comparisons]
        rows.append(
            (t.name, *(f"{d.rel_err:.2e}" for d in at), *(f"{d.rms_rel_err:.2e}" for d in at))
        )
    return "relative errors by sequence length\n" + _layout(rows)


def _layout(rows: list[tuple[str, ...]]) -> str:
    """Columns aligned: names left, numbers right, the unnamed mark column left."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [
            c.ljust(w) if i == 0 or not rows[0][i] else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
