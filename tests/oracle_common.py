"""What the two eager oracles (oracle.py, oracle_general.py) do alike: split the head's gradient
into per-stream injections, and the one final backward. Independent of hbp_compile."""
import torch


def per_stream(flat, states):
    """Values, one per state of every stream in order, back into one list per stream."""
    out, i = [], 0
    for xs in states:
        out.append(flat[i : i + len(xs)])
        i += len(xs)
    return out


def final_backward(loss, streams, step_roots, grads, injections):
    """The final backward, all at once so that a shared graph (the prelude, tied or shared
    weights) is walked once: the head at 1, each stream's steps at `step_roots` (per stream, its
    (root, cotangent) pairs in order), its prelude (through x_0) at g^k_0 + e_0.

    Returns (loss, grads): the detached loss, and per stream [g_0 + e_0, g_1, ..., g_L]."""
    roots, cotangents = ([loss], [torch.ones_like(loss)]) if loss.requires_grad else ([], [])
    for (x0, _), pairs, g, e in zip(streams, step_roots, grads, injections):
        for root, cotangent in pairs:
            roots.append(root)
            cotangents.append(cotangent)
        if x0.requires_grad:
            roots.append(x0)
            cotangents.append(g[0] + e[0])
    if roots:
        torch.autograd.backward(roots, cotangents)
    return loss.detach(), [[g[0] + e[0]] + g[1:] for g, e in zip(grads, injections)]
