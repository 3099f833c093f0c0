"""Build script: compiles the Cython data plane (shrimpio/_fastpath.pyx)."""
from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "shrimpio._fastpath",
        ["shrimpio/_fastpath.pyx"],
        include_dirs=["shrimpio"],
        depends=["shrimpio/_fastpath_core.h", "shrimpio/_fastpath_ctl.h", "shrimpio/_fastpath.pxd",
                 "shrimpio/_fastpath_poll.pxi", "shrimpio/_fastpath_stream.pxi",
                 "shrimpio/_fastpath_ctl.pxi", "shrimpio/_fastpath_handshake.pxi",
                 "shrimpio/_fastpath_transport.pxi", "shrimpio/_fastpath_ring.pxi",
                 "shrimpio/_fastpath_ring_layout.pxi", "shrimpio/_fastpath_ring_areas.pxi",
                 "shrimpio/_fastpath_ring_io.pxi", "shrimpio/_fastpath_ring_wait.pxi",
                 "shrimpio/_fastpath_exit.pxi", "shrimpio/_fastpath_exit.h"],
        extra_compile_args=["-O3", "-std=gnu11"],
    ),
    Extension(
        "shrimpio.msg._msgfast",
        ["shrimpio/msg/_msgfast.pyx"],
        include_dirs=["shrimpio", "."],
        depends=["shrimpio/_fastpath.pxd", "shrimpio/_fastpath_core.h"],
        extra_compile_args=["-O3", "-std=gnu11"],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    )
)
