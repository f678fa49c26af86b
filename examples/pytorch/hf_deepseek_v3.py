#!/usr/bin/env python3
"""transformers' deepseek_v3 MoE block against moe-run --hf: hf_blocks.py --family deepseek_v3 [--moe-run PATH] [--tokens N]."""
import pathlib, runpy, sys  # noqa: E401
sys.argv[1:1] = ["--family", "deepseek_v3"]
runpy.run_path(str(pathlib.Path(__file__).with_name("hf_blocks.py")), run_name="__main__")
