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
