"""What the arithmetic of BERT's elementwise kernels costs under inductor, against kernels of the same bytes
without it: dropout's random draws in dropout + residual + LayerNorm, and erf/exp in GELU forward and backward.
Each expression is compiled alone at BERT-large's shapes (hidden 1024, intermediate 4096) and timed with
triton's do_bench; the bytes counted are the 2-D inputs and the outputs. The differences bound what any
kernel keeping the same bytes could gain by cheaper arithmetic (BERT-large runs about 48 such LayerNorms
and 24 GELUs per forward).

    python benchmarks/elementwise_bounds.py --batch 256
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F


def cases(rows: int, hidden: int, inter: int, device: str) -> list[tuple[str, object, tuple]]:
    x = torch.randn(rows, hidden, device=device, dtype=torch.bfloat16)   # a linear's output under autocast
    res = torch.randn(rows, hidden, device=device)                       # the residual stream (fp32)
    w, b = torch.ones(hidden, device=device), torch.zeros(hidden, device=device)
    mask = torch.rand(rows, hidden, device=device) > 0.1
    h = torch.randn(rows, inter, device=device, dtype=torch.bfloat16)
    gh = torch.randn(rows, inter, device=device, dtype=torch.bfloat16)
    bias = torch.randn(inter, device=device, dtype=torch.bfloat16)

    def ln_dropout(x, res):
        y = F.dropout(x.float(), 0.1, True) + res
        return F.layer_norm(y, (hidden,), w, b), y

    def ln_mask(x, res, mask):
        y = x.float() * mask * (1 / 0.9) + res
        return F.layer_norm(y, (hidden,), w, b), y

    def ln_plain(x, res):
        y = x.float() + res
        return F.layer_norm(y, (hidden,), w, b), y

    return [("dropout + residual + LayerNorm", ln_dropout, (x, res)),
            ("given mask + residual + LayerNorm", ln_mask, (x, res, mask)),
            ("residual + LayerNorm", ln_plain, (x, res)),
            ("dropout alone", lambda x: F.dropout(x.float(), 0.1, True), (x,)),
            ("residual add", lambda x, res: x.float() + res, (x, res)),
            ("bias + GELU", lambda h, bias: F.gelu(h + bias), (h, bias)),
            ("bias + ReLU", lambda h, bias: F.relu(h + bias), (h, bias)),
            ("GELU backward", lambda g, h: torch.ops.aten.gelu_backward(g, h), (gh, h)),
            ("product", lambda g, h: g * h, (gh, h))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=4096)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("elementwise_bounds.py times Triton kernels: it needs a CUDA device")
    from triton.testing import do_bench

    rows = args.batch * args.seq
    probe = torch.randn(rows, args.intermediate, device="cuda", dtype=torch.bfloat16)
    copy_ms = do_bench(lambda: torch.empty_like(probe).copy_(probe))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {rows} rows")
    copied = probe.numel() * probe.element_size()
    print(f"copy of {copied / 1e9:.2f} GB: {copy_ms:.3f} ms, {2 * copied / copy_ms / 1e9:.2f} TB/s")
    print("| expression | ms | GB | TB/s |\n| --- | ---: | ---: | ---: |")
    for name, fn, inputs in cases(rows, args.hidden, args.intermediate, "cuda"):
        compiled = torch.compile(fn)
        outs = compiled(*inputs)
        ms = do_bench(lambda c=compiled, i=inputs: c(*i))
        outs = outs if isinstance(outs, tuple) else (outs,)
        nbytes = sum(t.numel() * t.element_size() for t in (*inputs, *outs) if t.dim() == 2)
        print(f"| {name} | {ms:.3f} | {nbytes / 1e9:.3f} | {nbytes / ms / 1e9:.2f} |")


if __name__ == "__main__":
    main()
