"""Plot a run's metrics.jsonl: loss over steps (the held-out eval loss beside the training
loss when the run evaluated), and the learning rate and tokens/s when the run logged them.

    python -m tools.plot_metrics outputs/RUN            # writes outputs/RUN/metrics.png
    python -m tools.plot_metrics path/to/metrics.jsonl --out loss.png

Records are those of trainers/metrics.py (one JSON object a logged step). A skipped step's loss
is null and leaves a gap; a resumed run's records continue the same file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

#: metrics.jsonl keys drawn, each in its own panel, in this order (loss always).
PANELS = (("loss", "loss"), ("lr", "learning rate"), ("tokens_per_sec", "tokens/s"))
#: Keys drawn in the panel of another key: (key, into panel, legend label).
OVERLAYS = (("eval_loss", "loss", "eval (held-out)"),)

Series = tuple[str, list[int], list[float]]
"""(legend label, steps, values)."""


class MetricsFileError(ValueError):
    """The metrics file is missing, empty or not JSON lines; the message names the file."""


def metrics_path(path: Path) -> Path:
    """The metrics.jsonl a path means: the file itself, or the one in a run's output_dir."""
    return path / "metrics.jsonl" if path.is_dir() else path


def load_records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise MetricsFileError(
            f"{path}: no such metrics file (a run writes "
            "output_dir/metrics.jsonl at its first logged step)."
        )
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise MetricsFileError(f"{path}, line {number}: not JSON ({e.msg}).") from None
    records = [r for r in records if "step" in r and "loss" in r]
    if not records:
        raise MetricsFileError(f"{path}: no logged steps in it (empty, or no step and loss).")
    return records


def panel_series(records: list[dict[str, Any]]) -> list[tuple[str, list[Series]]]:
    """(y label, curves) of each panel drawn: a key's values at the steps that logged it (a
    null value leaves a gap); the eval loss only at the steps that evaluated."""
    panels = []
    for key, label in PANELS:
        if not any(r.get(key) is not None for r in records):
            continue
        steps = [r["step"] for r in records if key in r]
        values = [r[key] if r[key] is not None else float("nan") for r in records if key in r]
        curves = [("train" if key == "loss" else label, steps, values)]
        for extra, into, name in OVERLAYS:
            taken = [r for r in records if into == key and r.get(extra) is not None]
            if taken:
                curves.append((name, [r["step"] for r in taken], [r[extra] for r in taken]))
        panels.append((label, curves))
    return panels


def plot(records: list[dict[str, Any]], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    panels = panel_series(records)
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(7, 2.4 * len(panels)), sharex=True, squeeze=False
    )
    for ax, (label, curves) in zip(axes[:, 0], panels):
        for name, steps, values in curves:
            few = len(steps) < 50
            ax.plot(steps, values, marker="." if few else None, linewidth=1.2, label=name)
        if len(curves) > 1:
            ax.legend()
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m tools.plot_metrics", description=__doc__.split("\n")[0]
    )
    parser.add_argument("run", type=Path, help="a run's output_dir or its metrics.jsonl")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="PNG to write (default: metrics.png next to metrics.jsonl)",
    )
    args = parser.parse_args(argv)
    path = metrics_path(args.run)
    try:
        records = load_records(path)
    except MetricsFileError as e:
        parser.exit(2, f"error: {e}\n")
    out = args.out or path.with_name("metrics.png")
    first, last = records[0], records[-1]
    title = f"{path.parent.name}: steps {first['step']}-{last['step']}"
    plot(records, out, title)
    print(f"wrote {out} ({len(records)} logged steps)")
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
