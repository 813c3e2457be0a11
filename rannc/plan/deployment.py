"""The plan as plain data: which blocks form each stage, which ranks run it, how many micro-batches, and
what the cost model predicts. Saved to and loaded from JSON, printed as RaNNC's partition report."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


class DeploymentError(ValueError):
    """A saved deployment does not fit this model, world size or batch size."""


@dataclasses.dataclass
class StagePlan:
    first_block: int
    end_block: int                 # exclusive
    start: int                     # first compute position of the graph
    end: int                       # exclusive
    ranks: list[int]
    recompute: bool
    fwd_ms: float = 0.0            # per micro-batch, per replica
    bwd_ms: float = 0.0
    allreduce_ms: float = 0.0
    param_bytes: int = 0
    activation_bytes: int = 0
    memory_bytes: int = 0          # everything the stage needs on one device
    send_ms: float = 0.0           # per micro-batch, to the next stage
    exposed_allreduce_ms: float = 0.0   # the all-reduce's part not hidden behind the backward
    optimizer_ms: float = 0.0      # once per step
    clip_ms: float = 0.0           # once per step
    grad_send_ms: float = 0.0      # per micro-batch, the gradients back to the previous stage

    @property
    def replicas(self) -> int:
        return len(self.ranks)


@dataclasses.dataclass
class Deployment:
    fingerprint: str
    world_size: int
    batch_size: int
    microbatch_count: int
    stages: list[StagePlan]
    block_bounds: list[int]
    predicted_step_ms: float = 0.0
    memory_limit_bytes: int = 0
    schedule: str = "gpipe"
    version: int = 1
    bubble_fraction: float = 0.0   # simulated idle share of the pipeline's stage time
    planning_s: float = 0.0
    candidates_considered: int = 0
    virtual_stages: int = 1        # model pieces per pipeline rank: `stages` lists pipeline_depth x this many
    p2p_hop_ms: float = 0.0        # each hop of a micro-batch between ranks waits this long (ProfileSet's)
    split_backward: dict = dataclasses.field(default_factory=dict)   # BI, BW: shares of a backward (the profile's)

    @property
    def replicas(self) -> int:
        return self.stages[0].replicas

    @property
    def pipeline_depth(self) -> int:
        """Ranks a micro-batch passes on its way through (physical stages); piece c runs on the ranks of
        physical stage c % pipeline_depth, as its virtual stage c // pipeline_depth."""
        return len(self.stages) // self.virtual_stages

    def stage_of_rank(self, rank: int) -> int | None:
        """The physical stage whose ranks include `rank` (None for an idle rank)."""
        for index, stage in enumerate(self.stages[:self.pipeline_depth]):
            if rank in stage.ranks:
                return index
        return None

    def pieces_of_rank(self, rank: int) -> list[int]:
        """Indices into `stages` of the pieces `rank` runs, by virtual stage."""
        physical = self.stage_of_rank(rank)
        if physical is None:
            return []
        return list(range(physical, len(self.stages), self.pipeline_depth))

    def peak_memory_bytes(self) -> int:
        """The predicted memory of the fullest rank (the sum of its pieces with virtual stages)."""
        per_rank: dict[int, int] = {}
        for stage in self.stages:
            for rank in stage.ranks:
                per_rank[rank] = per_rank.get(rank, 0) + stage.memory_bytes
        return max(per_rank.values(), default=0)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Deployment":
        data = json.loads(text)
        stages = [StagePlan(**s) for s in data.pop("stages")]
        return cls(stages=stages, **data)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "Deployment":
        try:
            return cls.from_json(Path(path).read_text())
        except FileNotFoundError:
            raise DeploymentError(f"deployment file {path} does not exist (load_deployment is on)") from None
        except (json.JSONDecodeError, TypeError, KeyError) as exc:
            raise DeploymentError(f"deployment file {path} is not a rannc deployment: {exc}") from None

    def check_fits(self, fingerprint: str, world_size: int, batch_size: int, path: str = "") -> None:
        where = f" in {path}" if path else ""
        if self.fingerprint != fingerprint:
            raise DeploymentError(f"the deployment{where} was planned for another model (fingerprint "
                                  f"{self.fingerprint}, this model {fingerprint}); delete it or turn off "
                                  f"load_deployment")
        if self.world_size != world_size:
            raise DeploymentError(f"the deployment{where} was planned for {self.world_size} processes, "
                                  f"this run has {world_size}")
        if self.batch_size != batch_size:
            raise DeploymentError(f"the deployment{where} was planned for global batch size {self.batch_size}, "
                                  f"this run has {batch_size}")

    def table(self) -> str:
        """The partition report, one line per stage, like RaNNC's DPStaging log."""
        pieces = f" virtual_stages={self.virtual_stages}" if self.virtual_stages > 1 else ""
        counts = [s.replicas for s in self.stages[:self.pipeline_depth]]
        replicas = ",".join(map(str, counts)) if len(set(counts)) > 1 else str(self.replicas)
        lines = [f"Deployment: stages={self.pipeline_depth}{pieces} replicas={replicas} "
                 f"micro-batches={self.microbatch_count} batch_size={self.batch_size} ranks={self.world_size} "
                 f"schedule={self.schedule} predicted_step={self.predicted_step_ms:.2f} ms "
                 f"bubble={self.bubble_fraction:.1%}"
                 + (f" hop={self.p2p_hop_ms:.2f} ms" if self.p2p_hop_ms and self.pipeline_depth > 1 else "")
                 + (f" mem_limit={self.memory_limit_bytes / 2**30:.1f} GiB" if self.memory_limit_bytes else ""),
                 f"{'stage':>5} {'blocks':>11} {'ranks':>14} {'cp':>3} {'fwd_ms':>9} {'bwd_ms':>9} "
                 f"{'ar_ms':>9} {'tail_ms':>9} {'params':>10} {'act':>10} {'mem':>10}"]
        for i, s in enumerate(self.stages):
            tail = s.exposed_allreduce_ms + s.optimizer_ms + s.clip_ms
            lines.append(
                f"{i:>5} {f'{s.first_block}-{s.end_block - 1}':>11} {_ranks(s.ranks):>14} "
                f"{'y' if s.recompute else 'n':>3} {s.fwd_ms:9.3f} {s.bwd_ms:9.3f} {s.allreduce_ms:9.3f} "
                f"{tail:9.3f} {_gib(s.param_bytes):>10} {_gib(s.activation_bytes):>10} {_gib(s.memory_bytes):>10}")
        idle = self.idle_ranks()
        if idle:
            lines.append(f"idle ranks: {_ranks(idle)} (no plan using them was predicted faster, or none fitted)")
        return "\n".join(lines)

    def idle_ranks(self) -> list[int]:
        """Ranks that run no stage."""
        busy = {rank for stage in self.stages for rank in stage.ranks}
        return [rank for rank in range(self.world_size) if rank not in busy]


def _ranks(ranks: list[int]) -> str:
    """[0, 1, 2, 3] as 0-3; other lists as they are."""
    if len(ranks) > 2 and ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    return str(ranks)


def _gib(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f}G"
    if n >= 2**20:
        return f"{n / 2**20:.1f}M"
    return f"{n / 2**10:.1f}K"


def show_deployment(path: str | Path, batch_size: int | None = None) -> Deployment:
    """Print a saved deployment's report (RaNNC's `show_deployment`)."""
    deployment = Deployment.load(path)
    if batch_size is not None and batch_size != deployment.batch_size:
        print(f"note: the deployment was planned for batch size {deployment.batch_size}, not {batch_size}")
    print(deployment.table())
    return deployment
