"""Tools around the kernels, none of them imported by the kernels or the public calls:

    resources    compiles every shipped kernel configuration with the real compiler (no GPU
                 needed) and reports registers, spills and shared memory  (flashnumba resources)
    accuracy     the accuracy table: every version in every storage dtype against float64
                 (flashnumba accuracy)
    selfcheck    every kernel once on awkward shapes, small enough for compute-sanitizer
                 (python -m flashnumba.tools.selfcheck)

The benchmark, a larger tool, is its own package, ``flashnumba.bench``.
"""
