"""``x @ W`` with ``W`` a compressed 2:4 `Sparse24`, differentiable, dispatched per backend.

On GPU the Pallas kernel reads the compressed weight (never a dense copy in
HBM); elsewhere a reference path decompresses and calls ``jnp.dot``. The
gradient flows to ``x`` (through the transposed kernel) and to the kept values
(``gather_kept`` of the dense weight gradient), never to the metadata, so a
compressed model can be evaluated or fine-tuned with its sparsity pattern fixed.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from sparse_jax._compressed import Sparse24, decompress, gather_kept
from sparse_jax.kernels import Tiles, sparse24_matmul_mosaic, sparse24_matmul_pallas

IMPLS = ("auto", "reference", "pallas", "mosaic")


@dataclasses.dataclass(frozen=True)
class _Config:
    shape: tuple[int, int]  # dense (K, N) of W
    transpose: bool
    impl: str  # resolved: reference | pallas | mosaic
    interpret: bool
    tiles: Tiles | None


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _resolve_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"matmul: impl={impl!r}; expected one of {IMPLS}")
    if impl == "auto":
        return "pallas" if _on_gpu() else "reference"
    return impl


def _forward(x, values, meta, cfg: _Config):
    k, _ = cfg.shape
    out_dtype = jnp.result_type(x.dtype, values.dtype)
    if cfg.impl == "reference":
        w = decompress(Sparse24(values, meta, cfg.shape, 0)).astype(out_dtype)
        w = w.T if cfg.transpose else w
        return jnp.dot(x.astype(out_dtype), w, preferred_element_type=jnp.float32).astype(out_dtype)
    if cfg.impl == "mosaic":
        if cfg.transpose:
            raise NotImplementedError(
                "matmul: impl='mosaic' has no transposed (x @ W.T) kernel; use impl='pallas'"
            )
        return sparse24_matmul_mosaic(
            x, values, meta, k_dense=k, tiles=cfg.tiles, interpret=cfg.interpret
        )
    return sparse24_matmul_pallas(
        x, values, meta, k_dense=k, transpose=cfg.transpose, tiles=cfg.tiles, interpret=cfg.interpret
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _matmul_2d(x, values, meta, cfg: _Config):
    return _forward(x, values, meta, cfg)


def _matmul_2d_fwd(x, values, meta, cfg: _Config):
    return _forward(x, values, meta, cfg), (x, values, meta)


def _matmul_2d_bwd(cfg: _Config, residuals, g):
    x, values, meta = residuals
    # d(x @ W)/dx = g @ W.T and d(x @ W.T)/dx = g @ W: the other orientation.
    # Tiles were chosen for the forward shapes; let the kernel pick its own.
    backward_impl = "pallas" if cfg.impl == "mosaic" else cfg.impl
    flipped = dataclasses.replace(
        cfg, transpose=not cfg.transpose, impl=backward_impl, tiles=None
    )
    dx = _forward(g.astype(x.dtype), values, meta, flipped).astype(x.dtype)
    if cfg.transpose:  # y = x @ W.T: dW = g.T @ x
        dense_grad = jnp.dot(g.T, x, preferred_element_type=jnp.float32)
    else:  # y = x @ W: dW = x.T @ g
        dense_grad = jnp.dot(x.T, g, preferred_element_type=jnp.float32)
    dvalues = gather_kept(dense_grad, Sparse24(values, meta, cfg.shape, 0))
    return dx, dvalues.astype(values.dtype), None


_matmul_2d.defvjp(_matmul_2d_fwd, _matmul_2d_bwd)


def matmul(
    x: jax.Array,
    s: Sparse24,
    *,
    transpose: bool = False,
    impl: str = "auto",
    interpret: bool | None = None,
    tiles: Tiles | None = None,
) -> jax.Array:
    """``x @ W`` (or ``x @ W.T``) for ``W = decompress(s)`` of shape ``(K, N)``.

    Args:
      x: ``(..., K)`` (or ``(..., N)`` when ``transpose``), floating point.
      s: the compressed weight, 2-d, compressed along axis 0 (``K``, the
        reduction axis of ``x @ W``), as ``compress(w, axis=0)`` gives for a
        Flax ``Linear`` kernel.
      transpose: compute ``x @ W.T`` (``(..., K)`` out) instead.
      impl: ``"auto"`` (the portable Pallas kernel on GPU, the reference
        elsewhere), ``"reference"`` (decompress, then ``jnp.dot``),
        ``"pallas"`` (portable kernel, Triton lowering on GPU) or ``"mosaic"``
        (Hopper kernel; bf16/f16, not transposed).
      interpret: run a Pallas kernel in interpret mode; default: when not on GPU.
      tiles: kernel block sizes; chosen per shape when None.

    Returns:
      ``(..., N)`` (or ``(..., K)``) in the promoted dtype of ``x`` and
      ``s.values``, accumulated in float32. Differentiable in ``x`` and in
      ``s.values`` (the gradient of the kept entries); the metadata gets none.

    Example:
      >>> import jax, jax.numpy as jnp, sparse_jax
      >>> w = jax.random.normal(jax.random.key(0), (64, 16))
      >>> s = sparse_jax.compress(w, prune=True)
      >>> x = jax.random.normal(jax.random.key(1), (2, 3, 64))
      >>> y = sparse_jax.matmul(x, s)
      >>> y.shape, bool(jnp.allclose(y, x @ sparse_jax.decompress(s), atol=1e-4))
      ((2, 3, 16), True)
    """
    if not isinstance(s, Sparse24):
        raise TypeError(f"matmul: s must be a Sparse24 (sparse_jax.compress), got {type(s).__name__}")
    if s.ndim != 2 or s.axis != 0:
        raise ValueError(
            f"matmul: s must be a 2-d weight (K, N) compressed along axis 0, got "
            f"shape {s.shape} compressed along axis {s.axis}"
        )
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"matmul: x must be floating point, got {x.dtype} with shape {x.shape}")
    k, n = s.shape
    contracted, produced = (n, k) if transpose else (k, n)
    if x.ndim == 0 or x.shape[-1] != contracted:
        raise ValueError(
            f"matmul: x has shape {x.shape}; expected (..., {contracted}) to multiply "
            f"{'W.T' if transpose else 'W'} with W of shape {s.shape}"
        )
    cfg = _Config(
        shape=(k, n),
        transpose=bool(transpose),
        impl=_resolve_impl(impl),
        interpret=(not _on_gpu()) if interpret is None else bool(interpret),
        tiles=tiles,
    )
    batch = x.shape[:-1]
    y = _matmul_2d(x.reshape(-1, contracted), s.values, s.meta, cfg)
    return y.reshape(batch + (produced,))
