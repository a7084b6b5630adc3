"""Hardware cost models: what a sparse pattern costs the hardware that stores and decodes it.

The one home of the formulas that the methods (DARB's decoding cost, ADMM's multiplications
saved), the storage encodings (position widths, block states, information-theoretic index
minimums) and the report (selection width of each stored encoding) must agree on, and of the
constants they share. Everything here works on the *im2col matrix* of a weight: ``(rows,
cols) = (shape[0], numel / shape[0])`` (one row below 2 dimensions); a Linear or an RNN
weight is already that matrix.

* **Index bits**: fixed-width codes (``ceil_log2``: the bits that tell ``x`` cases apart;
  ``kofn_rank_bits``: one k-of-n run's position code) and the information-theoretic minimum
  of each pattern (``irregular_min_bits``, ``kofn_min_bits``, ``block_min_bits``,
  ``row_block_min_bits``, ``unified_min_bits``), docs/storage.md.
* **Decoding**: ``decoding_cost`` (index bits and selection width per kept weight of the
  ``"csr"``, ``"block"``, ``"bmwm"`` and ``"darb"`` schemes, docs/darb.md) and
  ``stored_selection`` (the scheme that decodes each storage encoding).
* **Arithmetic**: ``multiplications_saved`` by unified and zero blocks (docs/admm.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError

__all__ = [
    "ROW_BLOCK_SIZES",
    "ZERO",
    "UNIFIED",
    "FREE",
    "BLOCK_STATES",
    "BLOCK_STATE_BITS",
    "SCHEMES",
    "ENCODING_SCHEMES",
    "ceil_log2",
    "log2_comb",
    "im2col_shape",
    "block_kept",
    "kofn_rank_bits",
    "irregular_min_bits",
    "kofn_min_bits",
    "block_min_bits",
    "row_block_min_bits",
    "unified_min_bits",
    "decoding_cost",
    "stored_selection",
    "multiplications_saved",
]

#: block sizes a row may take under block-max masking (DARB's default allowed set, and the
#: sizes the storage's ``rowblock`` encoding records per row)
ROW_BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64)

#: states of a block under weight unification (ADMM's projection, the ``unified`` encoding):
#: all zero; unified (one shared magnitude, signs free); free (every weight its own value)
ZERO, UNIFIED, FREE = 0, 1, 2
BLOCK_STATES = (ZERO, UNIFIED, FREE)
#: bits that store one block state
BLOCK_STATE_BITS = 2

#: the decoding schemes of ``decoding_cost``
SCHEMES = ("csr", "block", "bmwm", "darb")

#: the ``decoding_cost`` scheme that decodes each sparse storage encoding: irregular positions
#: (bitmask, CSR) select among a row's inputs; a k-of-n run is an n:k block-max selection, a
#: rowblock row a b_r:1 one; block and unified tiles select a bw-wide slice of the row per tile.
#: Encodings not listed (dense, quantized) store every element in place.
ENCODING_SCHEMES = {"bitmask": "csr", "csr": "csr", "kofn": "bmwm", "rowblock": "bmwm",
                    "block": "block", "unified": "block", "gaps": "csr"}


# -- index-bit arithmetic ------------------------------------------------------------------
def ceil_log2(x: int) -> int:
    """Exact ``ceil(log2(x))`` for a positive integer (0 for 1): the bits to tell x cases apart."""
    return (x - 1).bit_length()


def log2_comb(n: int, k: int) -> float:
    """``log2(C(n, k))`` without forming the (possibly huge) integer."""
    if not 0 <= k <= n:
        return 0.0
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def im2col_shape(shape: Sequence[int]) -> tuple[int, int]:
    """The im2col matrix of a weight of ``shape``: ``(shape[0], rest)`` for 2+ dimensions,
    else one row."""
    numel = math.prod(shape)
    if len(shape) >= 2:
        return int(shape[0]), numel // shape[0] if shape[0] else 0
    return 1, numel


def block_kept(cols: int, b: int, m: int = 1) -> int:
    """Weights block-max masking keeps in a row of ``cols`` with blocks of ``b`` (``m`` per
    block; a ragged last block of fewer than ``m`` weights keeps them all)."""
    return min(m, b) * (cols // b) + min(m, cols % b)


def kofn_rank_bits(n: int, k: int) -> int:
    """Bits of one k-of-n run's position code as a combinatorial rank: ``ceil(log2 C(n, k))``
    (``k`` positions as indices take ``k * ceil_log2(n)``)."""
    return ceil_log2(math.comb(n, k))


# -- information-theoretic minimum of an index, in bits ------------------------------------
def irregular_min_bits(numel: int, kept: int) -> float:
    """Any ``kept`` of ``numel`` positions (bitmask, CSR): ``log2 C(numel, kept)``."""
    return log2_comb(numel, kept)


def kofn_min_bits(runs: int, n: int, k: int) -> float:
    """``k`` positions in each of ``runs`` runs of ``n``: ``runs * log2 C(n, k)``."""
    return runs * log2_comb(n, k)


def block_min_bits(tiles: int, kept_tiles: int) -> float:
    """Which ``kept_tiles`` of ``tiles`` tiles are kept: ``log2 C(tiles, kept_tiles)``."""
    return log2_comb(tiles, kept_tiles)


def row_block_min_bits(cols: int, row_sizes: Sequence[int],
                       allowed: Sequence[int] = ROW_BLOCK_SIZES) -> float:
    """Block-max rows: per block, log2 of its real width (where its weight can be); per row,
    log2 of the number of ``allowed`` sizes (which size the row has)."""
    bits = 0.0
    for b in sorted(set(row_sizes)):
        full, rest = divmod(cols, b)
        per_row = full * math.log2(b) + (math.log2(rest) if rest else 0.0)
        bits += sum(1 for s in row_sizes if s == b) * per_row
    return bits + len(row_sizes) * math.log2(len(allowed))


def unified_min_bits(state_counts: Sequence[int], sign_bits: int) -> float:
    """Blocks in ``BLOCK_STATES`` (``state_counts``: blocks per state): log2 of the
    multinomial of the states, plus the sign bits of unified blocks (incompressible)."""
    blocks = sum(state_counts)
    multinomial = math.lgamma(blocks + 1) - sum(math.lgamma(c + 1) for c in state_counts)
    return multinomial / math.log(2) + sign_bits


# -- decoding --------------------------------------------------------------------------------
def decoding_cost(mask: Tensor, scheme: str, *, block: tuple[int, int] | None = None,
                  block_sizes: Tensor | int | None = None,
                  allowed: Sequence[int] | None = None) -> dict[str, float]:
    """Index bits and selection work to decode one weight's sparse pattern, per kept weight.

    The weight is seen as its im2col matrix (``rows x cols``); ``kept`` = nonzeros of ``mask``
    (for ``"block"``: the real elements of tiles with any kept weight, all of which are stored).

    * ``"csr"`` (irregular): a column index of ``ceil(log2 cols)`` bits per kept weight plus
      ``rows + 1`` row pointers of ``ceil(log2(kept + 1))`` bits. Each kept weight selects its
      input among the row's ``cols`` inputs: selection width ``cols``, one selection per weight.
    * ``"block"`` (``block=(bh, bw)``): one bit per tile of the matrix (kept or not). A kept
      tile selects one ``bw``-wide input slice among ``ceil(cols / bw)`` positions, shared by
      its weights: selection width ``ceil(cols / bw)``, one selection per kept tile.
    * ``"bmwm"`` (``block_sizes=b``) and ``"darb"`` (``block_sizes`` per row, ``allowed``): each
      kept weight's position in its block, ``ceil(log2 b_r)`` bits (``m`` positions per block
      for ``m`` kept); DARB adds ``ceil(log2 len(allowed))`` bits per row for the row's block
      size. Each kept weight comes through a ``b_r``:1 selection: selection width ``b_r``.

    Returns ``kept``, ``index_bits``, ``index_bits_per_kept``, ``selection_width`` (mean over
    kept weights of the width of the selection their input passes), ``selections_per_kept``
    and ``selection_inputs_per_kept`` (width x selections, the multiplexer inputs per weight).
    """
    if scheme not in SCHEMES:
        raise ConfigError(f"scheme must be one of {SCHEMES}; got {scheme!r}")
    rows, cols = im2col_shape(mask.shape)
    m = mask.reshape(rows, cols).bool().cpu()
    if scheme == "csr":
        kept = int(m.sum())
        bits = kept * ceil_log2(cols) + (rows + 1) * ceil_log2(kept + 1)
        width, selections = float(cols), kept
    elif scheme == "block":
        if block is None:
            raise ConfigError("scheme 'block' needs block=(bh, bw)")
        bh, bw = block
        pr, pc = -(-rows // bh), -(-cols // bw)
        tiles = F.pad(m.float(), (0, pc * bw - cols, 0, pr * bh - rows))
        tiles = tiles.reshape(pr, bh, pc, bw).amax((1, 3)) > 0
        real = F.pad(torch.ones(rows, cols), (0, pc * bw - cols, 0, pr * bh - rows))
        real = real.reshape(pr, bh, pc, bw).sum((1, 3))
        kept = int(real[tiles].sum())
        bits = pr * pc
        width, selections = float(pc), int(tiles.sum())
    else:
        if block_sizes is None:
            raise ConfigError(f"scheme {scheme!r} needs block_sizes")
        sizes = (torch.full((rows,), int(block_sizes)) if isinstance(block_sizes, int)
                 else block_sizes.to("cpu", torch.long))
        per_row = m.sum(1)
        kept = int(per_row.sum())
        bits = sum(int(k) * ceil_log2(int(b)) for k, b in zip(per_row, sizes, strict=True))
        if scheme == "darb":
            if allowed is None:
                raise ConfigError("scheme 'darb' needs allowed (the block sizes a row may have)")
            bits += rows * ceil_log2(len(allowed))
        width = float((per_row * sizes).sum()) / kept if kept else 0.0
        selections = kept
    per = (lambda x: x / kept) if kept else (lambda x: 0.0)
    return {"kept": kept, "index_bits": bits, "index_bits_per_kept": per(bits),
            "selection_width": width, "selections_per_kept": per(selections),
            "selection_inputs_per_kept": per(selections * width)}


def stored_selection(mask: Tensor, encoding: str, params: Mapping[str, int] | None = None,
                     row_sizes: Tensor | None = None) -> tuple[float, float]:
    """(selection width, selection inputs per kept weight) of decoding a weight stored in
    ``encoding`` (a name of ``hwprune.storage``'s encodings) with kept weights ``mask``.

    ``params``: the encoding's ``n`` (kofn) or ``bh``/``bw`` (block, unified); ``row_sizes``:
    the block size of every row (rowblock). Dense and quantized tensors store every element in
    place: each kept weight is placed by a trivial 1-wide selection. The others are decoded by
    the ``decoding_cost`` scheme ``ENCODING_SCHEMES`` names.
    """
    scheme = ENCODING_SCHEMES.get(encoding)
    if scheme is None:
        return 1.0, 1.0
    params = params or {}
    if encoding == "rowblock":
        if row_sizes is None:
            raise ConfigError("encoding 'rowblock' needs row_sizes (the block size of each row)")
        cost = decoding_cost(mask, scheme, block_sizes=row_sizes)
    elif scheme == "bmwm":
        cost = decoding_cost(mask, scheme, block_sizes=int(params["n"]))
    elif scheme == "block":
        cost = decoding_cost(mask, scheme, block=(int(params["bh"]), int(params["bw"])))
    else:
        cost = decoding_cost(mask, scheme)
    return cost["selection_width"], cost["selection_inputs_per_kept"]


# -- arithmetic --------------------------------------------------------------------------------
def multiplications_saved(group_sizes: Tensor, states: Tensor, numel: int) -> dict[str, float]:
    """Share of a layer's ``numel`` multiplications (per output position) that its block
    ``states`` remove: a unified block of m weights needs 1 multiplication instead of m, a
    zero block none. ``group_sizes``: real weights per block.

    Returns ``mults_saved`` (unified and zero blocks) and ``mults_saved_by_unify``.
    """
    by_unify = int((group_sizes[states == UNIFIED] - 1).sum())
    by_zero = int(group_sizes[states == ZERO].sum())
    return {"mults_saved": (by_unify + by_zero) / numel,
            "mults_saved_by_unify": by_unify / numel}
