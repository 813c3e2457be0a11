"""Capture `model.forward` with the first call's inputs as an fx graph (torch.export, non-strict).

The call may use keywords, constants and return any structure (`signature.py` maps both ends); the graph
itself takes and returns flat tensors.

The graph keeps the user's parameter objects (so the user's optimizer still refers to them), has one
node per tensor operation, a symbolic batch dimension on every batched input (so any micro-batch size
runs through it), and dropout routed through switches that `enable_dropout` and `eval()` control (where the
model's own code reads `self.training`, an eval-mode trace says whether eval mode would run other operations:
rannc.graph.modes). Where the
forward fixes the batch size (a Python number taken from it, or a batch of one row), the graph holds for that
size only, and `batch_range` says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.export import Dim

from rannc.graph import dropout as dropout_ops
from rannc.graph.modes import fixed_dropout, mode_difference, mode_ops, reads_training
from rannc.graph.signature import CallSignature, OutputSignature, SignatureError, is_symbolic

logger = logging.getLogger("rannc.capture")


def _warn(message: str, *args) -> None:
    """A capture warning, from rank 0 only: every rank traces the same forward and would say the same."""
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    logger.warning(message, *args)


class CaptureError(RuntimeError):
    """The model's forward cannot be turned into a graph."""


@dataclass
class CapturedGraph:
    """The model as one fx graph plus what the runtime needs to feed and read it."""

    gm: fx.GraphModule
    input_names: list[str]               # placeholders: the call's tensors, in CallSignature order
    batched_inputs: list[bool]           # inputs split along dim 0 (0-dim tensors are broadcast)
    call: CallSignature                  # the user's calling convention -> the graph's inputs
    outputs: OutputSignature             # the graph's outputs -> the user's result
    fingerprint: str                     # identifies graph + parameter shapes + input shapes
    tensor_names: dict[int, str] = field(default_factory=dict)  # id(tensor) -> first state_dict name
    batch_range: tuple[int, int | None] = (1, None)  # rows the graph holds for (a branch on the batch size)
    batch_fixed: bool = False            # the graph holds for the captured batch size only (see _fixed_batch)
    eval_difference: str | None = None   # where eval mode runs other operations than the graph (rannc.graph.modes)

    def output_nodes(self) -> list[Any]:
        return list(next(n for n in self.gm.graph.nodes if n.op == "output").args[0])

    def tensor_name(self, target: str) -> str:
        """The user's name (its first state_dict name) of the tensor at the graph's attribute `target`, for
        messages; the target itself for a tensor the model does not name."""
        return self.tensor_names.get(id(_attr(self.gm, target)), target)


class _FlatCall(nn.Module):
    """The model called with the graph's flat tensor inputs, returning the tensor leaves of its result:
    what torch.export traces, so that keyword arguments, constants and structured results need no
    support from export. The output structure is recorded while tracing."""

    def __init__(self, model: nn.Module, call: CallSignature, recorded: list):
        super().__init__()
        self.model = model
        self.call = call
        self.record = recorded.append   # export may trace a deep copy of this module; the list stays shared

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args, kwargs = self.call.rebuild(tensors)
        result = self.model(*args, **kwargs)
        signature, leaves = OutputSignature.of(result)
        self.record(signature)
        return tuple(leaves)


def _dynamic_shapes(args: tuple[torch.Tensor, ...]) -> tuple[Any, ...]:
    return (tuple({0: Dim.AUTO} if a.dim() > 0 else None for a in args),)


@contextlib.contextmanager
def _capture_mode(model: nn.Module, train: bool = True):
    """Trace in train mode with autograd on and autocast off: the graph must hold dropout ops and fp32
    ops; autocast is applied again when the stages run. A model in train mode is traced with its layers' modes
    as they are (a BatchNorm kept in eval inside it, frozen, stays so in the graph); a model in eval mode is
    traced with every layer in train mode. `train=False`: every layer in eval mode (the mode check's trace).
    Every layer's mode and every buffer (BatchNorm's running statistics) are put back afterwards: tracing
    must not count as a training step."""
    modes = [(m, m.training) for m in model.modules()]
    if not train:
        model.eval()
    elif not model.training:
        model.train()
    try:
        with preserved_state(model), torch.enable_grad(), torch.autocast("cpu", enabled=False), (
                torch.autocast("cuda", enabled=False) if torch.cuda.is_available() else contextlib.nullcontext()):
            yield
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def preserved_state(model: nn.Module):
    """Put the model's buffers and its parameters' gradients back as they were after the enclosed work
    (capture and profiling run the model; neither may count as a training step)."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    grads = [(p, p.grad) for p in model.parameters()]
    for p, _ in grads:
        p.grad = None   # profiling's backward accumulates into fresh tensors, not into these
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in buffers:
                b.copy_(value)
        for p, g in grads:
            p.grad = g


def mutated_args(node: fx.Node) -> list[fx.Node]:
    """The values an operation writes in place (from its schema's alias annotations)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return []
    out = []
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            if isinstance(value, fx.Node):
                out.append(value)
    return out


def _view_base(node: fx.Node) -> fx.Node:
    """The value a view is of, following view operations (an aliasing first argument) back as far as they go."""
    while node.op == "call_function":
        schema = getattr(node.target, "_schema", None)
        first = schema.arguments[0] if schema is not None and schema.arguments else None
        if first is None or first.alias_info is None or not node.args or not isinstance(node.args[0], fx.Node):
            break
        node = node.args[0]
    return node


def _base_placeholder(node: fx.Node) -> fx.Node | None:
    """The input a value is (a view of), following view operations back."""
    base = _view_base(node)
    return base if base.op == "placeholder" else None


def _refuse_mutated_inputs(gm: fx.GraphModule, call: CallSignature, model_name: str) -> None:
    """rannc runs the model on micro-batches cut from a gathered copy of the inputs, so an in-place write to
    an input would neither reach the caller's tensor nor be seen consistently by autograd: refuse it here."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    written = {base for node in gm.graph.nodes for arg in mutated_args(node)
               if (base := _base_placeholder(arg)) is not None}
    if not written:
        return
    paths = call.tensor_paths()
    which = [paths[i] if i < len(paths) else p.name for i, p in enumerate(placeholders) if p in written]
    raise CaptureError(f"{model_name}.forward writes in place to its argument {', '.join(which)}; rannc runs the model "
                       f"on micro-batches cut from a copy of the inputs, so the write could not reach your tensor. "
                       f"Clone the input before changing it (x = x.clone(); x.add_(...)) or use the out-of-place "
                       f"operation (x = x + ...)")


def _region_arg(module: fx.GraphModule, node: fx.Node) -> int | None:
    """Where a higher-order operation export made of a block of the forward (`torch.no_grad()`,
    `torch.autocast(...)`) holds its subgraph among its arguments; the arguments after it are the subgraph's
    inputs. None for any other node."""
    if not isinstance(node.target, torch._ops.HigherOrderOperator):
        return None
    for i, arg in enumerate(node.args):
        if isinstance(arg, fx.Node) and arg.op == "get_attr" and isinstance(_attr(module, arg.target),
                                                                             fx.GraphModule):
            return i
    return None


def written_attrs(gm: fx.GraphModule, statistics: bool = True) -> list[fx.Node]:
    """The get_attr nodes of `gm` whose tensors the graph writes in place: by its own operations (an in-place
    op, an `out=` argument, also into a view of the tensor) and inside the regions export traced apart (`with
    torch.no_grad()` and `with torch.autocast()` blocks, whose inputs stand for values of the graph around them;
    spectral_norm's power iteration writes its vectors there). With `statistics`, BatchNorm's running statistics
    and batch counter (written through the mode switches) count too."""
    found: list[fx.Node] = []

    def walk(module: fx.GraphModule, outer: dict) -> None:
        for node in module.graph.nodes:
            if node.op != "call_function":
                continue
            region_at = _region_arg(module, node)
            if region_at is not None:
                region = _attr(module, node.args[region_at].target)
                inner = [n for n in region.graph.nodes if n.op == "placeholder"]
                walk(region, {p: outer.get(a, a) for p, a in zip(inner, node.args[region_at + 1:])})
                continue
            if node.target is dropout_ops.batch_norm:
                written = list(node.args[3:5]) if statistics else []
            elif node.target is dropout_ops.count_batch:
                written = list(node.args[:1]) if statistics else []
            else:
                written = mutated_args(node)
            for arg in written:
                if not isinstance(arg, fx.Node):
                    continue
                arg = _view_base(arg)   # a write into a slice of a buffer (queue[:n] = k) writes the buffer
                arg = _view_base(outer[arg]) if arg in outer else arg
                if arg.op == "get_attr" and arg not in found:
                    found.append(arg)

    walk(gm, {})
    return found


def written_buffers(captured: CapturedGraph) -> list[str]:
    """Names of the buffers the forward writes other than BatchNorm's statistics (which the mode switches
    handle): each is written once per run of the graph, so once per micro-batch."""
    names: list[str] = []
    for node in written_attrs(captured.gm, statistics=False):
        tensor = _attr(captured.gm, node.target)
        name = captured.tensor_names.get(id(tensor), str(node.target))
        if not isinstance(tensor, nn.Parameter) and name not in names:
            names.append(name)
    return names


_CHECKPOINT_SOURCE = "torch/utils/checkpoint.py"


def _refuse_reentrant_checkpoint(gm: fx.GraphModule, model: nn.Module) -> None:
    """Refuse a graph holding torch.utils.checkpoint(..., use_reentrant=True) while the model has parameters to
    train. torch.export traces its call as a region with gradients off (and often all after it too), without
    the eager backward that recomputes the call with gradients: no gradient would reach the layers inside or
    after it, and backward would run without a word. Found by the region's operations, whose source is the
    checkpoint's own code; a `torch.no_grad()` block of the model is no such region and passes."""
    if not any(p.requires_grad for p in model.parameters()):
        return
    for node in gm.graph.nodes:
        if not (node.op == "call_function" and node.target is torch.ops.higher_order.wrap_with_set_grad_enabled
                and node.args[0] is False):
            continue
        region = _attr(gm, node.args[1].target)
        if any(_CHECKPOINT_SOURCE in (n.meta.get("stack_trace") or "").replace("\\", "/")
               for n in region.graph.nodes):
            raise CaptureError(f"{type(model).__name__}.forward calls torch.utils.checkpoint(..., "
                               f"use_reentrant=True), which torch.export traces with gradients disabled and "
                               f"without its backward, so no gradient would reach the layers in and after it: pass "
                               f"use_reentrant=False (or, for Hugging Face models, gradient_checkpointing_kwargs="
                               f"{{'use_reentrant': False}}), or drop the checkpointing, since rannc plans "
                               f"recomputation itself; for inference only, set requires_grad=False on the "
                               f"parameters")


def capture(model: nn.Module, args: tuple, kwargs: dict | None = None, dynamic_batch: bool = True) -> CapturedGraph:
    """Export `model(*args, **kwargs)`; raise CaptureError naming the failing operation.

    `dynamic_batch=False` fixes the batch size (three times faster to export; enough for a dry-run plan,
    which only reads shapes)."""
    call = CallSignature.of(tuple(args), dict(kwargs or {}))
    tensors = tuple(call.tensors(tuple(args), dict(kwargs or {})))
    batched = [t.dim() > 0 for t in tensors]
    sizes = {path: t.shape[0] for path, t, b in zip(call.tensor_paths(), tensors, batched) if b}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{p}: {n}" for p, n in sizes.items())
        raise CaptureError(f"the tensor arguments have different first dimensions ({listed}); rannc splits every "
                           f"tensor of at least one dimension along its first dimension, the batch: pass "
                           f"per-sample tensors only (0-dim tensors are passed whole)")
    recorded: list[OutputSignature] = []
    flat = _FlatCall(model, call, recorded)
    with _capture_mode(model):
        try:
            shapes = _dynamic_shapes(tensors) if dynamic_batch else None
            exported = torch.export.export(flat, tensors, dynamic_shapes=shapes, strict=False)
        except Exception as exc:  # export raises many types; all mean "cannot capture"
            text = str(exc).strip()
            lines = text.splitlines()
            summary = "\n".join(lines[:25]) + ("\n..." if len(lines) > 25 else "")
            raise CaptureError(
                f"rannc could not capture {type(model).__name__}.forward with torch.export (non-strict): "
                f"{type(exc).__name__}: {summary}\nrannc needs a forward without data-dependent Python "
                f"control flow on tensor values; see the operation and source line named above. Where that "
                f"line is in a loss torch.export cannot trace (CTC's, whose shapes follow the labels' values), "
                f"return the loss's inputs from forward and compute the loss outside the model.") from exc
    outputs = recorded[0] if recorded else None
    if outputs is None or not outputs.tensor_slots:
        raise CaptureError(f"{type(model).__name__}.forward returns no tensor; rannc needs a loss or batched "
                           f"outputs to return")
    gm = exported.module()
    # before the routing below renames the switched ops
    train_ops, eval_may_differ = mode_ops(gm, eval_mode=False), reads_training(model) or fixed_dropout(gm)
    _clean(gm)
    _refuse_mutated_inputs(gm, call, type(model).__name__)
    _refuse_reentrant_checkpoint(gm, model)
    dropout_ops.route_dropout(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(tensors):
        raise CaptureError(f"captured graph has {len(placeholders)} inputs but forward got {len(tensors)}")
    # each batched input's first dimension as traced (None for the others): a symbol, or a number export fixed
    firsts = [p.meta["val"].shape[0] if b and isinstance(p.meta.get("val"), torch.Tensor) else None
              for p, b in zip(placeholders, batched)]
    symbols = [size for size in firsts if size is not None and is_symbolic(size)]
    batch_dims = {str(size) for size in symbols}
    out_nodes = list(next(n for n in gm.graph.nodes if n.op == "output").args[0])
    local_batch = next(iter(sizes.values()), 1)
    batch_fixed = dynamic_batch and _fixed_batch(firsts, call.tensor_paths(), local_batch, type(model).__name__)
    try:
        outputs.classify([n.meta.get("val") if isinstance(n, fx.Node) else n for n in out_nodes], batch_dims,
                         local_batch, fixed=batch_fixed)
    except SignatureError as exc:
        raise CaptureError(str(exc)) from None
    tensor_names: dict[int, str] = {}
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + list(
            model.named_buffers(remove_duplicate=False)):
        tensor_names.setdefault(id(tensor), name)
    _warn_pairs_of_samples(gm, {size.node.expr for size in symbols}, type(model).__name__)
    # a dry run (a fixed batch) only plans; nothing runs in eval mode there
    eval_difference = (_eval_difference(model, call, tensors, shapes, train_ops)
                       if dynamic_batch and eval_may_differ else None)
    return CapturedGraph(
        gm=gm,
        input_names=[n.name for n in placeholders],
        batched_inputs=batched,
        call=call,
        outputs=outputs,
        fingerprint=_fingerprint(gm, model, tensors, call),
        tensor_names=tensor_names,
        batch_range=(local_batch, local_batch) if batch_fixed else _batch_range(exported, symbols),
        batch_fixed=batch_fixed,
        eval_difference=eval_difference,
    )


def _eval_difference(model: nn.Module, call: CallSignature, tensors: tuple, shapes, train_ops: list) -> str | None:
    """Trace the forward again in eval mode and say where its operations part from the train-mode graph's (None
    where they do not). Only where they may: the model's code reads `self.training`, or fixes a dropout."""
    with _capture_mode(model, train=False):
        try:
            exported = torch.export.export(_FlatCall(model, call, []), tensors, dynamic_shapes=shapes, strict=False)
        except Exception as exc:  # export raises many types; the train-mode graph stands, eval mode cannot run
            return f"the eval-mode forward could not be traced ({type(exc).__name__}: " \
                   f"{(str(exc).strip().splitlines() or [''])[0]})"
    difference = mode_difference(train_ops, mode_ops(exported.module(), eval_mode=True))
    if difference is not None:
        _warn("%s.forward runs other operations in eval mode than in train mode (%s): rannc will refuse "
                       "eval-mode calls, since its graph holds the train-mode ones", type(model).__name__, difference)
    return difference


def _fixed_batch(firsts: list, paths: list[str], local_batch: int, model_name: str) -> bool:
    """Whether export made a batched input's first dimension a number instead of a symbol, and so fixed the
    batch size of the whole graph: a Python number taken from the batch (`len(x)`, `int(x.shape[0])`) is
    recorded as a constant, and a batch of one row is never traced symbolically. Any other micro-batch size
    would run with that constant, silently wrong (`loss.sum() / len(x)`), so the plan must keep every
    micro-batch at the captured size; warns saying why."""
    fixed = [path for path, size in zip(paths, firsts) if size is not None and not is_symbolic(size)]
    if not fixed:
        return False
    if local_batch == 1:
        _warn("%s.forward was captured with 1 row per process, and torch.export does not trace a batch "
                       "of one row symbolically: the graph holds for micro-batches of 1 row only, and the plan "
                       "keeps to them; call the model with at least 2 rows per process to let rannc cut "
                       "micro-batches of any size", model_name)
    else:
        _warn("%s.forward fixed the batch size at %d rows while it was captured (inputs %s): a Python "
                       "number taken from the batch, such as len(x) or int(x.shape[0]), becomes a constant of the "
                       "graph, wrong for any other number of rows. Every micro-batch of every replica keeps %d "
                       "rows; use x.shape[0] inside tensor operations (torch.arange(x.shape[0]), "
                       "loss.sum() / x.shape[0]) instead to let rannc cut micro-batches of any size. A loss that "
                       "pairs the batch's samples (a contrastive loss whose labels are torch.arange(len(logits))) "
                       "pairs those of one micro-batch only",
                       model_name, local_batch, ", ".join(fixed), local_batch)
    return True


def _warn_pairs_of_samples(gm: fx.GraphModule, symbols: set, model_name: str) -> None:
    """Warn, once, where the graph pairs the batch's samples with each other (a value with the batch size in
    two dimensions, such as a contrastive loss's batch x batch similarities): rannc runs the graph on each
    micro-batch, so such a value pairs only the samples of one micro-batch, and a loss built from it is the
    mean of the micro-batches' losses (as under DistributedDataParallel), not the global batch's."""
    if not symbols:
        return
    for node in gm.graph.nodes:
        value = node.meta.get("val")
        if node.op != "call_function" or not isinstance(value, torch.Tensor):
            continue
        in_batch = [bool(symbols & d.node.expr.free_symbols) for d in value.shape if isinstance(d, torch.SymInt)]
        if sum(in_batch) >= 2:
            trace = (node.meta.get("stack_trace") or "").strip().splitlines()
            where = f" ({trace[-2].strip()}: {trace[-1].strip()})" if len(trace) >= 2 else ""
            _warn("%s.forward pairs the samples of its batch with each other: %s has shape %s%s. rannc "
                           "runs the model on micro-batches, so it pairs the samples of one micro-batch only, and "
                           "a loss built from it is the mean of the micro-batches' losses (as under "
                           "DistributedDataParallel), not the loss of the global batch", model_name, node.name,
                           tuple(value.shape), where)
            return


def _batch_range(exported, symbols: list) -> tuple[int, int | None]:
    """The batch sizes the graph is valid for. Python code that branches on the batch size (`if x.shape[0] > 6`)
    is traced down one branch, and export narrows the batch symbol's range to the sizes that take it; the graph
    must run only micro-batches within it (its runtime guard is dropped with the others, see _clean). Export's
    lower bound of 2 is its default (sizes 0 and 1 are not traced symbolically) and is read as 1: a branch on
    `batch > 1` itself cannot be told apart. `symbols`: the batched inputs' first dimensions that are symbols."""
    for size in symbols:
        bounds = exported.range_constraints.get(size.node.expr)
        if bounds is None:
            continue
        low = int(bounds.lower)
        high = int(bounds.upper) if bounds.upper.is_Integer else None  # else int_oo: no upper bound
        return (1 if low <= 2 else low, high)
    return (1, None)


def _clean(gm: fx.GraphModule) -> None:
    """Drop export's guard call, its tensor-metadata assertions and unused attribute reads, and make every
    tensor one get_attr node (a tied weight is listed under each of its names)."""
    graph = gm.graph
    first_attr: dict[int, fx.Node] = {}
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            graph.erase_node(node)
        elif node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default:
            # dtype/device checks of the capture; autocast and the rank's device legitimately change both
            graph.erase_node(node)
        elif node.op == "get_attr":
            tensor = _attr(gm, node.target)
            keeper = first_attr.setdefault(id(tensor), node)
            if keeper is not node:
                node.replace_all_uses_with(keeper)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    graph.lint()
    gm.recompile()


def _attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def named_graph_tensors(gm: fx.GraphModule) -> list[tuple[str, torch.Tensor]]:
    """Every tensor the graph reads with its attribute path: parameters, buffers and the plain tensor
    attributes (`self.scale = torch.randn(4)`) that export keeps as constants of the graph."""
    out, seen = [], set()
    for name, t in list(gm.named_parameters()) + list(gm.named_buffers()):
        out.append((name, t))
        seen.add(id(t))
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            t = _attr(gm, node.target)
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                out.append((node.target, t))
                seen.add(id(t))
    return out


def _fingerprint(gm: fx.GraphModule, model: nn.Module, args: tuple[torch.Tensor, ...], call: CallSignature) -> str:
    digest = hashlib.sha256()
    digest.update(type(model).__qualname__.encode())
    digest.update(repr((call.paths, sorted(call.constants.items(), key=lambda kv: kv[0]))).encode())
    for node in gm.graph.nodes:
        digest.update(f"{node.op}|{_stable_name(node.target)}|{len(node.args)}".encode())
    for name, p in model.named_parameters():
        digest.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
    for a in args:
        digest.update(f"{tuple(a.shape[1:])}:{a.dtype}".encode())
    return digest.hexdigest()[:16]


def _stable_name(target) -> str:
    """A node target's name that is the same in every process: a Python function's str() holds its address, so
    the fingerprint (the key of profile caches and saved deployments) would change from run to run."""
    text = str(target)
    if " at 0x" not in text:  # ops ("aten.mm.default"), builtins, attribute names
        return text
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', type(target).__qualname__)}"


def is_tensor_value(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


_SYM_OPS = {operator.getitem, operator.mul, operator.add, operator.sub, operator.floordiv, operator.truediv}


def is_replicable(node: fx.Node, memo: dict[fx.Node, bool]) -> bool:
    """True for values any stage can recompute for itself: inputs, attributes, and non-tensor values
    (symbolic sizes) derived only from those."""
    if node in memo:
        return memo[node]
    if node.op in ("placeholder", "get_attr"):
        result = True
    elif node.op == "call_function" and not is_tensor_value(node) and (
            node.target in _SYM_OPS or "sym_" in str(node.target)):
        result = all(is_replicable(n, memo) for n in node.all_input_nodes)
    else:
        result = False
    memo[node] = result
    return result


def retarget_device(gm: fx.GraphModule, device: torch.device) -> None:
    """Point the graph at this rank's device: factory ops (arange, zeros, ...) captured with the model on
    another device carry that device as a constant, and lifted tensor constants live there too."""
    changed = False
    for node in gm.graph.nodes:
        dev = node.kwargs.get("device")
        if isinstance(dev, torch.device) and dev != device:
            node.update_kwarg("device", device)
            changed = True
        elif node.op == "get_attr":
            owner_path, _, name = node.target.rpartition(".")
            owner = gm.get_submodule(owner_path) if owner_path else gm
            value = getattr(owner, name)
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and \
                    name not in owner._buffers and value.device != device:
                setattr(owner, name, value.to(device))
    if changed:
        gm.recompile()
