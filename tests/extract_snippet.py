#!/usr/bin/env python3
"""Writes the first ```cpp block of a Markdown file to a source file, so the build checks it."""
import re
import sys

text = open(sys.argv[1], encoding="utf-8").read()
match = re.search(r"```cpp\n(.*?)```", text, re.S)
if not match:
    sys.exit(f"{sys.argv[1]}: no ```cpp block")
with open(sys.argv[2], "w", encoding="utf-8") as out:
    out.write(match.group(1))
