"""Whether a model's forward runs other operations in eval mode than in train mode.

rannc traces the forward once, in train mode, and switches the ops whose behaviour follows the mode (dropout,
attention's dropout, recurrent layers' dropout, BatchNorm: rannc.graph.dropout) when the graph runs. Any other
branch on `self.training` in the model's code is fixed in the graph at its train-mode path, so an eval-mode call
would run the train-mode operations (a noise term, an auxiliary loss, another normalisation) without a word.
The capture therefore traces the forward a second time in eval mode, where the model's code reads
`self.training` at all, and compares the two graphs' operations (:func:`mode_difference`); rannc refuses
eval-mode calls of a model whose graphs differ, naming the first difference.
"""

from __future__ import annotations

import difflib
import inspect
import re

import torch
import torch.fx as fx
import torch.nn as nn

# Layers whose mode rannc switches itself (their ops are routed), so reading `self.training` there changes nothing.
_SWITCHED_LAYERS = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)
_TRAINING = re.compile(r"\btraining\b")


def reads_training(model: nn.Module) -> bool:
    """Whether the code of any of the model's layers mentions `training` (a class whose source cannot be read
    counts as one), other than the layers rannc switches: only then can the eval-mode graph differ."""
    for cls in {type(m) for m in model.modules()}:
        if issubclass(cls, _SWITCHED_LAYERS):
            continue
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            return True
        if _TRAINING.search(source):
            return True
    return False


def _constant(value):
    """An argument as the comparison sees it: graph values stand for themselves, numbers and flags as they are."""
    if isinstance(value, fx.Node):
        return "%"
    if isinstance(value, (list, tuple)):
        return tuple(_constant(v) for v in value)
    return repr(value)


def _arguments(node: fx.Node) -> tuple:
    """Every argument of the op in its schema's order, defaults filled in (a trace may leave them out)."""
    schema = node.target._schema
    out = []
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            value = node.args[i]
        elif arg.name in node.kwargs:
            value = node.kwargs[arg.name]
        else:
            value = arg.default_value if arg.has_default_value() else None
        out.append(_constant(value))
    return tuple(out)


def _is_batch_count(node: fx.Node) -> bool:
    """BatchNorm's `num_batches_tracked += 1`, which only train mode traces (the switches run it)."""
    first = node.args[0] if node.args else None
    return (node.target is torch.ops.aten.add_.Tensor and isinstance(first, fx.Node) and first.op == "get_attr"
            and str(first.target).endswith("num_batches_tracked"))


def mode_ops(gm: fx.GraphModule, routed: frozenset) -> list[tuple[tuple, fx.Node]]:
    """The graph's operations in order, each with its key for the comparison: the op and its constant arguments,
    or the op alone where rannc routes it (`routed`: its mode flags and rates are the switches' business).
    Export's size bookkeeping and assertions are left out; the blocks export traced apart (`torch.no_grad()`,
    `torch.autocast()`) are walked into."""
    out: list[tuple[tuple, fx.Node]] = []

    def walk(module: fx.GraphModule) -> None:
        for node in module.graph.nodes:
            if node.op != "call_function":
                continue
            target = node.target
            if isinstance(target, torch._ops.HigherOrderOperator):
                out.append(((str(target),), node))
                for arg in node.args:
                    if isinstance(arg, fx.Node) and arg.op == "get_attr":
                        inner = getattr(module, str(arg.target), None)
                        if isinstance(inner, fx.GraphModule):
                            walk(inner)
                continue
            if not isinstance(target, torch._ops.OpOverload):
                continue   # getitem, arithmetic on sizes
            name = str(target)
            if name.startswith("aten.sym_") or "_assert" in name or _is_batch_count(node):
                continue
            out.append(((name,) if target in routed else (name, _arguments(node)), node))

    walk(gm)
    return out


def _where(node: fx.Node) -> str:
    """The model's source line that made the operation (the innermost frame of its stack trace)."""
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in \S+\n\s*(.*)', trace)
    if not frames:
        return "an unknown line"
    path, line, code = frames[-1]
    return f"{path.replace(chr(92), '/').rsplit('/', 1)[-1]}:{line} ({code.strip()})"


def _describe(entries: list[tuple[tuple, fx.Node]]) -> str:
    if not entries:
        return "nothing"
    key, node = entries[0]
    more = f" and {len(entries) - 1} more" if len(entries) > 1 else ""
    return f"{key[0]} at {_where(node)}{more}"


def mode_difference(train_ops: list[tuple[tuple, fx.Node]], eval_ops: list[tuple[tuple, fx.Node]]) -> str | None:
    """None where both modes run the same operations; else where they first part, in words."""
    train_keys = [key for key, _ in train_ops]
    eval_keys = [key for key, _ in eval_ops]
    if train_keys == eval_keys:
        return None
    matcher = difflib.SequenceMatcher(None, train_keys, eval_keys, autojunk=False)
    tag, i1, i2, j1, j2 = next(op for op in matcher.get_opcodes() if op[0] != "equal")
    return f"train mode runs {_describe(train_ops[i1:i2])} where eval mode runs {_describe(eval_ops[j1:j2])}"
