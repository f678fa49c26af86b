#!/usr/bin/env python3
"""moe-run end to end: a Mixtral-style block written from Python under Hugging Face's names,
run by moe-run, against a reference of the block written here (y, gates, routing), its gradients
against finite differences of moe-run's own outputs, a layer given by --config (in full and in part), configuration
overrides (--set), a Hugging Face model directory (--hf), and the errors a user can make (bad options, inputs moe-run does not read,
noise where no gate draws it, --set keys the layer does not have). With --cuda, only the CUDA backend against the CPU one on the same block: it exits
77 (Meson: SKIP) when no CUDA device answers or moe-run was built without CUDA, so a check that
could not run never shows as a pass.

usage: moe_run_test.py MOE_RUN [--cuda]"""
import json
import math
import os
import random
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import safetensors_py as st  # noqa: E402

MOE_RUN = sys.argv[1]
CUDA_ONLY = sys.argv[2:] == ["--cuda"]
if sys.argv[2:] not in ([], ["--cuda"]):
    raise SystemExit(f"usage: moe_run_test.py MOE_RUN [--cuda], got {sys.argv[1:]}")
D, N, H, T = 5, 4, 3, 7
PREFIX = "model.layers.0.block_sparse_moe."
failures = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        failures.append(what)


def run(*args, expect=0):
    p = subprocess.run([MOE_RUN, *map(str, args)], capture_output=True, text=True)
    if p.returncode != expect:
        print(p.stdout, p.stderr)
        raise SystemExit(f"moe-run {' '.join(map(str, args))}: exit {p.returncode}, expected {expect}")
    return p


def rand(rng, count):
    return [st.f32(rng.uniform(-1, 1)) for _ in range(count)]


def mixtral_weights(rng):
    w = {PREFIX + "gate.weight": ("F32", [N, D], rand(rng, N * D))}
    for e in range(N):
        p = f"{PREFIX}experts.{e}."
        w[p + "w1.weight"] = ("F32", [H, D], rand(rng, H * D))
        w[p + "w2.weight"] = ("F32", [D, H], rand(rng, D * H))
        w[p + "w3.weight"] = ("F32", [H, D], rand(rng, H * D))
    return w


def reference(w, x):
    """The block: softmax over the n logits, top 2 renormalized, SwiGLU experts."""
    g = w[PREFIX + "gate.weight"][2]
    ys, gates, experts = [], [], []
    for t in range(T):
        xt = x[t * D : (t + 1) * D]
        logits = [sum(g[e * D + j] * xt[j] for j in range(D)) for e in range(N)]
        m = max(logits)
        p = [math.exp(v - m) for v in logits]
        z = sum(p)
        p = [v / z for v in p]
        top = sorted(range(N), key=lambda e: (-p[e], e))[:2]
        kept = p[top[0]] + p[top[1]]
        y = [0.0] * D
        for e in top:
            w1, w2, w3 = (w[f"{PREFIX}experts.{e}.{k}.weight"][2] for k in ("w1", "w2", "w3"))
            u = [sum(w1[i * D + j] * xt[j] for j in range(D)) for i in range(H)]
            v = [sum(w3[i * D + j] * xt[j] for j in range(D)) for i in range(H)]
            hid = [u[i] / (1 + math.exp(-u[i])) * v[i] for i in range(H)]
            for j in range(D):
                y[j] += p[e] / kept * sum(w2[j * H + i] * hid[i] for i in range(H))
        ys += y
        gates += [p[e] / kept for e in top]
        experts += top
    return ys, gates, experts


def rel_err(a, b):
    num = math.sqrt(sum((u - v) ** 2 for u, v in zip(a, b)))
    den = math.sqrt(sum(v * v for v in b)) or 1.0
    return num / den


def cuda_against_cpu():
    """The CUDA backend against the CPU one on the Mixtral block: 77 when it cannot run."""
    with tempfile.TemporaryDirectory() as tmp:
        path = lambda name: os.path.join(tmp, name)  # noqa: E731
        rng = random.Random(7)
        st.write(path("w.safetensors"), mixtral_weights(rng))
        x, dy = rand(rng, T * D), rand(rng, T * D)
        st.write(path("in.safetensors"), {"x": ("F64", [T, D], x), "dy": ("F64", [T, D], dy)})
        common = ["--weights", path("w.safetensors"), "--mixtral", PREFIX, "--input", path("in.safetensors")]
        p = subprocess.run([MOE_RUN, *common, "--output", path("gpu.safetensors"), "--backend", "cuda"],
                           capture_output=True, text=True)
        if p.returncode == 77:
            print("SKIP: no CUDA device answers, so the CUDA backend could not be compared with the CPU one")
            return 77
        if "built without CUDA" in p.stderr:
            print("SKIP: moe-run was built without CUDA, so the CUDA backend could not be compared with the CPU one")
            return 77
        check(p.returncode == 0, f"--backend cuda runs ({p.stderr.strip()})")
        if p.returncode != 0:
            return 1
        run(*common, "--output", path("cpu.safetensors"))
        g, c = st.read(path("gpu.safetensors"))[0], st.read(path("cpu.safetensors"))[0]
        for name in ("y", "gates", "dx", "grad.experts.1.w1"):
            check(rel_err(g[name][2], c[name][2]) < 1e-5, f"CUDA {name} matches the CPU")
    return 1 if failures else 0


if CUDA_ONLY:
    sys.exit(cuda_against_cpu())

with tempfile.TemporaryDirectory() as tmp:
    path = lambda name: os.path.join(tmp, name)  # noqa: E731
    rng = random.Random(7)
    weights = mixtral_weights(rng)
    st.write(path("w.safetensors"), weights)
    x = rand(rng, T * D)
    dy = rand(rng, T * D)
    st.write(path("in.safetensors"), {"x": ("F64", [T, D], x), "dy": ("F64", [T, D], dy)})

    # 1. The forward pass against the reference.
    run("--weights", path("w.safetensors"), "--mixtral", PREFIX, "--input", path("in.safetensors"),
        "--output", path("out.safetensors"), "--mode", "inference", "--dtype", "double")
    out, meta = st.read(path("out.safetensors"))
    ry, rg, re = reference(weights, x)
    check(out["y"][1] == [T, D] and rel_err(out["y"][2], ry) < 1e-12, f"y matches the reference ({rel_err(out['y'][2], ry):.2e})")
    check(rel_err(out["gates"][2], rg) < 1e-12, "gates match the reference")
    check(out["experts"][0] == "I64" and out["experts"][2] == re, "routing matches the reference")
    check(meta.get("moe.gate") == "TopK" and meta.get("run.mode") == "inference", "output metadata describes the run")
    check(all(k in out for k in ("loss", "importance", "load", "tokens_per_expert", "dropped_tokens")), "statistics written")
    check(sum(out["tokens_per_expert"][2]) == 2 * T, "tokens_per_expert counts every slot")

    # 2. Gradients against finite differences of L = sum(y * dy), through moe-run itself.
    def loss(w, xs):
        st.write(path("wp.safetensors"), w)
        st.write(path("ip.safetensors"), {"x": ("F64", [T, D], xs)})
        run("--weights", path("wp.safetensors"), "--mixtral", PREFIX, "--input", path("ip.safetensors"),
            "--output", path("op.safetensors"), "--mode", "inference", "--dtype", "double")
        y = st.read(path("op.safetensors"))[0]["y"][2]
        return sum(a * b for a, b in zip(y, dy))

    eps = 1e-4  # weights are stored as F32: steps of 2^-14 and up are exact
    probes = [  # (HF tensor, row, col, our gradient, its index in our [in, out] layout)
        (PREFIX + "gate.weight", 2, 3, "grad.gate.w_gate", 3 * N + 2),
        (PREFIX + "experts.1.w1.weight", 1, 4, "grad.experts.1.w1", 4 * H + 1),
        (PREFIX + "experts.3.w2.weight", 0, 2, "grad.experts.3.w2", 2 * D + 0),
        (PREFIX + "experts.0.w3.weight", 2, 0, "grad.experts.0.w3", 0 * H + 2),
    ]
    for name, r, c, grad, idx in probes:
        cols = weights[name][1][1]
        used = any(e in re for e in range(N)) if "gate" in name else int(name.split("experts.")[1].split(".")[0]) in re
        plus, minus = dict(weights), dict(weights)
        for sign, w in ((1, plus), (-1, minus)):
            vals = list(weights[name][2])
            vals[r * cols + c] = st.f32(vals[r * cols + c] + sign * eps)
            w[name] = ("F32", weights[name][1], vals)
        step = plus[name][2][r * cols + c] - minus[name][2][r * cols + c]
        fd = (loss(plus, x) - loss(minus, x)) / step
        got = out[grad][2][idx]
        check(abs(fd - got) <= 1e-6 * max(1.0, abs(fd)) and (used or got == 0),
              f"{grad}[{idx}] = {got:.9g} against finite differences {fd:.9g}")
    for j in (0, 3 * D + 2):
        xp, xm = list(x), list(x)
        xp[j] += 1e-6
        xm[j] -= 1e-6
        fd = (loss(weights, xp) - loss(weights, xm)) / 2e-6
        check(abs(fd - out["dx"][2][j]) <= 1e-6 * max(1.0, abs(fd)), f"dx[{j}] = {out['dx'][2][j]:.9g} against {fd:.9g}")

    # 3. A layer given by --config (a two-level hierarchy), weights without metadata, explicit noise.
    config = {"moe.expert": "FeedForward", "moe.gate": "NoisyTopK", "moe.depth": 2, "moe.scalar": "double",
              "config.d_model": D, "config.n_experts": 4, "config.shared_experts": 0, "config.seed": 0,
              "config.check_finite": True, "config.expert.hidden": H, "config.expert.bias": False,
              "config.expert.precision": "fp32", "config.gate.w_importance": 0.01, "config.gate.w_load": 0.01}
    for level, branching in ((0, 2), (1, 2)):
        config[f"config.gate.levels.{level}.branching"] = branching
        for key, value in (("k", 1), ("eps_noise", 0.01), ("noisy", True), ("w_importance", 0.0),
                           ("w_load", 0.0), ("w_z", 0.0)):
            config[f"config.gate.levels.{level}.gate.{key}"] = value
    with open(path("config.json"), "w") as f:
        json.dump(config, f)
    w2 = {"gate.0.w_gate": ("F64", [D, 2], rand(rng, D * 2)), "gate.0.w_noise": ("F64", [D, 2], rand(rng, D * 2)),
          "gate.1.w_gate": ("F64", [2, D, 2], rand(rng, 2 * D * 2)),
          "gate.1.w_noise": ("F64", [2, D, 2], rand(rng, 2 * D * 2))}
    for e in range(4):
        w2[f"experts.{e}.w1"] = ("F64", [D, H], rand(rng, D * H))
        w2[f"experts.{e}.w2"] = ("F64", [H, D], rand(rng, H * D))
    st.write(path("w2.safetensors"), w2)
    noise = rand(rng, T * 6)  # every level's nodes: 2 + 4
    st.write(path("in2.safetensors"), {"x": ("F64", [T, D], x), "noise": ("F64", [T, 6], noise)})
    args = ["--weights", path("w2.safetensors"), "--config", path("config.json"), "--input", path("in2.safetensors")]
    run(*args, "--output", path("o1.safetensors"))
    run(*args, "--output", path("o2.safetensors"), "--threads", "1")
    with open(path("o1.safetensors"), "rb") as a, open(path("o2.safetensors"), "rb") as b:
        check(a.read() == b.read(), "a run is deterministic, whatever the thread count")
    o1, m1 = st.read(path("o1.safetensors"))
    check(m1.get("moe.depth") == "2" and "level.1.importance" in o1, "a hierarchy's per-level statistics are written")
    check(all(math.isfinite(v) for v in o1["y"][2]), "the hierarchy's output is finite")
    # The noise is used: other noise, another smooth load (the gates of k = 1 are all 1).
    st.write(path("in3.safetensors"), {"x": ("F64", [T, D], x), "noise": ("F64", [T, 6], [3 * v for v in noise])})
    run(*args[:-1], path("in3.safetensors"), "--output", path("o3.safetensors"))
    check(st.read(path("o3.safetensors"))[0]["load"][2] != o1["load"][2], "the input's noise reaches the gate (its smooth load)")

    # Weights exported by another writer carry its own "format" (Hugging Face: "pt"): not ours.
    st.write(path("w2pt.safetensors"), w2, metadata={"format": "pt"})
    run("--weights", path("w2pt.safetensors"), "--config", path("config.json"), "--input", path("in2.safetensors"),
        "--output", path("o4.safetensors"))
    with open(path("o1.safetensors"), "rb") as a, open(path("o4.safetensors"), "rb") as b:
        check(a.read() == b.read(), "weights with another writer's format metadata run the same")

    # 4. Errors: each names what is wrong.
    p = run("--weights", path("w.safetensors"), "--input", path("in.safetensors"), expect=2)
    check("--output" in p.stderr, "a missing option is a usage error")
    p = run("--weights", path("w.safetensors"), "--mixtral", PREFIX, "--input", path("in.safetensors"),
            "--output", path("x.safetensors"), "--mode", "sideways", expect=2)
    check("--mode sideways" in p.stderr, "a bad value is a usage error naming it")
    p = run("--weights", path("w.safetensors"), "--input", path("in.safetensors"), "--output", path("x.safetensors"),
            "--verbose", expect=2)
    check("unknown option --verbose" in p.stderr, "an unknown option is named, even last")
    p = run("--weights", path("w2.safetensors"), "--config", path("config.json"), "--k", "3", "--input",
            path("in2.safetensors"), "--output", path("x.safetensors"), expect=2)
    check("--k is the Mixtral block's k" in p.stderr, "--k without --mixtral is refused")
    p = run("--weights", path("w.safetensors"), "--mixtral", PREFIX, "--threads", "-1", "--input",
            path("in.safetensors"), "--output", path("x.safetensors"), expect=2)
    check("--threads -1" in p.stderr, "a negative thread count is refused")
    st.write(path("bad.safetensors"), {"x": ("F64", [T, D + 1], rand(rng, T * (D + 1)))})
    p = run("--weights", path("w.safetensors"), "--mixtral", PREFIX, "--input", path("bad.safetensors"),
            "--output", path("x.safetensors"), expect=1)
    check("'x'" in p.stderr and f"[{T}, {D + 1}]" in p.stderr, "an input of the wrong width names the tensor and shape")
    p = run("--weights", path("w2.safetensors"), "--input", path("in2.safetensors"), "--output", path("x.safetensors"),
            expect=1)
    check("no 'format'" in p.stderr, "weights without metadata and without --config are refused")
    broken = dict(w2)
    del broken["experts.3.w2"]
    st.write(path("w3.safetensors"), broken)
    p = run("--weights", path("w3.safetensors"), "--config", path("config.json"), "--input", path("in2.safetensors"),
            "--output", path("x.safetensors"), expect=1)
    check("experts.3.w2" in p.stderr, "a missing weight is named")
    check(not os.path.exists(path("x.safetensors")), "no output is written when the run fails")

    # 5. Input tensors: only x, noise and dy; noise only where a gate draws it.
    mix = ["--weights", path("w.safetensors"), "--mixtral", PREFIX]
    hier = ["--weights", path("w2.safetensors"), "--config", path("config.json")]
    st.write(path("in_z.safetensors"), {"x": ("F64", [T, D], x), "z": ("F64", [T, 6], noise)})
    p = run(*hier, "--input", path("in_z.safetensors"), "--output", path("x.safetensors"), expect=1)
    check("'z'" in p.stderr and all(n in p.stderr for n in ("x [T, d]", "noise [", "dy [T, d]")),
          "an input tensor moe-run does not read is refused, naming it and the accepted names")
    st.write(path("in_dY.safetensors"), {"x": ("F64", [T, D], x), "dY": ("F64", [T, D], dy)})
    p = run(*mix, "--input", path("in_dY.safetensors"), "--output", path("x.safetensors"), expect=1)
    check("'dY'" in p.stderr, "a misspelt dy is refused, naming it")
    p = run(*hier, "--input", path("in2.safetensors"), "--output", path("x.safetensors"), "--mode", "inference",
            expect=1)
    check("'noise'" in p.stderr and "--mode inference" in p.stderr, "noise with --mode inference is refused")
    st.write(path("in_noise.safetensors"), {"x": ("F64", [T, D], x), "noise": ("F64", [T, N], rand(rng, T * N))})
    p = run(*mix, "--input", path("in_noise.safetensors"), "--output", path("x.safetensors"), expect=1)
    check("'noise'" in p.stderr and "TopK" in p.stderr and "draws no noise" in p.stderr,
          "noise for a gate that reads none is refused, naming the gate")
    check(not os.path.exists(path("x.safetensors")), "no output is written when an input is refused")

    # 6. --set: configuration keys over any source of the layer.
    mixin = [*mix, "--input", path("in.safetensors"), "--dtype", "double"]
    run(*mixin, "--output", path("s0.safetensors"))
    s0 = st.read(path("s0.safetensors"))[0]
    check(s0["loss_z"][2] == [0.0] and s0["loss"][2] == [0.0], "the Mixtral block has no balancing or z-loss weights")
    run(*mixin, "--output", path("s1.safetensors"), "--set", "gate.w_z=1e-3")
    s1, sm1 = st.read(path("s1.safetensors"))
    check(s1["loss_z"][2][0] > 0 and sm1.get("config.gate.w_z") == "0.001",
          f"--set gate.w_z=1e-3 turns the z-loss on (loss_z {s1['loss_z'][2][0]:.3g})")
    check(s1["y"][2] == s0["y"][2], "--set gate.w_z leaves the forward pass as it was")
    check(s1["grad.gate.w_gate"][2] != s0["grad.gate.w_gate"][2], "the z-loss reaches the router's gradient")
    run(*mixin, "--output", path("s2.safetensors"), "--set", "gate.w_importance=0.5", "--set", "gate.w_z=0")
    s2 = st.read(path("s2.safetensors"))[0]
    check(s2["loss"][2][0] > 0 and s2["loss_importance"][2][0] > 0 and s2["loss_z"][2] == [0.0],
          f"--set gate.w_importance adds the importance loss to loss ({s2['loss'][2][0]:.3g}); the last --set wins")
    run(*mixin, "--output", path("s3.safetensors"), "--set", "gate.k=1")
    check(st.read(path("s3.safetensors"))[0]["gates"][1] == [T, 1], "--set gate.k=1 routes each token to one expert")
    # On a hierarchy from --config, and on weights that carry their configuration (checked
    # against the layer with --set applied to both).
    run(*hier, "--input", path("in2.safetensors"), "--output", path("s4.safetensors"),
        "--set", "gate.w_importance=0.5", "--set", "gate.levels.1.gate.w_load=0.25")
    s4, sm4 = st.read(path("s4.safetensors"))
    check(s4["loss"][2] != o1["loss"][2] and sm4.get("config.gate.levels.1.gate.w_load") == "0.25",
          "--set reaches a hierarchy's keys given by --config")
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in config.items()}
    meta["format"] = "moe.layer/1"
    st.write(path("w2meta.safetensors"), w2, metadata=meta)
    run("--weights", path("w2meta.safetensors"), "--input", path("in2.safetensors"), "--output", path("s5.safetensors"),
        "--set", "gate.w_importance=0.5", "--set", "gate.levels.1.gate.w_load=0.25")
    with open(path("s4.safetensors"), "rb") as a, open(path("s5.safetensors"), "rb") as b:
        check(a.read() == b.read(), "--set on weights that carry their configuration: the same run as with --config")
    p = run(*mixin, "--output", path("x.safetensors"), "--set", "gate.w_zz=1", expect=1)
    check("gate.w_zz" in p.stderr and "gate.w_z," in p.stderr and "gate.w_importance" in p.stderr
          and "expert.hidden" in p.stderr, "--set with an unknown key is refused, listing the layer's keys")
    p = run(*mixin, "--output", path("x.safetensors"), "--set", "config.gate.w_z=1", expect=1)
    check("without the 'config.' prefix" in p.stderr, "--set with the config. prefix says to drop it")
    p = run(*mixin, "--output", path("x.safetensors"), "--set", "seed=3", expect=1)
    check("seed" in p.stderr and "weights replace" in p.stderr, "--set seed is refused: the weights replace it")
    p = run(*mixin, "--output", path("x.safetensors"), "--set", "gate.w_z=lots", expect=1)
    check("gate.w_z=lots" in p.stderr and "expected a number" in p.stderr, "--set with a bad value names the key")
    p = run(*mixin, "--output", path("x.safetensors"), "--set", "gate.k=2.5", expect=1)
    check("gate.k=2.5" in p.stderr and "integer" in p.stderr, "--set with a non-integer k names the key")
    p = run(*mixin, "--output", path("x.safetensors"), "--set", "gate.w_z", expect=2)
    check("--set gate.w_z: expected KEY=VALUE" in p.stderr, "--set without = is a usage error")
    check(not os.path.exists(path("x.safetensors")), "no output is written when --set is refused")

    # 7. A partial --config: only what differs from the library's defaults; unknown keys refused.
    partial = {"moe.expert": "FeedForward", "moe.gate": "NoisyTopK", "moe.depth": 2, "moe.scalar": "double",
               "config.d_model": D, "config.n_experts": 4, "config.expert.hidden": H,
               "config.gate.levels.0.branching": 2, "config.gate.levels.1.branching": 2,
               "config.gate.levels.0.gate.k": 1, "config.gate.levels.1.gate.k": 1}
    with open(path("partial.json"), "w") as f:
        json.dump(partial, f)
    run("--weights", path("w2.safetensors"), "--config", path("partial.json"), "--input", path("in2.safetensors"),
        "--output", path("p1.safetensors"))
    p1 = st.read(path("p1.safetensors"))[0]
    full = st.read(path("o1.safetensors"))[0]
    check(p1["y"][2] == full["y"][2], "a partial --config takes the defaults: the same output as the full one")
    partial["config.gate.levels.0.gate.kk"] = 1
    with open(path("partial.json"), "w") as f:
        json.dump(partial, f)
    p = run("--weights", path("w2.safetensors"), "--config", path("partial.json"), "--input", path("in2.safetensors"),
            "--output", path("p2.safetensors"), expect=1)
    check("config.gate.levels.0.gate.kk" in p.stderr and "not a field" in p.stderr,
          "an unknown --config key is refused, naming it")

    # 8. --hf: a Qwen2-MoE model directory (config.json, two shards and their index), against the
    # block's math written here: softmax top 2 unnormalized, SwiGLU experts, one shared expert of
    # its own width gated by sigmoid(x w); the router's logits and probabilities; --set over it.
    HS = 4
    hf = path("qwen2")
    os.makedirs(hf)
    with open(os.path.join(hf, "config.json"), "w") as f:
        json.dump({"model_type": "qwen2_moe", "hidden_size": D, "num_hidden_layers": 2, "num_experts": N,
                   "num_experts_per_tok": 2, "moe_intermediate_size": H, "shared_expert_intermediate_size": HS,
                   "norm_topk_prob": False, "mlp_only_layers": [0]}, f)
    qp = "model.layers.1.mlp."
    qw = {qp + "gate.weight": ("F32", [N, D], rand(rng, N * D)),
          qp + "shared_expert.gate_proj.weight": ("F32", [HS, D], rand(rng, HS * D)),
          qp + "shared_expert.up_proj.weight": ("F32", [HS, D], rand(rng, HS * D)),
          qp + "shared_expert.down_proj.weight": ("F32", [D, HS], rand(rng, D * HS)),
          qp + "shared_expert_gate.weight": ("F32", [1, D], rand(rng, D))}
    for e in range(N):
        qw[f"{qp}experts.{e}.gate_proj.weight"] = ("F32", [H, D], rand(rng, H * D))
        qw[f"{qp}experts.{e}.up_proj.weight"] = ("F32", [H, D], rand(rng, H * D))
        qw[f"{qp}experts.{e}.down_proj.weight"] = ("F32", [D, H], rand(rng, D * H))
    names = sorted(qw)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        st.write(os.path.join(hf, file), {k: qw[k] for k in part})
    with open(os.path.join(hf, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: file for file, part in shards.items() for k in part}}, f)

    def swiglu(wg, wu, wd, hidden, xt):
        a = [sum(wg[i * D + j] * xt[j] for j in range(D)) for i in range(hidden)]
        u = [sum(wu[i * D + j] * xt[j] for j in range(D)) for i in range(hidden)]
        act = [a[i] / (1 + math.exp(-a[i])) * u[i] for i in range(hidden)]
        return [sum(wd[j * hidden + i] * act[i] for i in range(hidden)) for j in range(D)]

    q_y, q_logits, q_p, q_f = [], [], [], [0.0] * N
    for t in range(T):
        xt = x[t * D : (t + 1) * D]
        logits = [sum(qw[qp + "gate.weight"][2][e * D + j] * xt[j] for j in range(D)) for e in range(N)]
        m = max(logits)
        p = [math.exp(v - m) for v in logits]
        p = [v / sum(p) for v in p]
        top = sorted(range(N), key=lambda e: (-p[e], e))[:2]
        y = [0.0] * D
        for e in top:
            q_f[e] += 1.0 / T
            o = swiglu(*(qw[f"{qp}experts.{e}.{k}_proj.weight"][2] for k in ("gate", "up", "down")), H, xt)
            y = [a + p[e] * b for a, b in zip(y, o)]
        so = swiglu(*(qw[f"{qp}shared_expert.{k}_proj.weight"][2] for k in ("gate", "up", "down")), HS, xt)
        g = 1 / (1 + math.exp(-sum(qw[qp + "shared_expert_gate.weight"][2][j] * xt[j] for j in range(D))))
        q_y += [a + g * b for a, b in zip(y, so)]
        q_logits += logits
        q_p += p
    hf_args = ["--hf", hf, "--layer", 1, "--input", path("in.safetensors"), "--dtype", "double"]
    run(*hf_args, "--output", path("hf.safetensors"), "--mode", "inference")
    h = st.read(path("hf.safetensors"))[0]
    check(rel_err(h["y"][2], q_y) < 1e-12, f"--hf: y matches the Qwen2-MoE block ({rel_err(h['y'][2], q_y):.2e})")
    check(h["router_logits"][1] == [T, N] and rel_err(h["router_logits"][2], q_logits) < 1e-12,
          "--hf: router_logits [T, n] written")
    check(rel_err(h["router_probabilities"][2], q_p) < 1e-12, "--hf: router_probabilities [T, n] written")
    check("grad.shared_gate.w_gate" in h and "grad.shared_experts.0.w1" in h, "--hf: every gradient written with dy")
    run(*hf_args, "--output", path("hf2.safetensors"), "--mode", "inference", "--set", "gate.w_aux=0.01")
    h2 = st.read(path("hf2.safetensors"))[0]
    p_mean = [sum(q_p[t * N + e] for t in range(T)) / T for e in range(N)]
    expect_aux = 0.01 * N * sum(q_f[e] * p_mean[e] for e in range(N))
    check(abs(h2["loss_aux"][2][0] - expect_aux) < 1e-12 and h2["y"][2] == h["y"][2],
          f"--hf with --set gate.w_aux: the top-k balancing loss n sum f_i P_i ({h2['loss_aux'][2][0]:.6g})")
    p = run("--hf", hf, "--layer", 0, "--input", path("in.safetensors"), "--output", path("x.safetensors"), expect=1)
    check("dense MLP" in p.stderr and "mlp_only_layers" in p.stderr, "--hf on a dense layer says so")
    p = run("--hf", hf, "--input", path("in.safetensors"), "--output", path("x.safetensors"), expect=2)
    check("--layer" in p.stderr, "--hf without --layer is a usage error")
    p = run("--hf", hf, "--layer", 1, "--weights", path("w.safetensors"), "--input", path("in.safetensors"),
            "--output", path("x.safetensors"), expect=2)
    check("drop --weights" in p.stderr, "--hf with --weights is a usage error")

if failures:
    print(f"{len(failures)} check(s) failed")
    sys.exit(1)
print("all checks passed")
