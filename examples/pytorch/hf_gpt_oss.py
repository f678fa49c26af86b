#!/usr/bin/env python3
"""transformers' gpt_oss MoE block against moe-run --hf: hf_blocks.py --family gpt_oss [--moe-run PATH] [--tokens N]."""
import pathlib, runpy, sys  # noqa: E401
sys.argv[1:1] = ["--family", "gpt_oss"]
runpy.run_path(str(pathlib.Path(__file__).with_name("hf_blocks.py")), run_name="__main__")
