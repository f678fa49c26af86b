#!/usr/bin/env python3
"""Runs a test program under mpirun with the given rank counts, one after the other, and fails if
any run fails. Adds what OpenMPI needs to run as root in a container (--allow-run-as-root, only
when root) and to run more ranks than cores (--oversubscribe).

usage: mpirun.py MPIRUN RANKS[,RANKS...] PROGRAM [ARGS...]"""
import os
import subprocess
import sys


def main():
    if len(sys.argv) < 4:
        raise SystemExit(__doc__)
    mpirun, ranks, program, args = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    flags = ["--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    env = dict(os.environ, OMP_NUM_THREADS="1")  # one thread per rank: the ranks share the cores
    status = 0
    for n in ranks.split(","):
        cmd = [mpirun, *flags, "-np", n, program, *args]
        print("+ " + " ".join(cmd), flush=True)
        result = subprocess.run(cmd, env=env)
        if result.returncode != 0:
            print(f"mpirun.py: {n} ranks: exit {result.returncode}", flush=True)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
