"""Build script. The native extension soap_kernels._C is optional (see csrc/)."""

from setuptools import setup

setup()
