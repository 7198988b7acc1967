"""The one place that reaches into jax's private Mosaic GPU interpret mode."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def mosaic_gpu_interpret_mode():
    """Runs Mosaic GPU kernels traced inside the block on the CPU interpreter.

    Mosaic GPU's interpreter (``force_gpu_interpret_mode``) is not public API
    in jax 0.10/0.11, so the import is confined here; if jax moves it, this
    helper is the only thing to update.

    Raises:
      RuntimeError: if this jax has no Mosaic GPU interpret mode.

    Example (the Mosaic GPU kernel on the CPU, where ``interpret=True`` enters
    this context around the kernel; a few seconds):
      >>> import jax, jax.numpy as jnp, numpy as np, sparse_jax
      >>> from sparse_jax import kernels
      >>> w = jax.random.normal(jax.random.key(0), (64, 64), jnp.bfloat16)
      >>> s = sparse_jax.compress(w, axis=0, prune=True)
      >>> x = jax.random.normal(jax.random.key(1), (2, 64), jnp.bfloat16)
      >>> y = kernels.sparse24_matmul_mosaic(x, s.values, s.meta, k_dense=64,
      ...                                    tiles=kernels.Tiles(64, 64, 64), interpret=True)
      >>> want = x.astype(np.float32) @ sparse_jax.decompress(s).astype(np.float32)
      >>> bool(np.allclose(y.astype(np.float32), want, rtol=2e-2, atol=5e-2))
      True
    """
    try:
        from jax._src.pallas.mosaic_gpu.interpret import params as interpret_params
    except ImportError as err:  # pragma: no cover - depends on the jax version
        raise RuntimeError(
            "Mosaic GPU interpret mode is unavailable in this jax "
            "(no jax._src.pallas.mosaic_gpu.interpret.params); run the "
            "Mosaic kernel on a GPU or use impl='pallas'"
        ) from err
    with interpret_params.force_gpu_interpret_mode(interpret_params.InterpretGPUParams()):
        try:
            yield
        except BaseException:
            # The interpreter keeps global state that a failed kernel leaves dirty.
            reset = getattr(interpret_params, "reset_gpu_interpret_mode_state", None)
            if reset is None:
                from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

                reset = getattr(interpret_pallas_call, "reset_gpu_interpret_mode_state", None)
            if reset is not None:
                reset()
            raise
