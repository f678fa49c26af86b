#!/usr/bin/env python3
"""The MoE blocks of Hugging Face transformers against moe-run --hf, one family at a time.

For a family (mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3, glm4_moe, gpt_oss):
builds a small model of that family with transformers (random weights, the MoE block's made
large enough to route decisively), writes it twice, as save_pretrained writes it (the released
checkpoints' per-expert tensors) and as the modules hold it (transformers 5's fused
experts.gate_up_proj / experts.down_proj, written from the state dict), runs the block in
PyTorch (forward, then backward of sum(y * dy)) and the same block with moe-run from each
directory, and prints the largest relative difference of the output, the input gradient, the
router's and the experts' gradients, and whether the routing is the same.

transformers computes the routing of these families in float32 whatever the model's dtype
(softmax(..., dtype=torch.float), .float(), a float32 router for DeepSeek). In float64 the script
reports both: the block as transformers runs it, and with those casts kept in float64 (the rows
whose routing column says float64), which is what a float64 comparison of the arithmetic means.

  pip install torch transformers safetensors numpy
  meson setup build && ninja -C build tools/moe-run
  python3 examples/pytorch/hf_blocks.py --moe-run build/tools/moe-run --family qwen2_moe
  python3 examples/pytorch/hf_blocks.py --moe-run build/tools/moe-run --all --json errors.json

Exits non-zero when a difference exceeds the tolerance (1e-5 in float32; in float64 1e-12 with
the routing kept in float64, 1e-5 as transformers runs it) or the routing differs."""
import argparse
import contextlib
import json
import pathlib
import subprocess
import sys
import tempfile

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

D = 32  # hidden_size of every test model
COMMON = dict(hidden_size=D, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, vocab_size=64,
              head_dim=8)
FAMILIES = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=48, num_local_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=8,
                                         num_experts_per_tok=3, norm_topk_prob=False, intermediate_size=64)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                                         norm_topk_prob=True, intermediate_size=64)),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=24, num_experts=8, num_experts_per_tok=3, norm_topk_prob=False)),
    "deepseek_v2": ("DeepseekV2Config", dict(moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=3,
                                             n_shared_experts=2, first_k_dense_replace=0, n_group=4, topk_group=2,
                                             topk_method="group_limited_greedy", routed_scaling_factor=2.5,
                                             intermediate_size=64, kv_lora_rank=16, q_lora_rank=16,
                                             qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)),
    "deepseek_v3": ("DeepseekV3Config", dict(moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=3,
                                             n_shared_experts=1, first_k_dense_replace=0, n_group=4, topk_group=2,
                                             routed_scaling_factor=2.5, norm_topk_prob=True, intermediate_size=64,
                                             kv_lora_rank=16, q_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                                             v_head_dim=8)),
    "glm4_moe": ("Glm4MoeConfig", dict(moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2,
                                       n_shared_experts=1, first_k_dense_replace=0, n_group=2, topk_group=1,
                                       routed_scaling_factor=1.5, norm_topk_prob=False, intermediate_size=64)),
    "gpt_oss": ("GptOssConfig", dict(intermediate_size=24, num_local_experts=8, num_experts_per_tok=2,
                                     layer_types=["full_attention"])),
}


@contextlib.contextmanager
def keep_float64():
    """The routers' float32 casts left out for float64 tensors (everything else unchanged)."""
    f = torch.nn.functional
    saved = (torch.Tensor.float, torch.Tensor.type, f.softmax, torch.Tensor.softmax)

    def as_float(self, *a, **k):
        return self if self.dtype == torch.float64 else saved[0](self, *a, **k)

    def as_type(self, dtype=None, *a, **k):
        if self.dtype == torch.float64 and dtype in (torch.float32, "torch.FloatTensor"):
            return self
        return saved[1](self, dtype, *a, **k)

    def softmax(input, dim=None, _stacklevel=3, dtype=None):
        return saved[2](input, dim=dim, dtype=None if input.dtype == torch.float64 else dtype)

    def tensor_softmax(self, dim, dtype=None):
        return saved[3](self, dim, dtype=None if self.dtype == torch.float64 else dtype)

    torch.Tensor.float, torch.Tensor.type, f.softmax, torch.Tensor.softmax = as_float, as_type, softmax, tensor_softmax
    try:
        yield
    finally:
        torch.Tensor.float, torch.Tensor.type, f.softmax, torch.Tensor.softmax = saved


def build(family, dtype):
    cls, extra = FAMILIES[family]
    # The experts' eager loop (the grouped_mm kernels take no float64).
    config = getattr(transformers, cls)(**COMMON, **extra, experts_implementation="eager")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    block = model.model.layers[0].mlp
    with torch.no_grad():
        for name, p in block.named_parameters():
            fan_in = p.shape[-1] if p.dim() > 1 else D
            if family == "gpt_oss" and name.startswith("experts.") and p.dim() == 3:
                fan_in = p.shape[1]  # x W layout
            p.copy_(torch.randn_like(p) * (2.0 / fan_in ** 0.5))
        for name, b in block.named_buffers():
            if "correction_bias" in name:
                b.copy_(torch.randn_like(b) * 0.1)
    return model, block


def run_block(family, block, x, dy, exact):
    x = x.clone().requires_grad_(True)
    block.zero_grad()
    with keep_float64() if exact else contextlib.nullcontext():
        out = block(x[None])
        y = (out[0] if isinstance(out, tuple) else out)[0]
        router = block.router if family == "gpt_oss" else block.gate
        _, _, chosen = router(x.detach())
    (y * dy).sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in block.named_parameters()}
    return y.detach(), x.grad.detach(), grads, chosen.detach()


def write_tensors(path, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def library_grads(out, family, prefix, hf_names, n):
    """The library's gradients in the block's own layout (fused as the modules hold them)."""
    g = {}

    def t(name):
        return out.get_tensor("grad." + name)

    g["gate.weight" if family != "gpt_oss" else "router.weight"] = t("gate.w_gate").T
    if family == "gpt_oss":
        g["router.bias"] = t("gate.b_gate")
        w1 = torch.stack([t(f"experts.{e}.w1") for e in range(n)])  # [n, d, h]
        w3 = torch.stack([t(f"experts.{e}.w3") for e in range(n)])
        gu = torch.empty(n, w1.shape[1], 2 * w1.shape[2], dtype=w1.dtype)
        gu[..., ::2], gu[..., 1::2] = w1, w3
        g["experts.gate_up_proj"] = gu
        b1 = torch.stack([t(f"experts.{e}.b1") for e in range(n)])
        b3 = torch.stack([t(f"experts.{e}.b3") for e in range(n)])
        gub = torch.empty(n, 2 * b1.shape[1], dtype=b1.dtype)
        gub[:, ::2], gub[:, 1::2] = b1, b3
        g["experts.gate_up_proj_bias"] = gub
        g["experts.down_proj"] = torch.stack([t(f"experts.{e}.w2") for e in range(n)])
        g["experts.down_proj_bias"] = torch.stack([t(f"experts.{e}.b2") for e in range(n)])
        return g
    g["experts.gate_up_proj"] = torch.stack(
        [torch.cat([t(f"experts.{e}.w1").T, t(f"experts.{e}.w3").T]) for e in range(n)])
    g["experts.down_proj"] = torch.stack([t(f"experts.{e}.w2").T for e in range(n)])
    for hf, lib in (("shared_experts.", "shared_experts.0."), ("shared_expert.", "shared_experts.0.")):
        if any(name.startswith(hf) for name in hf_names):
            g[hf + "gate_proj.weight"] = t(lib + "w1").T
            g[hf + "up_proj.weight"] = t(lib + "w3").T
            g[hf + "down_proj.weight"] = t(lib + "w2").T
    if "shared_expert_gate.weight" in hf_names:
        g["shared_expert_gate.weight"] = t("shared_gate.w_gate").T
    return g


def rel(a, b):
    a, b = a.double(), b.double()
    den = b.norm()
    return ((a - b).norm() / den).item() if den > 0 else (a - b).norm().item()


def compare(family, moe_run, dtype, tokens, backend="cpu"):
    model, block = build(family, dtype)
    n = FAMILIES[family][1].get("num_local_experts") or FAMILIES[family][1].get("num_experts") or \
        FAMILIES[family][1]["n_routed_experts"]
    torch.manual_seed(1)
    x = torch.randn(tokens, D, dtype=dtype)
    dy = torch.randn(tokens, D, dtype=dtype)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        per_expert, fused = tmp / "per_expert", tmp / "fused"
        model.save_pretrained(per_expert)
        fused.mkdir()
        (fused / "config.json").write_text((per_expert / "config.json").read_text())
        write_tensors(fused / "model.safetensors", {k: v.detach() for k, v in model.state_dict().items()})
        write_tensors(tmp / "input.safetensors", {"x": x, "dy": dy})
        for layout, directory in (("per-expert", per_expert), ("fused", fused)):
            out_path = tmp / f"out_{layout}.safetensors"
            cmd = [moe_run, "--hf", str(directory), "--layer", "0", "--input", str(tmp / "input.safetensors"),
                   "--output", str(out_path), "--mode", "inference", "--backend", backend,
                   "--dtype", "double" if dtype == torch.float64 else "float"]
            subprocess.run(cmd, check=True)
            with safe_open(str(out_path), "pt") as out:
                hf_names = [name for name, _ in block.named_parameters()]
                lib = library_grads(out, family, "", hf_names, n)
                for exact in ([False, True] if dtype == torch.float64 else [False]):
                    y, dx, grads, chosen = run_block(family, block, x, dy, exact)
                    same_routing = torch.equal(torch.sort(chosen, dim=1).values,
                                               torch.sort(out.get_tensor("experts"), dim=1).values)
                    row = {"family": family, "layout": layout, "dtype": str(dtype).replace("torch.", ""),
                           "routing_in_float64": exact, "same_routing": bool(same_routing),
                           "y": rel(out.get_tensor("y"), y), "dx": rel(out.get_tensor("dx"), dx)}
                    router = "router.weight" if family == "gpt_oss" else "gate.weight"
                    row["router_grad"] = rel(lib[router], grads[router])
                    row["expert_grads"] = max(rel(lib[k], grads[k]) for k in grads if k != router)
                    missing = [k for k in grads if k not in lib]
                    if missing:
                        raise SystemExit(f"{family}: no library gradient for {missing}")
                    results.append(row)
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--moe-run", default="build/tools/moe-run")
    ap.add_argument("--family", choices=sorted(FAMILIES))
    ap.add_argument("--all", action="store_true")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--backend", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    families = sorted(FAMILIES) if args.all else [args.family or ap.error("--family or --all")]
    rows = []
    for family in families:
        for dtype in (torch.float32, torch.float64):
            rows += compare(family, args.moe_run, dtype, args.tokens, args.backend)
    print(f"{'family':12} {'layout':10} {'dtype':8} {'routing':8} {'same':5} {'y':>9} {'dx':>9} {'router':>9} {'experts':>9}")
    failed = False
    for r in rows:
        routing = "float64" if r["routing_in_float64"] else "as is"
        print(f"{r['family']:12} {r['layout']:10} {r['dtype']:8} {routing:8} {str(r['same_routing']):5} "
              f"{r['y']:9.2e} {r['dx']:9.2e} {r['router_grad']:9.2e} {r['expert_grads']:9.2e}")
        tol = 1e-12 if (r["dtype"] == "float64" and r["routing_in_float64"]) else 1e-5
        worst = max(r["y"], r["dx"], r["router_grad"], r["expert_grads"])
        failed |= not r["same_routing"] or worst > tol
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
