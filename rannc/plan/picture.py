"""A deployment as a picture: which blocks each stage holds on which ranks and each device's predicted memory
against its limit, the simulated timeline of one step per stage (forward, backward, the tail of all-reduce,
clipping and optimizer; the white gaps are the bubble), and, from trace_events files, the measured timeline
beside it. Needs matplotlib (`pip install rannc[plot]`)."""

from __future__ import annotations

import json
from pathlib import Path

from rannc.plan.deployment import Deployment
from rannc.plan.planner import simulate_deployment

COLORS = {"F": "#4C72B0", "B": "#DD8452", "BI": "#DD8452", "BW": "#C44E52", "tail": "#8C8C8C"}
LEGEND = {"F": "forward", "B": "backward (whole, or inputs' part)", "BW": "backward, weights' part",
          "tail": "all-reduce + clip + optimizer"}


def simulated_timeline(deployment: Deployment) -> list[tuple[int, str, float, float]]:
    """(stage, kind, start ms, end ms) of one simulated step, the tail (of all the stage's pieces) after each
    stage's last backward."""
    depth = deployment.pipeline_depth
    result = simulate_deployment(deployment)
    rows = [(s, action.kind, start, end) for s, action, start, end in result.timeline]
    for s in range(depth):
        last = max(end for stage, _, _, end in rows if stage == s)
        tail = sum(st.exposed_allreduce_ms + st.clip_ms + st.optimizer_ms for st in deployment.stages[s::depth])
        if tail > 0:
            rows.append((s, "tail", last, last + tail))
    return rows


def measured_timeline(trace_files: list[str | Path]) -> dict[int, list[tuple[str, float, float]]]:
    """Per rank, (kind, start ms, end ms) of the traced actions, times relative to the first traced action."""
    events = []
    for path in trace_files:
        events.extend(e for e in json.loads(Path(path).read_text())["traceEvents"] if e.get("ph") == "X")
    if not events:
        return {}
    origin = min(e["ts"] for e in events)
    rows: dict[int, list[tuple[str, float, float]]] = {}
    for e in events:
        kind = next(k for k in ("BI", "BW", "F", "B") if e["name"].startswith(k))
        start = (e["ts"] - origin) / 1e3
        rows.setdefault(int(e["pid"]), []).append((kind, start, start + e["dur"] / 1e3))
    return rows


def draw(deployment: Deployment, path: str | Path, trace_files: list[str | Path] | None = None) -> Path:
    """Write the picture to `path` (PNG) and return it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = measured_timeline(trace_files) if trace_files else {}
    panels = 3 if measured else 2
    fig, axes = plt.subplots(panels, 1, figsize=(11, 3.2 * panels + 0.15 * min(len(deployment.stages), 32)))
    _draw_memory(axes[0], deployment)
    pieces = f", {deployment.virtual_stages} pieces per rank" if deployment.virtual_stages > 1 else ""
    _draw_timeline(axes[1], simulated_timeline(deployment), deployment.pipeline_depth, "stage",
                   f"simulated step: {deployment.predicted_step_ms:.1f} ms predicted, "
                   f"bubble {deployment.bubble_fraction:.0%} ({deployment.schedule}{pieces}, "
                   f"{deployment.microbatch_count} micro-batches)")
    if measured:
        ranks = sorted(measured)
        rows = [(ranks.index(rank), kind, start, end) for rank, items in measured.items()
                for kind, start, end in items]
        _draw_timeline(axes[2], rows, len(ranks), "rank", "measured (trace_events, host times)",
                       labels=[str(r) for r in ranks])
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _draw_memory(ax, deployment: Deployment) -> None:
    """One bar per rank, one segment per piece it runs (one unless the schedule has virtual stages)."""
    palette = [f"C{k % 10}" for k in range(len(deployment.stages))]
    below: dict[int, float] = {}
    for s, st in enumerate(deployment.stages):
        gib = st.memory_bytes / 2**30
        ax.bar(st.ranks, [gib] * len(st.ranks), bottom=[below.get(r, 0.0) for r in st.ranks], color=palette[s])
        ax.text(st.ranks[0], below.get(st.ranks[0], 0.0) + gib,
                f"piece {s}\nblocks {st.first_block}-{st.end_block - 1}", fontsize=7, va="bottom")
        for r in st.ranks:
            below[r] = below.get(r, 0.0) + gib
    if deployment.memory_limit_bytes:
        ax.axhline(deployment.memory_limit_bytes / 2**30, color="red", linestyle="--", label="memory limit")
        ax.legend(loc="upper right")
    ax.set_xlabel("rank")
    ax.set_ylabel("predicted GiB")
    ax.set_title(f"{deployment.pipeline_depth} stages x {deployment.replicas} replicas on {deployment.world_size} "
                 f"ranks, global batch {deployment.batch_size}")


def _draw_timeline(ax, rows, count: int, what: str, title: str, labels: list[str] | None = None) -> None:
    for lane, kind, start, end in rows:
        ax.broken_barh([(start, end - start)], (lane - 0.4, 0.8), color=COLORS.get(kind, "#999999"),
                       edgecolor="white", linewidth=0.3)
    ax.set_yticks(range(count))
    ax.set_yticklabels(labels or [str(k) for k in range(count)])
    ax.invert_yaxis()
    ax.set_ylabel(what)
    ax.set_xlabel("ms")
    ax.set_title(title)
    handles = [ax.barh([0], [0], color=COLORS[k]) for k in LEGEND]
    ax.legend(handles=handles, labels=list(LEGEND.values()), loc="lower right", fontsize=7)
