"""Exact per-tensor encodings, the chooser, and the byte count the report calls "stored".

One module per encoding family (``dense``, ``irregular``: bitmask and CSR, ``gaps``: Golomb-
coded positions, ``kofn``, ``block``, ``rowblock``, ``unified``, ``quantized``) on a shared
``base``, and ``valuecoding`` (Huffman-coded byte planes of the stored values); ``registry`` names
them all, ``chooser`` picks the smallest, ``summary`` is the report's per-tensor record. The
index widths and minimums come from ``hwprune.hardware``.

Every encoding maps a tensor to an ``EncodedTensor``: named numpy arrays split into *payload*
(the kept values) and *index* (everything that says where they go: masks, pointers, positions,
sign bits, block states), plus a few JSON-able parameters. Decoding gives back the same dtype,
shape and raw bits (``-0.0`` and NaN payloads included): encodings work on raw bits, and
"nonzero" means "some bit set", so ``-0.0`` is a stored value. Tensors with NaN or inf (floats)
only take the dense encoding.

``-0.0`` is common in pruned weights (``w * mask`` gives it wherever w < 0), and storing each
one would hide a k-of-n or block pattern. So a floating tensor holding -0.0 is also tried as
the tensor with +0.0 there plus a *zero-signs* bit stream (index): one bit per zero element, in
flat order, ``ceil8(zeros)`` bytes, 1 where the zero is -0.0 (``meta["zero_signs"] = True``).
The chooser keeps whichever variant is smaller.

Notation for the byte formulas: N elements of e bytes, z of them nonzero; the *matrix* is the
im2col view ``(rows, cols) = (shape[0], N / shape[0])`` (``(1, N)`` below 2 dimensions);
``w(x)`` is the byte width of the smallest unsigned int holding ``x`` (1, 2, 4 or 8);
``ceil8(b) = ceil(b / 8)`` bytes for b bits (bit streams are packed, MSB first, no padding
except at the very end).

===========  =============================================  ===================================
encoding     payload bytes                                  index bytes
===========  =============================================  ===================================
dense        N·e                                            0
bitmask      z·e                                            ceil8(N)
csr          z·e                                            (rows+1)·w(z) + z·w(cols-1)
gaps         z·e                                            ceil8(Golomb bits of the gaps)
kofn         runs·k·e  (runs = N / n)                       ceil8(runs·ceil(log2 C(n,k)))
                                                            ["rank"], ceil8(runs·k·ceil(log2
                                                            n)) ["index"] or ceil8(ceil(runs/g)
                                                            ·ceil(g·log2 C(n,k))) ["coded"]
block        e·(real elements of kept tiles)                ceil8(tiles)
rowblock     e·Σ_r ceil(cols / b_r)                         ceil8(3·rows) + Σ_b ceil8(blocks of
                                                            size b · ceil(log2 b))
unified      e·(unified blocks + real elements of free      ceil8(2·blocks) + ceil8(real
             blocks)                                        elements of unified blocks) [signs]
quantized    ceil8(N·ceil(log2(2q+1))) + e  [codes, scale]  0
===========  =============================================  ===================================

* **kofn**: runs of n consecutive elements along dim 1 (the input channels; for a conv weight
  (K, C, R, S) the n consecutive channels at each (k, r, s): the group order of
  ``hwprune.structures.Element(axis=1)`` / ``KofN``) with at most k nonzeros each. Exactly k
  values are stored per run (a kept weight that happens to be zero is stored as a zero), so
  the position code is the fixed-width k-subset: its combinatorial rank (the information-
  theoretic minimum rounded up to whole bits per run) or k positions of ceil(log2 n) bits.
* **block**: bh x bw tiles of the matrix (row-major, as ``hwprune.structures.Block``); a tile is
  kept when any element is nonzero; ragged edge tiles store only their real elements.
* **rowblock**: block-max rows (BMWM, DARB): row r takes the largest b_r in
  ``hwprune.hardware.ROW_BLOCK_SIZES`` (<= cols) whose blocks of b_r consecutive weights hold
  at most one nonzero each; per block one value (zero for an empty block) and its position,
  grouped by size.
* **unified**: bh x bw blocks of the matrix (default 1 x b along rows); state 0 = all zero,
  1 = unified (every real element has the same magnitude bits; one magnitude in the tensor's
  dtype + one sign bit per element), 2 = free (stored dense). A block with zeros among
  equal-magnitude weights is free: three states are what ADMM weight unification produces.
* **quantized**: every element is an integer code in [-q, q] (q <= 127) times one scale, with
  ``code.to(dtype) * scale`` (in the dtype) giving back the exact bits; codes are stored
  offset by q in ceil(log2(2q+1)) bits each. Code 0 decodes to +0.0, so a tensor with -0.0
  is quantized only in the zero-signs variant.

* **quantized values** (``meta["qvalues"]``): when the whole tensor is quantized (as above,
  found once per tensor), every sparse encoding (bitmask, csr, kofn, block, unified) is also
  tried with each payload array stored as codes: ``ceil8(count·ceil(log2(2q+1)))`` bytes per
  array + one scale of e bytes, the index unchanged. DPP's 2:4 with 8-bit values is stored as
  k-of-n positions + codes of the kept weights only this way, where ``quantized`` stores a
  code for every weight.

``choose`` considers every applicable encoding (k-of-n for n in 2, 4, 8, 16 with k the largest
count of nonzeros in a run; blocks bxb, 1xb, bx1 for b in 2, 4, 8, 16; unified 1 x b; plus the
sizes a hint names) by its exact size in closed form (``Encoding.sizes``), keeps the smallest
total, ties to the simpler one, encodes only that one, and (by default) codes its values
(``valuecoding``).
``stored_bytes`` is the per-tensor line the report prints; the container stores exactly these
arrays, so a file's data section is the sum of the tensors' ``total_bytes``.
"""

from .base import ZERO_SIGNS, EncodedTensor, Encoding, TensorView
from .block import BLOCK_SIZES, BlockEncoding
from .chooser import Hints, choose, encodings_for, saved_encodings, small_vector_choice
from .dense import Dense
from .gaps import Gaps
from .irregular import CSR, Bitmask
from .kofn import KOFN_N, KofNEncoding
from .quantized import QUANT_MAX, QVALUES, Quantized
from .registry import ENCODINGS, decode, encode
from .rowblock import RowBlock
from .summary import stored_bytes, summarize
from .unified import UNIFIED_SIZES, Unified

__all__ = [
    "EncodedTensor",
    "Encoding",
    "ENCODINGS",
    "Hints",
    "encode",
    "decode",
    "encodings_for",
    "choose",
    "saved_encodings",
    "small_vector_choice",
    "stored_bytes",
    "summarize",
    "TensorView",
    "Dense",
    "Bitmask",
    "CSR",
    "Gaps",
    "KofNEncoding",
    "BlockEncoding",
    "RowBlock",
    "Unified",
    "Quantized",
    "KOFN_N",
    "BLOCK_SIZES",
    "UNIFIED_SIZES",
    "QUANT_MAX",
    "QVALUES",
    "ZERO_SIGNS",
]
