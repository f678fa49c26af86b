#!/usr/bin/env python3
"""Compiles every public header on its own with a compiler and flags given, e.g. clang++'s
-Wall -Wextra -Wpedantic -Werror, each header included twice (its include guard is checked too).

usage: check_headers.py --root ROOT [--cccl DIR] [--cuda-include DIR] -- COMPILER [FLAGS...]

The headers: include/moe/**.hpp and backends/cpu/moe/**.hpp, found anew on every run (a header
added later is checked without a change here), and with --cccl (Thrust's include directory) the
CUDA backend's Thrust headers, which also build for the host. The MPI communicator's header is
checked with MPI's flags where pkg-config knows an MPI; with --cuda-include (the directory of
nccl.h and cuda_runtime.h) the NCCL communicator's header, and its MPI bootstrap's where an MPI
is known too. Eigen and nlohmann_json come from pkg-config as system headers: their own warnings
are not ours. Exits 1 if any header fails.
"""
import argparse
import concurrent.futures
import os
import shlex
import subprocess
import sys
from pathlib import Path

THRUST_HEADERS = ["moe/backend/thrust.hpp", "moe/backend/thrust_host.hpp"]
MPI_HEADERS = ["moe/comm/mpi.hpp"]
NCCL_HEADERS = ["moe/comm/nccl.hpp"]
NCCL_MPI_HEADERS = ["moe/comm/nccl_mpi.hpp"]


def system_includes(packages):
    out = subprocess.run(["pkg-config", "--cflags", *packages], capture_output=True, text=True, check=True).stdout
    flags = []
    for flag in shlex.split(out):
        flags += ["-isystem", flag[2:]] if flag.startswith("-I") else [flag]
    return flags


def main():
    parser = argparse.ArgumentParser(usage=__doc__.split("\n\n")[1].removeprefix("usage: "))
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--cccl", help="Thrust's include directory: check the Thrust headers too")
    parser.add_argument("--cuda-include", help="nccl.h's and cuda_runtime.h's directory: check the NCCL headers too")
    parser.add_argument("compiler", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    compiler = args.compiler[1:] if args.compiler[:1] == ["--"] else args.compiler
    if not compiler:
        parser.error("no compiler given")

    dirs = [args.root / "include", args.root / "backends/cpu"]
    headers = sorted(str(p.relative_to(d)) for d in dirs for p in d.rglob("*.hpp"))
    base = compiler + ["-fsyntax-only", "-x", "c++"] + [f"-I{d}" for d in dirs]
    jobs = [(h, base) for h in headers if h not in MPI_HEADERS + NCCL_HEADERS + NCCL_MPI_HEADERS]
    # The MPI communicator needs mpi.h: checked where pkg-config knows an MPI, said otherwise.
    mpi_flags = None
    if subprocess.run(["pkg-config", "--exists", "mpi"]).returncode == 0:
        mpi_flags = ["-DOMPI_SKIP_MPICXX"] + system_includes(["mpi"])
        jobs += [(h, base + mpi_flags) for h in MPI_HEADERS]
    else:
        print(f"not checked (no MPI known to pkg-config): {', '.join(MPI_HEADERS + NCCL_MPI_HEADERS)}", flush=True)
    # The NCCL communicator needs nccl.h and cuda_runtime.h; its MPI bootstrap mpi.h as well.
    if args.cuda_include:
        nccl = base + ["-isystem", args.cuda_include]
        jobs += [(h, nccl) for h in NCCL_HEADERS]
        if mpi_flags is not None:
            jobs += [(h, nccl + mpi_flags) for h in NCCL_MPI_HEADERS]
    else:
        print(f"not checked (no --cuda-include): {', '.join(NCCL_HEADERS + NCCL_MPI_HEADERS)}", flush=True)
    if args.cccl:
        thrust = base + [f"-I{args.root / 'backends/cuda'}", "-isystem", args.cccl]
        jobs += [(h, thrust) for h in THRUST_HEADERS]
    base_tail = system_includes(["eigen3", "nlohmann_json"])

    def check(job):
        header, cmd = job
        source = f"#include <{header}>\n#include <{header}>\n"
        result = subprocess.run(cmd + base_tail + ["-"], input=source, capture_output=True, text=True)
        return header, result

    print("+ " + shlex.join(base + base_tail + ["-"]) + "  (each header, from stdin)", flush=True)
    failed = clean = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for header, result in pool.map(check, jobs):
            if result.returncode == 0 and not result.stderr.strip():
                clean += 1
                print(f"ok    {header}")
                continue
            # Output without a failure is a warning that -Werror was not asked for: still reported.
            failed += result.returncode != 0
            print(f"{'FAIL' if result.returncode else 'WARN'}  {header}\n{result.stderr.rstrip()}", flush=True)
    print(f"{clean} of {len(jobs)} headers compile cleanly with {compiler[0]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
