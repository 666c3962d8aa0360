"""The residual add + RMSNorm kernel (jaxfp4/kernels/norm_triton.py) against its jnp twin
(:func:`jaxfp4.models.llama.add_rms_norm`, the model's RMSNorm), on CPU in Pallas interpret mode (CI) and on
the GPU.

``h`` (the residual sum) must be equal bit for bit: one rounding of an exact float32 sum. ``y``
differs only through the float32 sum of squares (another order) and, on the GPU, the ``rsqrt``
approximation: the normalizing factor moves by a few float32 ulps (relative ~1e-6), so ``h * r``
rounds to the neighbouring bf16/fp16 value only where it lies that close to a rounding boundary,
and the weight's product of a value one ulp off rounds at most two ulps off. Hence: every ``y``
within two ulps (relative ``2 * 2**-7`` in bf16, ``2 * 2**-10`` in fp16) and nearly all (99%)
equal; a wrong eps, weight, row or mean moves most values by far more.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxfp4.kernels import norm_triton as N
from jaxfp4.models.llama import add_rms_norm as reference
from jaxfp4.ops import SplitKSum
from tests.conftest import requires_gpu

# (leading shape, hidden): one decode row, a batch, odd widths (masked past hidden), a 3-D input.
CASES = [((1,), 4096), ((16,), 4096), ((3,), 1000), ((2, 5), 64), ((4,), 16)]


def _inputs(seed: int, lead: tuple[int, ...], hid: int, dtype, wdtype=jnp.float32):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*lead, hid)) * 2.0 ** rng.integers(-4, 5, (*lead, 1))
    delta = rng.standard_normal((*lead, hid)) * 0.3
    w = 1.0 + 0.2 * rng.standard_normal(hid)
    cast = lambda a, t: jnp.asarray(a, jnp.float32).astype(t)
    return cast(x, dtype), cast(delta, dtype), cast(w, wdtype)


def _check(got, want, dtype):
    (h, y), (rh, ry) = got, want
    assert h.dtype == y.dtype == dtype and h.shape == y.shape == rh.shape
    np.testing.assert_array_equal(np.asarray(h.astype(jnp.float32)), np.asarray(rh.astype(jnp.float32)))
    y, ry = np.asarray(y.astype(jnp.float32)), np.asarray(ry.astype(jnp.float32))
    rel = 2.0**-7 if dtype == jnp.bfloat16 else 2.0**-10  # one ulp, relative
    assert np.all(np.abs(y - ry) <= 2 * rel * np.abs(ry) + 2.0**-24), np.abs(y - ry).max()
    assert np.mean(y == ry) >= 0.99, np.mean(y == ry)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize(("lead", "hid"), CASES)
@pytest.mark.parametrize("with_delta", [True, False])
def test_kernel_matches_the_jnp_norm_in_interpret_mode(lead, hid, dtype, with_delta):
    x, delta, w = _inputs(hid + len(lead), lead, hid, dtype)
    delta = delta if with_delta else None
    _check(N.add_rms_norm(x, delta, w, eps=1e-5, interpret=True), reference(x, delta, w, 1e-5), dtype)


def _split_k(seed: int, lead: tuple[int, ...], hid: int, splits: int, dtype) -> SplitKSum:
    """A split-K layer output as the Mosaic GPU kernel leaves it: float32 partials ``[S, Mp, Np]``
    (tokens padded to 8, rows to 64, the padding random too: it must not be read) and row
    multipliers ``alpha * 2**c``. With three splits or more the first two are large and cancel
    exactly, so that a sum in another order than the split order rounds the rest away."""
    rng = np.random.default_rng(seed)
    m = int(np.prod(lead))
    np_, mp = -(-hid // 64) * 64, -(-m // 8) * 8
    parts = rng.standard_normal((splits, mp, np_)).astype(np.float32) * 2.0**-8
    if splits >= 3:
        parts[0] = rng.standard_normal((mp, np_)) * 2.0**10
        parts[1] = -parts[0]
    scale = (2.0**8 * rng.uniform(0.5, 2.0, np_)).astype(np.float32)
    return SplitKSum(jnp.asarray(parts), jnp.asarray(scale), lead, hid, jnp.dtype(dtype))


SPLIT_CASES = [((1,), 4096, 4), ((3,), 1000, 2), ((2, 5), 64, 3), ((1,), 3000, 4), ((16,), 4096, 2)]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize(("lead", "hid", "splits"), SPLIT_CASES)
def test_split_k_delta_is_summed_like_its_resolve(lead, hid, splits, dtype):
    # The kernel sums a SplitKSum's partials itself (hid 3000: the padded rows are short of the
    # program's block, so it resolves them first): h bit-equal to the summed path's. The split
    # order matters (three splits and more: the first two cancel), which the check would see.
    x, _, w = _inputs(hid + splits, lead, hid, dtype)
    delta = _split_k(hid, lead, hid, splits, dtype)
    _check(N.add_rms_norm(x, delta, w, eps=1e-5, interpret=True), reference(x, delta.resolve(), w, 1e-5), dtype)
    with pytest.raises(ValueError, match="split-K delta"):
        N.add_rms_norm(x, _split_k(0, lead, hid, splits, jnp.float32), w, eps=1e-5, interpret=True)


def test_split_order_is_what_resolve_depends_on():
    # The cancelling partials make the order visible: summing them the other way round loses the
    # small ones, so the test above could tell a kernel that summed in another order.
    d = _split_k(7, (1,), 256, 3, jnp.bfloat16)
    p = np.asarray(d.parts)
    other = (p[2] + p[1]) + p[0]
    assert not np.array_equal(other, np.asarray((p[0] + p[1]) + p[2]))


def test_weight_dtype_and_eps_are_used():
    # A bf16 weight is cast like a float32 one; eps enters the factor (rows of tiny values show it).
    x, delta, w = _inputs(3, (2,), 256, jnp.bfloat16, jnp.bfloat16)
    x = x * jnp.bfloat16(2.0**-10)
    delta = delta * jnp.bfloat16(2.0**-10)
    for eps in (1e-6, 1e-2):
        _check(N.add_rms_norm(x, delta, w, eps=eps, interpret=True), reference(x, delta, w, eps), jnp.bfloat16)
    _, y6 = N.add_rms_norm(x, delta, w, eps=1e-6, interpret=True)
    _, y2 = N.add_rms_norm(x, delta, w, eps=1e-2, interpret=True)
    assert float(jnp.abs(y6.astype(jnp.float32)).mean()) > 10 * float(jnp.abs(y2.astype(jnp.float32)).mean())


def test_bad_inputs_are_refused():
    x, delta, w = _inputs(0, (2,), 64, jnp.bfloat16)
    with pytest.raises(ValueError, match="unsupported"):
        N.add_rms_norm(x.astype(jnp.float32), None, w, eps=1e-5, interpret=True)
    with pytest.raises(ValueError, match="does not match"):
        N.add_rms_norm(x, delta[:, :32], w, eps=1e-5, interpret=True)
    with pytest.raises(ValueError, match="weight"):
        N.add_rms_norm(x, delta, w[:32], eps=1e-5, interpret=True)


def test_kernel_lowers_for_cuda_on_cpu_install():
    x, delta, w = _inputs(0, (1,), 4096, jnp.bfloat16)
    for d in (delta, None):
        lowered = jax.jit(lambda x, d, w: N.add_rms_norm(x, d, w, eps=1e-5)).trace(x, d, w)
        assert "triton" in lowered.lower(lowering_platforms=("cuda",)).as_text()


@requires_gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize(("lead", "hid", "splits"), SPLIT_CASES)
def test_split_k_delta_on_gpu(lead, hid, splits, dtype):
    x, _, w = _inputs(hid + splits, lead, hid, dtype)
    delta = _split_k(hid, lead, hid, splits, dtype)
    _check(N.add_rms_norm(x, delta, w, eps=1e-5), reference(x, delta.resolve(), w, 1e-5), dtype)


@requires_gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize(("lead", "hid"), [*CASES, ((2048,), 4096), ((1,), 8192)])
@pytest.mark.parametrize("with_delta", [True, False])
def test_kernel_matches_the_jnp_norm_on_gpu(lead, hid, dtype, with_delta):
    x, delta, w = _inputs(hid + len(lead), lead, hid, dtype)
    delta = delta if with_delta else None
    _check(N.add_rms_norm(x, delta, w, eps=1e-5), reference(x, delta, w, 1e-5), dtype)
