"""The benchmark: flashnumba's kernels next to PyTorch's attention on one CUDA GPU.

    run        ``flashnumba bench``: validate, then time (its docstring says how)
    impls      each implementation behind one interface: every registry version, the naive
               baseline, PyTorch's SDPA backends
    cases      the shapes;  check  the verdicts against float64;  timing  CUDA events
    report     results.json, the plots and the closing table
    calls      ``flashnumba bench --calls``: the public calls beside their kernels and SDPA
    breakdown  ``flashnumba bench --calls --breakdown``: a small call's host time, layer by layer
    sim        ``flashnumba bench --sim``: a correctness pass on the simulator, not a benchmark
    profile    one launch of each fast kernel, for ncu
"""
