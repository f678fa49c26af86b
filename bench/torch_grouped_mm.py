#!/usr/bin/env python3
"""PyTorch's GEMMs on the shapes of bench/cuda_layer.cu's section 1 ("experts alone"), beside
which the layer's own grouped GEMM kernels are read: n experts of m rows each (balanced routing)
or half of all rows to expert 0 (skewed), d = 1024, h = 4096, the forward [r x d][d x h], dgrad
[r x h][d x h]^T and wgrad [r x d]^T [r x h] shapes (r = n*m), each timed as

  - dense:   ONE GEMM of the same FLOPs (torch.matmul over all r rows, expert 0's weights),
  - loop:    one torch.matmul per expert (n launches), the "loop of n small GEMMs",
  - grouped: torch._grouped_mm over all experts in one call, where this PyTorch has it and
             takes the dtype and shape (reported as unavailable, with PyTorch's reason, if not),

in fp32 (true fp32: TF32 off, as the benchmark's cuBLAS baseline) and bf16 (bf16 operands and
outputs, fp32 accumulation), with CUDA events: a warm-up call, then each timed run repeats the
GEMM to about 3 ms between two events (1 to 64 times), and the median of the runs is reported.
Prints a table and writes JSON in the layout of cuda_layer's "experts_gemm" rows, atomically
(a temporary file, then a rename).

  python3 bench/torch_grouped_mm.py [--quick] [--json PATH] [--warmup N] [--reps N]

Exits 77 (nothing measured) when PyTorch or a CUDA device is missing; standard library and torch
only."""
import argparse
import json
import math
import os
import statistics
import sys

# bench/cuda_layer.cu, plan_for(): GemmShape {d, h, (n, m) configs, warm-up, repetitions, target_s}.
FULL = {"d": 1024, "h": 4096, "configs": [(8, 1024), (64, 1024), (8, 4096)], "warmup": 1, "reps": 7,
        "target_s": 3e-3}
QUICK = {"d": 128, "h": 256, "configs": [(4, 128)], "warmup": 1, "reps": 1, "target_s": 0.0}
OPS = ("forward", "dgrad", "wgrad")
ROUTINGS = ("balanced", "skewed")


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the benchmark's --quick sizes: a smoke run")
    p.add_argument("--json", default="bench_torch.json", help="where to write the results (default %(default)s)")
    p.add_argument("--warmup", type=int, help="untimed runs before the timed ones")
    p.add_argument("--reps", type=int, help="timed runs; the median is reported")
    return p.parse_args(argv)


def write_atomically(path, text):
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def offsets_for(n, m, skewed):
    """Expert e's rows [offsets[e], offsets[e + 1]), as cuda_layer's gemm_offsets()."""
    rows = n * m
    offsets = [0]
    for e in range(n):
        count = m
        if skewed:
            first = rows if n == 1 else rows // 2
            rest = rows - first
            count = first if e == 0 else rest // (n - 1) + (1 if e - 1 < rest % (n - 1) else 0)
        offsets.append(offsets[-1] + count)
    return offsets


def main(argv):
    args = parse(argv)
    try:
        import torch
    except ImportError as e:
        print(f"torch_grouped_mm: PyTorch is not installed here ({e}); nothing measured. "
              "Run this on a machine with PyTorch and a CUDA GPU.")
        return 77
    if not torch.cuda.is_available():
        print(f"torch_grouped_mm: PyTorch {torch.__version__} finds no CUDA device "
              f"(torch.cuda.is_available() is False; built for CUDA {torch.version.cuda}); nothing measured.")
        return 77

    shape = dict(QUICK if args.quick else FULL)
    if args.warmup is not None:
        shape["warmup"] = args.warmup
    if args.reps is not None:
        shape["reps"] = args.reps
    if shape["reps"] < 1 or shape["warmup"] < 0:
        print("torch_grouped_mm: --reps must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    d, h = shape["d"], shape["h"]
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    props = torch.cuda.get_device_properties(dev)
    cc = props.major * 10 + props.minor
    have_grouped = hasattr(torch, "_grouped_mm")

    def elapsed(fn, times):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(times):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e-3

    def median_seconds(fn):
        fn()  # lazy setup: cuBLAS heuristics, kernel selection
        torch.cuda.synchronize()
        inner = 1
        if shape["target_s"] > 0:
            inner = int(min(64, max(1, math.ceil(shape["target_s"] / max(elapsed(fn, 1), 1e-7)))))
        for _ in range(shape["warmup"]):
            elapsed(fn, inner)
        return statistics.median(elapsed(fn, inner) / inner for _ in range(shape["reps"]))

    def rel_diff(a, b):
        a, b = a.float(), b.float()
        return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-30)

    rows = []
    for n, m in shape["configs"]:
        r = n * m
        need = 4.0 * (r * d + r * h + 2 * n * d * h + r * h + r * d)
        free = torch.cuda.mem_get_info()[0]
        if need > 0.7 * free:
            print(f"torch_grouped_mm: n={n} m={m} skipped: {need * 1e-9:.1f} GB would not fit", file=sys.stderr)
            continue
        gen = torch.Generator(device=dev).manual_seed(11)
        x32 = torch.rand(r, d, device=dev, generator=gen) * 2 - 1
        dy32 = (torch.rand(r, h, device=dev, generator=gen) * 2 - 1) * 1e-2
        w32 = (torch.rand(n, d, h, device=dev, generator=gen) * 2 - 1) / math.sqrt(d)
        for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            x, dy, w = x32.to(dtype), dy32.to(dtype), w32.to(dtype)
            w0 = w[0]
            # Outputs written in place by the dense GEMMs and the loops (torch._grouped_mm allocates its own).
            yf = torch.empty(r, h, device=dev, dtype=dtype)
            yd = torch.empty(r, d, device=dev, dtype=dtype)
            gw = torch.empty(n, d, h, device=dev, dtype=dtype)
            flop = 2.0 * r * d * h
            dense = {"forward": lambda: torch.matmul(x, w0, out=yf), "dgrad": lambda: torch.matmul(dy, w0.t(), out=yd),
                     "wgrad": lambda: torch.matmul(x.t(), dy, out=gw[0])}
            dense_s = {op: median_seconds(fn) for op, fn in dense.items()}
            for routing in ROUTINGS:
                offsets = offsets_for(n, m, routing == "skewed")
                spans = [(e, offsets[e], offsets[e + 1]) for e in range(n) if offsets[e + 1] > offsets[e]]
                max_rows = max(b - a for _, a, b in spans)

                def loop_forward():
                    for e, a, b in spans:
                        torch.matmul(x[a:b], w[e], out=yf[a:b])
                    return yf

                def loop_dgrad():
                    for e, a, b in spans:
                        torch.matmul(dy[a:b], w[e].t(), out=yd[a:b])
                    return yd

                def loop_wgrad():
                    for e, a, b in spans:
                        torch.matmul(x[a:b].t(), dy[a:b], out=gw[e])
                    return gw

                loop = {"forward": loop_forward, "dgrad": loop_dgrad, "wgrad": loop_wgrad}
                grouped = {}
                if have_grouped:
                    offs = torch.tensor(offsets[1:], device=dev, dtype=torch.int32)
                    grouped = {"forward": lambda: torch._grouped_mm(x, w, offs=offs),
                               "dgrad": lambda: torch._grouped_mm(dy, w.transpose(-2, -1), offs=offs),
                               "wgrad": lambda: torch._grouped_mm(x.t(), dy, offs=offs)}
                for op in OPS:
                    row = {"precision": precision, "n_experts": n, "rows_per_expert": m, "routing": routing,
                           "op": op, "max_rows_per_expert": max_rows, "flop": flop,
                           "dense_s": dense_s[op], "dense_tflops": flop / dense_s[op] * 1e-12}
                    loop_s = median_seconds(loop[op])
                    row.update({"loop_s": loop_s, "loop_tflops": flop / loop_s * 1e-12,
                                "loop_fraction_of_dense": dense_s[op] / loop_s,
                                "grouped_mm": "unavailable: this PyTorch has no torch._grouped_mm",
                                "grouped_s": None, "grouped_tflops": None, "fraction_of_dense": None,
                                "grouped_vs_loop_rel_diff": None})
                    if op in grouped:
                        try:
                            reference = loop[op]().clone()
                            if op == "wgrad" and len(spans) < n:  # experts without rows: zeros in grouped
                                reference = None
                            result = grouped[op]()
                            torch.cuda.synchronize()
                            grouped_s = median_seconds(grouped[op])
                            row.update({"grouped_mm": "ok", "grouped_s": grouped_s,
                                        "grouped_tflops": flop / grouped_s * 1e-12,
                                        "fraction_of_dense": dense_s[op] / grouped_s,
                                        "grouped_vs_loop_rel_diff":
                                            None if reference is None else rel_diff(result, reference)})
                        except (RuntimeError, TypeError, NotImplementedError) as e:
                            text = str(e).strip()
                            row["grouped_mm"] = "unavailable: " + (text.splitlines()[0][:160] if text
                                                                   else type(e).__name__)
                    rows.append(row)
            print(f"torch_grouped_mm: {precision} n={n} m={m} done", file=sys.stderr)
            del x, dy, w, w0, yf, yd, gw
        del x32, dy32, w32
        torch.cuda.empty_cache()

    print(f"torch_grouped_mm: {props.name} (sm_{cc}, {props.multi_processor_count} SMs), torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}; d={d} h={h}; median of {shape['reps']} after {shape['warmup']} warm-up; "
          f"fp32 with TF32 off")
    print(f"{'prec':4} {'n':>4} {'m':>5} {'routing':8} {'op':7} | {'dense ms':>9} {'TFLOP/s':>7} | {'loop ms':>9} "
          f"{'TFLOP/s':>7} {'of dns':>6} | {'grouped ms':>10} {'TFLOP/s':>7} {'of dns':>6} {'vs loop':>7}")
    for row in rows:
        line = (f"{row['precision']:4} {row['n_experts']:>4} {row['rows_per_expert']:>5} {row['routing']:8} "
                f"{row['op']:7} | {row['dense_s'] * 1e3:>9.3f} {row['dense_tflops']:>7.1f} | "
                f"{row['loop_s'] * 1e3:>9.3f} {row['loop_tflops']:>7.1f} {row['loop_fraction_of_dense']:>6.2f} | ")
        if row["grouped_s"] is not None:
            check = row["grouped_vs_loop_rel_diff"]
            line += (f"{row['grouped_s'] * 1e3:>10.3f} {row['grouped_tflops']:>7.1f} {row['fraction_of_dense']:>6.2f} "
                     f"{'-' if check is None else format(check, '.1e'):>7}")
        else:
            line += f"{'-':>10} {'-':>7} {'-':>6} {'-':>7}  {row['grouped_mm']}"
        print(line)
    print("dense: one torch.matmul of the same FLOPs (2*r*d*h) over all r = n*m rows; loop: one torch.matmul per\n"
          "expert; grouped: torch._grouped_mm. of dns: the dense GEMM's time over this one's (1 = as fast as one\n"
          "dense GEMM). vs loop: max |grouped - loop| / max |loop|.")

    doc = {"benchmark": "torch_grouped_mm", "device": props.name, "compute_capability": cc,
           "sms": props.multi_processor_count, "torch": torch.__version__, "cuda": torch.version.cuda,
           "fp32_matmul": "ieee (TF32 off)", "grouped_mm_in_torch": have_grouped, "quick": 1 if args.quick else 0,
           "experts_gemm": {"d_model": d, "hidden": h, "repetitions": shape["reps"], "warmup": shape["warmup"],
                            "rows": rows}}
    write_atomically(args.json, json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
