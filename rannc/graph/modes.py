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

import ast
import difflib
import inspect
import re
import textwrap

import torch
import torch.fx as fx
import torch.nn as nn

from rannc.graph import dropout as switches

# torch's layers whose mode rannc switches itself (their ops are routed): reading `self.training` there changes
# nothing. A user's subclass with code of its own is read like any other layer.
_SWITCHED_LAYERS = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)


def reads_training(model: nn.Module) -> bool:
    """Whether the code of any of the model's layers reads `.training` (a class whose source cannot be read
    counts as one), their base classes included (a forward may be inherited), other than torch's own layers
    that rannc switches: only then can the eval-mode graph differ."""
    seen: set[type] = set()
    for module in model.modules():
        for cls in type(module).__mro__:
            if cls in seen or cls in (nn.Module, object):
                continue
            seen.add(cls)
            if issubclass(cls, _SWITCHED_LAYERS) and cls.__module__.startswith("torch.nn."):
                continue
            try:
                tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
            except (OSError, TypeError, SyntaxError):
                return True
            if any(isinstance(node, ast.Attribute) and node.attr == "training" for node in ast.walk(tree)):
                return True
    return False


def fixed_dropout(gm: fx.GraphModule) -> bool:
    """Whether the train-mode graph drops out in code of the model's own (not a torch layer's): a rate or flag
    fixed there (`F.dropout(x, p, training=True)`, Monte Carlo dropout) drops out in eval mode too, where the
    switches would not, and only an eval-mode trace tells it from one that follows the mode."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in switches.DROPOUT_ARG:
            continue
        if not bool(_argument(node, switches.DROPOUT_ARG[node.target])):
            continue
        owners = list((node.meta.get("nn_module_stack") or {}).values())
        owner = str(owners[-1][1]) if owners else ""
        if not owner.startswith("torch.nn.modules."):
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
    return tuple(_constant(_argument(node, i)) for i in range(len(node.target._schema.arguments)))


_DROPPING = "dropout on in eval mode"


def _argument(node: fx.Node, index: int):
    """The op's argument at `index` of its schema, its default where the trace left it out."""
    arg = node.target._schema.arguments[index]
    if index < len(node.args):
        return node.args[index]
    if arg.name in node.kwargs:
        return node.kwargs[arg.name]
    return arg.default_value if arg.has_default_value() else None


def _key(node: fx.Node, eval_mode: bool) -> tuple | None:
    """What the comparison sees of one op (None: nothing). Ops that only drop out do nothing in eval mode
    under rannc, so they are left out, unless an eval-mode trace holds one switched on (dropout asked for in
    eval mode, which the switches would turn off); the other switched ops count by name, the rest with their
    constant arguments."""
    target = node.target
    dropping = target in switches.DROPOUT_ARG and bool(_argument(node, switches.DROPOUT_ARG[target]))
    if eval_mode and dropping:
        return (str(target), _DROPPING)
    if target in switches.DROPOUT_OPS:
        return None
    if target in switches.ROUTED_OPS:
        return (str(target),)
    return (str(target), _arguments(node))


def mode_ops(gm: fx.GraphModule, eval_mode: bool) -> list[tuple[tuple, fx.Node]]:
    """The graph's operations in order, each with its key for the comparison (:func:`_key`). Export's size
    bookkeeping and assertions are left out; the blocks export traced apart (`torch.no_grad()`,
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
                    inner = switches.subgraph(module, arg)
                    if inner is not None:
                        walk(inner)
                continue
            if not isinstance(target, torch._ops.OpOverload):
                continue   # getitem, arithmetic on sizes
            name = str(target)
            if name.startswith("aten.sym_") or "_assert" in name or switches.is_batch_count(node):
                continue
            key = _key(node, eval_mode)
            if key is not None:
                out.append((key, node))

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
    dropping = f" ({_DROPPING})" if key[1:] == (_DROPPING,) else ""
    return f"{key[0]}{dropping} at {_where(node)}{more}"


def mode_difference(train_ops: list[tuple[tuple, fx.Node]], eval_ops: list[tuple[tuple, fx.Node]]) -> str | None:
    """None where both modes run the same operations; else where they first part, in words."""
    train_keys = [key for key, _ in train_ops]
    eval_keys = [key for key, _ in eval_ops]
    if train_keys == eval_keys:
        return None
    matcher = difflib.SequenceMatcher(None, train_keys, eval_keys, autojunk=False)
    tag, i1, i2, j1, j2 = next(op for op in matcher.get_opcodes() if op[0] != "equal")
    return f"train mode runs {_describe(train_ops[i1:i2])} where eval mode runs {_describe(eval_ops[j1:j2])}"
