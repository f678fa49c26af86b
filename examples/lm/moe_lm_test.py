#!/usr/bin/env python3
"""moe-lm end to end on a small generated corpus: train, resume (after a stop and after a kill)
to the bytes of an uninterrupted run, eval, generate, compare with its table and JSON, and the
errors of a bad corpus, a bad checkpoint and a bad option. Usage: moe_lm_test.py MOE_LM"""
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

exe = sys.argv[1]
failures = []


def check(ok, what):
    if not ok:
        failures.append(what)
        print("FAIL:", what)


def run(*args, expect=0):
    p = subprocess.run([exe, *args], capture_output=True, text=True, timeout=240)
    if p.returncode != expect:
        check(False, f"moe-lm {' '.join(args)}: exit {p.returncode}, expected {expect}\n{p.stdout}\n{p.stderr}")
    return p


def read(path):
    with open(path, "rb") as f:
        return f.read()


with tempfile.TemporaryDirectory() as d:
    # A small language with structure: sentences from a few patterns, paragraphs of 3 sentences.
    rng = random.Random(7)
    nouns, verbs = ["lord", "king", "people", "city", "house", "land"], ["saw", "built", "kept", "left"]
    paragraphs = []
    for _ in range(400):
        sentences = []
        for _ in range(3):
            sentences.append(f"the {rng.choice(nouns)} {rng.choice(verbs)} the {rng.choice(nouns)} .")
        paragraphs.append(" ".join(sentences))
    corpus = os.path.join(d, "corpus.txt")
    with open(corpus, "w") as f:
        f.write("\n\n".join(paragraphs) + "\n")
    common = ["--corpus", corpus, "--vocab", "64", "--batch", "4", "--steps", "10", "--quiet"]

    p = run("configs")
    check("moe-256" in p.stdout and "moe-1024-h" in p.stdout, "configs lists the configurations")

    # Uninterrupted: 40 windows of 40 words.
    a = os.path.join(d, "a.safetensors")
    p = run("train", *common, "--config", "moe-4", "--tokens", "1600", "--checkpoint", a, "--save-every", "5")
    check("test perplexity" in p.stdout, "train reports perplexities")
    # Stopped at 16 windows, then resumed to 40: the same bytes.
    b = os.path.join(d, "b.safetensors")
    run("train", *common, "--config", "moe-4", "--tokens", "640", "--checkpoint", b, "--save-every", "5")
    p = run("train", *common, "--config", "moe-4", "--tokens", "1600", "--checkpoint", b, "--save-every", "5")
    check("resuming" in p.stderr, "a second train resumes from the checkpoint")
    check(read(a) == read(b), "training stopped and resumed ends in the bytes of an uninterrupted run")
    # Killed (SIGKILL) once a checkpoint exists, then run again: the same bytes.
    c = os.path.join(d, "c.safetensors")
    args = [exe, "train", *common, "--config", "moe-4", "--tokens", "1600", "--checkpoint", c, "--save-every", "5"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and not os.path.exists(c):
        time.sleep(0.005)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    print("killed mid-run" if killed else "the run ended before it could be killed")
    run("train", *common, "--config", "moe-4", "--tokens", "1600", "--checkpoint", c, "--save-every", "5")
    check(read(a) == read(c), "training killed and resumed ends in the bytes of an uninterrupted run")

    p = run("eval", "--corpus", corpus, "--checkpoint", a)
    check("valid perplexity" in p.stdout, "eval reports perplexities")
    ppl = float(p.stdout.split("valid perplexity")[1].split(",")[0])
    check(ppl < 30, f"the model learned the small language: valid perplexity {ppl} < 30 (64 words)")
    p = run("generate", "--checkpoint", a, "--prompt", "the king", "--words", "12")
    check(len(p.stdout.split()) >= 12, "generate prints the prompt and the words it drew")

    js = os.path.join(d, "r.json")
    names = ["lstm-3", "moe-1-wide", "moe-1-deep", "moe-4", "moe-32", "moe-256", "moe-1024-h"]
    p = run("compare", *common, "--tokens", "400", "--configs", ",".join(names), "--json", js)
    check("| moe-32 | 32 |" in p.stdout and "| lstm-3 | 0 |" in p.stdout, "compare prints the table")
    runs = json.load(open(js))["runs"]
    check([r["name"] for r in runs] == names, "compare trains every configuration and writes it to the JSON")
    check(all(r["test_perplexity"] > 1 for r in runs), "perplexities are above 1")

    # Errors: a bad corpus, a truncated checkpoint (left as it was), an unknown configuration.
    empty = os.path.join(d, "empty.txt")
    open(empty, "w").close()
    p = run("train", "--corpus", empty, "--config", "moe-4", "--tokens", "100", expect=1)
    check("empty.txt" in p.stderr, "an empty corpus is refused, naming it")
    cut = os.path.join(d, "cut.safetensors")
    with open(cut, "wb") as f:
        f.write(read(a)[: len(read(a)) // 2])
    before = read(cut)
    p = run("train", *common, "--config", "moe-4", "--tokens", "1600", "--checkpoint", cut, expect=1)
    check("cut.safetensors" in p.stderr and read(cut) == before, "a truncated checkpoint is refused and left alone")
    p = run("train", *common, "--config", "moe-3", "--tokens", "100", expect=1)
    check("expected one of" in p.stderr, "an unknown configuration is refused, listing the known ones")

print("FAILED" if failures else "all passed")
sys.exit(1 if failures else 0)
