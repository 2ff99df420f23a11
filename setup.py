"""Builds the optional native extension ``torchcompress._C`` from ``kernels/cpu/*.cpp``.

Everything else is in pyproject.toml. The extension is built only when its sources exist and
``TORCHCOMPRESS_BUILD_EXT=1`` is set; install with ``pip install --no-build-isolation .`` so the
build uses the installed torch instead of downloading another. Without it the pure-PyTorch
reference kernels run.
"""

import glob
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
sources = sorted(glob.glob(os.path.join("kernels", "cpu", "*.cpp")))
if sources and os.environ.get("TORCHCOMPRESS_BUILD_EXT") == "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules = [CppExtension("torchcompress._C", sources, extra_compile_args=["-O3", "-fopenmp"], extra_link_args=["-fopenmp"])]
    cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
