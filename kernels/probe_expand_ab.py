"""A/B of the Mosaic GPU kernel's E2M1 expansion (run on the GPU machine; the kernel lab).

"nibble": session 14's layout (each code a nibble; per 32-bit word 15 integer instructions before
the four bf16x2 multiplies). "scatter": the layout of ``prepare_codes`` now (each code's bits
scattered so that the word takes 10, :data:`jaxfp4.kernels.w4a16_mgpu.BIT_PLACES`). Same configs
(the tuned ones), same weights, in one run, interleaved; each layer's GPU time by CUPTI over
``COPIES`` distinct weights (``kernels/tune_mgpu.py``'s method), and the two outputs must be
bit-equal (the same exact products summed in the same order).

    PYTHONPATH=. python kernels/probe_expand_ab.py --ms 1,16,128 --shapes 4096x14336,14336x4096
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxfp4.formats import FP4Format
from jaxfp4.kernels import w4a16_mgpu as K
from jaxfp4.ops import pallas
from kernels.bench_gemm import COPIES, gpu_us
from kernels.probe_mgpu import layout
from kernels.tune_mgpu import layer_us, weight_sets


def _nibble_codes(codes: jax.Array) -> jax.Array:
    """Session 14's kernel order: inside each 16-byte chunk stored byte ``4p + j`` is natural byte
    ``4j + p``; inside each word nibble ``3 - j`` holds element ``8j + 2p``, ``7 - j`` the next."""
    n, kb = codes.shape
    c = codes.reshape(n, kb // 16, 4, 4).swapaxes(2, 3).reshape(n, kb // 4, 4)
    e = jnp.stack([c & 0xF, c >> 4], axis=-1).reshape(n, kb // 4, 8)
    nib = e[..., np.array([6, 4, 2, 0, 7, 5, 3, 1])]
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).astype(jnp.uint8).reshape(n, kb)


_NIBBLE_STEP = """and.b32 t, q, 0x70007000;
shr.b32 t, t, 6;
and.b32 u, q, 0x80008000;
or.b32 u, u, t;
mul.rn.bf16x2 ${j}, u, ${m};
"""
_NIBBLE_ASM = (
    "{\n.reg .b32 q, t, u;\nmov.b32 q, $4;\n"
    + "shl.b32 q, q, 4;\n".join(_NIBBLE_STEP.format(j=j, m=5 + j // 2) for j in range(4))
    + "}\n"
)


@contextlib.contextmanager
def variant(name: str):
    """The kernel with one expansion; jit caches are cleared on entry and exit (the PTX string is
    read when the kernel is traced)."""
    saved = K.prepare_codes, K._EXPAND_ASM
    if name == "nibble":
        K.prepare_codes, K._EXPAND_ASM = _nibble_codes, _NIBBLE_ASM
    jax.clear_caches()
    try:
        yield
    finally:
        K.prepare_codes, K._EXPAND_ASM = saved
        jax.clear_caches()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4096x14336,14336x4096,8192x8192,4096x28672")
    ap.add_argument("--ms", default="1,16,128")
    ap.add_argument("--formats", default="nvfp4,mxfp4")
    ap.add_argument("--reps", type=int, default=2, help="A/B rounds per case (interleaved)")
    args = ap.parse_args()
    dev = jax.devices()[0].device_kind
    out = {"device": dev, "jax": jax.__version__, "copies": COPIES, "method": __doc__.split("\n\n")[1], "records": []}
    key = jax.random.key(0)
    for k, n, wb, fname, qs in weight_sets(args.shapes, args.formats, key):
        fmt = FP4Format(fname)
        mx = fmt is FP4Format.MXFP4
        lays = {}
        for name in ("nibble", "scatter"):
            with variant(name):
                lays[name] = [layout(q) for q in qs]
        for m in map(int, args.ms.split(",")):
            x = jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.bfloat16)
            _, bf16 = gpu_us(lambda x, w: jnp.dot(x, w.T), x, wb)
            cfg = pallas.choose_mgpu_config(m, n, k, fmt)
            us, ys = {"nibble": [], "scatter": []}, {}
            for _ in range(args.reps):
                for name in ("nibble", "scatter"):
                    with variant(name):
                        t, y = layer_us(x, lays[name], mx, cfg)
                    us[name].append(t)
                    ys[name] = np.asarray(y.astype(jnp.float32))
            equal = bool(np.array_equal(ys["nibble"], ys["scatter"]))
            rec = dict(format=fname, M=m, K=k, N=n, config=str(cfg), bf16_us=bf16, us=us, bit_equal=equal)
            out["records"].append(rec)
            a, b = min(us["nibble"]), min(us["scatter"])
            print(
                f"{fname} M={m:4d} {k}x{n}: bf16 {bf16:6.1f}  nibble {a:6.2f}  scatter {b:6.2f} us "
                f"({a / b:.3f}x; {bf16 / b:.2f}x bf16) equal={equal}",
                flush=True,
            )
            with open(os.path.join(os.environ.get("OUT", "."), f"expand-ab-{dev.replace(' ', '_')}.json"), "w") as f:
                json.dump(out, f, indent=1)
        del lays


if __name__ == "__main__":
    main()
