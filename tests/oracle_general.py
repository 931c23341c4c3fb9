"""An eager reference Highway-BP for arbitrary residual functions (ALGORITHM.md, paper Table 1).

Generalises oracle.py (identity residuals x_{l+1} = x_l + z_l) to steps

    zs_l = block_l(x_l)                      (a tuple of tensors: the expensive part)
    x_{l+1} = residual_l(x_l, *zs_l)          (cheap, elementwise in x_l; may have parameters)

with the two Jacobians of one step, both applied as VJPs only (no diagonal assumption):
    K_l^T g = d residual / d x  (zs held fixed) at g
    J_l^T g = d block / d x_l   at  (d residual / d zs at g)

Same conventions as oracle.highway_backward, per stream of L steps (e_l = d head / d x_l):
    round 0:  g_L = e_L,  g_l = (1 - gamma) K_l^T g_{l+1} + e_l  (l >= 1),  g_0 = (1 - gamma) K_0^T g_1
    round r:  v_l = J_l^T g^{r-1}_{l+1} + gamma K_l^T g^{r-1}_{l+1}  for every l (independent),
              g_l = (1 - gamma) K_l^T g_{l+1} + v_l + e_l    (a sequential scan of VJPs)
    finally:  block l's parameters and side inputs: its VJP at d residual / d zs at g^k_{l+1};
              residual l's parameters and side inputs: the residual's VJP at g^k_{l+1};
              the prelude (through x_0): g^k_0 + e_0.
The gamma split moves gamma * K_l from the residual path into the block side, so exact backprop
(and Highway-BP at k >= L) is unchanged; gamma = 1 is the fixed-point iteration.

Every block is CALLED EXACTLY ONCE per highway_backward_general call, at its forward state x_l
(a detached leaf), and that one graph serves every round and the final VJP. This matters for
blocks with side effects in forward, e.g. BatchNorm in train mode, whose running statistics are
then updated exactly as by one model.forward (same batch statistics, same number of updates).
With residual = lambda x, z: x + z the result equals oracle.highway_backward.
"""
import torch

from oracle_common import final_backward, per_stream


def _grads(outputs, inputs, cotangents):
    """cotangents^T d outputs / d inputs, zeros for inputs the outputs do not depend on."""
    pairs = [(o, c) for o, c in zip(outputs, cotangents) if o.requires_grad]
    if not pairs or not inputs:
        return [torch.zeros_like(x) for x in inputs]
    outs, cots = zip(*pairs)
    grads = torch.autograd.grad(outs, inputs, cots, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


class _Step:
    """One step's saved graphs: the block at leaf x, the residual at (x, leaf copies of zs)."""

    def __init__(self, block, residual, x):
        zs = block(x)
        if isinstance(zs, torch.Tensor):
            raise TypeError("a block must return a tuple of tensors, e.g. (z,)")
        self.x = x
        self.zs = tuple(zs)
        # zs cut off from the block's graph: the residual's VJP then splits into K^T (w.r.t. x)
        # and the cotangents of zs, which the block's graph takes further.
        self.zs_in = tuple(z.detach().requires_grad_() for z in self.zs)
        self.out = residual(x, *self.zs_in)

    def residual_vjp(self, g):
        """(K^T g, cotangents of zs): one VJP of the residual at g."""
        kg, *zg = _grads([self.out], [self.x, *self.zs_in], [g])
        return kg, zg

    def k_vjp(self, g):
        return _grads([self.out], [self.x], [g])[0]

    def j_vjp(self, zg):
        return _grads(self.zs, [self.x], zg)[0]

    def final_roots(self, g):
        """(root, cotangent) pairs of this step in the final backward at g = g^k_{l+1}: the
        block's outputs at their cotangents (the residual's VJP at g), then the residual at g."""
        _, zg = self.residual_vjp(g)
        return [(z, c) for z, c in zip(self.zs, zg) if z.requires_grad] + [(self.out, g)]


def _scan(steps, v, e, gamma):
    """Solve g_l = (1 - gamma) K_l^T g_{l+1} + v_l + e_l backwards along one stream (e_0 left out)."""
    L = len(steps)
    g = [None] * (L + 1)
    g[L] = e[L] if L > 0 else torch.zeros_like(e[0])
    for l in range(L - 1, -1, -1):
        g[l] = (1 - gamma) * steps[l].k_vjp(g[l + 1]) + v[l] + (e[l] if l > 0 else 0)
    return g


def highway_backward_general(streams, head, k, gamma=0.0):
    """Accumulate into .grad the gradients Highway-BP with k rounds defines.

    streams: list of (x0, steps), steps a list of (block, residual) with zs = block(x_l) a tuple
    and x_{l+1} = residual(x_l, *zs); head(states) takes one list [x_0, ..., x_L] per stream and
    returns the scalar loss (see models_general.py).

    Returns (loss, grads): the detached loss, and per stream the list [g_0 + e_0, g_1, ..., g_L]
    at round k, Highway-BP's stand-in for d loss / d x_l (exact where k >= L - l).
    """
    # Forward: each block once, on a leaf copy of its input state, keeping its graph.
    all_steps, states = [], []
    with torch.enable_grad():
        for x0, stream_steps in streams:
            xs = [x0.detach().requires_grad_()]
            saved = []
            for block, residual in stream_steps:
                step = _Step(block, residual, xs[-1])
                saved.append(step)
                xs.append(step.out.detach().requires_grad_())
            all_steps.append(saved)
            states.append(xs)

        loss = head(states)
    flat = [x for xs in states for x in xs]
    injections = per_stream(_grads([loss], flat, [torch.ones_like(loss)]), states)

    grads = []
    for steps, xs, e in zip(all_steps, states, injections):
        L = len(steps)
        g = _scan(steps, [torch.zeros_like(x) for x in xs[:L]], e, gamma)  # round 0
        for _ in range(k):
            v = []
            for l, step in enumerate(steps):  # independent: each reads the previous round only
                kg, zg = step.residual_vjp(g[l + 1])
                v.append(step.j_vjp(zg) + gamma * kg)
            g = _scan(steps, v, e, gamma)
        grads.append(g)

    # Final backward (one call, oracle_common.final_backward): the head, each block at the
    # zs-cotangents of g^k_{l+1}, each residual at g^k_{l+1} (its own parameters / side inputs),
    # the prelude at g^k_0 + e_0. The private leaf copies (states, zs_in) also collect .grad
    # there; they are dropped on return.
    step_roots = [[pair for step, g_next in zip(steps, g[1:]) for pair in step.final_roots(g_next)]
                  for steps, g in zip(all_steps, grads)]
    return final_backward(loss, streams, step_roots, grads, injections)

