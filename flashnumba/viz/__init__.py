"""Pictures of FlashAttention's schedule, each drawn from a NumPy mirror's trace or the tile geometry.

One module per kind of figure; each function returns a matplotlib Figure (or
Animation) with the data it drew attached as ``fig.flashnumba_data``, so tests
can check the picture against the mirror, not just that a file appeared.

    loop_order      the order tiles are computed: FA1 (outer j) beside FA2 (outer i, blocks in parallel)
    causal          which tiles the causal mask skips, for both diagonal alignments
    on_chip         what is in SRAM at step k, and the HBM traffic so far (PNG and GIF)
    warps           inside one block: FA1's split-K versus FA2's split-Q; FA2 backward's blocks
    online_softmax  the running max m_i and sum l_i of a few rows, step by step
    io              HBM traffic measured by the mirrors against the paper's formulas
    memory          extra memory: N x N scores versus O(N) statistics
    ring            ring attention over P ranks: who holds which K/V block when, contiguous beside zigzag

``flashnumba.figures`` writes them all to figures/.
"""
