"""The one compiled part: the native front of HTTP/2 connections (src/osmo_router/h2/front.py).

`optional=True`: a machine without a C compiler or the Python headers installs the package without it,
and every message takes the Python path (the same behaviour, slower on small messages).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "osmo_router.h2._front",
            ["src/osmo_router/h2/_front.c"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ]
)
