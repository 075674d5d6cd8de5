#!/usr/bin/env python3
"""Build the in-process multi-rank drivers (tests/emulator/*_driver.cpp) for the emulated device.

    python scripts/emu_build.py [--variant plain|address|thread] [--out DIR]

Drivers: intranode_driver (layout + intranode kernels over IPC buffers), low_latency_driver
(low-latency kernels over the emulated NVSHMEM) and internode_driver (layout + internode kernels
over the emulated NVSHMEM, ranks on emulated nodes), all in build/emu-check/<variant>/, sharing
the objects of the emulated device. Variants:
  plain    g++ -O2
  address  g++ -O2 -fsanitize=address,undefined -fno-sanitize-recover=undefined
  thread   g++ -O2 with libtsan: every file -fsanitize=thread except csrc/emulator/scheduler.cpp, which
           switches fiber stacks under TSan's feet and tells TSan about fibers and barriers itself
           (-DEP_EMU_TSAN), exactly as setup.py builds ep_comm._C_emu (emulator_flags).

The flags mirror setup.py's emulator_flags() (setup.py cannot be imported: it calls setup()).
A ninja file per variant recompiles only what changed. scripts/emu_mutants.py reuses this module to
build a driver from a mutated copy of csrc/, recompiling only the objects that depend on the mutated
file and linking them with this build's other objects.

CXX overrides the compiler (default g++: clang-19's TSan runtime tracks only 256 threads' worth of
fibers and misses races, see ../shared/EMULATOR.md).
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from typing import Dict, List, Optional, Sequence, Set, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("plain", "address", "thread")
# driver -> (its source, what it links from csrc/: the kernels it calls, their runtime, the emulated device)
DRIVERS: Dict[str, Tuple[str, List[str]]] = {
    "intranode": ("tests/emulator/intranode_driver.cpp",
                  ["kernels/layout.cu", "kernels/intranode.cu", "runtime/ipc_buffer.cpp",
                   "emulator/runtime.cpp", "emulator/scheduler.cpp"]),
    "low_latency": ("tests/emulator/low_latency_driver.cpp",
                    ["kernels/low_latency.cu", "runtime/nvshmem_runtime.cpp",
                     "emulator/runtime.cpp", "emulator/scheduler.cpp", "emulator/nvshmem.cpp"]),
    "internode": ("tests/emulator/internode_driver.cpp",
                  # low_latency.cu only because nvshmem_runtime.cpp also holds LowLatencyRuntime
                  ["kernels/layout.cu", "kernels/internode.cu", "runtime/internode_runtime.cpp",
                   "runtime/nvshmem_runtime.cpp", "kernels/low_latency.cu", "emulator/runtime.cpp",
                   "emulator/scheduler.cpp", "emulator/nvshmem.cpp"]),
}
SCHEDULER = "emulator/scheduler.cpp"  # never TSan-instrumented


def default_build_dir(variant: str) -> str:
    return os.path.join(ROOT, "build", "emu-check", variant)


def compiler() -> str:
    return os.environ.get("CXX", "g++")


def variant_flags(variant: str, csrc: str) -> tuple[List[str], List[str], List[str]]:
    """(flags for every source, extra flags for all but the scheduler, link flags)."""
    flags = ["-std=c++17", "-Wall", "-Wno-sign-compare", "-Wno-unknown-pragmas", "-fno-strict-aliasing", "-DEP_COMM_EMULATOR",
             "-O2", "-g1", "-fno-omit-frame-pointer",
             f"-I{os.path.join(csrc, 'emulator', 'include')}", f"-I{csrc}"]
    instrumented: List[str] = []
    link: List[str] = []
    if variant == "address":
        flags += ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
        link += ["-fsanitize=address,undefined"]
    elif variant == "thread":
        # -Wno-tsan: g++ warns that TSan ignores the standalone fences of ptx.cuh; known and documented
        # (../shared/EMULATOR.md, "What it cannot catch"): the kernels' ordering is checked through
        # their acquire loads and release stores.
        flags += ["-DEP_EMU_TSAN"] + (["-Wno-tsan"] if "clang" not in os.path.basename(compiler()) else [])
        instrumented += ["-fsanitize=thread"]
        link += ["-fsanitize=thread"]
    elif variant != "plain":
        raise SystemExit(f"unknown variant {variant!r}: expected one of {', '.join(VARIANTS)}")
    return flags, instrumented, link + ["-lpthread"]


def _q(path: str) -> str:
    """A path for a ninja file."""
    return path.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def object_path(build_dir: str, source: str, root: str = ROOT) -> str:
    """build_dir/obj/<source relative to root>.o"""
    rel = os.path.relpath(os.path.abspath(source), root)
    if rel.startswith(".."):
        raise SystemExit(f"{source} is not under {root}")
    return os.path.join(os.path.abspath(build_dir), "obj", rel + ".o")


def write_ninja(build_dir: str, variant: str, csrc: str,
                drivers: Dict[str, Tuple[Sequence[str], Sequence[str]]]) -> str:
    """A ninja file that builds build_dir/<driver>_driver for each driver in `drivers`, from
    (sources to compile: absolute paths, under the directory that holds `csrc` or under this
    checkout; prebuilt objects to link with them). A source several drivers use is compiled once.
    Written only when it changed."""
    build_dir = os.path.abspath(build_dir)
    src_root = os.path.dirname(os.path.abspath(csrc))
    flags, instrumented, link = variant_flags(variant, csrc)
    lines = [
        "# Generated by scripts/emu_build.py.",
        "ninja_required_version = 1.3",
        f"builddir = {_q(build_dir)}",
        f"cxx = {compiler()}",
        f"flags = {' '.join(shlex.quote(f) for f in flags)}",
        f"instrumented = {' '.join(instrumented)}",
        f"ldflags = {' '.join(link)}",
        "",
        "rule cxx",
        "  command = $cxx -x c++ $flags $extra -MMD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = CXX ($variant) $in",
        "",
        "rule link",
        "  command = $cxx $in -o $out $ldflags",
        "  description = LINK $out",
        "",
    ]
    compiled: Set[str] = set()
    targets = []
    for driver, (compile_sources, prebuilt_objects) in drivers.items():
        objects = []
        for src in compile_sources:
            inside = not os.path.relpath(os.path.abspath(src), src_root).startswith("..")
            obj = object_path(build_dir, src, src_root if inside else ROOT)
            objects.append(obj)
            if obj in compiled:
                continue
            compiled.add(obj)
            is_scheduler = os.path.normpath(src).endswith(os.path.normpath(SCHEDULER))
            lines.append(f"build {_q(obj)}: cxx {_q(src)}")
            lines.append(f"  extra = {'' if is_scheduler else '$instrumented'}")
            lines.append(f"  variant = {variant}")
        objects += list(prebuilt_objects)
        target = driver_path(build_dir, driver)
        targets.append(target)
        lines.append(f"build {_q(target)}: link " + " ".join(_q(o) for o in objects))
    lines.append("default " + " ".join(_q(t) for t in targets))
    text = "\n".join(lines) + "\n"
    os.makedirs(build_dir, exist_ok=True)
    path = os.path.join(build_dir, "build.ninja")
    old = open(path).read() if os.path.exists(path) else None
    if old != text:
        with open(path, "w") as f:
            f.write(text)
    return path


def run_ninja(build_dir: str, quiet: bool = False) -> None:
    ninja = shutil.which("ninja")
    if ninja is None:
        raise SystemExit("ninja is not on PATH (pip install ninja)")
    jobs = str(os.cpu_count() or 2)
    result = subprocess.run([ninja, "-C", build_dir, "-j", jobs], capture_output=quiet, text=True)
    if result.returncode != 0:
        if quiet:
            sys.stderr.write(result.stdout + result.stderr)
        raise subprocess.CalledProcessError(result.returncode, "ninja")


def driver_path(build_dir: str, driver: str) -> str:
    return os.path.join(os.path.abspath(build_dir), f"{driver}_driver")


def driver_sources(csrc: str, driver: str) -> List[str]:
    source, linked = DRIVERS[driver]
    return [os.path.join(ROOT, source)] + [os.path.join(csrc, s) for s in linked]


def all_sources(csrc: str) -> List[str]:
    return list(dict.fromkeys(src for d in DRIVERS for src in driver_sources(csrc, d)))


def build(variant: str, build_dir: Optional[str] = None, quiet: bool = False) -> str:
    """Builds every driver from this checkout's csrc/; returns the build directory."""
    build_dir = os.path.abspath(build_dir or default_build_dir(variant))
    csrc = os.path.join(ROOT, "csrc")
    write_ninja(build_dir, variant, csrc, {d: (driver_sources(csrc, d), []) for d in DRIVERS})
    run_ninja(build_dir, quiet=quiet)
    return build_dir


def dependencies(build_dir: str) -> Dict[str, Set[str]]:
    """source (absolute) -> every file it was compiled from (itself and its headers, absolute),
    from ninja's deps log of a finished build."""
    build_dir = os.path.abspath(build_dir)
    out = subprocess.run([shutil.which("ninja") or "ninja", "-C", build_dir, "-t", "deps"], capture_output=True,
                         text=True, check=True).stdout
    deps: Dict[str, Set[str]] = {}
    current: Optional[Set[str]] = None
    for line in out.splitlines():
        if line and not line.startswith(" "):
            current = set()
            deps[line.split(":")[0]] = current  # the object
        elif line.strip() and current is not None:
            current.add(os.path.normpath(os.path.join(build_dir, line.strip())) if not os.path.isabs(line.strip())
                        else os.path.normpath(line.strip()))
    by_source: Dict[str, Set[str]] = {}
    csrc = os.path.join(ROOT, "csrc")
    for src in all_sources(csrc):
        obj = object_path(build_dir, src)
        key = next((k for k in deps if os.path.normpath(os.path.join(build_dir, k) if not os.path.isabs(k) else k)
                    == os.path.normpath(obj)), None)
        by_source[src] = (deps[key] if key is not None else set()) | {os.path.normpath(src)}
    return by_source


def build_from_copy(variant: str, base_dir: str, copy_csrc: str, changed: Sequence[str], build_dir: str,
                    driver: str, quiet: bool = True) -> str:
    """Builds `driver` with sources from `copy_csrc` (a copy of csrc/): the objects that depend on
    any of `changed` (paths relative to csrc/) are recompiled from the copy, the others are taken
    from the finished build in base_dir. Returns the driver's path."""
    csrc = os.path.join(ROOT, "csrc")
    deps = dependencies(base_dir)
    changed_abs = {os.path.normpath(os.path.join(csrc, c)) for c in changed}
    compile_sources, prebuilt = [], []
    for src in driver_sources(csrc, driver):
        if deps[src] & changed_abs:
            rel = os.path.relpath(src, csrc)
            compile_sources.append(os.path.join(copy_csrc, rel) if not rel.startswith("..") else src)
        else:
            prebuilt.append(object_path(base_dir, src))
    if not compile_sources:
        raise SystemExit(f"no source of {driver}_driver depends on {', '.join(changed)}")
    write_ninja(build_dir, variant, copy_csrc, {driver: (compile_sources, prebuilt)})
    run_ninja(build_dir, quiet=quiet)
    return driver_path(build_dir, driver)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=VARIANTS, action="append",
                        help="variant(s) to build (default: all three)")
    parser.add_argument("--out", help="build directory (one variant only; default build/emu-check/<variant>)")
    args = parser.parse_args(argv)
    variants = args.variant or list(VARIANTS)
    if args.out and len(variants) != 1:
        parser.error("--out needs exactly one --variant")
    for v in variants:
        build_dir = build(v, args.out)
        for d in DRIVERS:
            print(driver_path(build_dir, d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
