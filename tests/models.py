"""Small models for the equivalence tests: each returns a scalar loss from its inputs."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    """RaNNC's tutorial model: a stack of Linear + ReLU, with the loss folded in."""

    def __init__(self, hidden: int = 16, layers: int = 6):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))
        self.head = nn.Linear(hidden, 1)

    def forward(self, x, y):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return F.mse_loss(self.head(x).squeeze(-1), y)


class TinyBert(nn.Module):
    """Embedding, a few attention blocks, an MLM decoder tied to the embedding, loss inside. Two blocks by default:
    capturing the model is most of a multi-rank test's time (a third block costs ~70% more), and plans cut between
    operations, so 3 stages and interleaved pieces still find places to cut."""

    def __init__(self, vocab: int = 32, hidden: int = 16, layers: int = 2, heads: int = 2, seq: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.pos = nn.Parameter(torch.randn(seq, hidden) * 0.02)
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(hidden, heads, 2 * hidden, dropout=0.0,
                                                               batch_first=True, bias=False)
                                     for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.decoder = nn.Linear(hidden, vocab)
        self.decoder.weight = self.embed.weight
        self.vocab = vocab

    def forward(self, ids, mask, labels):
        h = self.embed(ids) + self.pos
        pad = mask == 0
        for block in self.blocks:
            h = block(h, src_key_padding_mask=pad)
        logits = self.decoder(self.norm(h))
        return F.cross_entropy(logits.view(-1, self.vocab), labels.view(-1))


class SkipNet(nn.Module):
    """A skip connection from the first layer to the last one, crossing every stage in between."""

    def __init__(self, hidden: int = 12, layers: int = 6):
        super().__init__()
        self.inp = nn.Linear(hidden, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))
        self.out = nn.Linear(hidden, 3)

    def forward(self, x, target):
        first = torch.tanh(self.inp(x))
        h = first
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return F.cross_entropy(self.out(h + first), target)


class MultiInput(nn.Module):
    """Two inputs read by different parts of the model, the second one only near the end."""

    def __init__(self, a: int = 10, b: int = 6, hidden: int = 12, layers: int = 4):
        super().__init__()
        self.a_in = nn.Linear(a, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))
        self.b_in = nn.Linear(b, hidden)
        self.head = nn.Linear(hidden, 1)

    def forward(self, xa, xb, y):
        h = torch.relu(self.a_in(xa))
        for layer in self.layers:
            h = torch.relu(layer(h))
        h = h * torch.sigmoid(self.b_in(xb))
        return F.mse_loss(self.head(h).squeeze(-1), y)


class ScaledMLP(nn.Module):
    """Keyword and non-tensor arguments: `scale` is a Python float, `y` may come by keyword."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.fc = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x, y=None, scale: float = 1.0):
        out = self.head(torch.relu(self.fc(x)) * scale).squeeze(-1)
        return F.mse_loss(out, y) if y is not None else out


class GatedMLP(nn.Module):
    """A gated MLP (gate and up projections of one input, as in LLaMA): siblings that rannc fuses into one
    product (rannc.graph.fuse)."""

    def __init__(self, hidden: int = 16, inner: int = 16, layers: int = 2):
        super().__init__()
        self.gates = nn.ModuleList(nn.Linear(hidden, inner, bias=False) for _ in range(layers))
        self.ups = nn.ModuleList(nn.Linear(hidden, inner, bias=False) for _ in range(layers))
        self.downs = nn.ModuleList(nn.Linear(inner, hidden) for _ in range(layers))
        self.head = nn.Linear(hidden, 1)

    def forward(self, x, y):
        for gate, up, down in zip(self.gates, self.ups, self.downs):
            x = x + down(F.silu(gate(x)) * up(x))
        return F.mse_loss(self.head(x).squeeze(-1), y)


def make(name: str) -> nn.Module:
    return {"mlp": MLP, "bert": TinyBert, "skip": SkipNet, "multi": MultiInput, "scaled": ScaledMLP,
            "gated": GatedMLP}[name]()


def global_batch(name: str, batch: int, seed: int) -> list[torch.Tensor]:
    """A deterministic global batch for model `name`."""
    g = torch.Generator().manual_seed(seed)
    if name in ("mlp", "scaled", "gated"):
        return [torch.randn(batch, 16, generator=g), torch.randn(batch, generator=g)]
    if name == "bert":
        ids = torch.randint(0, 32, (batch, 8), generator=g)
        mask = torch.ones(batch, 8, dtype=torch.long)
        mask[:, -2:] = (torch.rand(batch, 2, generator=g) > 0.5).long()
        return [ids, mask, torch.randint(0, 32, (batch, 8), generator=g)]
    if name == "skip":
        return [torch.randn(batch, 12, generator=g), torch.randint(0, 3, (batch,), generator=g)]
    if name == "multi":
        return [torch.randn(batch, 10, generator=g), torch.randn(batch, 6, generator=g),
                torch.randn(batch, generator=g)]
    raise KeyError(name)


def local_part(batch: list[torch.Tensor], rank: int, world: int) -> list[torch.Tensor]:
    size = batch[0].shape[0] // world
    return [t[rank * size:(rank + 1) * size] for t in batch]
