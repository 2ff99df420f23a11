"""Generate the ggml reference vectors in ``ggml_ref_vectors.npz`` (run once; the result is committed).

Compiles ggml's own ``ggml-quants.c`` (from a llama.cpp checkout or the llama-cpp-python sdist, which
vendors it; nothing of it is copied into this repository) together with a tiny harness that calls
``quantize_row_<type>_ref`` on float32 inputs, and stores inputs and output bytes.

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/lcpp && tar xzf ...
    python tests/data/gguf/gen_vectors.py /tmp/lcpp/llama_cpp_python-0.3.36/vendor/llama.cpp/ggml
    python tests/data/gguf/gen_vectors.py --imatrix /tmp/lcpp/.../ggml   # -> ggml_imatrix_vectors.npz

``--imatrix`` stores the importance-weighted path instead (K-quants and Q4_0/Q4_1/Q5_0/Q5_1):
``quantize_<type>(src, dst, nrow, n_per_row, quant_weights)`` with one weight per column, as llama.cpp's quantizer calls it with an
imatrix (``ggml_row_size`` and ``ggml_abort``, the ggml.c symbols it needs, are defined in the harness).

Compiled with ``-O2 -DNDEBUG -ffp-contract=off`` (NDEBUG as in release builds, whose asserts are off) for the baseline x86-64 ISA: plain IEEE float32, one rounding
per operation, which is what ggml's reference code specifies (an -march=native build may fuse
multiply-adds and differ in the last bit of a few scale searches).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

TYPES = {  # name -> (block size, bytes per block)
    "q4_0": (32, 18), "q4_1": (32, 20), "q5_0": (32, 22), "q5_1": (32, 24), "q8_0": (32, 34), "q8_1": (32, 36),
    "q2_K": (256, 84), "q3_K": (256, 110), "q4_K": (256, 144), "q5_K": (256, 176), "q6_K": (256, 210),
}

HARNESS = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include "ggml.h"
#include "ggml-quants.h"

void ggml_abort(const char * file, int line, const char * fmt, ...) {  /* GGML_ASSERT's target */
    fprintf(stderr, "ggml_abort at %s:%d\n", file, line);
    abort();
}

size_t ggml_row_size(enum ggml_type type, int64_t ne) {  /* the types quantize_<type> is called for */
    switch (type) {
        case GGML_TYPE_Q4_0: return ne / 32 * 18;
        case GGML_TYPE_Q4_1: return ne / 32 * 20;
        case GGML_TYPE_Q5_0: return ne / 32 * 22;
        case GGML_TYPE_Q5_1: return ne / 32 * 24;
        case GGML_TYPE_Q2_K: return ne / 256 * 84;
        case GGML_TYPE_Q3_K: return ne / 256 * 110;
        case GGML_TYPE_Q4_K: return ne / 256 * 144;
        case GGML_TYPE_Q5_K: return ne / 256 * 176;
        case GGML_TYPE_Q6_K: return ne / 256 * 210;
        default: abort();
    }
}

/* usage: harness TYPE N IN.f32 OUT.bin [NPR QW.f32]; N floats, quantized as one row of N, or as
   rows of NPR with importance weights QW (NPR floats) through quantize_<type> */
int main(int argc, char ** argv) {
    if (argc != 5 && argc != 7) return 2;
    const char * t = argv[1];
    long n = atol(argv[2]);
    float * x = malloc(n * sizeof(float));
    void * y = calloc(n * 2, 1);
    FILE * f = fopen(argv[3], "rb");
    if (!f || fread(x, sizeof(float), n, f) != (size_t) n) return 3;
    fclose(f);
    size_t bytes = 0;
    if (argc == 7) {
        long npr = atol(argv[5]);
        float * qw = malloc(npr * sizeof(float));
        f = fopen(argv[6], "rb");
        if (!f || fread(qw, sizeof(float), npr, f) != (size_t) npr) return 3;
        fclose(f);
#define QCASE(name) if (!strcmp(t, #name)) { bytes = quantize_##name(x, y, n / npr, npr, qw); }
        QCASE(q2_K) QCASE(q3_K) QCASE(q4_K) QCASE(q5_K) QCASE(q6_K) QCASE(q4_0) QCASE(q4_1) QCASE(q5_0) QCASE(q5_1)
        if (!bytes) return 4;
        goto write;
    }
#define CASE(name, blk, sz) if (!strcmp(t, #name)) { quantize_row_##name##_ref(x, y, n); bytes = n / blk * sz; }
    CASE(q4_0, 32, 18) CASE(q4_1, 32, 20) CASE(q5_0, 32, 22) CASE(q5_1, 32, 24) CASE(q8_0, 32, 34)
    CASE(q8_1, 32, 36) CASE(q2_K, 256, 84) CASE(q3_K, 256, 110) CASE(q4_K, 256, 144) CASE(q5_K, 256, 176)
    CASE(q6_K, 256, 210)
    if (!bytes) return 4;
write:
    f = fopen(argv[4], "wb");
    fwrite(y, 1, bytes, f);
    fclose(f);
    return 0;
}
"""


def inputs() -> dict[str, np.ndarray]:
    """Named (rows, 256) float32 cases: random, structured and edge cases."""
    rng = np.random.default_rng(1234)
    c = {}
    c["randn"] = rng.standard_normal((24, 256))
    c["weights"] = rng.standard_normal((16, 256)) * 0.02 + rng.standard_t(3, (16, 256)) * 0.005  # LLM-like
    c["uniform_pos"] = rng.uniform(0, 1, (4, 256))
    c["uniform_neg"] = rng.uniform(-1, 0, (4, 256))
    z = rng.standard_normal((6, 256))
    z[0] = 0
    z[1, :128] = 0
    z[2, 16:48] = 0
    z[3, ::2] = 0
    z[4, :] = 1.0
    z[5, :] = -0.25
    c["zeros_and_const"] = z
    c["tiny"] = rng.standard_normal((4, 256)) * np.array([1e-6, 1e-12, 1e-20, 1e-30])[:, None]
    o = rng.standard_normal((6, 256)) * 0.01
    o[0, 7] = 50.0
    o[1, 200] = -80.0
    o[2, ::16] = 3.0
    o[3, 100] = 1e4
    o[4, 3] = -2e4
    o[5, :] *= np.linspace(0.001, 10, 256)
    c["outliers"] = o
    c["fp16_overflow"] = rng.standard_normal((2, 256)) * 1e6
    c["ints"] = rng.integers(-8, 8, (4, 256)).astype(np.float64)
    c["halves"] = (rng.integers(-64, 64, (4, 256)) + 0.5) / 8.0  # exact ties after scaling
    # many rows: rare decisions (a 1-ulp difference flipping a scale search) show up only in bulk
    c["bulk"] = rng.standard_t(4, (192, 256)) * rng.uniform(0.005, 0.05, (192, 1))
    # denormal float32 inputs: scales underflow, iscale overflows to inf, codes of inf/NaN
    c["denormal"] = rng.standard_normal((4, 256)) * np.array([1e-39, 1e-41, 1e-43, 1e-45])[:, None]
    return {k: v.astype(np.float32) for k, v in c.items()}


def imatrix_inputs() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Named ((rows, n_per_row) weights, (n_per_row,) importance) cases for the imatrix path."""
    rng = np.random.default_rng(4321)
    c = {}
    # LLM-like weights; importance like mean squared activations: positive, heavy-tailed
    w = rng.standard_normal((24, 512)) * 0.02 + rng.standard_t(3, (24, 512)) * 0.005
    c["llm"] = (w, rng.chisquare(1, 512) * rng.uniform(0.01, 10, 512))
    c["randn_flat_imp"] = (rng.standard_normal((8, 256)), np.ones(256))
    x = rng.standard_normal((6, 256))
    x[0] = 0
    x[1, :64] = 0
    x[2, 32:48] = 0
    x[3, :] = 0.5
    imp = rng.uniform(0, 2, 256)
    imp[::7] = 0  # dead columns
    c["zeros_and_dead_columns"] = (x, imp)
    o = rng.standard_normal((6, 768)) * 0.01
    o[0, 7], o[1, 300], o[2, ::50], o[3, 700] = 5.0, -8.0, 0.3, 1e3
    c["outliers"] = (o, rng.lognormal(0, 2, 768))
    c["bulk"] = (rng.standard_t(4, (96, 512)) * rng.uniform(0.005, 0.05, (96, 1)), rng.lognormal(0, 1.5, 512))
    return {k: (v.astype(np.float32), q.astype(np.float32)) for k, (v, q) in c.items()}


def main(ggml_dir: str, out: str, imatrix: bool = False) -> None:
    ggml = Path(ggml_dir)
    src = ggml / "src" / "ggml-quants.c"
    if not src.is_file():
        sys.exit(f"{src} not found")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "harness.c").write_text(HARNESS)
        flags = ["-O2", "-DNDEBUG", "-ffp-contract=off", "-fno-fast-math", "-ffunction-sections", "-fdata-sections", f"-I{ggml / 'include'}", f"-I{ggml / 'src'}"]
        subprocess.run(["gcc", *flags, "-c", str(src), "-o", str(tmp / "q.o")], check=True)
        subprocess.run(["gcc", *flags, "-c", str(tmp / "harness.c"), "-o", str(tmp / "h.o")], check=True)
        exe = tmp / "harness"
        # only the _ref quantizers are called; the rest of ggml-quants.o may reference ggml symbols, dropped by --gc-sections
        subprocess.run(["gcc", str(tmp / "h.o"), str(tmp / "q.o"), "-o", str(exe), "-lm",
                        "-Wl,--gc-sections"], check=True)
        arrays = {}
        if imatrix:
            for name, (x, qw) in imatrix_inputs().items():
                arrays[f"in/{name}"] = x
                arrays[f"imp/{name}"] = qw
                (tmp / "in.f32").write_bytes(x.tobytes())
                (tmp / "qw.f32").write_bytes(qw.tobytes())
                for t in ("q2_K", "q3_K", "q4_K", "q5_K", "q6_K", "q4_0", "q4_1", "q5_0", "q5_1"):
                    subprocess.run([str(exe), t, str(x.size), str(tmp / "in.f32"), str(tmp / "out.bin"),
                                    str(x.shape[1]), str(tmp / "qw.f32")], check=True)
                    data = np.frombuffer((tmp / "out.bin").read_bytes(), dtype=np.uint8)
                    arrays[f"out/{name}/{t}"] = data.reshape(x.shape[0], -1)
            np.savez_compressed(out, **arrays)
            print(f"wrote {out}: {len(arrays)} arrays")
            return
        for name, x in inputs().items():
            arrays[f"in/{name}"] = x
            (tmp / "in.f32").write_bytes(x.tobytes())
            for t, (blk, sz) in TYPES.items():
                subprocess.run([str(exe), t, str(x.size), str(tmp / "in.f32"), str(tmp / "out.bin")], check=True)
                data = np.frombuffer((tmp / "out.bin").read_bytes(), dtype=np.uint8)
                arrays[f"out/{name}/{t}"] = data.reshape(x.shape[0], -1)
    np.savez_compressed(out, **arrays)
    print(f"wrote {out}: {len(arrays)} arrays")


if __name__ == "__main__":
    args = sys.argv[1:]
    imat = "--imatrix" in args
    args = [a for a in args if a != "--imatrix"]
    default = "ggml_imatrix_vectors.npz" if imat else "ggml_ref_vectors.npz"
    main(args[0], args[1] if len(args) > 1 else str(Path(__file__).with_name(default)), imatrix=imat)
