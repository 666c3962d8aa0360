"""The one-kernel decode attention (jaxfp4/kernels/attn_triton.py) against the model's jnp attention
(:func:`jaxfp4.models.llama.attend`), on CPU in Pallas interpret mode (CI) and on the GPU.

What must be equal bit for bit: the updated caches (the new k's rotary embedding rounds like
HF's; v is copied). The output differs only through the order of float32 sums (and, on the GPU,
Triton's float32 ``exp`` and quotient, within a few float32 ulps): a score whose float32 value
lands next to a bf16/fp16 rounding boundary can round to the neighbouring value, one ulp away
(at most ``2**-7 * |score|`` in bf16, ``2**-10`` in fp16). If every score moves by at most
``eps`` the softmax weights move by factors within ``exp(+-2 eps)`` after normalization, so the
output moves by at most ``2 * (exp(2 eps) - 1) * max|v|``, plus one ulp of its own rounding: the
tolerance below, computed from each case's largest score. And nearly all outputs must be within
two ulps of the reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxfp4.kernels import attn_triton as A
from jaxfp4.models.llama import attend, attend_decode
from tests.conftest import requires_gpu

# (batch, max_len, heads, kv_heads, head_dim, pos): groups of 1, 2 and 4 query heads, lengths that
# are and are not multiples of the kernel's block, the first and the last position.
CASES = [
    (1, 160, 8, 2, 128, 129),
    (2, 37, 4, 4, 32, 36),
    (3, 100, 6, 3, 64, 0),
    (2, 64, 8, 2, 64, 63),
    (1, 300, 4, 1, 128, 257),
    (2, 40, 4, 2, 16, 21),  # the test fixtures' heads
]


def _inputs(seed: int, b: int, s: int, h: int, kvh: int, d: int, pos: int, dtype):
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((b, (h + 2 * kvh) * d)) * 0.5
    kc = rng.standard_normal((b, s, kvh, d))
    vc = rng.standard_normal((b, s, kvh, d)) * 2.0 ** rng.integers(-3, 4, (b, s, kvh, 1))
    kc[:, pos:], vc[:, pos:] = 0.0, 0.0  # positions from pos on not written yet (as in a decode)
    inv = 1.0 / 10000.0 ** (np.arange(0, d, 2) / d)
    ang = pos * np.concatenate([inv, inv])
    cast = lambda a: jnp.asarray(a, jnp.float32).astype(dtype)
    return cast(qkv), cast(np.cos(ang)), cast(np.sin(ang)), cast(kc), cast(vc)


def _split(qkv, cos, sin, h, kvh):
    """``attend``'s q, k, v ``[B, 1, heads, head_dim]`` and cos, sin ``[1, 1, head_dim]``."""
    b, d = qkv.shape[0], cos.shape[-1]
    q, k, v = jnp.split(qkv, [h * d, (h + kvh) * d], axis=-1)
    return q.reshape(b, 1, h, d), k.reshape(b, 1, kvh, d), v.reshape(b, 1, kvh, d), cos[None, None], sin[None, None]


def _run(qkv, cos, sin, kc, vc, pos, h, kvh, **kw):
    """The model's kernel path (``attend_decode``: its operand, then the kernel)."""
    o, (k2, v2) = attend_decode(*_split(qkv, cos, sin, h, kvh), (kc, vc), jnp.int32(pos), **kw)
    return o[:, 0], k2, v2


def _reference(qkv, cos, sin, kc, vc, pos, h, kvh):
    b, d = qkv.shape[0], kc.shape[-1]
    q, k, v, c, s = _split(qkv, cos, sin, h, kvh)
    o, (k2, v2) = attend(q, k, v, c, s, (kc, vc), jnp.int32(pos))
    # The largest scaled score, for the tolerance.
    qg = q.reshape(b, kvh, h // kvh, d).astype(jnp.float32)
    s = jnp.einsum("bkgd,bskd->bkgs", qg, k2.astype(jnp.float32)) * d**-0.5
    return o[:, 0], k2, v2, float(jnp.abs(s[..., : pos + 1]).max())


def _check(got, want, dtype):
    o, kc, vc = got
    ro, rk, rv, smax = want
    np.testing.assert_array_equal(np.asarray(kc.astype(jnp.float32)), np.asarray(rk.astype(jnp.float32)))
    np.testing.assert_array_equal(np.asarray(vc.astype(jnp.float32)), np.asarray(rv.astype(jnp.float32)))
    o, ro = np.asarray(o.astype(jnp.float32)), np.asarray(ro.astype(jnp.float32))
    rel = 2.0**-7 if dtype == jnp.bfloat16 else 2.0**-10  # one ulp, relative
    eps = rel * smax
    vmax = float(np.abs(np.asarray(rv.astype(jnp.float32))).max())
    tol = 2 * np.expm1(2 * eps) * vmax + rel * np.abs(ro).max()
    assert np.abs(o - ro).max() <= tol, (np.abs(o - ro).max(), tol)
    # Score flips are rare and a sum's order moves a result by an ulp at most: nearly every
    # output is within two ulps of the reference (a wrong position, head or mask moves most).
    near = np.abs(o - ro) <= 2 * rel * np.abs(ro) + 2.0**-24
    assert np.mean(near) >= 0.99, np.mean(near)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize(("b", "s", "h", "kvh", "d", "pos"), CASES)
def test_kernel_matches_attend_in_interpret_mode(b, s, h, kvh, d, pos, dtype):
    qkv, cos, sin, kc, vc = _inputs(s + pos, b, s, h, kvh, d, pos, dtype)
    want = _reference(qkv, cos, sin, kc, vc, pos, h, kvh)
    got = _run(qkv, cos, sin, kc, vc, pos, h, kvh, interpret=True)
    assert got[0].shape == (b, h * d) and got[0].dtype == dtype
    _check(got, want, dtype)


def test_kernel_block_size_does_not_change_the_result():
    # Blocks only split the loops over positions: a different block gives the same caches and an
    # output within the same tolerance (its sums run in another order).
    b, s, h, kvh, d, pos = 2, 100, 4, 2, 64, 77
    args = _inputs(5, b, s, h, kvh, d, pos, jnp.bfloat16)
    want = _reference(*args, pos, h, kvh)
    for block in (16, 32, 128):
        fresh = [jnp.array(a, copy=True) for a in args]  # the caches are donated
        got = _run(*fresh, pos, h, kvh, block=block, interpret=True)
        _check(got, want, jnp.bfloat16)


def test_position_past_the_cache_is_clamped_like_the_reference():
    # dynamic_update_slice clamps the write to the last position (and the causal mask then shows
    # every position); the kernel clamps the same way rather than write past the cache.
    b, s, h, kvh, d = 1, 40, 4, 2, 32
    qkv, cos, sin, kc, vc = _inputs(9, b, s, h, kvh, d, s - 1, jnp.bfloat16)
    ro, rk, rv, smax = _reference(qkv, cos, sin, kc, vc, s + 3, h, kvh)
    want = (ro, rk, rv, max(smax, 1.0))
    _check(_run(qkv, cos, sin, kc, vc, s + 3, h, kvh, interpret=True), want, jnp.bfloat16)


def test_kernel_lowers_for_cuda_on_cpu_install():
    b, s, h, kvh, d, pos = 1, 160, 32, 8, 128, 100
    args = _inputs(0, b, s, h, kvh, d, pos, jnp.bfloat16)
    f = jax.jit(A.decode_attention, static_argnames=("heads", "kv_heads", "block", "interpret"))
    qkv, _, _, kc, vc = args
    lowered = f.trace(qkv, kc, vc, jnp.int32(pos), heads=h, kv_heads=kvh)
    text = lowered.lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text


def test_unsupported_shapes_are_refused():
    assert A.supported(32, 8, 128, jnp.bfloat16)
    assert not A.supported(32, 8, 96, jnp.bfloat16)  # head_dim not a power of two
    assert not A.supported(32, 8, 8, jnp.bfloat16)  # too shallow for the tensor-core products
    assert not A.supported(34, 2, 128, jnp.bfloat16)  # more than 16 query heads per KV head
    assert not A.supported(32, 8, 128, jnp.float32)
    assert not A.supported(30, 8, 128, jnp.bfloat16)  # not whole query groups
    qkv, _, _, kc, vc = _inputs(0, 1, 16, 4, 2, 96, 3, jnp.bfloat16)
    with pytest.raises(ValueError, match="unsupported"):
        A.decode_attention(qkv, kc, vc, jnp.int32(3), heads=4, kv_heads=2, interpret=True)
    qkv, _, _, kc, vc = _inputs(0, 1, 16, 4, 2, 64, 3, jnp.bfloat16)
    with pytest.raises(ValueError, match="does not match"):
        A.decode_attention(qkv[:, :-64], kc, vc, jnp.int32(3), heads=4, kv_heads=2, interpret=True)


@requires_gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize(("b", "s", "h", "kvh", "d", "pos"), [*CASES, (16, 2048, 32, 8, 128, 2000)])
def test_kernel_matches_attend_on_gpu(b, s, h, kvh, d, pos, dtype):
    qkv, cos, sin, kc, vc = _inputs(s + pos, b, s, h, kvh, d, pos, dtype)
    want = _reference(qkv, cos, sin, kc, vc, pos, h, kvh)
    got = _run(qkv, cos, sin, kc, vc, pos, h, kvh)
    _check(got, want, dtype)
