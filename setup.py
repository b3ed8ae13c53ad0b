"""Build hook: compile every Cython source under ext/ (none yet is fine).

Kept in setup.py because pyproject metadata cannot express "cythonize whatever is
there". Each ext/NAME.pyx becomes the module sparsebench._ext.NAME, built with
OpenMP so kernels can take an explicit thread count.
"""
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent


def _extensions():
    sources = sorted((HERE / "ext").glob("*.pyx"))
    if not sources:
        return []
    from Cython.Build import cythonize
    from setuptools import Extension

    exts = [
        Extension(
            f"sparsebench._ext.{src.stem}",
            [str(src.relative_to(HERE))],
            # portable baseline flags; AVX2/FMA loops carry their own target attribute and are
            # chosen at run time, so one build runs on any x86-64 (and non-x86) machine
            extra_compile_args=["-O3", "-fopenmp"],
            extra_link_args=["-fopenmp"],
            libraries=["m"],
        )
        for src in sources
    ]
    return cythonize(exts, language_level=3, quiet=True)


setup(ext_modules=_extensions())
