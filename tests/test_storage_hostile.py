"""Hostile files: ``hp.load`` on compression bombs, forged documents, tensor records whose shapes
outgrow their data, devices, FIFOs and malformed JSON raises ``StorageError`` in bounded
memory (``hwprune report`` prints one line and exits 2); and a fuzz test over random bytes,
mutations of a real file, random documents and random records in valid containers.

The memory cases run in one child process under an address-space limit of its size after
importing hwprune plus ``BUDGET``: an allocation the size of a bomb fails there with
``MemoryError`` instead of taking the machine's memory.
"""

import hashlib
import json
import lzma
import os
import resource
import struct
import subprocess
import sys
import threading
import zlib

import numpy as np
import pytest
import safetensors.numpy
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hwprune as hp
from hwprune.storage import StorageError, container, encode, packing
from hwprune.storage.encodings.valuecoding import code_values
from hwprune.storage.fileformat import (
    CODECS,
    COMPRESSED_HEADER,
    DATA_KEY,
    DOC_BASE_BYTES,
    DOC_KEY,
    FORMAT,
    MAGIC,
    MAX_JSON_DEPTH,
    META_KEY,
)

#: bytes the child may map beyond what importing hwprune took
BUDGET = 64 << 20
MIB = 1 << 20

CHILD = r"""
import json, resource, sys
import torch
torch.set_num_threads(1)
import hwprune as hp
from hwprune.storage import StorageError

def mapped():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:"))

budget, jobs = int(sys.argv[1]), json.loads(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (mapped() + budget, resource.RLIM_INFINITY))
for name, path, max_bytes in jobs:
    kw = {} if max_bytes is None else {"max_bytes": max_bytes}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        hp.load(path, **kw)
        out = {"result": "loaded"}
    except StorageError as err:
        chain, e = [], err
        while e is not None:
            chain.append(type(e).__name__)
            e = e.__cause__ or e.__context__
        out = {"result": "StorageError", "message": str(err), "chain": chain}
    except BaseException as err:
        out = {"result": type(err).__name__, "message": str(err)[:300]}
    out["rss_growth"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    print(json.dumps({name: out}), flush=True)
"""


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}


# -- building hostile files ----------------------------------------------------------------
def zlib_repeat(head: bytes, chunk: bytes, times: int, tail: bytes) -> bytes:
    """A valid zlib stream of ``head + chunk * times + tail``, built without compressing the
    repetitions: after a full flush the compressor's state is reset, so each ``chunk`` block
    is the same bytes."""
    c = zlib.compressobj(9)
    first = c.compress(head) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
    stream = first + block * times + c.compress(tail) + c.flush()
    adler = zlib.adler32(head)
    for _ in range(times):
        adler = zlib.adler32(chunk, adler)
    return stream[:-4] + zlib.adler32(tail, adler).to_bytes(4, "big")


def zstd_repeat(head: bytes, chunk: bytes, times: int, tail: bytes) -> bytes:
    """A Zstandard frame of ``head + chunk * times + tail`` that declares its length, streamed
    in so that the whole text is never held."""
    size = len(head) + len(chunk) * times + len(tail)
    c = zstandard.ZstdCompressor(write_checksum=True).compressobj(size=size)
    out = [c.compress(head)] + [c.compress(chunk) for _ in range(times)]
    return b"".join([*out, c.compress(tail), c.flush()])


def wrapped(body: bytes, codec: str, size: int) -> bytes:
    """A compressed wrapper around ``body`` that records ``size`` uncompressed bytes."""
    return COMPRESSED_HEADER.pack(MAGIC, 1, CODECS[codec], bytes(6), size,
                                  hashlib.sha256(body).digest()) + body


def with_document(doc_z: bytes, blob: bytes = b"", version: int = 2) -> bytes:
    """A ``version`` file whose document array holds ``doc_z`` (zlib up to version 7, a
    Zstandard frame from 8) and data ``blob``."""
    meta = json.dumps({"format": FORMAT, "version": version})
    return safetensors.numpy.save({DOC_KEY: np.frombuffer(doc_z, np.uint8),
                                   DATA_KEY: np.frombuffer(blob, np.uint8)},
                                  metadata={META_KEY: meta})


def forged(records: list, arrays: dict) -> bytes:
    """A file of these records and arrays with a valid checksum."""
    return container.pack(records, {k: np.ascontiguousarray(a).reshape(-1)
                                    for k, a in arrays.items()})


def record(name, encoding, dtype, shape, payload, index, **meta):
    return {"name": name, "encoding": encoding, "dtype": dtype, "shape": list(shape),
            "meta": meta, "payload": list(payload), "index": list(index)}


def real_encodings() -> dict[str, tuple[dict, dict]]:
    """One real record (and its arrays) per encoding, from tensors that take it."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 16, 3, 3, generator=g)
    mask24 = torch.zeros(16, 16, 3, 3)
    mask24[:, ::2] = 1
    blocks = torch.zeros(16, 16, 3, 3)
    blocks[:8, :8] = 1
    q = (torch.randint(-7, 8, (16, 16, 3, 3), generator=g) * 0.25).float()
    unified = torch.ones(16, 144).mul(0.5) * torch.sign(torch.randn(16, 144, generator=g))
    unified[:, :8] = 0
    rowblock = torch.zeros(16, 144)
    rowblock[:, ::8] = 1.0
    def keep(m):
        return torch.where(m.bool(), w, 0.0)  # w * m would leave -0.0

    cases = {"dense": (w, {}), "bitmask": (keep(w > 1), {}), "csr": (keep(w > 2), {}),
             "kofn": (keep(mask24), {"k": 1, "n": 2}), "block": (keep(blocks), {"bh": 4, "bw": 4}),
             "rowblock": (rowblock, {}), "unified": (unified, {"bh": 1, "bw": 4}),
             # gaps of the zeros (most weights kept): a larger shape needs more zeros' gaps
             # (gaps of nonzeros would describe the larger tensor validly: max_bytes bounds it)
             "quantized": (q, {}), "gaps": (keep(w > -1), {}),
             "kofn coded": (keep(mask24), {"k": 1, "n": 2, "positions": "coded"}),
             "dense coded": (w, {})}
    out = {}
    for name, (t, params) in cases.items():
        enc = encode(t, name.split()[0], **params)
        if name == "dense coded":  # its values as Huffman-coded byte planes
            enc = code_values(enc)
            assert "vcoded" in enc.meta
        rec = record("w", enc.encoding, str(enc.dtype).removeprefix("torch."), enc.shape,
                     enc.payload, enc.index, **enc.meta)
        out[name] = (rec, {f"w/{k}": a for k, a in {**enc.payload, **enc.index}.items()})
    return out


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """{case: (path, max_bytes or None for the default)} of every memory case."""
    d = tmp_path_factory.mktemp("hostile")
    files: dict[str, tuple[bytes, int | None]] = {}
    sparse = torch.zeros(64, 64)
    sparse[::9, ::7] = 1.0
    legit = container.plan({"w": sparse, "b": torch.zeros(3)}).data
    assert len(legit) < 64 * 64 * 4
    files["legit"] = (legit, None)
    files["legit, max_bytes its decoded size"] = (legit, 64 * 64 * 4 + 3 * 4)
    files["legit, max_bytes one less"] = (legit, 64 * 64 * 4 + 3 * 4 - 1)
    # 7. compression bombs: the recorded length lies outside the checksum
    zeros = zlib_repeat(b"", bytes(MIB), 1024, b"")  # 1 GiB of zeros in 1 MB
    files["zlib bomb, huge length"] = (wrapped(zeros, "zlib", 1 << 40), None)
    files["zlib bomb, length within max_bytes"] = (wrapped(zeros, "zlib", 900 * MIB), None)
    lz = lzma.LZMACompressor(preset=0)
    lzma_zeros = b"".join([lz.compress(bytes(MIB)) for _ in range(128)]) + lz.flush()
    files["lzma bomb, huge length"] = (wrapped(lzma_zeros, "lzma", 1 << 40), None)
    files["lzma bomb, length within max_bytes"] = (wrapped(lzma_zeros, "lzma", 100 * MIB), None)
    files["zlib, 1 GiB past the recorded length"] = (
        wrapped(zlib_repeat(legit, bytes(MIB), 1024, b""), "zlib", len(legit)), None)
    # 8. a 200 MiB document of `[],` (under the 256 MiB cap) in a file of 200 KB
    doc = zlib_repeat(b'{"arrays":[],"sha256":"","tensors":[', b"[]," * (MIB // 3), 200,
                      b"[]]}")
    files["document bomb"] = (with_document(doc), None)
    dense = b'{"arrays":[],"sha256":"","tensors":[' + b"[]," * (3 * MIB // 3) + b"[]]}"
    files["document dense with values"] = (with_document(zlib.compress(dense)), None)
    # the same as a version 8 document's Zstandard frame: its declared length is the check
    files["zstd document bomb"] = (with_document(zstd_repeat(
        b'{"arrays":[],"blake3":"","tensors":[', b"[]," * (MIB // 3), 200, b"[]]}"),
        version=8), None)
    files["zstd document dense with values"] = (with_document(
        packing.compress_document(dense, 8), version=8), None)
    files["zstd document of no declared length"] = (with_document(
        zstandard.ZstdCompressor(write_content_size=False).compress(dense), version=8), None)
    # 9. shapes that outgrow their data, with valid checksums
    f32 = np.zeros(0, np.uint32)
    files["block 4x4, shape 65536x65536"] = (forged(
        [record("w", "block", "float32", (65536, 65536), ["values"], ["tiles"], bh=4, bw=4)],
        {"w/values": f32, "w/tiles": np.zeros(1, np.uint8)}), None)
    files["block, one 65536x65536 float64 tile"] = (forged(
        [record("w", "block", "float64", (65536, 65536), ["values"], ["tiles"], bh=65536,
                bw=65536)], {"w/values": np.zeros(0, np.uint64), "w/tiles": np.zeros(1, np.uint8)}),
        None)
    one_tile = forged([record("w", "block", "float32", (1024, 1024), ["values"], ["tiles"],
                              bh=1024, bw=1024)],
                      {"w/values": f32, "w/tiles": np.zeros(1, np.uint8)})
    files["block, a 4 MiB zero tile, max_bytes 1 MiB"] = (one_tile, MIB)
    files["csr, zero 1x2^34"] = (forged(
        [record("w", "csr", "float32", (1, 1 << 34), ["values"], ["indptr", "indices"])],
        {"w/values": f32, "w/indptr": np.zeros(2, np.uint8),
         "w/indices": np.zeros(0, np.uint8)}), None)
    for name, (rec, arrays) in real_encodings().items():
        files[f"{name}, as stored"] = (forged([rec], arrays), MIB)
        big = dict(rec, shape=[rec["shape"][0] << 16, *rec["shape"][1:]])
        files[f"{name}, rows x 65536"] = (forged([big], arrays), None)
    # 10. not regular files
    paths = {"/dev/zero": ("/dev/zero", None)}
    for name, (data, max_bytes) in files.items():
        path = d / f"{len(paths)}.hwp"
        path.write_bytes(data)
        paths[name] = (str(path), max_bytes)
    jobs = [[name, path, max_bytes] for name, (path, max_bytes) in paths.items()]
    proc = subprocess.run([sys.executable, "-c", CHILD, str(BUDGET), json.dumps(jobs)],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = {k: v for line in proc.stdout.splitlines() for k, v in json.loads(line).items()}
    return {name: (paths[name], results.get(name)) for name in paths}


def _clean(result: dict | None) -> bool:
    """A ``StorageError`` with no ``MemoryError`` on the way to it."""
    return result is not None and result["result"] == "StorageError" \
        and "MemoryError" not in result["chain"]


def test_the_memory_limit_lets_a_real_file_load_and_max_bytes_is_exact(hostile):
    assert hostile["legit"][1]["result"] == "loaded"
    assert hostile["legit, max_bytes its decoded size"][1]["result"] == "loaded"
    low = hostile["legit, max_bytes one less"][1]
    assert _clean(low) and "max_bytes=16395" in low["message"], low


@pytest.mark.parametrize("case", ["zlib bomb, huge length", "zlib bomb, length within max_bytes",
                                  "lzma bomb, huge length", "lzma bomb, length within max_bytes",
                                  "zlib, 1 GiB past the recorded length"])
def test_compression_bombs_are_refused_before_they_inflate(hostile, case):
    (path, _), result = hostile[case]
    assert _clean(result), result
    assert os.path.getsize(path) < 1100 * 1000
    assert result["rss_growth"] < 16 * MIB


def test_a_document_bomb_is_refused_by_what_the_data_section_can_need(hostile):
    (path, _), result = hostile["document bomb"]
    assert os.path.getsize(path) < 250_000
    assert _clean(result) and f"past {DOC_BASE_BYTES} bytes" in result["message"], result
    dense = hostile["document dense with values"][1]
    assert _clean(dense) and "JSON values" in dense["message"], dense
    (path, _), result = hostile["zstd document bomb"]
    assert os.path.getsize(path) < 250_000
    assert _clean(result) and "the document's frame declares" in result["message"], result
    assert result["rss_growth"] < 16 * MIB
    dense = hostile["zstd document dense with values"][1]
    assert _clean(dense) and "JSON values" in dense["message"], dense
    undeclared = hostile["zstd document of no declared length"][1]
    assert _clean(undeclared) and "declares -1 bytes" in undeclared["message"], undeclared


@pytest.mark.parametrize("case", ["block 4x4, shape 65536x65536",
                                  "block, one 65536x65536 float64 tile",
                                  "block, a 4 MiB zero tile, max_bytes 1 MiB",
                                  "csr, zero 1x2^34"])
def test_shapes_beyond_their_data_or_max_bytes_are_refused_before_allocating(hostile, case):
    (path, _), result = hostile[case]
    assert os.path.getsize(path) < 1000
    assert _clean(result), result
    assert "packed array has 1 bytes" in result["message"] or "max_bytes" in result["message"]


@pytest.mark.parametrize("encoding", ["dense", "bitmask", "csr", "kofn", "block", "rowblock",
                                      "unified", "quantized", "gaps", "kofn coded",
                                      "dense coded"])
def test_every_encoding_checks_its_arrays_against_the_shape(hostile, encoding):
    assert hostile[f"{encoding}, as stored"][1]["result"] == "loaded"
    assert _clean(hostile[f"{encoding}, rows x 65536"][1])


def test_devices_folders_and_fifos_are_refused(hostile, tmp_path):
    result = hostile["/dev/zero"][1]
    assert _clean(result) and "not a regular file" in result["message"]
    with pytest.raises(StorageError, match="not a regular file"):
        hp.load(tmp_path)
    fifo = tmp_path / "fifo.hwp"
    os.mkfifo(fifo)
    outcome = []

    def load_fifo():
        try:
            hp.load(fifo)
        except StorageError as err:
            outcome.append(err)

    worker = threading.Thread(target=load_fifo, daemon=True)
    worker.start()
    worker.join(timeout=20)
    if worker.is_alive():  # blocked in open(): give it a writer so the thread can end
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(timeout=5)
        pytest.fail("load blocked on a FIFO")
    assert outcome and "not a regular file" in str(outcome[0])
    with pytest.raises(StorageError, match="max_bytes must be a positive int"):
        hp.load(tmp_path / "x.hwp", max_bytes=0)


# -- 11. JSON that is not strict -----------------------------------------------------------
def _doc_file(path, text: str) -> str:
    path.write_bytes(with_document(zlib.compress(text.encode())))
    return str(path)


def _version_1_file(path, doc_text: str) -> str:
    path.write_bytes(safetensors.numpy.save({"w/values": np.zeros(1, np.uint8)},
                                            metadata={META_KEY: doc_text}))
    return str(path)


REC = ('{"dtype":"float32","encoding":"dense","index":[],"meta":%s,"name":"w",'
       '"payload":["values"],"shape":[1]}')
NAN, BIG, INF, LONG = '{"k":NaN}', '{"k":1e400}', '{"k":-Infinity}', '{"k":' + "1" * 5000 + "}"
BAD_JSON = {  # case: (document, why it is refused)
    "NaN in the document": (f'{{"arrays":[],"sha256":"x","tensors":[{REC % NAN}]}}',
                            "unreadable JSON"),
    "1e400 in the document": (f'{{"arrays":[],"sha256":"x","tensors":[{REC % BIG}]}}',
                              "unreadable JSON"),
    "Infinity in the document": (f'{{"arrays":[],"sha256":"x","tensors":[{REC % INF}]}}',
                                 "unreadable JSON"),
    "a 5000-digit int": (f'{{"arrays":[],"sha256":"x","tensors":[{REC % LONG}]}}',
                         "unreadable JSON"),
    "nested 100000 deep": ('{"arrays":[],"tensors":' + "[" * 100_000 + "]" * 100_000 + "}",
                           r"\d+ JSON values in"),
    "nested 5000 deep, spaced": ('{"arrays":[],"tensors":' + "[   " * 5000 + "]" * 5000 + "}",
                                 "JSON nested deeper"),
    "nested one level too deep": ('{"arrays":[],"tensors":' + "[" * MAX_JSON_DEPTH
                                  + "]" * MAX_JSON_DEPTH + "}", "JSON nested deeper"),
}


@pytest.mark.parametrize("case", sorted(BAD_JSON))
def test_json_that_is_not_strict_or_too_deep_is_a_storage_error(tmp_path, case):
    text, reason = BAD_JSON[case]
    with pytest.raises(StorageError, match=f"the document: {reason}"):
        hp.load(_doc_file(tmp_path / "bad.hwp", text))


@pytest.mark.parametrize("value", ["NaN", "1e400", "Infinity"])
def test_non_finite_numbers_in_metadata_are_a_storage_error(tmp_path, value):
    rec = REC % ('{"k":' + value + "}")
    v1 = f'{{"format":"{FORMAT}","version":1,"sha256":"x","tensors":[{rec}]}}'
    with pytest.raises(StorageError, match="unreadable JSON"):
        hp.load(_version_1_file(tmp_path / "v1.hwp", v1))
    meta = f'{{"format":"{FORMAT}","version":{value}}}'
    with pytest.raises(StorageError, match="unreadable JSON"):
        hp.load(_version_1_file(tmp_path / "meta.hwp", meta))


# -- 12. fuzz ------------------------------------------------------------------------------
def _mapped() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))


@pytest.fixture
def bounded_memory():
    """This process limited to 1 GiB more address space while the fuzz tests run: a decoder
    that allocated what a record's shape says, unchecked, would fail with MemoryError (a
    failure here) instead of taking the machine's memory."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (_mapped() + (1 << 30), hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture(scope="module")
def real_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("real")
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 8, 3, 3, generator=g)
    sd = {"conv.weight": w * (w.abs() > 1), "fc.weight": torch.randn(4, 8, generator=g),
          "fc.bias": torch.zeros(4)}
    out = {}
    for compress in (None, "zlib", "lzma"):
        hp.save(sd, d / f"{compress}.hwp", compress=compress)
        out[compress] = (d / f"{compress}.hwp").read_bytes()
    return d, out


def _only_storage_errors(path, max_bytes=None):
    try:
        hp.load(path, **({} if max_bytes is None else {"max_bytes": max_bytes}))
    except StorageError:
        pass  # the one exception load may raise


FUZZ = settings(max_examples=120, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@FUZZ
@given(prefix=st.sampled_from([b"", MAGIC, MAGIC + b"\x01\x01" + bytes(6),
                               struct.pack("<Q", 40), struct.pack("<Q", 2**63)]),
       data=st.binary(max_size=600))
def test_random_bytes_are_refused_cleanly(bounded_memory, tmp_path, prefix, data):
    path = tmp_path / "random.hwp"
    path.write_bytes(prefix + data)
    _only_storage_errors(path)


MUTATION = st.tuples(st.sampled_from(["cut", "flip", "insert", "delete"]),
                     st.floats(0, 1, exclude_max=True), st.binary(min_size=1, max_size=8))


@FUZZ
@given(compress=st.sampled_from([None, "zlib", "lzma"]),
       mutations=st.lists(MUTATION, min_size=1, max_size=4))
def test_mutations_of_a_real_file_are_refused_cleanly(bounded_memory, real_files, compress,
                                                      mutations):
    d, files = real_files
    data = bytearray(files[compress])
    for kind, where, junk in mutations:
        i = int(where * len(data))
        if kind == "cut":
            del data[i:]
        elif kind == "flip" and i < len(data):
            data[i] ^= junk[0]
        elif kind == "insert":
            data[i:i] = junk
        else:
            del data[i: i + len(junk)]
    path = d / "mutated.hwp"
    path.write_bytes(bytes(data))
    _only_storage_errors(path)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=20)


@FUZZ
@given(doc=JSON, blob=st.binary(max_size=64), tensors=st.booleans(), version=st.sampled_from(
    [2, 7, 8]))
def test_random_documents_in_a_valid_container_are_refused_cleanly(bounded_memory, tmp_path,
                                                                  doc, blob, tensors, version):
    if tensors:
        doc = {"arrays": doc, "sha256": "0" * 64, "tensors": [doc]}
    path = tmp_path / "doc.hwp"
    text = json.dumps(doc).encode()
    path.write_bytes(with_document(packing.compress_document(text, version), blob, version))
    _only_storage_errors(path)


NAMES = ("values", "mask", "indptr", "indices", "positions", "tiles", "states", "signs",
         "magnitudes", "codes", "scale", "sizes", "positions8", "zero_signs", "values_codes",
         "values_planes")
#: coded value planes: [count, [plane lengths]] or that and a coder tag per array, any of them wrong
VCODED = st.dictionaries(st.sampled_from(["values", "magnitudes"]), st.tuples(
    st.integers(-1, 1 << 40), st.lists(st.integers(-2, 64), max_size=9),
    st.lists(st.sampled_from(["zstd", "deflate", 0]), max_size=2)).map(
        lambda t: [t[0], t[1], *t[2]]), max_size=2)
META = st.dictionaries(
    st.sampled_from(["k", "n", "bh", "bw", "positions", "qmax", "zero_signs", "qvalues", "m",
                     "zeros", "vcoded"]),
    st.integers(-2, 70) | st.sampled_from(["rank", "index", "coded", True, False])
    | st.fixed_dictionaries({"qmax": st.integers(0, 130),
                             "counts": st.dictionaries(st.sampled_from(NAMES[:2]),
                                                       st.integers(-1, 40))})
    | VCODED,
    max_size=4)
#: each encoding's arrays (payload, index) and parameters, so that most random records reach
#: the decoders' checks rather than stop at a missing array
TEMPLATES = {"dense": (["values"], [], ()), "bitmask": (["values"], ["mask"], ()),
             "csr": (["values"], ["indptr", "indices"], ()),
             "kofn": (["values"], ["positions"], ("k", "n", "positions")),
             "block": (["values"], ["tiles"], ("bh", "bw")),
             "rowblock": (["values"], ["sizes", "positions1", "positions8"], ()),
             "unified": (["magnitudes", "values"], ["states", "signs"], ("bh", "bw")),
             "quantized": (["codes", "scale"], [], ("qmax",)),
             "gaps": (["values"], ["positions"], ("m", "zeros")),
             "dense coded": (["values_planes"], [], ("vcoded",)), "zip": ([], [], ())}


@st.composite
def random_record(draw):
    encoding = draw(st.sampled_from(sorted(TEMPLATES)))
    payload, index, params = TEMPLATES[encoding]
    if draw(st.integers(0, 4)) == 0:
        payload = draw(st.lists(st.sampled_from(NAMES), max_size=2, unique=True))
        index = draw(st.lists(st.sampled_from(NAMES), max_size=3, unique=True))
    meta = {k: draw(VCODED if k == "vcoded" else st.booleans() if k == "zeros" else
                    st.integers(0, 9) | st.sampled_from(["rank", "index", "coded"]))
            for k in params}
    if encoding == "dense coded":
        encoding = "dense"
    meta.update(draw(META))
    return {"encoding": encoding, "meta": meta, "payload": payload, "index": index,
            "dtype": draw(st.sampled_from(["float32", "float16", "bfloat16", "int8", "bool",
                                           "complex64", "float64", "uint8", "Tensor"])),
            "shape": draw(st.lists(st.integers(0, 9) | st.integers(0, 1 << 20), max_size=4))}


ARRAY = st.tuples(st.sampled_from(["|u1", "<u2", "<u4", "<u8", "|b1", "<f4"]),
                  st.binary(max_size=48))


@FUZZ
@given(records=st.lists(random_record(), min_size=1, max_size=3),
       raw=st.lists(ARRAY, max_size=8))
def test_random_records_with_a_valid_checksum_are_refused_cleanly(bounded_memory, tmp_path,
                                                                 records, raw):
    arrays, pool = {}, iter(raw)
    for i, rec in enumerate(records):
        rec["name"] = f"t{i}"
        for arr in dict.fromkeys(rec["payload"] + rec["index"]):
            dtype, data = next(pool, ("|u1", b""))
            dt = np.dtype(dtype)
            arrays[f"t{i}/{arr}"] = np.frombuffer(data[: len(data) // dt.itemsize * dt.itemsize],
                                                  dt)
    path = tmp_path / "records.hwp"
    path.write_bytes(forged(records, arrays))
    _only_storage_errors(path, max_bytes=MIB)


def test_hwprune_report_on_hostile_files_prints_one_line(tmp_path):
    # a few examples (each command takes seconds): noise, and item 11's two tracebacks
    paths = [tmp_path / "random.hwp", tmp_path / "nan.hwp", tmp_path / "deep.hwp"]
    paths[0].write_bytes(os.urandom(300))
    _doc_file(paths[1], BAD_JSON["NaN in the document"][0])
    _doc_file(paths[2], BAD_JSON["nested 5000 deep, spaced"][0])
    procs = [subprocess.Popen([sys.executable, "-m", "hwprune.app.cli", "report", str(p)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env()) for p in paths]
    for path, proc in zip(paths, procs, strict=True):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (path, out, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"hwprune: error: {path}:"), err


def test_tensors_decoded_in_threads_load_exactly_and_a_bad_one_is_named(tmp_path, monkeypatch):
    """With every tensor decoded in the thread pool: each encoding's record loads bit for bit
    as it does one at a time, and a record whose stored parameters lie (a valid checksum, a
    k-of-n record whose k exceeds n) is one StorageError naming that tensor, not a pool's
    raw exception."""
    cases = real_encodings()
    records, arrays = [], {}
    for i, (rec, arrs) in enumerate(cases.values()):
        records.append({**rec, "name": f"t{i}"})
        arrays.update({f"t{i}/{k.split('/', 1)[1]}": a for k, a in arrs.items()})
    path = tmp_path / "all.hwp"
    path.write_bytes(forged(records, arrays))
    serial = hp.load(path)
    monkeypatch.setattr(container, "PARALLEL_NUMEL", 1)  # every tensor in the pool
    threaded = hp.load(path)
    assert list(threaded) == list(serial) == [r["name"] for r in records]
    assert all(torch.equal(threaded[k].view(torch.uint8), serial[k].view(torch.uint8))
               for k in serial)
    bad = next(i for i, r in enumerate(records) if r["encoding"] == "kofn")
    records[bad] = {**records[bad], "meta": {**records[bad]["meta"], "k": 3}}
    path.write_bytes(forged(records, arrays))
    with pytest.raises(StorageError, match=f"tensor 't{bad}'"):
        hp.load(path)
