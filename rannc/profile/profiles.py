"""Profile records: what the planner knows about each block and about the links between devices.

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
    measured: bool = True

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
        return cls(blocks=blocks, **data)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)
