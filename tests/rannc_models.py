"""RaNNC-style test models (after upstream's `test/models.py`, written anew and kept small), each with a
factory, a deterministic global-batch generator and a per-rank criterion.

Every model can be used two ways:
  * "out":  the model returns batched outputs (a tensor, a tuple or a dict whose tensors have the batch as
            first dimension); the loss is computed outside the module with `spec.criterion(out, target)`.
  * "loss": `WithLoss(model, criterion)` folds the criterion into forward, taking the target as an extra
            input, and returns one scalar: the loss of the batch (a per-sample mean).
`LossOut` returns its loss itself and is used the "loss" way only. "nograd" (BatchNorm only): the "out" way in
training mode under torch.no_grad(), no backward: running statistics without gradients.

The global batch is BATCH rows, divisible by 1, 2 and 3 ranks (and by 2 micro-batches per replica);
rank r's local batch is rows(r, world) of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

BATCH = 12


# ---- models ----------------------------------------------------------------------------------------------

class LeNet(nn.Module):
    """Upstream's BasicModel, shrunk: two 3x3 convolutions, max-pool, two Linear layers; input 1x16x16."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3)
        self.conv2 = nn.Conv2d(3, 5, 3)
        self.fc1 = nn.Linear(5 * 6 * 6, 16)
        self.fc2 = nn.Linear(16, 10)
        self.fc3 = nn.Linear(10, 7)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        return self.fc3(F.relu(self.fc2(x)))


class MLP(nn.Module):
    def __init__(self, inp: int = 10, hidden: int = 16, out: int = 3, layers: int = 4):
        super().__init__()
        self.inp = nn.Linear(inp, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))
        self.out = nn.Linear(hidden, out)

    def forward(self, x):
        x = torch.relu(self.inp(x))
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.out(x)


class _Inner(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.a = nn.Linear(hidden, hidden)
        self.b = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x):
        return torch.tanh(self.b(torch.relu(self.a(x)))) + x


class _Middle(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.first = _Inner(hidden)
        self.second = _Inner(hidden)
        self.gate = nn.Parameter(torch.linspace(0.5, 1.5, hidden))

    def forward(self, x):
        return self.second(self.first(x)) * self.gate


class NestModel(nn.Module):
    """Modules three levels deep (parameter names like `blocks.1.second.a.weight`) and a bare Parameter."""

    def __init__(self, inp: int = 10, hidden: int = 8, out: int = 3):
        super().__init__()
        self.embed = nn.Linear(inp, hidden)
        self.blocks = nn.Sequential(_Middle(hidden), _Middle(hidden))
        self.head = nn.Linear(hidden, out)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)))


class SharedParamModel(nn.Module):
    """fc2.weight = fc1.weight: one weight used twice within a few neighbouring operations."""

    def __init__(self, inp: int = 10, hidden: int = 8, out: int = 3):
        super().__init__()
        self.inp = nn.Linear(inp, hidden)
        self.fc1 = nn.Linear(hidden, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, hidden, bias=True)
        self.fc2.weight = self.fc1.weight
        self.mid = nn.Linear(hidden, hidden)
        self.mid2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, out)

    def forward(self, x):
        x = torch.relu(self.inp(x))
        x = self.fc2(torch.tanh(self.fc1(x)))
        x = torch.relu(self.mid(x))
        x = torch.relu(self.mid2(x))
        return self.out(x)


class SharedEmbModel(nn.Module):
    """An embedding tied to the output projection, with several layers between them (so the two uses of
    the weight land in different stages of a 2-stage plan)."""

    def __init__(self, vocab: int = 11, hidden: int = 8, layers: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))
        self.proj = nn.Linear(hidden, vocab, bias=False)
        self.proj.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return self.proj(h)                    # (B, T, vocab)


class ForkJoinModel(nn.Module):
    """One value forked into two branches of different depth, joined again; returns a tuple."""

    def __init__(self, inp: int = 10, hidden: int = 8, out: int = 3):
        super().__init__()
        self.inp = nn.Linear(inp, hidden)
        self.left1 = nn.Linear(hidden, hidden)
        self.left2 = nn.Linear(hidden, hidden)
        self.right = nn.Linear(hidden, hidden)
        self.join = nn.Linear(2 * hidden, hidden)
        self.out = nn.Linear(hidden, out)
        self.aux = nn.Linear(hidden, 2)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        left = torch.relu(self.left2(torch.relu(self.left1(h))))
        right = torch.sigmoid(self.right(h))
        joined = torch.relu(self.join(torch.cat([left, right * h], dim=1)))
        return self.out(joined), self.aux(left)


class SharedInputModel(nn.Module):
    """The same input tensor read by two branches (one early, one late); returns a dict."""

    def __init__(self, inp: int = 10, hidden: int = 8, out: int = 3, layers: int = 3):
        super().__init__()
        self.a_in = nn.Linear(inp, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))
        self.b_in = nn.Linear(inp, hidden)
        self.out = nn.Linear(hidden, out)

    def forward(self, x):
        h = torch.relu(self.a_in(x))
        for layer in self.layers:
            h = torch.relu(layer(h))
        mixed = h * torch.sigmoid(self.b_in(x))
        return {"logits": self.out(mixed), "hidden": mixed}


class BertLayerNorm(nn.Module):
    """The hand-written LayerNorm of the original BERT code."""

    def __init__(self, hidden: int, eps: float = 1e-12):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.variance_epsilon = eps

    def forward(self, x):
        u = x.mean(-1, keepdim=True)
        s = (x - u).pow(2).mean(-1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.variance_epsilon)
        return self.weight * x + self.bias


class LayerNormModel(nn.Module):
    def __init__(self, inp: int = 10, hidden: int = 16, out: int = 3, layers: int = 2):
        super().__init__()
        self.inp = nn.Linear(inp, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))
        self.norms = nn.ModuleList(BertLayerNorm(hidden) for _ in range(layers))
        self.out = nn.Linear(hidden, out)

    def forward(self, x):
        h = self.inp(x)
        for layer, norm in zip(self.layers, self.norms):
            h = norm(h + torch.relu(layer(h)))
        return self.out(h)


class BufferModel(nn.Module):
    """Linear + BatchNorm1d layers (upstream's BufferModel1-3), one (affine, track_running_stats) per layer."""

    def __init__(self, variants: tuple[tuple[bool, bool], ...], inp: int = 10, hidden: int = 8, out: int = 3):
        super().__init__()
        self.inp = nn.Linear(inp, hidden)
        # no bias before a normalisation: its true gradient is 0, leaving only rounding noise to compare
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden, bias=False) for _ in variants)
        self.norms = nn.ModuleList(nn.BatchNorm1d(hidden, affine=affine, track_running_stats=track)
                                   for affine, track in variants)
        self.out = nn.Linear(hidden, out)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        for layer, norm in zip(self.layers, self.norms):
            h = torch.relu(norm(layer(h)))
        return self.out(h)


class EmbeddingModel(nn.Module):
    """An embedding read with integer inputs (B, T), pooled over T."""

    def __init__(self, vocab: int = 13, hidden: int = 8, out: int = 3, layers: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))
        self.out = nn.Linear(hidden, out)

    def forward(self, ids):
        h = self.embed(ids).mean(dim=1)
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return self.out(h)


class ParamFreeModel(nn.Module):
    """Upstream's OneOpModel, a few operations long: no parameters and no buffers at all."""

    def forward(self, x):
        x = x * 2
        x = torch.tanh(x) + 1
        x = x * x - 0.5
        x = torch.sigmoid(x) * 3
        x = x.sum(dim=1, keepdim=True) + x
        return torch.sin(x)


class TensorMulModel(nn.Module):
    """Multiplies by plain tensor attributes (neither parameters nor buffers): constants of the graph."""

    def __init__(self, inp: int = 10, hidden: int = 8, out: int = 3, layers: int = 3):
        super().__init__()
        g = torch.Generator().manual_seed(77)
        self.scale = torch.randn(inp, generator=g)
        self.inp = nn.Linear(inp, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))
        self.late_scale = torch.rand(hidden, generator=g) + 0.5
        self.out = nn.Linear(hidden, out)

    def forward(self, x):
        h = torch.relu(self.inp(x * self.scale))
        for layer in self.layers:
            h = torch.relu(layer(h))
        return self.out(h * self.late_scale)


class LossOutModel(nn.Module):
    """Upstream's LossOutModel: two inputs, returns the MSE itself."""

    def __init__(self, inp: int = 10, hidden: int = 8, layers: int = 4):
        super().__init__()
        self.inp = nn.Linear(inp, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))
        self.out = nn.Linear(hidden, 3)

    def forward(self, x, target):
        h = torch.relu(self.inp(x))
        for layer in self.layers:
            h = torch.relu(layer(h))
        return F.mse_loss(self.out(h), target)


class WithLoss(nn.Module):
    """Folds a criterion into forward: `forward(x, target)` returns `criterion(model(x), target)`."""

    def __init__(self, model: nn.Module, criterion: Callable):
        super().__init__()
        self.model = model
        self.criterion = criterion

    def forward(self, x, target):
        return self.criterion(self.model(x), target)


# ---- criteria (per-sample means, so that a loss of the global batch is the row-weighted mean) ------------

def ce(out, target):
    return F.cross_entropy(out, target)


def mse(out, target):
    return F.mse_loss(out, target)


def seq_ce(out, target):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))


def fork_loss(out, target):
    main, aux = out
    return F.cross_entropy(main, target) + 0.5 * aux.pow(2).mean()


def dict_loss(out, target):
    return F.cross_entropy(out["logits"], target) + 0.1 * out["hidden"].pow(2).mean()


# ---- specs -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    factory: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator, int], torch.Tensor]    # (generator, rows) -> the model's input
    targets: Callable[[torch.Generator, int], torch.Tensor]   # (generator, rows) -> the criterion's target
    criterion: Callable
    ways: tuple[str, ...] = ("out", "loss")   # and "nograd"
    batchnorm: bool = False
    has_params: bool = True


def _x(g, n):
    return torch.randn(n, 10, generator=g)


def _cls3(g, n):
    return torch.randint(0, 3, (n,), generator=g)


def _reg3(g, n):
    return torch.randn(n, 3, generator=g)


SPECS: dict[str, Spec] = {
    "lenet": Spec(LeNet, lambda g, n: torch.randn(n, 1, 16, 16, generator=g),
                  lambda g, n: torch.randint(0, 7, (n,), generator=g), ce),
    "mlp": Spec(MLP, _x, _reg3, mse),
    "nest": Spec(NestModel, _x, _cls3, ce),
    "shared_param": Spec(SharedParamModel, _x, _cls3, ce),
    "shared_emb": Spec(SharedEmbModel, lambda g, n: torch.randint(0, 11, (n, 5), generator=g),
                       lambda g, n: torch.randint(0, 11, (n, 5), generator=g), seq_ce),
    "fork_join": Spec(ForkJoinModel, _x, _cls3, fork_loss),
    "shared_input": Spec(SharedInputModel, _x, _cls3, dict_loss),
    "layernorm": Spec(LayerNormModel, _x, _reg3, mse),
    # running statistics, with and without affine parameters
    "bn": Spec(lambda: BufferModel(((True, True), (False, True), (True, True))), _x, _cls3, ce,
               ways=("out", "loss", "nograd"), batchnorm=True),
    # batch statistics only (no buffers), with and without affine parameters
    "bn_notrack": Spec(lambda: BufferModel(((True, False), (False, False), (True, False))), _x, _cls3, ce,
                       batchnorm=True),
    "embedding": Spec(EmbeddingModel, lambda g, n: torch.randint(0, 13, (n, 5), generator=g), _cls3, ce),
    "param_free": Spec(ParamFreeModel, _x, lambda g, n: torch.randn(n, 10, generator=g), mse, has_params=False),
    "tensor_mul": Spec(TensorMulModel, _x, _reg3, mse),
    "loss_out": Spec(LossOutModel, _x, _reg3, mse, ways=("loss",)),
}


def make(name: str, way: str, seed: int = 0) -> nn.Module:
    """Model `name` built under `torch.manual_seed(seed)`, wrapped with its criterion for way "loss"."""
    spec = SPECS[name]
    torch.manual_seed(seed)
    model = spec.factory()
    if way == "loss" and name != "loss_out":
        model = WithLoss(model, spec.criterion)
    return model


def global_batch(name: str, seed: int, batch: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic global batch (input, target) for model `name`."""
    spec = SPECS[name]
    g = torch.Generator().manual_seed(1000 + seed)
    return spec.inputs(g, batch), spec.targets(g, batch)


def rows(rank: int, world: int, batch: int = BATCH) -> slice:
    size = batch // world
    return slice(rank * size, (rank + 1) * size)
