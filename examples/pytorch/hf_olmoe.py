#!/usr/bin/env python3
"""transformers' olmoe MoE block against moe-run --hf: hf_blocks.py --family olmoe [--moe-run PATH] [--tokens N]."""
import pathlib, runpy, sys  # noqa: E401
sys.argv[1:1] = ["--family", "olmoe"]
runpy.run_path(str(pathlib.Path(__file__).with_name("hf_blocks.py")), run_name="__main__")
