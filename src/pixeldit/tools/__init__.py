"""Research tooling beside the library: nothing in :mod:`pixeldit` imports this package.

``gemm_floor``: list every matrix product of a traced program and time each alone
(``pixeldit bench --gemm-floor``).
"""
