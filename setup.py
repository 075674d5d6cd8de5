"""Build ep_comm: a pure-Python package plus two pybind11 extensions.

``ep_comm._C`` is compiled with nvcc (``csrc/**/*.cu``) and the host C++ compiler
(``csrc/**/*.cpp``) through a generated ninja file, and linked against the CUDA
runtime (static) and NVSHMEM from the ``nvidia-nvshmem-cu{major}`` wheel. It never
links libtorch: torch.utils.cpp_extension needs a CUDA build of torch and couples
us to torch's ABI.

``ep_comm._C_emu`` is the emulated device: the same kernel sources compiled as host
C++ with ``csrc/emulator`` (CPU threads, host memory). It needs only a C++ compiler
and is built on every machine, with or without CUDA; its build failing fails the install.

Environment knobs:
  EP_COMM_NO_CUDA=1         build the pure-Python package only (no kernels)
  EP_COMM_CUDA_ARCHS="90"   ';', ',' or ' ' separated: 90, 90a, 100a, 90+PTX ...
  EP_COMM_MAX_JOBS=N        parallel compile jobs (else MAX_JOBS, else nproc)
  EP_COMM_DEBUG=1           -O0 -g (host) and -G (device)
  EP_COMM_NVCC_FLAGS=...    extra nvcc flags, EP_COMM_CXX_FLAGS=... extra host flags
  CUDA_HOME / CUDA_PATH     toolkit root (else found from nvcc on PATH)
  NVSHMEM_HOME              NVSHMEM root with include/ and lib/ (else the pip wheel)
  CXX, CUDAHOSTCXX          host compiler for .cpp files / for nvcc
  EP_COMM_NO_EMULATOR=1     do not build ep_comm._C_emu
  EP_COMM_EMU_SANITIZE=...  build ep_comm._C_emu with sanitizers: "address" (address +
                            undefined) or "thread"; load it with the sanitizer's runtime
                            preloaded (scripts/emu_sanitize.sh shows how)
"""

from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "install", "develop"}


def read_version() -> str:
    with open(os.path.join(ROOT, "ep_comm", "version.py")) as f:
        match = re.search(r'__version__\s*=\s*["\']([^"\']+)["\']', f.read())
    if match is None:
        raise RuntimeError("ep_comm/version.py has no __version__")
    return match.group(1)


VERSION = read_version()


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


# ---------------------------------------------------------------------------------------
# CUDA toolkit
# ---------------------------------------------------------------------------------------

def find_lib_dir(root: str) -> str | None:
    """The folder of the toolkit that holds libcudart_static.a."""
    for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
        if os.path.isfile(os.path.join(root, sub, "libcudart_static.a")):
            return os.path.join(root, sub)
    return None


def is_toolkit(root: str | None) -> bool:
    return bool(root) and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")) \
        and os.path.isfile(os.path.join(root, "bin", "nvcc")) and find_lib_dir(root) is not None


def toolkit_roots_from_nvcc(nvcc: str) -> list[str]:
    """Candidate roots for an nvcc on PATH, which may be a symlink or a wrapper script."""
    roots = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    # nvcc itself says where it lives (works through any wrapper): "#$ _HERE_=/x/bin".
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-E", os.devnull],
                             capture_output=True, text=True, timeout=60)
        for line in (out.stdout + out.stderr).splitlines():
            m = re.match(r"#\$ _HERE_=(.+)$", line.strip())
            if m:
                roots.append(os.path.dirname(os.path.realpath(m.group(1).strip())))
    except (OSError, subprocess.SubprocessError):
        pass
    # A small wrapper script: look for an absolute path to .../bin/nvcc inside it.
    try:
        if os.path.getsize(nvcc) < 64 * 1024:
            with open(nvcc, "rb") as f:
                text = f.read().decode("utf-8", "ignore")
            for m in re.finditer(r"(/[^\s'\"]+)/bin/nvcc\b", text):
                roots.append(m.group(1))
    except OSError:
        pass
    return roots


def find_cuda_home() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root:
            if is_toolkit(root):
                return os.path.realpath(root)
            print(f"ep_comm: ignoring {var}={root}: no bin/nvcc, include/cuda_runtime.h and "
                  "libcudart_static.a there", file=sys.stderr)
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates += toolkit_roots_from_nvcc(nvcc)
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in candidates:
        if is_toolkit(root):
            return os.path.realpath(root)
    return None


def nvcc_version(cuda_home: str) -> tuple[int, int]:
    out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                         capture_output=True, text=True, check=True).stdout
    m = re.search(r"release (\d+)\.(\d+)", out)
    if m is None:
        raise RuntimeError(f"cannot parse `nvcc --version` output:\n{out}")
    return int(m.group(1)), int(m.group(2))


# ---------------------------------------------------------------------------------------
# NVSHMEM
# ---------------------------------------------------------------------------------------

def is_nvshmem(root: str) -> bool:
    return os.path.isfile(os.path.join(root, "include", "nvshmem.h")) \
        and os.path.isfile(os.path.join(root, "lib", "libnvshmem_host.so.3")) \
        and os.path.isfile(os.path.join(root, "lib", "libnvshmem_device.a"))


def installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def find_nvshmem(cuda_major: int) -> str:
    root = os.environ.get("NVSHMEM_HOME")
    if root:
        if not is_nvshmem(root):
            raise RuntimeError(f"NVSHMEM_HOME={root} lacks include/nvshmem.h, "
                               "lib/libnvshmem_host.so.3 or lib/libnvshmem_device.a")
        return os.path.realpath(root)
    wanted = f"nvidia-nvshmem-cu{cuda_major}"
    if installed_version(wanted) is None:
        # cu12 and cu13 wheels share one folder: refuse the wrong one instead of failing
        # later with obscure link errors.
        others = [d for d in ("nvidia-nvshmem-cu12", "nvidia-nvshmem-cu13")
                  if d != wanted and installed_version(d)]
        hint = f" (found {others[0]}, which is for another CUDA major version)" if others else ""
        raise RuntimeError(
            f"ep_comm: CUDA {cuda_major} toolkit found but {wanted} is not installed{hint}. "
            f"Run `pip install {wanted}` (then build with --no-build-isolation), point "
            "NVSHMEM_HOME at an NVSHMEM install, or set EP_COMM_NO_CUDA=1 to build without kernels.")
    for entry in sys.path:
        root = os.path.join(entry or os.getcwd(), "nvidia", "nvshmem")
        if is_nvshmem(root):
            return os.path.realpath(root)
    raise RuntimeError(f"{wanted} is installed but nvidia/nvshmem/ was not found on sys.path")


def nvshmem_header_version(root: str) -> tuple[int, int, int]:
    parts = []
    with open(os.path.join(root, "include", "non_abi", "nvshmem_version.h")) as f:
        text = f.read()
    for key in ("MAJOR", "MINOR", "PATCH"):
        m = re.search(rf"#define NVSHMEM_VENDOR_{key}_VERSION (\d+)", text)
        parts.append(int(m.group(1)) if m else 0)
    return parts[0], parts[1], parts[2]


# ---------------------------------------------------------------------------------------
# Configuration decided once, at import, because install_requires depends on it
# ---------------------------------------------------------------------------------------

class CudaConfig:
    def __init__(self, cuda_home: str, nvshmem_home: str):
        self.cuda_home = cuda_home
        self.cuda_lib = find_lib_dir(cuda_home)
        self.nvcc = os.path.join(cuda_home, "bin", "nvcc")
        self.cuda_version = nvcc_version(cuda_home)
        self.nvshmem_home = nvshmem_home
        self.nvshmem_version = nvshmem_header_version(nvshmem_home)
        self.archs = parse_archs(os.environ.get("EP_COMM_CUDA_ARCHS", "90"))


def parse_archs(spec: str) -> list[str]:
    archs = [a for a in re.split(r"[;,\s]+", spec.strip()) if a]
    for a in archs:
        if not re.fullmatch(r"\d+\.?\d[af]?(\+PTX)?", a):
            raise RuntimeError(f"EP_COMM_CUDA_ARCHS entry {a!r}: expected e.g. 90, 90a, 9.0, 90+PTX")
    return [a.replace(".", "") for a in archs] or ["90"]


def gencode_flags(archs: list[str]) -> list[str]:
    flags = []
    for a in archs:
        ptx = a.endswith("+PTX")
        a = a.removesuffix("+PTX")
        flags.append(f"-gencode=arch=compute_{a},code=sm_{a}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{a},code=compute_{a}")
    return flags


def detect() -> tuple[CudaConfig | None, str]:
    """(config, reason): config is None when the kernels cannot be built."""
    if env_flag("EP_COMM_NO_CUDA"):
        return None, "EP_COMM_NO_CUDA is set"
    cuda_home = find_cuda_home()
    if cuda_home is None:
        return None, "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    cuda_major = nvcc_version(cuda_home)[0]
    return CudaConfig(cuda_home, find_nvshmem(cuda_major)), ""


CUDA, NO_CUDA_REASON = detect()
if CUDA is None and BUILD_COMMANDS & set(sys.argv[1:]):
    print(f"ep_comm: {NO_CUDA_REASON}; building the pure-Python package only, "
          "GPU kernels (ep_comm._C) will be unavailable", file=sys.stderr)


# ---------------------------------------------------------------------------------------
# ninja
# ---------------------------------------------------------------------------------------

def rel_sources(ext: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT)
                  for p in glob.glob(os.path.join(ROOT, "csrc", "**", f"*{ext}"), recursive=True))


def ninja_path(path: str) -> str:
    """Escape a path for a ninja build line."""
    return path.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def ninja_flags(flags: list[str]) -> str:
    """Shell-quote flags, then escape '$' for ninja."""
    return " ".join(shlex.quote(f) for f in flags).replace("$", "$$")


def find_ninja() -> str:
    try:
        import ninja  # the PyPI package ships the binary
        exe = os.path.join(ninja.BIN_DIR, "ninja")
        if os.path.isfile(exe):
            return exe
    except ImportError:
        pass
    exe = shutil.which("ninja")
    if exe is None:
        raise RuntimeError("ninja not found: pip install ninja")
    return exe


def max_jobs() -> int:
    for var in ("EP_COMM_MAX_JOBS", "MAX_JOBS"):
        if os.environ.get(var, "").strip():
            return max(1, int(os.environ[var]))
    return os.cpu_count() or 1


def write_if_changed(path: str, text: str) -> None:
    if os.path.isfile(path):
        with open(path) as f:
            if f.read() == text:
                return
    with open(path, "w") as f:
        f.write(text)


def build_ninja_text(cfg: CudaConfig, build_dir: str, target: str) -> str:
    """build.ninja for ninja run from ROOT; all project paths are relative to ROOT."""
    import pybind11

    debug = env_flag("EP_COMM_DEBUG")
    nvshmem_inc = os.path.join(cfg.nvshmem_home, "include")
    nvshmem_lib = os.path.join(cfg.nvshmem_home, "lib")
    cuda_inc = os.path.join(cfg.cuda_home, "include")
    defines = [f'-DEP_COMM_VERSION="{VERSION}"',
               f'-DEP_COMM_CUDA_ARCHS="{";".join(cfg.archs)}"']
    gencode = gencode_flags(cfg.archs)

    nvcc_flags = (["-rdc=true", "-std=c++17", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr"]
                  # -lineinfo costs nothing at run time and lets ncu/compute-sanitizer name lines
                  + (["-O0", "-g", "-G"] if debug else ["-O3", "-lineinfo"])
                  + gencode + defines + ["-Icsrc", f"-I{nvshmem_inc}"]
                  + shlex.split(os.environ.get("EP_COMM_NVCC_FLAGS", "")))
    if os.environ.get("CUDAHOSTCXX"):
        nvcc_flags += ["-ccbin", os.environ["CUDAHOSTCXX"]]
    cccl_inc = os.path.join(cuda_inc, "cccl")  # nvshmem.h needs <cuda/atomic>; nvcc adds it itself
    cxx_flags = (["-std=c++17", "-fPIC", "-fvisibility=hidden", "-Wall"]
                 + (["-O0", "-g"] if debug else ["-O2"])
                 + defines
                 + ["-Icsrc", f"-I{sysconfig.get_path('include')}", f"-I{pybind11.get_include()}",
                    f"-I{cuda_inc}"]
                 + ([f"-I{cccl_inc}"] if os.path.isdir(cccl_inc) else [])
                 + [f"-I{nvshmem_inc}"]
                 + shlex.split(os.environ.get("EP_COMM_CXX_FLAGS", "")))
    # site-packages/ep_comm/_C.so -> site-packages/nvidia/nvshmem/lib; the absolute path
    # serves editable installs and NVSHMEM_HOME (not pip's temporary isolated build env).
    rpaths = ["$ORIGIN/../nvidia/nvshmem/lib"]
    if "pip-build-env-" not in nvshmem_lib:
        rpaths.append(nvshmem_lib)
    ldflags = (["-shared", f"-L{cfg.cuda_lib}", f"-L{nvshmem_lib}"]
               + [f"-Wl,-rpath,{p}" for p in rpaths]
               # our static cudart must not interpose on torch's libcudart
               + ["-Wl,--exclude-libs,libcudart_static.a"])
    # Order matters: the linker resolves left to right, and with --as-needed (the default on
    # Debian/Ubuntu) a shared library listed before anything references it is dropped. The
    # device archive's host half calls into libnvshmem_host, and both call cudart.
    libs = ["-l:libnvshmem_device.a", "-Wl,--no-as-needed", "-l:libnvshmem_host.so.3",
            "-Wl,--as-needed", "-lcudart_static", "-lpthread", "-ldl", "-lrt"]

    cu_srcs = rel_sources(".cu")
    cpp_srcs = [s for s in rel_sources(".cpp") if not s.startswith(EMULATOR_DIR)]
    obj = lambda src: os.path.join(build_dir, "obj", src + ".o")  # noqa: E731

    lines = [
        "# Generated by setup.py; rewritten on every build.",
        "ninja_required_version = 1.3",
        f"builddir = {ninja_path(build_dir)}",
        f"nvcc = {ninja_flags([cfg.nvcc])}",
        f"cxx = {ninja_flags([os.environ.get('CXX', 'c++')])}",
        f"nvcc_flags = {ninja_flags(nvcc_flags)}",
        f"cxx_flags = {ninja_flags(cxx_flags)}",
        f"gencode = {ninja_flags(gencode)}",
        f"nvshmem_lib = {ninja_flags([nvshmem_lib])}",
        f"ldflags = {ninja_flags(ldflags)}",
        f"libs = {ninja_flags(libs)}",
        "",
        "rule nvcc",
        "  command = $nvcc $nvcc_flags -MD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = NVCC $in",
        "",
        "rule cxx",
        "  command = $cxx $cxx_flags -MMD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = CXX $in",
        "",
        "rule dlink",
        "  command = $nvcc -dlink -Xcompiler -fPIC $gencode $in -o $out -L$nvshmem_lib -lnvshmem_device",
        "  description = DLINK $out",
        "",
        "rule link",
        "  command = $cxx $in -o $out $ldflags $libs",
        "  description = LINK $out",
        "",
    ]
    for src in cu_srcs:
        lines.append(f"build {ninja_path(obj(src))}: nvcc {ninja_path(src)}")
    for src in cpp_srcs:
        lines.append(f"build {ninja_path(obj(src))}: cxx {ninja_path(src)}")
    objects = [obj(s) for s in cu_srcs + cpp_srcs]
    if cu_srcs:  # nvcc -dlink refuses an empty input list
        dlink = os.path.join(build_dir, "obj", "dlink.o")
        lines.append(f"build {ninja_path(dlink)}: dlink "
                     + " ".join(ninja_path(obj(s)) for s in cu_srcs))
        objects.append(dlink)
    lines.append(f"build {ninja_path(target)}: link " + " ".join(ninja_path(o) for o in objects))
    lines.append(f"default {ninja_path(target)}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# The emulated device (ep_comm._C_emu)
# ---------------------------------------------------------------------------------------

EMULATOR_DIR = os.path.join("csrc", "emulator") + os.sep
# The kernel families the emulator runs, and the runtime and bindings they need.
EMULATOR_SOURCES = [
    "csrc/kernels/layout.cu", "csrc/kernels/intranode.cu", "csrc/kernels/low_latency.cu", "csrc/kernels/internode.cu",
    "csrc/runtime/device.cpp", "csrc/runtime/ipc_buffer.cpp", "csrc/runtime/nvshmem_runtime.cpp",
    "csrc/runtime/internode_runtime.cpp",
    "csrc/bindings/module.cpp", "csrc/bindings/runtime.cpp", "csrc/bindings/intranode.cpp",
    "csrc/bindings/low_latency.cpp", "csrc/bindings/internode.cpp",
    "csrc/emulator/bindings.cpp", "csrc/emulator/runtime.cpp", "csrc/emulator/scheduler.cpp",
    "csrc/emulator/nvshmem.cpp",
]
# The fiber scheduler switches stacks under TSan's feet: it is built without TSan
# instrumentation and tells TSan about fibers and barriers itself (EP_EMU_TSAN).
EMULATOR_SCHEDULER = "csrc/emulator/scheduler.cpp"


def emulator_sanitizer() -> str:
    value = os.environ.get("EP_COMM_EMU_SANITIZE", "").strip().lower()
    if value in ("", "0", "none", "off"):
        return ""
    if value in ("address", "asan", "address,undefined"):
        return "address"
    if value in ("thread", "tsan"):
        return "thread"
    raise RuntimeError(f"EP_COMM_EMU_SANITIZE={value!r}: expected 'address' (address+undefined) or 'thread'")


def emulator_flags(sanitizer: str) -> tuple[list[str], list[str], list[str]]:
    """(compile flags for every source, extra flags for all but the scheduler, link flags)."""
    debug = env_flag("EP_COMM_DEBUG")
    # as nvcc, no warnings for `threadIdx.x < an int` and `#pragma unroll`
    flags = (["-std=c++17", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wno-sign-compare", "-Wno-unknown-pragmas",
              # Kernels reinterpret vector registers (int4 as 8 bf16), as CUDA code customarily does
              # and nvcc honours; g++'s type-based aliasing would drop those stores.
              "-fno-strict-aliasing", "-DEP_COMM_EMULATOR",
              "-DEP_COMM_MODULE_NAME=_C_emu", f'-DEP_COMM_VERSION="{VERSION}"',
              '-DEP_COMM_CUDA_ARCHS="emulated"']
             + (["-O0", "-g"] if debug else ["-O2", "-g1"])
             # the emulator's CUDA headers first; no CUDA toolkit is involved
             + ["-Icsrc/emulator/include", "-Icsrc"])
    instrumented, link = [], []
    if sanitizer == "address":
        flags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
        link += ["-fsanitize=address,undefined"]
    elif sanitizer == "thread":
        flags += ["-DEP_EMU_TSAN", "-fno-omit-frame-pointer"]
        instrumented += ["-fsanitize=thread"]
        link += ["-fsanitize=thread"]
    return flags, instrumented, link


def build_emulator_ninja_text(build_dir: str, target: str) -> str:
    import pybind11

    sanitizer = emulator_sanitizer()
    flags, instrumented, link = emulator_flags(sanitizer)
    py_flags = [f"-I{sysconfig.get_path('include')}", f"-I{pybind11.get_include()}"]
    flags += py_flags + shlex.split(os.environ.get("EP_COMM_CXX_FLAGS", ""))
    obj = lambda src: os.path.join(build_dir, "obj", src + ".o")  # noqa: E731
    lines = [
        "# Generated by setup.py; rewritten on every build.",
        "ninja_required_version = 1.3",
        f"builddir = {ninja_path(build_dir)}",
        f"cxx = {ninja_flags([os.environ.get('CXX', 'c++')])}",
        f"flags = {ninja_flags(flags)}",
        f"instrumented = {ninja_flags(instrumented)}",
        f"ldflags = {ninja_flags(['-shared'] + link)}",
        "",
        "rule cxx",
        "  command = $cxx -x c++ $flags $extra -MMD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = CXX (emulated device) $in",
        "",
        "rule link",
        "  command = $cxx $in -o $out $ldflags -lpthread",
        "  description = LINK $out",
        "",
    ]
    for src in EMULATOR_SOURCES:
        lines.append(f"build {ninja_path(obj(src))}: cxx {ninja_path(src)}")
        lines.append(f"  extra = {'' if src == EMULATOR_SCHEDULER else '$instrumented'}")
    lines.append(f"build {ninja_path(target)}: link " + " ".join(ninja_path(obj(s)) for s in EMULATOR_SOURCES))
    lines.append(f"default {ninja_path(target)}")
    return "\n".join(lines) + "\n"


def check_undefined_symbols(so_path: str) -> None:
    """Fail the build, not the import, when _C.so needs a symbol nothing will provide.

    A shared object may leave symbols undefined; those of libpython are resolved by the
    interpreter and versioned ones (foo@GLIBC_2.2.5) by a NEEDED library. Anything else is a
    missing definition or a library listed in the wrong order.
    """
    nm = shutil.which("nm")
    if nm is None:
        return
    out = subprocess.run([nm, "-D", "--undefined-only", so_path], capture_output=True,
                         text=True).stdout
    missing = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "U" and "@" not in parts[1] \
                and not re.match(r"_?Py", parts[1]):
            missing.append(parts[1])
    if missing:
        names = subprocess.run(["c++filt"] + missing, capture_output=True, text=True).stdout.split("\n") \
            if shutil.which("c++filt") else missing
        raise RuntimeError(f"ep_comm: {os.path.basename(so_path)} has undefined symbols that no library provides "
                           "(a declared but undefined function, or a missing library):\n  "
                           + "\n  ".join(n for n in names if n))


class NinjaExtension(Extension):
    """Marker: built by NinjaBuildExt, not by setuptools' compiler classes."""


class EmulatorExtension(NinjaExtension):
    """ep_comm._C_emu: the kernels for the emulated device, host compiler only."""


class NinjaBuildExt(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, NinjaExtension):
            return super().build_extension(ext)
        if isinstance(ext, EmulatorExtension):
            return self.build_emulator(ext)
        cfg = CUDA
        key = [cfg.cuda_home, ".".join(map(str, cfg.nvshmem_version))]
        target = self.run_ninja(ext, "", key, "_C.so", lambda build_dir, target: build_ninja_text(cfg, build_dir, target),
                                f"with CUDA {cfg.cuda_version[0]}.{cfg.cuda_version[1]} ({cfg.cuda_home}), NVSHMEM "
                                f"{'.'.join(map(str, cfg.nvshmem_version))} ({cfg.nvshmem_home}), archs {','.join(cfg.archs)}",
                                "")
        self.finish(ext, target)

    def build_emulator(self, ext: Extension) -> None:
        sanitizer = emulator_sanitizer()
        cxx = os.environ.get("CXX", "c++")
        target = self.run_ninja(ext, "emu-", [cxx, sanitizer], "_C_emu.so", build_emulator_ninja_text,
                                f"(the emulated device) with {cxx}" + (f", sanitizer {sanitizer}" if sanitizer else ""),
                                ", or set EP_COMM_NO_EMULATOR=1")
        # Sanitizer runtimes leave libc's symbols unversioned: the check would misfire there.
        self.finish(ext, target, check_symbols=not sanitizer)

    @staticmethod
    def run_ninja(ext: Extension, prefix: str, key: list[str], library: str, ninja_text, what: str,
                  hint: str) -> str:
        """Writes and runs the ninja file of one extension; returns the built library's path."""
        # A stable folder in the source tree (not build_temp, which editable and isolated
        # builds make anew each time) keeps ninja's state, so rebuilds are incremental.
        # Not keyed on paths that change per build (isolated build envs live in temp dirs):
        # ninja notices changed command lines by itself.
        digest = hashlib.sha1("|".join([sysconfig.get_config_var("EXT_SUFFIX") or ""] + key).encode()).hexdigest()
        build_dir = os.path.join("build", "ninja", f"{prefix}{sys.implementation.cache_tag}-{digest[:8]}")
        os.makedirs(os.path.join(ROOT, build_dir), exist_ok=True)
        target = os.path.join(build_dir, library)
        ninja_file = os.path.join(build_dir, "build.ninja")
        write_if_changed(os.path.join(ROOT, ninja_file), ninja_text(build_dir, target))
        print(f"ep_comm: building {ext.name} {what}", flush=True)
        result = subprocess.run([find_ninja(), "-f", ninja_file, "-j", str(max_jobs())], cwd=ROOT)
        if result.returncode != 0:
            raise RuntimeError(f"ep_comm: building {ext.name} failed (compiler output above); "
                               f"rerun from {ROOT} with `ninja -f {ninja_file}`{hint}")
        return target

    def finish(self, ext: Extension, target: str, check_symbols: bool = True) -> None:
        if check_symbols:
            check_undefined_symbols(os.path.join(ROOT, target))
        dest = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        shutil.copyfile(os.path.join(ROOT, target), dest)


def extensions() -> list[Extension]:
    # sources/depends are listed so that an sdist carries csrc/; NinjaBuildExt compiles them.
    headers = []
    for ext in (".hpp", ".h", ".cuh"):
        headers += rel_sources(ext)
    exts = []
    if CUDA is not None:
        exts.append(NinjaExtension("ep_comm._C", sources=rel_sources(".cu") + rel_sources(".cpp"),
                                   depends=headers))
    if not env_flag("EP_COMM_NO_EMULATOR"):
        exts.append(EmulatorExtension("ep_comm._C_emu", sources=list(EMULATOR_SOURCES), depends=headers))
    return exts


def install_requires() -> list[str]:
    reqs = ["numpy", "torch>=2.1"]
    if CUDA is not None and not os.environ.get("NVSHMEM_HOME"):
        # The host library must be at least as new as the device library linked into _C.
        # No exact pin: CUDA builds of torch pin their own NVSHMEM and load it in-process.
        major, minor, _ = CUDA.nvshmem_version
        reqs.append(f"nvidia-nvshmem-cu{CUDA.cuda_version[0]}>={major}.{minor},<{major + 1}")
    return reqs


setup(
    name="ep_comm",
    version=VERSION,
    description="CUDA/NVSHMEM communication kernels for Mixture-of-Experts expert parallelism",
    python_requires=">=3.9",
    packages=find_packages(include=["ep_comm", "ep_comm.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": NinjaBuildExt},
    install_requires=install_requires(),
    extras_require={"test": ["pytest", "ml_dtypes"], "bench": ["matplotlib"]},
    zip_safe=False,
)
