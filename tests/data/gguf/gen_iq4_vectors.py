"""Generate ``ggml_iq4_vectors.npz``: ggml's own IQ4_NL / IQ4_XS bytes (run once; the result is committed).

Same method as ``gen_vectors.py`` (ggml's ``ggml-quants.c`` compiled beside a tiny harness, baseline ISA,
``-ffp-contract=off``; nothing of ggml is copied here), on the same named inputs: for every case of
``gen_vectors.inputs()`` the unweighted quantizers ``quantize_iq4_nl/xs(src, dst, nrow, n, NULL)`` (what
llama.cpp's quantize runs without an imatrix), and for every case of ``gen_vectors.imatrix_inputs()``
the importance-weighted ones (``quant_weights``, one weight per column).

    python tests/data/gguf/gen_iq4_vectors.py /tmp/lcpp/llama_cpp_python-0.3.36/vendor/llama.cpp/ggml
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from gen_vectors import imatrix_inputs, inputs  # noqa: E402

HARNESS = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include "ggml.h"
#include "ggml-quants.h"

void ggml_abort(const char * file, int line, const char * fmt, ...) {
    fprintf(stderr, "ggml_abort at %s:%d\n", file, line);
    abort();
}

/* usage: harness TYPE N NPR IN.f32 OUT.bin [QW.f32]: N floats as rows of NPR, weights QW (NPR floats) or NULL */
int main(int argc, char ** argv) {
    if (argc != 6 && argc != 7) return 2;
    const char * t = argv[1];
    long n = atol(argv[2]), npr = atol(argv[3]);
    float * x = malloc(n * sizeof(float));
    void * y = calloc(n, 1);
    FILE * f = fopen(argv[4], "rb");
    if (!f || fread(x, sizeof(float), n, f) != (size_t) n) return 3;
    fclose(f);
    float * qw = NULL;
    if (argc == 7) {
        qw = malloc(npr * sizeof(float));
        f = fopen(argv[6], "rb");
        if (!f || fread(qw, sizeof(float), npr, f) != (size_t) npr) return 3;
        fclose(f);
    }
    size_t bytes = 0;
    if (!strcmp(t, "iq4_nl")) bytes = quantize_iq4_nl(x, y, n / npr, npr, qw);
    if (!strcmp(t, "iq4_xs")) bytes = quantize_iq4_xs(x, y, n / npr, npr, qw);
    if (!bytes) return 4;
    f = fopen(argv[5], "wb");
    fwrite(y, 1, bytes, f);
    fclose(f);
    return 0;
}
"""


def main(ggml_dir: str, out: str) -> None:
    ggml = Path(ggml_dir)
    src = ggml / "src" / "ggml-quants.c"
    if not src.is_file():
        sys.exit(f"{src} not found")
    arrays = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "harness.c").write_text(HARNESS)
        flags = ["-O2", "-DNDEBUG", "-ffp-contract=off", "-fno-fast-math", "-ffunction-sections", "-fdata-sections",
                 f"-I{ggml / 'include'}", f"-I{ggml / 'src'}"]
        subprocess.run(["gcc", *flags, "-c", str(src), "-o", str(tmp / "q.o")], check=True)
        subprocess.run(["gcc", *flags, "-c", str(tmp / "harness.c"), "-o", str(tmp / "h.o")], check=True)
        exe = tmp / "harness"
        subprocess.run(["gcc", str(tmp / "h.o"), str(tmp / "q.o"), "-o", str(exe), "-lm", "-Wl,--gc-sections"], check=True)
        cases = {name: (x, None) for name, x in inputs().items()}
        cases.update({f"imatrix_{name}": xq for name, xq in imatrix_inputs().items()})
        for name, (x, qw) in cases.items():
            arrays[f"in/{name}"] = x
            (tmp / "in.f32").write_bytes(x.tobytes())
            extra = []
            if qw is not None:
                arrays[f"imp/{name}"] = qw
                (tmp / "qw.f32").write_bytes(qw.tobytes())
                extra = [str(tmp / "qw.f32")]
            for t in ("iq4_nl", "iq4_xs"):
                subprocess.run([str(exe), t, str(x.size), str(x.shape[1]), str(tmp / "in.f32"), str(tmp / "out.bin"), *extra],
                               check=True)
                arrays[f"out/{name}/{t}"] = np.frombuffer((tmp / "out.bin").read_bytes(), dtype=np.uint8).reshape(x.shape[0], -1)
    np.savez_compressed(out, **arrays)
    print(f"wrote {out}: {len(arrays)} arrays")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else str(Path(__file__).with_name("ggml_iq4_vectors.npz")))
