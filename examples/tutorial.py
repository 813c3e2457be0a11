"""RaNNC's tutorial: an MLP trained with one added line (the RaNNCModule wrap).

    torchrun --nproc_per_node=2 examples/tutorial.py --batch 64 --hidden 512 --layers 10
"""

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

import rannc


class Net(nn.Module):
    def __init__(self, hidden: int, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))

    def forward(self, x, target):
        for layer in self.layers:
            x = F.relu(layer(x))
        return F.mse_loss(x, target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=64, help="global batch size")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = Net(args.hidden, args.layers)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model = rannc.RaNNCModule(model, optimizer)           # the one added line

    local = args.batch // rannc.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    x = torch.randn(local, args.hidden, device=device)
    target = torch.randn(local, args.hidden, device=device)
    for step in range(args.steps):
        loss = model(x, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if rannc.get_rank() == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d} loss {loss.item():.6f}", flush=True)


if __name__ == "__main__":
    main()
