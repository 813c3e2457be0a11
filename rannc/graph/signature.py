"""How a user's call maps onto the captured graph, and the graph's results back onto what forward returns.

Users call models as they were written: tensors by position or keyword, `None`, Python scalars and flags
(`use_cache=False`), and get back tensors, tuples, dicts, dataclasses or Hugging Face `ModelOutput`s. The
graph, and everything that moves data between ranks, sees only flat lists of tensors. `CallSignature`
flattens a call into the graph's tensor inputs (non-tensor values are constants of the graph, checked on
every call); `OutputSignature` records which leaves of the result are tensors, how each one relates to the
batch (a scalar, or batched along dimension 0), and rebuilds the result from the graph's flat outputs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree

SCALAR = "scalar"     # a 0-dim tensor: combined over micro-batches as the mean weighted by rows
BATCHED = "batched"   # first dimension is the batch: each rank gets the rows of its own local batch

_CONSTANT_TYPES = (type(None), bool, int, float, str, torch.dtype, torch.device)


class SignatureError(TypeError):
    """A call or a result that rannc cannot map onto the captured graph."""


def _paths(tree: Any) -> tuple[list[str], list[Any], pytree.TreeSpec]:
    """Leaves with readable paths: `loss`, `hidden_states[1]`, `[0]`."""
    with_path, spec = pytree.tree_flatten_with_path(tree)
    paths = [re.sub(r"\['([^']*)'\]", r".\1", pytree.keystr(k)).lstrip(".") for k, _ in with_path]
    return paths, [v for _, v in with_path], spec


@dataclass
class CallSignature:
    """The structure of the first call's (args, kwargs): which leaves are tensors (graph inputs, in order)
    and the values of the others (constants baked into the graph)."""

    spec: pytree.TreeSpec
    paths: list[str]
    tensor_slots: list[int]
    constants: dict[int, Any]

    @classmethod
    def of(cls, args: tuple, kwargs: dict) -> CallSignature:
        paths, leaves, spec = _call_paths(args, kwargs)
        slots, constants = [], {}
        for i, (path, leaf) in enumerate(zip(paths, leaves)):
            if isinstance(leaf, torch.Tensor):
                slots.append(i)
            elif isinstance(leaf, _CONSTANT_TYPES):
                constants[i] = leaf
            else:
                raise SignatureError(f"argument {_describe(path)} is a {type(leaf).__name__}; rannc passes "
                                     f"tensors, None, numbers, strings and flags (in tuples, lists and dicts)")
        if not slots:
            raise SignatureError("the call passes no tensor; rannc needs at least one tensor argument")
        return cls(spec, paths, slots, constants)

    def tensors(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        """The graph inputs of a later call; fails naming the argument that differs from the first call."""
        paths, leaves, spec = _call_paths(args, kwargs)
        if spec != self.spec:
            raise SignatureError(f"the call's arguments differ from the first call's: now {_names(paths)}, "
                                 f"first {_names(self.paths)}; rannc captures the model for one calling "
                                 f"convention: pass the same arguments (by position or keyword) on every call")
        for i, value in self.constants.items():
            now = leaves[i]
            if isinstance(now, torch.Tensor) or type(now) is not type(value) or now != value:
                raise SignatureError(f"argument {_describe(self.paths[i])} was {value!r} when the model was "
                                     f"captured and is {_short(now)} now; non-tensor arguments are constants "
                                     f"of the captured graph: keep them fixed, or wrap the model in another "
                                     f"RaNNCModule for the other value")
        out = []
        for i in self.tensor_slots:
            if not isinstance(leaves[i], torch.Tensor):
                raise SignatureError(f"argument {_describe(self.paths[i])} was a tensor when the model was "
                                     f"captured and is {_short(leaves[i])} now")
            out.append(leaves[i])
        return out

    def rebuild(self, tensors: tuple) -> tuple[tuple, dict]:
        """(args, kwargs) with the graph inputs put back among the constants (run while capturing)."""
        leaves: list[Any] = [None] * len(self.paths)
        for i, value in self.constants.items():
            leaves[i] = value
        for i, t in zip(self.tensor_slots, tensors):
            leaves[i] = t
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        return args, kwargs

    def tensor_paths(self) -> list[str]:
        return [self.paths[i] for i in self.tensor_slots]


def is_symbolic(size) -> bool:
    """Whether a traced size is a symbol: export keeps one it specialised (`len(x)`) as a SymInt of a number."""
    return isinstance(size, torch.SymInt) and not size.node.expr.is_number


@dataclass
class OutputSignature:
    """The structure of forward's result: tensor leaves (the graph outputs, in order) with their kind, and
    the non-tensor leaves (kept as constants; objects that are not plain values, like a KV cache, are
    dropped and returned as None)."""

    spec: pytree.TreeSpec
    paths: list[str]
    tensor_slots: list[int]
    constants: dict[int, Any]
    dropped: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)           # per tensor leaf: SCALAR or BATCHED
    row_shapes: list[tuple[int, ...]] = field(default_factory=list)  # per tensor leaf: shape after dim 0
    dtypes: list[torch.dtype] = field(default_factory=list)

    @classmethod
    def of(cls, result: Any) -> tuple[OutputSignature, list[torch.Tensor]]:
        paths, leaves, spec = _paths(result)
        slots, constants, dropped, tensors = [], {}, [], []
        for i, (path, leaf) in enumerate(zip(paths, leaves)):
            if isinstance(leaf, torch.Tensor):
                slots.append(i)
                tensors.append(leaf)
            elif isinstance(leaf, _CONSTANT_TYPES):
                constants[i] = leaf
            else:
                constants[i] = None
                dropped.append(f"{_describe(path)} ({type(leaf).__name__})")
        return cls(spec, paths, slots, constants, dropped), tensors

    @property
    def scalar_only(self) -> bool:
        return all(k == SCALAR for k in self.kinds)

    def classify(self, values: list[Any], batch_dims: set, local_batch: int, fixed: bool = False) -> None:
        """Set each tensor leaf's kind from its captured value (a fake tensor with symbolic sizes):
        0-dim is SCALAR; a first dimension that is an input's batch dimension is BATCHED (with `fixed`, the
        capture fixed the batch size of some input, and a first dimension of that size is one too). Anything
        else cannot be split or joined by rows and is refused here, before any profiling or planning."""
        kinds, rows, dtypes = [], [], []
        for slot, value in zip(self.tensor_slots, values):
            path = _describe(self.paths[slot])
            if not isinstance(value, torch.Tensor):
                raise SignatureError(f"output {path} has no captured tensor value; this is a rannc bug")
            dtypes.append(value.dtype)
            if value.dim() == 0:
                kinds.append(SCALAR)
                rows.append(())
                continue
            first = value.shape[0]
            symbolic = is_symbolic(first)   # a batch export fixed (len(x)) is a number here, as without symbols
            first = first if symbolic else int(first)
            batched = (str(first) in batch_dims) if symbolic else ((fixed or not batch_dims) and first == local_batch)
            rest = tuple(value.shape[1:])
            if not batched or any(not isinstance(d, int) for d in rest):
                raise SignatureError(
                    f"output {path} has shape {tuple(value.shape)}: rannc returns scalars (combined over the "
                    f"global batch) and tensors whose first dimension is the batch (each rank gets its own rows); "
                    f"return this value from forward in one of those forms, or compute it outside the model")
            kinds.append(BATCHED)
            rows.append(tuple(int(d) for d in rest))
        self.kinds, self.row_shapes, self.dtypes = kinds, rows, dtypes

    def rebuild(self, tensors: list[Any]) -> Any:
        leaves: list[Any] = [None] * len(self.paths)
        for i, value in self.constants.items():
            leaves[i] = value
        for i, t in zip(self.tensor_slots, tensors):
            leaves[i] = t
        return pytree.tree_unflatten(leaves, self.spec)


def _call_paths(args: tuple, kwargs: dict) -> tuple[list[str], list[Any], pytree.TreeSpec]:
    """Like _paths, with each leaf named as the user wrote it: `#0` for the first positional argument,
    `labels` for a keyword, then any index or key inside it."""
    with_path, spec = pytree.tree_flatten_with_path((tuple(args), dict(kwargs)))
    paths = []
    for keys, _ in with_path:
        head = keys[1]
        name = f"#{head.idx}" if keys[0].idx == 0 else str(head.key)
        paths.append(name + pytree.keystr(keys[2:]))
    return paths, [v for _, v in with_path], spec


def _describe(path: str) -> str:
    return path if path else "(the whole value)"


def _names(paths: list[str]) -> str:
    return ", ".join(paths) if paths else "nothing"


def _short(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) < 60 else text[:57] + "..."
