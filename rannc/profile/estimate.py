"""Profiles estimated from the graph alone (FLOPs, tensor sizes and a device's datasheet), for planning
without running anything: dry runs for devices this machine does not have, and models too large to
profile here."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from rannc.graph.blocks import Blocks, Linearized, _hint, _numel, node_flops
from rannc.graph.capture import CapturedGraph, is_tensor_value
from rannc.profile.profiler import tensor_table
from rannc.profile.profiles import BlockProfile, Linear, ProfileSet
from rannc.profile.update import estimate_update


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    memory_bytes: int
    peak_flops: float            # dense bf16 (or fp32 when that is what runs) FLOP/s
    efficiency: float = 0.45     # fraction of peak that transformer blocks reach
    link_bytes_per_ms: float = 1.5e8   # NVLink-class p2p / all-reduce bus bandwidth
    op_overhead_ms: float = 0.004      # launch cost per operation
    memory_bytes_per_ms: float = 3.35e9    # device memory bandwidth


DEVICES = {
    "h200": DeviceSpec("NVIDIA H200 (datasheet)", 141 * 10**9, 989e12, memory_bytes_per_ms=4.8e9),
    "h100": DeviceSpec("NVIDIA H100 80GB (datasheet)", 80 * 10**9, 989e12, memory_bytes_per_ms=3.35e9),
    "a100": DeviceSpec("NVIDIA A100 80GB (datasheet)", 80 * 10**9, 312e12, memory_bytes_per_ms=2.0e9),
    "v100": DeviceSpec("NVIDIA V100 32GB (datasheet)", 32 * 10**9, 125e12, link_bytes_per_ms=5e7,
                       memory_bytes_per_ms=0.9e9),
}


def _bytes(node: fx.Node, activation_bytes_per_element: float) -> float:
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        return 0.0
    per = activation_bytes_per_element if value.is_floating_point() else value.element_size()
    return _numel(value) * per


def estimate_profiles(captured: CapturedGraph, lin: Linearized, blocks: Blocks, spec: DeviceSpec,
                      activation_bytes_per_element: float = 2.0) -> ProfileSet:
    """A ProfileSet from FLOPs and sizes: time = FLOPs / (peak x efficiency) + per-op overhead, backward
    twice the forward; activations = every intermediate kept for backward (an upper bound)."""
    batch = _example_batch(captured)
    per_sample = _per_sample_nodes(captured.gm.graph)
    profiles = []
    for k in range(blocks.count):
        start, end = blocks.positions(k, k + 1)
        block_nodes = lin.compute_nodes[start:end]
        nodes = [n for n in block_nodes if n in per_sample]
        flops = sum(node_flops(n) for n in nodes) / batch
        fwd_per_sample = flops / (spec.peak_flops * spec.efficiency) * 1e3
        overhead = spec.op_overhead_ms * len(nodes)
        act = sum(_bytes(n, activation_bytes_per_element) for n in nodes) / batch
        out = 0.0
        if end < lin.size:
            out = sum(_bytes(n, activation_bytes_per_element) for n in lin.crossing[end] if is_tensor_value(n)) / batch
        names = []
        for node in block_nodes:
            for arg in node.all_input_nodes:
                if arg.op == "get_attr":
                    names.append(captured.tensor_name(arg.target))
        profiles.append(BlockProfile(fwd_ms=Linear(overhead, fwd_per_sample),
                                     bwd_ms=Linear(2 * overhead, 2 * fwd_per_sample),
                                     activation_bytes=Linear(0.0, act), out_bytes=Linear(0.0, out),
                                     tensors=list(dict.fromkeys(names))))
    sizes, trainable = tensor_table(captured)
    return ProfileSet(blocks=profiles, tensor_bytes=sizes, trainable=trainable, device_name=spec.name,
                      device_memory_bytes=spec.memory_bytes, p2p_bytes_per_ms=spec.link_bytes_per_ms,
                      p2p_latency_ms=0.02, allreduce_bytes_per_ms=spec.link_bytes_per_ms,
                      allreduce_latency_ms=0.05, measured=False,
                      update=estimate_update(spec.memory_bytes_per_ms, spec.op_overhead_ms))


def _per_sample_nodes(graph: fx.Graph) -> set[fx.Node]:
    """The compute nodes whose work and memory grow with the batch: not those computed from parameters and
    constants alone (the stacked weight of fused linears, rannc.graph.fuse: a per-step copy that compile folds
    into the weights' autocast cast), nor the pieces of a view op's several results (a split's getitems alias
    the result they split, which is counted once)."""
    weight_only: set[fx.Node] = set()
    chosen: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "get_attr":
            weight_only.add(node)
        elif node.op == "call_function":
            inputs = node.all_input_nodes
            if inputs and all(n in weight_only for n in inputs):
                weight_only.add(node)
            elif not (node.target is operator.getitem and inputs
                      and isinstance(inputs[0].target, torch._ops.OpOverload) and inputs[0].target.is_view):
                chosen.add(node)
    return chosen


def _example_batch(captured: CapturedGraph) -> int:
    for node, batched in zip((n for n in captured.gm.graph.nodes if n.op == "placeholder"), captured.batched_inputs):
        if batched:
            return max(1, _hint(node.meta["val"].shape[0]))
    return 1
