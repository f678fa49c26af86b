#!/usr/bin/env python3
"""Builds and runs a small program against moe the way a user's project would, outside moe's build.

usage: run.py pkgconfig|cmake|subproject --build-dir BUILD --source-root ROOT [options]

  pkgconfig   installs BUILD into a temporary DESTDIR (`meson install --no-rebuild --tags devel`),
              compiles app.cpp with `c++ $(pkg-config --cflags --libs moe)` and runs it; then
              compiles and links a line against each of moe-cuda, moe-mpi, moe-nccl the
              install has (--components).
  cmake       the same install; tests/consumers/cmake with find_package(moe MAJOR.MINOR REQUIRED
              COMPONENTS <--components>) and moe::moe, built and run; the next release series
              and an unknown component must each fail to configure, with the reason.
  subproject  tests/consumers/subproject with subprojects/moe a link to ROOT, moe's tests,
              examples, benchmarks and CUDA off; builds the program only and runs it.

Everything happens in a fresh temporary directory, deleted afterwards (--keep keeps it). Each
command is printed before it runs; on a failure its output is printed and the exit status is 1.
"""
import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


class Failure(Exception):
    pass


def run(cmd, cwd=None, env=None, expect_failure=False):
    """Runs cmd, printing it; returns its output (stdout and stderr together)."""
    cmd = [str(c) for c in cmd]
    print("+ " + shlex.join(cmd), flush=True)
    start = time.monotonic()
    result = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(f"  ({time.monotonic() - start:.1f} s, exit status {result.returncode})", flush=True)
    if (result.returncode != 0) != expect_failure:
        print(result.stdout[-20000:])
        raise Failure(f"{cmd[0]} {'succeeded, but it must fail' if expect_failure else 'failed'}")
    return result.stdout


def introspect(args, what):
    """What `meson introspect --<what>` prints, from the file the build directory keeps."""
    with open(args.build_dir / "meson-info" / f"intro-{what}.json", encoding="utf-8") as f:
        return json.load(f)


def install(args, tmp):
    """Installs the headers, pkg-config files and CMake package into tmp/destdir; returns the
    installed prefix and the build's options."""
    options = {o["name"]: o["value"] for o in introspect(args, "buildoptions")}
    destdir = tmp / "destdir"
    # --no-rebuild: this runs inside `meson test`, after the build; devel: what a consumer
    # needs, not the tools (which would have to be built).
    run(args.meson + ["install", "-C", args.build_dir, "--no-rebuild", "--quiet", "--tags", "devel",
                      "--destdir", destdir])
    prefix = destdir / options["prefix"].lstrip("/")
    if not (prefix / options["includedir"] / "moe" / "moe.hpp").is_file():
        raise Failure(f"no moe/moe.hpp under {prefix / options['includedir']} after the install")
    return prefix, options


def compile_cmd(args):
    # -O0: the consumer tests check that a program builds and runs, not how fast.
    return args.cxx + ["-std=c++20", "-O0"]


def check_pkgconfig(args, tmp):
    prefix, options = install(args, tmp)
    installed = prefix / options["libdir"] / "pkgconfig"
    if not (installed / "moe.pc").is_file():
        raise Failure(f"moe.pc is not in {installed}")
    # The files name the configured prefix; point them at where this install really is, as a
    # packager's relocation would (pkg-config's --define-prefix assumes <prefix>/lib/pkgconfig,
    # not Debian's lib/<triplet>/pkgconfig).
    pcdir = tmp / "pkgconfig"
    pcdir.mkdir()
    for pc in sorted(installed.glob("moe*.pc")):
        lines = pc.read_text(encoding="utf-8").splitlines()
        lines = [f"prefix={prefix}" if line.startswith("prefix=") else line for line in lines]
        (pcdir / pc.name).write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"  {pc.name}: prefix={prefix}")
    env = dict(os.environ)
    env["PKG_CONFIG_PATH"] = os.pathsep.join(p for p in [str(pcdir), env.get("PKG_CONFIG_PATH", "")] if p)

    expected = set(args.components)
    present = {c for c in ("cuda", "mpi", "nccl") if (pcdir / f"moe-{c}.pc").is_file()}
    if present != expected:
        raise Failure(f"installed pkg-config files for {sorted(present)}, expected {sorted(expected)}")

    flags = run([args.pkg_config, "--cflags", "--libs", "moe"], env=env)
    if f"-I{prefix / options['includedir']}" not in flags:
        raise Failure(f"`pkg-config --cflags moe` does not name the installed headers: {flags}")
    app = tmp / "app"
    run(compile_cmd(args) + [HERE / "app.cpp", "-o", app] + shlex.split(flags))
    print(run([app]), end="")

    # Each component's flags: a line that needs its headers and libraries compiles and links.
    probes = {
        "cuda": "#include <thrust/version.h>\n#include <cublas_v2.h>\n#include <cuda_runtime.h>\n"
                "int main() { int v = 0; cudaRuntimeGetVersion(&v); cublasGetProperty(MAJOR_VERSION, &v);\n"
                "  return THRUST_VERSION > 0 ? 0 : 1; }\n",
        # The communicators' headers, with calls that need every library they link (not run).
        "mpi": "#include <moe/comm/mpi.hpp>\nint main(int argc, char**) {\n"
               "  if (argc > 9) { moe::comm::Mpi c; c.barrier(); }\n  return 0; }\n",
        "nccl": "#include <moe/comm/nccl.hpp>\nint main(int argc, char**) {\n"
                "  if (argc > 9) { moe::comm::Nccl c(moe::comm::nccl_unique_id(), 0, 1); c.barrier(); }\n"
                "  return 0; }\n",
    }
    for component in sorted(expected):
        source = tmp / f"probe_{component}.cpp"
        source.write_text(probes[component], encoding="utf-8")
        flags = run([args.pkg_config, "--cflags", "--libs", f"moe-{component}"], env=env)
        run(compile_cmd(args) + [source, "-o", tmp / f"probe_{component}"] + shlex.split(flags))
    if "cuda" in expected:
        nvcc_flags = run([args.pkg_config, "--variable=nvcc_flags", "moe-cuda"], env=env).split()
        if "--extended-lambda" not in nvcc_flags:
            raise Failure(f"moe-cuda's nvcc_flags lack --extended-lambda: {nvcc_flags}")


def check_cmake(args, tmp):
    if not args.cmake:
        raise Failure("no cmake (--cmake)")
    prefix, _ = install(args, tmp)
    project = tmp / "project"
    project.mkdir()
    shutil.copy(HERE / "cmake" / "CMakeLists.txt", project)
    shutil.copy(HERE / "app.cpp", project)
    version = introspect(args, "projectinfo")["version"]
    major, minor = (int(v) for v in version.split(".")[:2])

    def configure(build, wanted, components, expect_failure=False):
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        return run([args.cmake, "-S", project, "-B", tmp / build, *generator,
                    f"-DCMAKE_PREFIX_PATH={prefix}", f"-DCMAKE_CXX_COMPILER={args.cxx[-1]}",
                    "-DCMAKE_BUILD_TYPE=", "-DCMAKE_CXX_FLAGS=-O0",
                    f"-DMOE_VERSION={wanted}", f"-DMOE_COMPONENTS={';'.join(components)}"],
                   expect_failure=expect_failure)

    out = configure("build", f"{major}.{minor}", args.components)
    if f"from {prefix}" not in out:
        raise Failure(f"find_package(moe) did not find the install at {prefix}")
    run([args.cmake, "--build", tmp / "build"])
    print(run([tmp / "build" / "app"]), end="")

    # A later release series is not this one, and a component that does not exist is refused
    # with its name, rather than ignored.
    newer = f"{major + 1}.0" if major > 0 else f"0.{minor + 1}"
    # (CMake wraps its messages: compared with the whitespace folded.)
    out = configure("build-newer", newer, [], expect_failure=True)
    if "compatible with requested version" not in " ".join(out.split()):
        print(out)
        raise Failure(f"find_package(moe {newer}) failed, but not for its version")
    out = configure("build-unknown", f"{major}.{minor}", ["warp_drive"], expect_failure=True)
    if "component warp_drive: no such component" not in " ".join(out.split()):
        print(out)
        raise Failure("an unknown component failed without saying so")


def check_subproject(args, tmp):
    project = tmp / "project"
    (project / "subprojects").mkdir(parents=True)
    shutil.copy(HERE / "subproject" / "meson.build", project)
    shutil.copy(HERE / "app.cpp", project)
    os.symlink(args.source_root, project / "subprojects" / "moe")
    build = tmp / "build"
    # --force-fallback-for: the subproject even where moe is installed; plain: -O0, no -g.
    run(args.meson + ["setup", build, project, "--force-fallback-for=moe", "--buildtype=plain",
                      "-Dmoe:tests=false", "-Dmoe:examples=false", "-Dmoe:bench=false",
                      "-Dmoe:with_cuda=disabled", "-Dmoe:tools=false"])
    # The program only: the subproject's other targets (its tools) are not what is checked.
    run(args.meson + ["compile", "-C", build, "app"])
    print(run([build / "app"]), end="")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["pkgconfig", "cmake", "subproject"])
    parser.add_argument("--build-dir", required=True, type=Path, help="moe's configured (and built) build directory")
    parser.add_argument("--source-root", required=True, type=Path, help="moe's source tree")
    parser.add_argument("--meson", default="meson", help="the meson command (split like a shell would)")
    parser.add_argument("--cxx", action="append", help="the C++ compiler command, one word per use (default: c++)")
    parser.add_argument("--cmake", default=shutil.which("cmake"))
    parser.add_argument("--pkg-config", default="pkg-config")
    parser.add_argument("--components", default="", help="comma-separated: the optional parts the install has")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    args.meson = shlex.split(args.meson)
    args.cxx = args.cxx or ["c++"]
    args.components = [c for c in args.components.split(",") if c]
    args.build_dir = args.build_dir.resolve()
    args.source_root = args.source_root.resolve()

    start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f"moe-consumer-{args.mode}-"))
    try:
        {"pkgconfig": check_pkgconfig, "cmake": check_cmake, "subproject": check_subproject}[args.mode](args, tmp)
    except Failure as e:
        print(f"consumer {args.mode}: FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"consumer {args.mode}: ok in {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
