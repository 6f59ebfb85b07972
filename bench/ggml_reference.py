"""llama.cpp's own quantizer (ggml_quantize_chunk in the libggml-base of ../shared/tools'
llama.cpp build, the code `llama-quantize` runs) called from Python, for benchmarks only.

The library needs the newer C library that comes with those tools, so it runs in a subprocess
under their loader: `quantize_all` writes the weights and importance vectors to an .npz, this
file (run as a script there) quantizes each with ctypes and writes the bytes back. Its output is
byte-identical to `llama-quantize --imatrix` on the same tensors and importance matrix (checked
for Q2_K, Q3_K, IQ4_NL, IQ4_XS, IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS, IQ2_S on a 16-block model)."""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

TYPE_IDS = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13,
            "Q6_K": 14, "IQ2_XXS": 16, "IQ2_XS": 17, "IQ3_XXS": 18, "IQ4_NL": 20, "IQ3_S": 21, "IQ2_S": 22, "IQ4_XS": 23}


def quantize_all(tools: Path, tensors: dict[str, tuple[np.ndarray, str, np.ndarray | None]]) -> dict[str, np.ndarray]:
    """{name: (weight (rows, cols) float32, type, importance (cols,) float32 or None)} ->
    {name: GGML bytes (rows, row bytes) uint8}, by llama.cpp's quantizer."""
    lib = Path(tools) / "root/usr/lib/x86_64-linux-gnu"
    with tempfile.TemporaryDirectory() as tmp:
        arrays = {}
        for k, (name, (w, kind, imp)) in enumerate(tensors.items()):
            arrays[f"w{k}"] = np.ascontiguousarray(w, dtype=np.float32)
            arrays[f"t{k}"] = np.array(TYPE_IDS[kind])
            if imp is not None:
                arrays[f"i{k}"] = np.ascontiguousarray(imp, dtype=np.float32)
        np.savez(Path(tmp) / "in.npz", **arrays)
        python = Path(sys.base_prefix) / "bin" / "python3"
        subprocess.run([str(lib / "ld-linux-x86-64.so.2"), "--library-path", f"{lib}:{Path(sys.base_prefix) / 'lib'}",
                        str(python), __file__, str(lib), tmp], check=True)
        out = np.load(Path(tmp) / "out.npz")
        return {name: out[f"q{k}"] for k, name in enumerate(tensors)}


def _main(lib: str, tmp: str) -> None:
    import ctypes
    ggml = ctypes.CDLL(str(Path(lib) / "libggml-base.so.0"))
    ggml.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                         ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    ggml.ggml_quantize_chunk.restype = ctypes.c_size_t
    ggml.ggml_quantize_init.argtypes = [ctypes.c_int]
    data = np.load(Path(tmp) / "in.npz")
    out = {}
    k = 0
    while f"w{k}" in data:
        w, kind = data[f"w{k}"], int(data[f"t{k}"])
        imp = data[f"i{k}"] if f"i{k}" in data else None
        ggml.ggml_quantize_init(kind)
        rows, cols = w.shape
        buf = np.zeros(rows * cols * 2 + 1024, dtype=np.uint8)
        size = ggml.ggml_quantize_chunk(kind, w.ctypes.data, buf.ctypes.data, 0, rows, cols,
                                        None if imp is None else imp.ctypes.data)
        out[f"q{k}"] = buf[:size].reshape(rows, -1)
        k += 1
    np.savez(Path(tmp) / "out.npz", **out)


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
