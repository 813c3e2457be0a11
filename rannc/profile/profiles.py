"""Profile records: what the planner knows about each block, about the optimizer step and clipping, about
the links between devices, and how block-by-block timing compares with running blocks back to back.

Times and activation memory are kept as lines in the micro-batch size (fixed part + per-sample part),
fitted to the sizes that were measured, so the planner can ask about any size.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


@dataclasses.dataclass
class Linear:
    """value(b) = fixed + per_sample * b, never below zero."""

    fixed: float = 0.0
    per_sample: float = 0.0

    def __call__(self, batch: float) -> float:
        return max(0.0, self.fixed + self.per_sample * batch)

    def scaled(self, factor: float) -> "Linear":
        return Linear(self.fixed * factor, self.per_sample * factor)

    @classmethod
    def fit(cls, points: list[tuple[float, float]]) -> "Linear":
        """Least-squares line through (batch, value) points; one point gives a proportional line."""
        points = sorted(points)
        if len(points) == 1 or points[0][0] == points[-1][0]:
            b, v = points[-1]
            return cls(0.0, v / max(b, 1.0))
        n = len(points)
        mb = sum(p[0] for p in points) / n
        mv = sum(p[1] for p in points) / n
        var = sum((p[0] - mb) ** 2 for p in points)
        slope = max(0.0, sum((p[0] - mb) * (p[1] - mv) for p in points) / var)
        return cls(max(0.0, mv - slope * mb), slope)


@dataclasses.dataclass
class BlockProfile:
    fwd_ms: Linear
    bwd_ms: Linear
    activation_bytes: Linear        # saved for backward during one micro-batch's forward
    out_bytes: Linear               # values this block's end sends to the next stage
    tensors: list[str]              # names of the parameters and buffers the block reads
    label: str = ""                 # the module the block's first operation belongs to


@dataclasses.dataclass
class UpdateProfile:
    """The optimizer step and the gradient clipping, per parameter tensor and per parameter byte: they run once
    per training step on every stage, over that stage's parameters, after the pipeline has drained."""

    optimizer_ms_fixed: float = 0.0              # per step of a stage that has trainable parameters
    optimizer_ms_per_tensor: float = 0.0
    optimizer_ms_per_byte: float = 0.0
    optimizer_temp_bytes_per_byte: float = 0.0   # transient memory of one step, per parameter byte
    state_bytes_per_byte: float | None = None    # optimizer state per parameter byte; None: use opt_param_factor
    clip_ms_fixed: float = 0.0
    clip_ms_per_tensor: float = 0.0
    clip_ms_per_byte: float = 0.0
    source: str = ""                             # what was measured (optimizer class, device) or "estimate"


@dataclasses.dataclass
class Calibration:
    """Block-by-block profiling synchronises the device around every block, so each block pays a launch and
    synchronisation overhead that a stage running its blocks back to back pays once. Runs of consecutive
    blocks timed whole give that overhead per block boundary (`*_overhead_ms`, a line in the micro-batch
    size), and their peak memory beyond the parameters, gradients and saved activations gives the workspace
    (temporaries such as the loss's fp32 logits, kernels' scratch) a stage must keep free."""

    fwd_overhead_ms: Linear = dataclasses.field(default_factory=Linear)
    bwd_overhead_ms: Linear = dataclasses.field(default_factory=Linear)
    workspace_bytes: float = 0.0
    runs: list = dataclasses.field(default_factory=list)   # (size, blocks, fwd sum, fwd whole, bwd sum, bwd whole)
    # a split backward's parts (zero bubble: "BI" the inputs' gradients, "BW" the weights') as shares of the whole
    # backward, timed on the run of blocks from block 1 at the largest size; empty where nothing splits (the
    # planner's defaults)
    split_backward: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ProfileSet:
    """Everything the planner needs."""

    blocks: list[BlockProfile]
    tensor_bytes: dict[str, int]        # parameter/buffer name -> bytes
    trainable: dict[str, bool]          # name -> whether it is a parameter with requires_grad
    device_name: str
    device_memory_bytes: int
    p2p_bytes_per_ms: float = 1e7       # measured between ranks; defaults are NVLink-class guesses
    p2p_latency_ms: float = 0.02
    allreduce_bytes_per_ms: float = 1e7
    allreduce_latency_ms: float = 0.05
    # From a send to its arrival while both ranks compute. On CPUs the communication threads wait for a core
    # that the computation holds (2 gloo ranks on 2 cores: about 2 ms for 128 KB, 0.12 ms with the ranks idle),
    # and every hop of a micro-batch between ranks waits that long; 0 where transfers run on the device (GPUs).
    p2p_hop_ms: float = 0.0
    measured: bool = True
    update: UpdateProfile = dataclasses.field(default_factory=UpdateProfile)
    calibration: Calibration = dataclasses.field(default_factory=Calibration)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ProfileSet":
        data = json.loads(text)
        blocks = []
        for b in data.pop("blocks"):
            blocks.append(BlockProfile(fwd_ms=Linear(**b["fwd_ms"]), bwd_ms=Linear(**b["bwd_ms"]),
                                       activation_bytes=Linear(**b["activation_bytes"]),
                                       out_bytes=Linear(**b["out_bytes"]), tensors=b["tensors"],
                                       label=b.get("label", "")))
        update = UpdateProfile(**data.pop("update", {}))
        cal = data.pop("calibration", {})
        calibration = Calibration(fwd_overhead_ms=Linear(**cal.pop("fwd_overhead_ms", {})),
                                  bwd_overhead_ms=Linear(**cal.pop("bwd_overhead_ms", {})), **cal)
        return cls(blocks=blocks, update=update, calibration=calibration, **data)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)
