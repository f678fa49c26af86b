#!/usr/bin/env python3
"""Plots bench/moe_layer's JSON into one PNG with gnuplot (Debian's gnuplot-nox).

usage: plot_moe_layer.py RESULTS.json OUT.png

Three panels against the mean rows per expert (T k / n), forward and forward + backward:
the MoE's rate as a share of the dense layer's, the floor (max of FLOPs at the dense rate and
bytes at the copy bandwidth) as a share of the MoE's time, and the speed-up over the naive
per-expert loop. A fourth shows the cost per token of the scaling series against n.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile


def main(argv):
    if len(argv) != 3:
        sys.stderr.write(__doc__)
        return 2
    src, out = argv[1], argv[2]
    gnuplot = shutil.which("gnuplot")
    if gnuplot is None:
        sys.stderr.write("plot_moe_layer: gnuplot is not installed (apt install gnuplot-nox)\n")
        return 1
    with open(src, encoding="utf-8") as f:
        run = json.load(f)
    results = run.get("results", [])
    if not results:
        sys.stderr.write(f"plot_moe_layer: {src} has no results\n")
        return 1
    tokens, k = run["tokens"], run["k"]
    with tempfile.TemporaryDirectory() as tmp:
        main_dat = os.path.join(tmp, "main.dat")
        with open(main_dat, "w", encoding="utf-8") as f:
            f.write("# rows share_dense_f share_dense_fb share_floor_f share_floor_fb naive_f naive_fb\n")
            for r in results:
                fw, fb = r["forward"], r["forward_backward"]
                rows = tokens * k / r["n_experts"]
                f.write(f"{rows} {fw['share_of_dense']} {fb['share_of_dense']} {fw['share_of_floor']} "
                        f"{fb['share_of_floor']} {fw['speedup_over_naive']} {fb['speedup_over_naive']}\n")
        scale_dat = os.path.join(tmp, "scale.dat")
        series = []
        with open(scale_dat, "w", encoding="utf-8") as f:
            for name in ("rows", "tokens"):
                points = [p for p in run.get("scaling", []) if p["series"] == name]
                if not points:
                    continue
                series.append(name)
                f.write(f"# {name}: n us_per_token_fwd us_per_token_fwd_bwd\n")
                for p in points:
                    f.write(f"{p['n_experts']} {1e6 * p['moe_forward_s'] / p['tokens']} "
                            f"{1e6 * p['moe_forward_backward_s'] / p['tokens']}\n")
                f.write("\n\n")
        title = (f"moe_layer: d={run['d_model']} h={run['hidden']} k={k} T={tokens}, "
                 f"{run['threads']} threads")
        script = f"""
set terminal pngcairo size 1400,1000 font ",10" noenhanced
set output "{out}"
set multiplot layout 2,2 title "{title}"
set logscale x 2
set grid
set key bottom right
set xlabel "rows per expert (T k / n)"
set ylabel "MoE rate / dense rate"
set yrange [0:1.2]
plot "{main_dat}" using 1:2 with linespoints title "forward", \\
     "" using 1:3 with linespoints title "forward + backward", 0.9 with lines dashtype 2 title "goal 0.9"
set ylabel "floor / MoE time"
plot "{main_dat}" using 1:4 with linespoints title "forward", \\
     "" using 1:5 with linespoints title "forward + backward", 1/1.3 with lines dashtype 2 title "goal 1/1.3"
set ylabel "naive loop time / MoE time"
set yrange [0:*]
plot "{main_dat}" using 1:6 with linespoints title "forward", \\
     "" using 1:7 with linespoints title "forward + backward", 1 with lines dashtype 2 title "even"
set xlabel "experts n"
set ylabel "microseconds per token"
set logscale y 2
set key top left
"""
        plots = []
        for i, name in enumerate(series):
            label = "fixed rows per expert" if name == "rows" else "fixed T"
            plots.append(f'"{scale_dat}" index {i} using 1:2 with linespoints title "forward, {label}"')
            plots.append(f'"{scale_dat}" index {i} using 1:3 with linespoints title "fwd+bwd, {label}"')
        script += ("plot " + ", \\\n     ".join(plots) + "\n") if plots else "unset logscale y\nplot 0 notitle\n"
        script += "unset multiplot\n"
        subprocess.run([gnuplot], input=script, text=True, check=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
