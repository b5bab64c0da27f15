"""Builds the C++ CPU extension ``pykd._C``; installs ``kernels/`` as ``pykd.kernels`` and
``benchmarks/`` as ``pykd.benchmarks`` (so ``pykd bench`` works from any install).

``pykd/kernels`` and ``pykd/benchmarks`` are links to the top-level folders, which have no
``__init__.py``: with the repository root on ``sys.path`` (``python -m pytest`` there) they are at most
namespace portions, which never shadow an installed package of the same name (Hugging Face's
``kernels``, which transformers imports). A wheel holds copies of the files under ``pykd/``.

CUDA sources (``csrc/*.cu``) are compiled only when the installed torch is a CUDA build: an nvcc on a
CPU-only machine must not switch CUDA on.
"""

import glob
import hashlib
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def source_hash(paths):
    h = hashlib.sha256()
    for p in sorted(paths):
        with open(p, "rb") as f:
            h.update(os.path.basename(p).encode() + b"\0" + f.read())
    return h.hexdigest()[:16]


cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
cu = sorted(glob.glob(os.path.join("csrc", "*.cu"))) if torch.version.cuda else []
headers = sorted(glob.glob(os.path.join("csrc", "*.h")))
src_hash = source_hash([os.path.join(HERE, p) for p in cpp + cu + headers])

# The build records which torch and which sources it was made from; pykd checks both at import.
define = [
    ("PYKD_TORCH_VERSION", '"' + torch.__version__ + '"'),
    ("PYKD_SOURCE_HASH", '"' + src_hash + '"'),
]
cxx_flags = ["-O3", "-std=c++20", "-fno-math-errno", "-fno-trapping-math", "-Wno-psabi"]
if os.environ.get("PYKD_OPENMP", "1") == "1":
    cxx_flags.append("-fopenmp")
ext_cls = CUDAExtension if cu else CppExtension
ext = ext_cls(
    name="pykd._C",
    sources=cpp + cu,
    include_dirs=[os.path.join(HERE, "csrc")],
    define_macros=define,
    extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]} if cu else cxx_flags,
    extra_link_args=["-fopenmp"] if "-fopenmp" in cxx_flags else [],
)

setup(
    packages=["pykd", "pykd.nn", "pykd.integrations", "pykd.kernels", "pykd.benchmarks"],
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
