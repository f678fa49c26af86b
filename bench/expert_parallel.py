#!/usr/bin/env python3
"""Runs bench/expert_parallel under mpirun on 1, 2 and 4 ranks (weak scaling: 4 experts and a
fixed batch per rank), prints one table and writes the rows as one JSON file.

usage: expert_parallel.py MPIRUN PROGRAM [--ranks 1,2,4] [--quick] [--json FILE]"""
import argparse
import json
import os
import subprocess
import sys
import tempfile


def main():
    parser = argparse.ArgumentParser(usage=__doc__.split("\n\n")[1].removeprefix("usage: "))
    parser.add_argument("mpirun")
    parser.add_argument("program")
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    # As root in a container OpenMPI needs --allow-run-as-root; more ranks than cores, --oversubscribe.
    flags = ["--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    env = dict(os.environ, OMP_NUM_THREADS="1")  # one thread per rank
    print(f"expert parallelism, weak scaling, {os.cpu_count()} cores, one thread per rank", flush=True)
    print("ranks  experts  tokens/rank  step (s)  tokens/s (all)  exchange %  other comm %  GFLOP/s", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.ranks.split(","):
            out = os.path.join(tmp, f"{n}.json")
            cmd = [args.mpirun, *flags, "-np", n, args.program, "--json", out] + (["--quick"] if args.quick else [])
            result = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if result.returncode != 0:
                sys.stderr.write(result.stdout + result.stderr)
                print(f"expert_parallel.py: {n} ranks: exit {result.returncode}", flush=True)
                return 1
            with open(out) as f:
                r = json.load(f)
            rows.append(r)
            print(f"{r['ranks']:5.0f}  {r['experts']:7.0f}  {r['tokens_per_rank']:11.0f}  {r['step_seconds']:8.4f}  "
                  f"{r['tokens_per_second']:14.0f}  {100 * r['exchange_share']:10.1f}  "
                  f"{100 * r['other_collectives_share']:12.1f}  {r['gflops']:7.2f}", flush=True)
    base = rows[0]["tokens_per_second"]
    for r in rows:
        r["throughput_vs_first"] = r["tokens_per_second"] / base
    print("throughput relative to " + f"{rows[0]['ranks']:.0f} rank(s): " +
          ", ".join(f"{r['ranks']:.0f}: {r['throughput_vs_first']:.2f}x" for r in rows))
    if args.json:
        tmp_path = args.json + ".tmp"
        with open(tmp_path, "w") as f:
            json.dump({"benchmark": "expert_parallel", "cores": os.cpu_count(), "rows": rows}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
