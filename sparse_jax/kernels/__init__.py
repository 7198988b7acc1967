"""Pallas kernels for the compressed 2:4 matmul.

* `sparse24_matmul_pallas`: portable ``pl.pallas_call`` (Triton lowering on GPU),
  ``x @ W`` and ``x @ W.T``, bf16/f16/f32.
* `sparse24_matmul_mosaic`: Hopper (Mosaic GPU) kernel with a TMA pipeline and
  wgmma, ``x @ W``, bf16/f16.

Both run on the CPU in interpret mode (``interpret=True``), which is how the
tests check them. Most callers want `sparse_jax.matmul`, which picks one.
"""

from sparse_jax.kernels._expand import expand_phase_major, permute_k, unpermute_k
from sparse_jax.kernels._interpret import mosaic_gpu_interpret_mode
from sparse_jax.kernels._mosaic_matmul import default_mosaic_tiles, sparse24_matmul_mosaic
from sparse_jax.kernels._pallas_matmul import sparse24_matmul_pallas
from sparse_jax.kernels._tiles import Tiles, choose_tiles

__all__ = [
    "Tiles",
    "choose_tiles",
    "default_mosaic_tiles",
    "expand_phase_major",
    "mosaic_gpu_interpret_mode",
    "permute_k",
    "sparse24_matmul_mosaic",
    "sparse24_matmul_pallas",
    "unpermute_k",
]
