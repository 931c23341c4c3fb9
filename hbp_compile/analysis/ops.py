"""Op categories, in one place (as Inductor's partitioner keeps its OpTypes): which aten ops
make a block heavy, move no values, draw random numbers, index a member's piece, and so on."""
from __future__ import annotations

import torch
import torch.fx as fx

aten = torch.ops.aten

# A block is the expensive part of a step: it must hold one of these (a normalisation's mean and
# variance are not a block, so a hand-written RMSNorm is no residual step).
HEAVY_OPS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
             aten.convolution.default, aten._scaled_dot_product_flash_attention_for_cpu.default,
             aten._scaled_dot_product_efficient_attention.default,
             aten._scaled_dot_product_flash_attention.default, aten.embedding.default}

# Op names a block's one-line summary mentions (groups.py), heavy ones and activations.
SUMMARY_OPS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "convolution", "native_layer_norm",
               "_softmax", "var_mean", "_scaled_dot_product_flash_attention_for_cpu",
               "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
               "embedding", "_native_batch_norm_legit_functional", "gelu", "silu", "tanh",
               "sigmoid", "relu"}

# Ops that only re-describe their input's memory: recomputed in the backward, never saved.
VIEW_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.t.default,
    aten.transpose.int, aten.permute.default, aten.expand.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.slice.Tensor,
    aten.select.int, aten.alias.default, aten.split.Tensor, aten.split_with_sizes.default,
    aten.unbind.int, aten.chunk.default, aten.detach.default,
}

# aten graphs are stride-specific: a view recorded on a contiguous intermediate may be invalid
# once vmap adds a member axis (the physical layout differs). Templates and backwards reshape.
VIEW_TO_RESHAPE = {aten.view.default, aten._unsafe_view.default}

# Reshapes (their inverse is a reshape back), for walking through them.
RESHAPE_OPS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}

# Ops that change how values are indexed but not the values (analysis/views.py moves them off
# a stream): reshape-like ones, whose inverse reshapes back to the input's shape (a clone or a
# cast to the input's own dtype among them), and permutations, which permute back.
REINDEX_OPS = RESHAPE_OPS | {aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
                             aten.squeeze.default, aten.alias.default, aten.clone.default,
                             aten._to_copy.default}
PERMUTE_OPS = {aten.permute.default, aten.transpose.int, aten.t.default}

# Parameter preprocessing that may move into a block (layout/dtype only, no arithmetic). Absorbed,
# a weight is captured as itself, so the t(W) that Dynamo emits at every RNN step does not hide
# that the steps share W.
ABSORBED_OPS = {
    aten.t.default, aten.permute.default, aten.transpose.int, aten.view.default,
    aten.reshape.default, aten.expand.default, aten.unsqueeze.default, aten.squeeze.dim,
    aten.squeeze.dims, aten._to_copy.default, aten.alias.default, aten.clone.default,
    aten._unsafe_view.default,
}

# Ops that pick a member's piece out of a shared tensor (x[t]): their index differs per member,
# so they stay outside a capture function, as its per-member inputs.
INDEXING_OPS = {
    aten.select.int, aten.slice.Tensor, aten.index.Tensor, aten.narrow.default,
    aten.as_strided.default, aten.unbind.int, aten.index_select.default, aten.gather.default,
}

# Random ops whose outputs do not depend differentiably on their inputs (the inputs give a shape
# or probabilities): the forward draws them, saves them, and the backward's templates read the
# saved values (dropout masks). Random ops that transform data (a fused dropout-attention) cannot.
SAVED_RANDOM_OPS = {
    aten.bernoulli.p, aten.bernoulli.default, aten.bernoulli.Tensor, aten.rand_like.default,
    aten.randn_like.default, aten.randint_like.default, aten.randint_like.low_dtype,
    aten.rand.default, aten.randn.default,
}

# Random ops that draw a mask and apply it in one kernel: the block saves the mask output, its
# backward templates apply the saved mask (groups.py), and the forward runs the op itself.
MASKED_RANDOM_OPS = {aten.native_dropout.default}

# *_like ops: a draw graph runs them on an empty tensor of the input's layout (partition.py).
LIKE_OPS = {aten.empty_like.default, aten.zeros_like.default, aten.ones_like.default,
            aten.rand_like.default, aten.randn_like.default, aten.full_like.default}

# Ops whose batching rules fall short inside a vmapped VJP: native_layer_norm's specialises a
# symbolic batch size (a recompile per batch size under dynamic=True); batch norm's functional
# form and the fused CPU attention kernel have none. Batched templates run their
# decompositions; Inductor decomposes them anyway, so only the eager path pays for it.
VMAP_DECOMPOSED = (
    aten.native_layer_norm.default,
    aten.native_group_norm.default,
    aten._native_batch_norm_legit_functional.default,
    aten._native_batch_norm_legit_no_training.default,
    aten._native_batch_norm_legit.no_stats,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
)


def is_pointwise_op(target) -> bool:
    """An aten overload tagged pointwise (elementwise arithmetic, no views)."""
    return isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags \
        and not target.is_view


def device_type(node: fx.Node) -> str:
    """The device type of a node's value ("cpu" where unknown)."""
    val = node.meta.get("val")
    return val.device.type if isinstance(val, torch.Tensor) else "cpu"
