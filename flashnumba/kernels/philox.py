"""Philox4x32-10 and the dropout keep-bit of ``flashnumba.philox``, compiled as CUDA device functions.

The kernels call exactly the functions the reference's mask is built from
(``flashnumba.philox.keep_mask`` runs the same ``philox4x32`` on NumPy arrays),
so a kernel's dropout cannot drift from the mask the mirrors and the reference use.

    keep(seed, b, h, r, c, p) -> bool      element (r, c) of head h, batch b is kept (u >= p)
    kept(x, p) -> bool                     the same test on a word x already drawn
    dropout_word(seed, b, h, r, c) -> x     its 32-bit random word, as uint64
    philox_key(seed) -> (k0, k1)           the key: the seed's low and high 32-bit words
    philox4x32(c0, c1, c2, c3, k0, k1, rounds) -> (x0, x1, x2, x3)

Pass seed as an integer (int64 or uint64) and p as float64: a float32 p is a
different number from the host's float64 p and can flip elements at the edge.
Each call runs one full Philox4x32-10 (10 rounds, 2 multiplies each) for one
element; the 4 words it makes serve columns 4k .. 4k+3, so a kernel that needs
a whole group can call ``philox4x32`` once instead of ``dropout_word`` 4 times.

Unlike ``kernels.geometry``, these functions call each other (keep ->
kept, dropout_word -> philox_key, philox4x32 -> mulhilo32), and a device function may only call
device functions: the real compiler rejects a call to the plain Python one
(the simulator would not notice). So each is compiled from the same code with
its module namespace where the names it calls mean their device versions.
"""

import types

from numba import cuda

from flashnumba import philox


def _device(fn, callees):
    """fn's own code as a device function; names in `callees` resolve to those device functions."""
    namespace = dict(fn.__globals__)
    namespace.update(callees)
    same_code = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__)
    return cuda.jit(device=True)(same_code)


mulhilo32 = _device(philox.mulhilo32, {})
philox4x32 = _device(philox.philox4x32, {"mulhilo32": mulhilo32})
philox_key = _device(philox.philox_key, {})
dropout_word = _device(philox.dropout_word, {"philox4x32": philox4x32, "philox_key": philox_key})
kept = _device(philox.kept, {})
keep = _device(philox.keep, {"dropout_word": dropout_word, "kept": kept})
