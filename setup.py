"""The one compiled part: vit_hf.data._jpeg, region decoding of JPEGs with libjpeg-turbo (see vit_hf/data/_jpeg.c).

Optional: without a C compiler or libjpeg-turbo's headers (Debian: libjpeg62-turbo-dev) the install goes on
without it, and vit_hf.data.sources decodes whole JPEGs with Pillow instead (same crops, slower).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("vit_hf.data._jpeg", ["vit_hf/data/_jpeg.c"], libraries=["jpeg"], optional=True)])
