"""Build script. Package metadata lives in pyproject.toml; this file only adds the optional native
extension ``soap_kernels._C`` (sources in ``csrc/``, listed once in ``csrc/sources.txt``).

The CPU kernels are built whenever a C++ compiler is present; the CUDA kernels too when the
installed torch has CUDA (``torch.version.cuda``) and ``nvcc`` is found. Environment switches:

- ``SOAP_KERNELS_NO_EXT=1``: build no extension (a pure-PyTorch install).
- ``SOAP_KERNELS_NO_CUDA=1``: build the CPU kernels only.
- ``MAX_JOBS=N``: parallel compile jobs (torch's ninja build reads it).

A build that fails prints a warning that says why and the package installs without the extension
(a failed CUDA build is retried CPU-only first); ``soap_kernels._native.load_error()`` tells at run
time why the extension is not there.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

from setuptools import setup

ROOT = Path(__file__).resolve().parent
SOURCE_LIST = ROOT / "csrc" / "sources.txt"
EXTENSION_NAME = "soap_kernels._C"
# The per-file rule of csrc/sources.txt (CMakeLists.txt applies the same): *_avx2.cpp is the AVX2
# variant of the CPU kernels, picked at run time, so only that file may use these instructions.
AVX2_SUFFIX = "_avx2.cpp"
AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c"]


def _switch(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _warn(message: str) -> None:
    # pip shows a build's output only with -v or when the install fails; the run-time
    # soap_kernels._native.load_error() covers the quiet case.
    print(f"WARNING: soap_kernels: {message}", file=sys.stderr, flush=True)


def _read_sources() -> list[str]:
    """The source list shared with CMakeLists.txt: one repository-relative path a line, # comments."""
    sources = []
    for line in SOURCE_LIST.read_text().splitlines():
        entry = line.split("#", 1)[0].strip()
        if entry:
            sources.append(entry)
    return sources


def _cuda_unavailable_reason(torch: Any, cpp_extension: Any) -> str | None:
    """None when the CUDA kernels can be built, else why not."""
    if _switch("SOAP_KERNELS_NO_CUDA"):
        return "SOAP_KERNELS_NO_CUDA is set"
    if torch.version.cuda is None:
        return f"the installed torch {torch.__version__} has no CUDA"
    cuda_home = cpp_extension.CUDA_HOME
    nvcc = Path(cuda_home, "bin", "nvcc") if cuda_home else None
    if nvcc is None or not nvcc.exists():
        return "nvcc was not found (set CUDA_HOME)"
    return None


def _extension_setup() -> dict[str, Any]:
    """``ext_modules`` and ``cmdclass`` for setup(), or nothing when no extension is to be built."""
    if _switch("SOAP_KERNELS_NO_EXT"):
        print("soap_kernels: SOAP_KERNELS_NO_EXT is set; building no native extension", file=sys.stderr)
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as err:  # torch missing or broken: the pure-PyTorch package still installs
        _warn(f"cannot import torch ({type(err).__name__}: {err}); building no native extension")
        return {}

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        _warn(f"no C++ compiler ({compiler!r} not found; set CXX); building no native extension")
        return {}

    if not SOURCE_LIST.exists():  # e.g. an sdist made without csrc/ (see MANIFEST.in)
        _warn(f"{SOURCE_LIST} is missing; building no native extension")
        return {}
    sources = _read_sources()
    cpp_sources = [s for s in sources if not s.endswith(".cu")]
    cuda_sources = [s for s in sources if s.endswith(".cu")]
    cxx_flags = [
        "-O3",
        # The kernels place every fused multiply-add explicitly (to match torch's rounding);
        # the compiler must not add more.
        "-ffp-contract=off",
        "-fvisibility=hidden",
    ]
    link_flags: list[str] = []
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        # at::parallel_for is inline: compiled without OpenMP it silently runs on one thread.
        # The extension then shares the libgomp torch has loaded (same soname).
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")

    def common() -> dict[str, Any]:
        # Fresh lists per extension: torch's *Extension helpers extend them in place.
        return {
            "include_dirs": [str(ROOT / "csrc")],
            "define_macros": [("SOAP_KERNELS_PYTHON_MODULE", None)],
            "extra_link_args": list(link_flags),
        }

    cpu_extension = cpp_extension.CppExtension(
        EXTENSION_NAME, sources=cpp_sources, extra_compile_args={"cxx": list(cxx_flags)}, **common()
    )

    reason = _cuda_unavailable_reason(torch, cpp_extension)
    extension, fallback = cpu_extension, None
    if reason is None:
        try:
            # No --use_fast_math: sqrt and division must be IEEE-rounded like torch's kernels.
            extension = cpp_extension.CUDAExtension(
                EXTENSION_NAME,
                sources=cpp_sources + cuda_sources,
                extra_compile_args={"cxx": list(cxx_flags), "nvcc": ["-O3", "--fmad=true"]},
                **common(),
            )
            fallback = cpu_extension
        except Exception as err:  # e.g. CUDA libraries missing
            reason = f"setting up the CUDA build failed ({type(err).__name__}: {err})"
    if reason is not None:
        print(f"soap_kernels: building the CPU kernels only: {reason}", file=sys.stderr)

    class OptionalBuildExtension(cpp_extension.BuildExtension):
        """torch's BuildExtension (ninja), but a failure warns and installs the package without it."""

        def run(self) -> None:
            # build_ext.run replaces the compiler option with a compiler object, and setuptools
            # clears inplace while building (restoring it only on success): restore both to retry.
            compiler_option, inplace = self.compiler, self.inplace
            try:
                super().run()
                return
            except Exception as err:
                failure = err
            if fallback is not None:
                _warn(
                    f"the CUDA build of {EXTENSION_NAME} failed ({type(failure).__name__}: {failure}); "
                    "retrying with the CPU kernels only"
                )
                # Keep the Extension object (setuptools annotated it in finalize_options); take
                # the CPU-only sources, flags and libraries.
                for ext in self.extensions:
                    ext.__dict__.update({k: v for k, v in vars(fallback).items() if not k.startswith("_")})
                self.compiler, self.inplace = compiler_option, inplace
                try:
                    super().run()
                    return
                except Exception as err:
                    failure = err
            self.extensions = []
            _warn(
                f"building the native extension {EXTENSION_NAME} failed ({type(failure).__name__}: "
                f"{failure}); the package installs without it and uses its PyTorch kernels. "
                "Set SOAP_KERNELS_NO_EXT=1 to skip the build."
            )

        def build_extension(self, ext: Any) -> None:
            # torch's ninja build gives every source the same flags: compile the AVX2 variant
            # apart and link its object after all the others (csrc/cpu/adam_avx2.cpp says why).
            isa_sources = [s for s in ext.sources if s.endswith(AVX2_SUFFIX)]
            ext.sources = [s for s in ext.sources if not s.endswith(AVX2_SUFFIX)]
            if isa_sources and platform.machine().lower() in ("x86_64", "amd64"):
                args = ext.extra_compile_args
                cxx = list(args.get("cxx", [])) if isinstance(args, dict) else list(args)
                objects = self.compiler.compile(
                    isa_sources,
                    output_dir=self.build_temp,
                    macros=ext.define_macros,
                    include_dirs=ext.include_dirs,
                    debug=self.debug,
                    extra_postargs={"cxx": cxx + AVX2_FLAGS} if self.use_ninja else cxx + AVX2_FLAGS,
                    depends=ext.depends,
                )
                ext.extra_objects = [*(ext.extra_objects or []), *objects]
            super().build_extension(ext)

        def get_outputs(self) -> list[str]:
            # An editable install copies what get_outputs() names; after a failure that is nothing.
            return super().get_outputs() if self.extensions else []

    return {
        "ext_modules": [extension],
        "cmdclass": {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)},
    }


setup(**_extension_setup())
