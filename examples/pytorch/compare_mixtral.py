#!/usr/bin/env python3
"""A PyTorch Mixtral-style MoE block against moe-run: export the block's weights to safetensors
under Hugging Face's names, run the same block with moe-run, compare the output, the routing and
every gradient. Walked through in docs/interop.md.

  pip install torch safetensors numpy
  python3 examples/pytorch/compare_mixtral.py --moe-run build/tools/moe-run

Exits non-zero when a relative difference exceeds the tolerance (1e-10 in float64, 1e-5 in
float32)."""
import argparse
import pathlib
import subprocess
import tempfile

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file


class Expert(torch.nn.Module):
    """A re-implementation of Hugging Face's MixtralBlockSparseTop2MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, d, h):
        super().__init__()
        self.w1 = torch.nn.Linear(d, h, bias=False)
        self.w2 = torch.nn.Linear(h, d, bias=False)
        self.w3 = torch.nn.Linear(d, h, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SparseMoeBlock(torch.nn.Module):
    """A re-implementation of Hugging Face's MixtralSparseMoeBlock (same names, same math: softmax
    router, top k renormalized, SwiGLU experts), computed in the block's own dtype; the transformers
    class computes its router softmax in float32 whatever the input's dtype."""

    def __init__(self, d, h, n, k):
        super().__init__()
        self.k = k
        self.gate = torch.nn.Linear(d, n, bias=False)
        self.experts = torch.nn.ModuleList(Expert(d, h) for _ in range(n))

    def forward(self, x):
        probs = F.softmax(self.gate(x), dim=1)
        weights, chosen = torch.topk(probs, self.k, dim=1)
        weights = weights / weights.sum(dim=1, keepdim=True)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            if token.numel():
                y.index_add_(0, token, weights[token, slot, None] * expert(x[token]))
        return y, weights, chosen


def rel(a, b):
    num = (a - b).norm()
    den = b.norm()
    return (num / den).item() if den > 0 else num.item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--moe-run", default="build/tools/moe-run")
    ap.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    ap.add_argument("--backend", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    d, h, n, k = 32, 48, 8, 2
    block = SparseMoeBlock(d, h, n, k).to(dtype)
    x = torch.randn(args.tokens, d, dtype=dtype, requires_grad=True)
    dy = torch.randn(args.tokens, d, dtype=dtype)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        # 1. Export: the state dict's names are Hugging Face's ("gate.weight", "experts.0.w1.weight").
        save_file({name: t.contiguous() for name, t in block.state_dict().items()}, tmp / "block.safetensors")
        save_file({"x": x.detach(), "dy": dy}, tmp / "input.safetensors")
        # 2. Run the block with moe-run: the prefix is empty, as the block is the whole file.
        subprocess.run([args.moe_run, "--weights", tmp / "block.safetensors", "--mixtral", "", "--k", str(k),
                        "--input", tmp / "input.safetensors", "--output", tmp / "out.safetensors",
                        "--mode", "inference", "--backend", args.backend,
                        "--dtype", "double" if dtype == torch.float64 else "float"], check=True)
        out = load_file(tmp / "out.safetensors")

    # 3. The same in PyTorch, with autograd for the gradients of sum(y * dy).
    y, gates, chosen = block(x)
    (y * dy).sum().backward()
    rows = [("y", rel(out["y"], y.detach())),
            ("gates", rel(out["gates"], gates.detach())),
            ("dx", rel(out["dx"], x.grad)),
            # The library stores x W, PyTorch's Linear x W^T: its gradients are transposed.
            ("grad gate", rel(out["grad.gate.w_gate"], block.gate.weight.grad.T))]
    for e in range(n):
        for w in ("w1", "w2", "w3"):
            weight = getattr(block.experts[e], w).weight
            grad = weight.grad if weight.grad is not None else torch.zeros_like(weight)  # an idle expert
            rows.append((f"grad expert {e} {w}", rel(out[f"grad.experts.{e}.{w}"], grad.T)))
    same_routing = torch.equal(out["experts"], chosen.to(torch.int64))
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    print(f"{'quantity':<22} {'||moe - torch|| / ||torch||':>28}")
    for name, err in rows:
        print(f"{name:<22} {err:>28.3e}")
    print(f"routing identical: {same_routing}")
    worst = max(err for _, err in rows)
    if not same_routing or not worst <= tolerance:  # NaN fails too
        raise SystemExit(f"difference {worst:.3e} above {tolerance:g}, or other routing")
    print(f"agree within {tolerance:g}")


if __name__ == "__main__":
    main()
