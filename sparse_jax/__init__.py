"""sparse_jax: N:M (2:4) structured sparsity for JAX, optax and Flax."""

# --- core: patterns, selection rules, pruning, the masked transform (issue 2) ---
from sparse_jax._masked import MaskedState, PackedMask, apply_updates, masked, masks_from_state
from sparse_jax._patterns import is_nm_sparse, nm_mask, nm_violations
from sparse_jax._prune import (
    ReportRow,
    SparsityReport,
    apply_masks,
    check_masks,
    prune,
    sparsity_report,
)
from sparse_jax._selection import LeafPlan, Layout, plan_tree
from sparse_jax._trace import rules_from_computation

# --- one-shot pruning from calibration statistics: SparseGPT, Wanda (issue 20) ---
from sparse_jax._oneshot import (
    CalibrationStats,
    sparsegpt,
    update_calibration_stats,
    wanda,
)
from sparse_jax._oneshot_model import OneShotResult, OneShotRow, oneshot_prune

# --- SR-STE (sparse from scratch) and transposable masks (issue 21) ---
from sparse_jax._srste import (
    SrsteState,
    mask_flip_fraction,
    srste,
    srste_finalize,
    srste_flip_fraction,
    srste_masks,
    srste_model,
    srste_project,
)
from sparse_jax._transposable import is_transposable_nm, transposable_nm_mask

# --- channel permutations for N:M masks, batch-norm recalibration (issue 22) ---
from sparse_jax._coupling import ChannelCoupling, ChannelGroup, channel_groups
from sparse_jax._permute import (
    GroupSearch,
    PermutationSearch,
    apply_permutations,
    search_permutations,
)
from sparse_jax._recalibrate import recalibrate_batch_norm, recalibrate_batch_stats

# --- compressed format, matmul, kernels, nn layers (issue 3) ---
from sparse_jax._compressed import Sparse24, compress, decompress, gather_kept
from sparse_jax._matmul import matmul
from sparse_jax import kernels, nn

# --- compressed checkpoints (issue 12); `sparse_jax.export`, `sparse_jax.inspect` are submodules ---
from sparse_jax._checkpoint import CompressedStats, restore_compressed, save_compressed
from sparse_jax import export, inspect  # noqa: E402  (submodules; jax2onnx/onnx load lazily)

__version__ = "0.1.0"
