"""An eager reference implementation of Highway-BP (see /work/shared/design/ALGORITHM.md).

Deliberately naive: Python loops, one torch.autograd.grad per block per round, no vmap, no
stacking, no scan tricks. It is independent of hbp_compile, so the package can be checked against it.

It works on a model's `stream_view` decomposition (see models.py): residual steps
x_{l+1} = x_l + z_l, z_l = block_l(x_l), so K_l = I. With the paper's gamma split, block_l becomes
block_l(x) + gamma * x and the residual (1 - gamma) * x + z, so K_l = (1 - gamma) I.

Conventions, per stream of L steps (e_l = d head / d x_l, the injections):
    g_L = e_L,   g_l = (1 - gamma) g_{l+1} + v_l + e_l   for l = L-1 .. 1,
    g_0 = (1 - gamma) g_1 + v_0                          (the part that went through the stream)
where v_l = 0 in round 0 and v_l = J_l^T g^{r-1}_{l+1} + gamma g^{r-1}_{l+1} in round r.
The prelude receives g^k_0 + e_0: e_0 goes from the head straight to x_0 without entering the
stream, so it never feeds a block VJP.
"""
import torch

from oracle_common import final_backward, per_stream


def exact_backward(model, *inputs):
    """Plain backprop: model(*inputs).backward(); returns the detached loss."""
    loss = model(*inputs)
    loss.backward()
    return loss.detach()


def param_grads(model):
    """{name: clone of .grad} for every parameter (zeros where .grad is None)."""
    return {
        name: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
        for name, p in model.named_parameters()
    }


def _vjp(out, inp, cotangent):
    """cotangent^T d out / d inp; zeros when out does not depend on inp."""
    if not out.requires_grad:
        return torch.zeros_like(inp)
    (grad,) = torch.autograd.grad(out, inp, cotangent, retain_graph=True, allow_unused=True)
    return torch.zeros_like(inp) if grad is None else grad


def _scan(v, e, gamma):
    """Solve g_l = (1 - gamma) g_{l+1} + v_l + e_l backwards along one stream (e_0 left out)."""
    L = len(v)
    g = [None] * (L + 1)
    g[L] = e[L] if L > 0 else torch.zeros_like(e[0])
    for l in range(L - 1, -1, -1):
        g[l] = (1 - gamma) * g[l + 1] + v[l] + (e[l] if l > 0 else 0)
    return g


def highway_backward(streams, head, k, gamma=0.0):
    """Accumulate into .grad the gradients Highway-BP with k rounds defines.

    streams, head: a model's stream_view(*inputs). Parameters of the prelude (through x0), of the
    blocks and of the head all receive gradients; anything else the blocks or head read from the
    autograd graph (side inputs) gets its share through the same backward.

    Returns (loss, grads): the detached loss, and per stream the list [g_0 + e_0, g_1, ..., g_L]
    at round k, i.e. Highway-BP's stand-in for d loss / d x_l (exact where k >= L - l).
    """
    # Forward along each stream without a graph, then make every state a leaf so that the head's
    # gradient into each x_l (its injection e_l) can be read off separately.
    states = []
    for x0, blocks in streams:
        xs = [x0.detach()]
        with torch.no_grad():
            for blk in blocks:
                xs.append(xs[-1] + blk(xs[-1]))
        states.append([x.requires_grad_() for x in xs])

    loss = head(states)
    flat = [x for xs in states for x in xs]
    e_flat = torch.autograd.grad(loss, flat, retain_graph=True, allow_unused=True) if flat else []
    e_flat = [torch.zeros_like(x) if g is None else g for x, g in zip(flat, e_flat)]
    injections = per_stream(e_flat, states)

    # One graph per block at its saved input, reused by every round and by the final VJP.
    with torch.enable_grad():
        zs = [[blk(x) for blk, x in zip(blocks, xs)] for (_, blocks), xs in zip(streams, states)]

    grads = []
    for xs, z, e in zip(states, zs, injections):
        L = len(z)
        g = _scan([torch.zeros_like(x) for x in xs[:L]], e, gamma)  # round 0: residual path only
        for _ in range(k):
            # every v_l depends only on the previous round: independent block VJPs
            v = [_vjp(z[l], xs[l], g[l + 1]) + gamma * g[l + 1] for l in range(L)]
            g = _scan(v, e, gamma)
        grads.append(g)

    # Final backward: the head's own parameters, block l's parameters at g^k_{l+1}, the prelude
    # at g^k_0 + e_0.
    step_roots = [[(z_l, g[l + 1]) for l, z_l in enumerate(z) if z_l.requires_grad]
                  for z, g in zip(zs, grads)]
    return final_backward(loss, streams, step_roots, grads, injections)
