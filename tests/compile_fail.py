#!/usr/bin/env python3
"""Compiles a source that must not compile and checks the diagnostic names the problem.

usage: compile_fail.py SOURCE COMPILER [ARGS...]; SOURCE's first line is '// expect: TEXT'.
"""
import shlex
import subprocess
import sys

source, compiler = sys.argv[1], sys.argv[2:]
with open(source, encoding="utf-8") as f:
    first = f.readline()
if not first.startswith("// expect: "):
    sys.exit(f"{source}: first line must be '// expect: TEXT'")
expected = first[len("// expect: "):].strip()
cflags = subprocess.run(["pkg-config", "--cflags", "eigen3"], capture_output=True, text=True, check=True).stdout
cmd = compiler + shlex.split(cflags) + ["-fsyntax-only", source]
result = subprocess.run(cmd, capture_output=True, text=True)
if result.returncode == 0:
    sys.exit(f"{source} compiled, but it must not")
if expected not in result.stderr:
    print(result.stderr[-4000:])
    sys.exit(f"{source}: the diagnostic does not contain '{expected}'")
print(f"{source}: rejected as expected ('{expected}')")
