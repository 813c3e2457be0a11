"""Mode switches of the captured graph. The graph is traced once, in train mode; its mode-dependent ops
call these functions instead, which read switches the owning RaNNCModule sets around each run:

- dropout (also alpha dropout, attention's, and recurrent layers' between layers) draws masks only in train mode
  with dropout enabled (`enable_dropout`);
- BatchNorm uses batch statistics and updates its running statistics only in train mode (a layer without
  running statistics always normalises by the batch, as in eager PyTorch); while a stage recomputes its
  forward for backward, running statistics and batch counters are left alone, so a recomputed micro-batch
  counts once."""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.fx as fx


class _Switches:
    active = True        # dropout draws masks
    training = True      # batch-statistics layers use (and update) batch statistics
    recomputing = False  # a stage is recomputing its forward for backward
    checkpointed = False  # a stage that recomputes runs its forward, first or again


_state = _Switches()


@contextlib.contextmanager
def _switched(name: str, value: bool):
    before = getattr(_state, name)
    setattr(_state, name, value)
    try:
        yield
    finally:
        setattr(_state, name, before)


def dropout_active(on: bool):
    """Set whether dropout draws masks while stages run (train mode and dropout enabled)."""
    return _switched("active", on)


def train_mode(on: bool):
    """Set whether batch-statistics layers run in train mode while stages run."""
    return _switched("training", on)


def recomputing():
    """Mark a stage's recomputation of its forward (in backward)."""
    return _switched("recomputing", True)


def checkpointed():
    """Mark both runs of the forward of a stage that recomputes: the first and its recomputation in backward."""
    return _switched("checkpointed", True)


def switches() -> tuple[bool, bool, bool]:
    """The switches now (dropout active, train mode, recomputing): compiled stages note them per call."""
    return _state.active, _state.training, _state.recomputing


def dropout(x: torch.Tensor, p: float, train: bool) -> torch.Tensor:
    return torch.ops.aten.dropout.default(x, p, train and _state.active)


def feature_dropout(x: torch.Tensor, p: float, train: bool) -> torch.Tensor:
    return torch.ops.aten.feature_dropout.default(x, p, train and _state.active)


def alpha_dropout(x: torch.Tensor, p: float, train: bool) -> torch.Tensor:
    return torch.ops.aten.alpha_dropout.default(x, p, train and _state.active)


def feature_alpha_dropout(x: torch.Tensor, p: float, train: bool) -> torch.Tensor:
    return torch.ops.aten.feature_alpha_dropout.default(x, p, train and _state.active)


def _recurrent(op, dropout_at: int):
    """nn.LSTM/GRU/RNN's op, whose `train` argument (after `dropout`) says whether to drop out between layers:
    in eval mode neither, as eager; with dropout disabled in train mode the rate is 0 and `train` stays, since
    cuDNN's backward needs the training variant."""
    def run(*args):
        args = list(args)
        if not _state.active:
            args[dropout_at] = 0.0
        args[dropout_at + 1] = args[dropout_at + 1] and _state.training
        if _state.checkpointed and args[dropout_at] > 0 and args[dropout_at + 1]:
            return _without_cudnn(op, args)
        return op(*args)

    run.__name__ = run.__qualname__ = "recurrent_" + op.__name__.replace(".", "_")   # stable in fingerprints
    # Run eagerly inside compiled stages: torch's decomposition of these ops (which compile traces through)
    # never drops out between layers (pytorch/torch/_decomp/decompositions.py, `num_layers < i - 1`), and it
    # would replace cuDNN's fused kernel with a loop over the cells.
    return torch.compiler.disable(run)


_WARNED_CUDNN = []


def _without_cudnn(op, args: list):
    """A recurrent op dropping out between layers, in a stage that recomputes: cuDNN's RNN draws its masks from a
    dropout state of its own (one per device, seeded once: pytorch/pytorch#74177), which the recomputation's
    restored RNG state does not reach, so the recomputed forward would draw other masks than the first and the
    backward would give the gradient of another sample. Without cuDNN, PyTorch's own implementation drops out
    with the default generator, which checkpoint restores (slower on CUDA devices; said once)."""
    if args[0].is_cuda and torch.backends.cudnn.enabled and not _WARNED_CUDNN:
        _WARNED_CUDNN.append(True)
        logging.getLogger("rannc.RaNNCModule").warning(
            "rannc: a stage that recomputes holds a recurrent layer (%s) dropping out between layers: it runs "
            "without cuDNN there, since cuDNN's dropout state cannot be replayed for the recomputation "
            "(pytorch/pytorch#74177); recompute='never' keeps cuDNN where memory allows", op.__name__)
    before = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = False
    try:
        return op(*args)
    finally:
        torch.backends.cudnn.enabled = before


def sdpa(*args, **kwargs) -> torch.Tensor:
    if not _state.active:
        if len(args) > 4:
            args = args[:4] + (0.0,) + args[5:]
        if "dropout_p" in kwargs:
            kwargs["dropout_p"] = 0.0
    return torch.ops.aten.scaled_dot_product_attention.default(*args, **kwargs)


def batch_norm(x, weight, bias, running_mean, running_var, training: bool, momentum: float, eps: float,
               cudnn_enabled: bool) -> torch.Tensor:
    batch_stats = training and (_state.training or running_mean is None)
    if _state.recomputing and running_mean is not None:
        momentum = 0.0  # the statistics were updated by this micro-batch's first forward
    return torch.ops.aten.batch_norm.default(x, weight, bias, running_mean, running_var, batch_stats, momentum, eps,
                                             cudnn_enabled)


def count_batch(counter: torch.Tensor, value) -> torch.Tensor:
    """BatchNorm's `num_batches_tracked += 1`, in train mode and not while recomputing."""
    if _state.training and not _state.recomputing:
        counter.add_(value)
    return counter


_ROUTES = {
    torch.ops.aten.dropout.default: dropout,
    torch.ops.aten.feature_dropout.default: feature_dropout,
    torch.ops.aten.scaled_dot_product_attention.default: sdpa,
    torch.ops.aten.batch_norm.default: batch_norm,
    torch.ops.aten.alpha_dropout.default: alpha_dropout,
    torch.ops.aten.feature_alpha_dropout.default: feature_alpha_dropout,
}
_aten = torch.ops.aten
_RECURRENT = (_aten.lstm, _aten.gru, _aten.rnn_tanh, _aten.rnn_relu)
for _op in _RECURRENT:
    _ROUTES[_op.input] = _recurrent(_op.input, 5)      # (input, hx, params, has_biases, layers, dropout, train, ...)
    _ROUTES[_op.data] = _recurrent(_op.data, 6)        # (data, batch_sizes, hx, params, ..., dropout, train, ...)
# Routed ops that run eagerly inside compiled code (a shared compile region cannot hold one: rannc.graph.regions).
EAGER_OPS = frozenset(_ROUTES[overload] for op in _RECURRENT for overload in (op.input, op.data))
# The ops whose mode the switches decide: their train flags and rates may differ between a graph traced in
# train mode and one traced in eval mode without the run differing (capture's mode check, rannc.graph.modes).
ROUTED_OPS = frozenset(_ROUTES)
# Ops that do nothing but drop out, so nothing at all in eval mode: the mode check leaves them out of both traces.
DROPOUT_OPS = frozenset({_aten.dropout.default, _aten.feature_dropout.default, _aten.alpha_dropout.default,
                         _aten.feature_alpha_dropout.default})
# Where a switched op says that it drops out (the argument's index: a flag, or attention's rate). An eval-mode
# trace holding one of these on (F.dropout(x, p, training=True)) asks for dropout in eval mode, which the
# switches would turn off: the mode check names it.
DROPOUT_ARG = {**{op: 2 for op in DROPOUT_OPS}, _aten.scaled_dot_product_attention.default: 4,
               **{op.input: 6 for op in _RECURRENT}, **{op.data: 7 for op in _RECURRENT}}


def route_dropout(gm: fx.GraphModule) -> None:
    """Point every mode-dependent op of the graph at its switch, also inside the blocks export traced apart
    (`torch.no_grad()`, `torch.autocast()`: higher-order ops holding a subgraph)."""
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if isinstance(node.target, torch._ops.HigherOrderOperator):
            for arg in node.args:
                inner = subgraph(gm, arg)
                if inner is not None:
                    route_dropout(inner)
        elif node.target in _ROUTES:
            node.target = _ROUTES[node.target]
        elif is_batch_count(node):
            node.target = count_batch
    gm.recompile()


def is_batch_count(node: fx.Node) -> bool:
    """BatchNorm's `num_batches_tracked += 1` as export traces it (train mode only; `count_batch` runs it)."""
    first = node.args[0] if node.args else None
    return (node.target is torch.ops.aten.add_.Tensor and isinstance(first, fx.Node) and first.op == "get_attr"
            and str(first.target).endswith("num_batches_tracked"))


def subgraph(gm: fx.GraphModule, arg) -> fx.GraphModule | None:
    """The subgraph an argument of a higher-order op reads, if it reads one."""
    if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
        return None
    obj = gm
    for part in str(arg.target).split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, fx.GraphModule) else None
