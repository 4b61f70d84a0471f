"""Reporting: the results table (text, Markdown, JSON) and the loss plot (PNG).

One convention for losses in the table, the Markdown, the terminal and the plot:
the loss **minus its floor, the entropy of the targets** (:data:`LOSS`; nats per
image, 0 is a perfect reconstruction), so that the differences between
optimizers are not hidden under the ~13.7 nats every model pays. The raw losses
are in ``results.json`` too.

The plot has two panels, that loss against the step and against the training
seconds, one line per optimizer, on a log scale. The per-step minibatch loss is
noisy, so the lines show its exponential moving average (bias-corrected,
``smoothing`` 0.9); the dots mark the full-training-set loss after each epoch.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

__all__ = ["LOSS", "COLUMNS", "rows", "format_table", "markdown_table", "write_json", "write_markdown", "plot"]

LOSS = "loss - target entropy"  # the one loss convention of the table and the plot
LOSS_NOTE = ("loss - target entropy: sigmoid cross-entropy in nats per image (summed over the "
             "pixels) minus its floor, the entropy of the targets; 0 is a perfect reconstruction")

# (key in RunResult.summary(), header)
COLUMNS = (
    ("optimizer", "optimizer"),
    ("final_train_excess", f"train {LOSS}"),
    ("final_test_excess", f"test {LOSS}"),
    ("opt_steps_per_s", "opt steps/s"),
    ("train_steps_per_s", "train steps/s"),
    ("state_bytes", "state bytes"),
)


def _fmt(key: str, value, s: dict) -> str:
    if key == "optimizer":
        return str(value) + (" (diverged)" if s["diverged"] else " (failed)" if s["failed"] else "")
    if key == "state_bytes":
        return f"{int(value):,}"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if key.endswith(("_loss", "_excess")):
        return f"{value:.3f}"
    return f"{value:,.0f}"


def _spread(key: str, values: list, s: dict) -> str:
    """Mean ± standard deviation (ddof 1) of a loss over seeds; the mean of a rate."""
    v = np.asarray([x for x in values if isinstance(x, float) and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return _fmt(key, math.nan, s)
    if key.endswith(("_loss", "_excess")) and v.size > 1:
        return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}"
    return _fmt(key, float(v.mean()), s)


def rows(results) -> list:
    """The table's cells as strings: one row per optimizer; runs of the same optimizer with
    other seeds are summarised (losses: mean ± standard deviation; rates: mean)."""
    groups = {}
    for r in results:
        groups.setdefault(r.name, []).append(r.summary())
    out = []
    for runs in groups.values():
        s = {**runs[0], "diverged": any(x["diverged"] for x in runs), "failed": any(x["failed"] for x in runs)}
        if len(runs) == 1:
            out.append([_fmt(k, s[k], s) for k, _ in COLUMNS])
            continue
        out.append([_fmt(k, s[k], s) if k in ("optimizer", "state_bytes") else
                    _spread(k, [x[k] for x in runs if not (x["diverged"] or x["failed"])], s)
                    for k, _ in COLUMNS])
    return out


def format_table(results) -> str:
    """A fixed-width text table for the terminal."""
    headers = [h for _, h in COLUMNS]
    body = rows(results)
    widths = [max(len(x) for x in col) for col in zip(headers, *body)]
    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in body])


def markdown_table(results) -> str:
    headers = [h for _, h in COLUMNS]
    out = ["| " + " | ".join(headers) + " |",
           "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows(results)]
    return "\n".join(out)


def _clean(x):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(path: str, config: dict, results) -> None:
    doc = {"config": config, "results": [r.to_dict() for r in results]}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_clean(doc), f, indent=1)
        f.write("\n")


def write_markdown(path: str, config: dict, results, title: str = "MLP autoencoder on scikit-learn digits") -> None:
    lines = [f"# arrayopt demo: {title}", ""]
    lines += [f"- {k}: `{v}`" for k, v in config.items()]
    lines += ["", markdown_table(results), "",
              f"Losses: {LOSS_NOTE} (`loss_floor_train`/`loss_floor_test` above), on the full "
              "train/test sets after the last epoch (with several seeds: mean ± standard deviation over the seeds whose "
              "runs neither diverged nor failed); the plot uses the same convention. Steps/s: optimizer step alone (`opt.step`), and the "
              "whole training step (forward, backward and optimizer step). State bytes: "
              "`arrayopt.state_nbytes(state)`.", ""]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def _ema(values, smoothing: float) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    out = np.empty_like(v)
    acc = 0.0
    for i, x in enumerate(v):
        acc = smoothing * acc + (1 - smoothing) * x
        out[i] = acc / (1 - smoothing ** (i + 1))
    return out


# tab20's ten dark hues, then their ten light ones: twenty distinct colours
_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
            "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
            "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5")
_STYLES = ("-", "--", "-.", ":")


def line_style(i: int) -> tuple:
    """``(colour, line style)`` of the ``i``-th row: distinct colours for the first twenty rows,
    and no two rows sharing both for the first eighty; the style changes with every row."""
    return _COLOURS[i % len(_COLOURS)], _STYLES[(i + i // len(_COLOURS)) % len(_STYLES)]


def plot(path: str, results, title: str = "", smoothing: float = 0.9):
    """Write the two-panel PNG and return its ``Figure`` (drawn on the Agg canvas directly;
    pyplot's state is left alone)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("the demo needs matplotlib: pip install 'arrayopt[demo]'") from e
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax_step, ax_time = fig.subplots(1, 2, sharey=True)
    for i, r in enumerate(results):
        color, style = line_style(i)
        label = r.name + (" (diverged)" if r.diverged else " (failed)" if r.failed else "")
        if r.step_excess:
            steps = np.arange(1, len(r.step_excess) + 1)
            smooth = _ema(r.step_excess, smoothing)
            ax_step.plot(steps, smooth, color=color, ls=style, lw=1.2, label=label)
            ax_time.plot(r.step_time, smooth, color=color, ls=style, lw=1.2)
        ev = [e for e in r.evals if math.isfinite(e["train_excess"])]
        if ev:
            ax_step.plot([e["step"] for e in ev], [e["train_excess"] for e in ev], "o", color=color, ms=2.5)
            ev = [e for e in ev if e["seconds"] > 0]  # log time axis: the dot before training is left out
            ax_time.plot([e["seconds"] for e in ev], [e["train_excess"] for e in ev], "o", color=color, ms=2.5)
    ax_step.set_xlabel("step")
    ax_time.set_xlabel("training seconds (forward + backward + optimizer step)")
    ax_step.set_ylabel(f"train {LOSS} (nats / image)")
    ax_step.set_yscale("log")
    ax_time.set_xscale("log")  # optimizers differ in speed by orders of magnitude
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax_step.yaxis.set_major_formatter(plain)
    ax_step.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(f"{v:g}")[0] in "2358" else ""))
    for ax in (ax_step, ax_time):
        ax.grid(True, which="both", alpha=0.3)
    fig.legend(loc="outside right upper", fontsize="small")
    ax_step.set_title(f"minibatch loss (EMA {smoothing}); dots: full train set", fontsize="small")
    ax_time.set_title("same, against training time (log scale)", fontsize="small")
    if title:
        fig.suptitle(title)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    return fig
