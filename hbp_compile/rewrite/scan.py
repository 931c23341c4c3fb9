"""Scans along the residual path: solve g_l = c * g_{l+1} + a_l backwards in l.

Written with plain torch ops so that AOTAutograd traces them and Inductor compiles them. Two
forms of the diagonal scan: a sequential loop (n - 1 small fused multiply-adds, n - 1 dependent
steps, the least arithmetic) and a Hillis-Steele doubling scan (log2(n) steps of O(n) work).
A third, "op", runs either of them as ONE opaque op (rnn_ops.reverse_linear_scan): the graph
then holds one node whatever the length, and a CPU runs the recurrence in place. `choose_scan`
picks one by stream length, from thresholds measured by benchmarks/bench_scan.py.
"""
from __future__ import annotations

import math

import torch


def reverse_cumsum(a: torch.Tensor) -> torch.Tensor:
    """g_l = sum_{j >= l} a_j along dim 0 (identity residuals, K_l = I)."""
    return a.flip(0).cumsum(0).flip(0)


def reverse_scan_scalar(a: torch.Tensor, decay: float) -> torch.Tensor:
    """g_l = decay * g_{l+1} + a_l along dim 0, g_{n-1} = a_{n-1} (K_l = decay * I).

    decay = 1 is a reverse cumsum and decay = 0 no scan at all; otherwise a Hillis-Steele
    doubling scan, log2(n) steps, which stays finite where the rescaling trick
    cumsum(decay^-l a_l) would overflow for long streams.
    """
    if decay == 1.0:
        return reverse_cumsum(a)
    if decay == 0.0:
        return a
    n, g, d = a.shape[0], a, 1
    while d < n:
        # after this step g_l = sum_{j = l}^{l + 2d - 1} decay^(j - l) a_j
        shifted = torch.cat([g[d:], torch.zeros_like(g[:d])])
        g = g + (decay ** d) * shifted
        d *= 2
    return g


def reverse_linear_scan(a: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """g_l = a_l + k_l * g_{l+1} along dim 0, g_{n-1} = a_{n-1} (diagonal K_l).

    a: (n, *x.shape); k: (n - 1, *x.shape) or broadcastable, k_l the factor between positions
    l and l + 1 (dx_{l+1}/dx_l). Hillis-Steele doubling, log2(n) steps: after the step with
    distance d, g_l = a_l + p_l * g_{l+d} where p_l = k_l ... k_{l+d-1}. (The paper's
    Algorithm 1 starts the running product at the factor of position l + 1; it must start at
    k_l, the factor between l and l + 1.)
    """
    n = a.shape[0]
    if n == 1:
        return a
    g = a
    # p_l for the current distance; positions without a successor get 0 (nothing flows in)
    p = torch.cat([k.expand(n - 1, *a.shape[1:]).to(a.dtype), torch.zeros_like(a[:1])])
    d = 1
    while d < n:
        g = g + p * torch.cat([g[d:], torch.zeros_like(g[:d])])
        p = p * torch.cat([p[d:], torch.zeros_like(p[:d])])
        d *= 2
    return g



def reverse_linear_scan_sequential(a: torch.Tensor, k) -> torch.Tensor:
    """reverse_linear_scan as the plain recurrence: n - 1 dependent steps, no extra work."""
    n = a.shape[0]
    rows = [None] * n
    rows[n - 1] = a[n - 1]
    for l in range(n - 2, -1, -1):
        kl = k[l] if isinstance(k, torch.Tensor) and k.dim() == a.dim() else k
        rows[l] = a[l] + rows[l + 1] if isinstance(kl, float) and kl == 1.0 \
            else a[l] + kl * rows[l + 1]
    return torch.stack(rows)


def reverse_linear_scan_chunked(a: torch.Tensor, k, chunk: int = 0) -> torch.Tensor:
    """reverse_linear_scan in O(sqrt(n)) dependent steps of O(n) total work, no doubling.

    Positions are cut into C chunks of c (n padded with zeros): every chunk scans its own
    positions at once (c steps, all chunks together), the chunk starts are scanned across
    chunks (C steps), and each position adds its chunk's carry: g = g_local + P * G_next, with
    P the product of k from the position to its chunk's end. k: (n - 1, *x.shape), broadcastable,
    or a float (K = k I). The graph holds about 3c + 2C steps instead of n (sequential) or
    n log2(n) work (doubling)."""
    n = a.shape[0]
    if n <= 2:
        return reverse_linear_scan_sequential(a, k)
    c = chunk or max(2, math.isqrt(n))
    C = -(-n // c)
    pad = C * c - n
    if not isinstance(k, torch.Tensor):
        k = torch.full_like(a[:-1], float(k))
    k = k.expand(n - 1, *a.shape[1:]).to(a.dtype)
    # k_l for l in 0..n-1 (nothing flows into the last position or the padding)
    kf = torch.cat([k, a.new_zeros((1 + pad, *a.shape[1:]))]).unflatten(0, (C, c))
    af = torch.cat([a, a.new_zeros((pad, *a.shape[1:]))]).unflatten(0, (C, c)) if pad else \
        a.unflatten(0, (C, c))
    g_loc, prod = [None] * c, [None] * c        # per position in a chunk, all chunks: (C, *x)
    g_loc[c - 1], prod[c - 1] = af[:, c - 1], kf[:, c - 1]
    for j in range(c - 2, -1, -1):
        g_loc[j] = af[:, j] + kf[:, j] * g_loc[j + 1]
        prod[j] = kf[:, j] * prod[j + 1]
    starts = [None] * (C + 1)                   # true g at each chunk's first position
    starts[C] = torch.zeros_like(a[0])
    for i in range(C - 1, -1, -1):
        starts[i] = g_loc[0][i] + prod[0][i] * starts[i + 1]
    carry = torch.stack(starts[1:])             # g at the start of the next chunk: (C, *x)
    g = torch.stack(g_loc, 1) + torch.stack(prod, 1) * carry.unsqueeze(1)
    return g.flatten(0, 1)[:n]


def reverse_scan_op(a: torch.Tensor, k: torch.Tensor, form: str = "log-depth",
                    v=None) -> torch.Tensor:
    """g_l = a_l (+ v_l) + k_l g_{l+1} as ONE opaque op (rnn_ops.reverse_linear_scan); k is
    broadcast to (n - 1, *x.shape); `form` is what the op runs where it does not run the
    recurrence in place (a GPU); v (n - 1 rows) is added to a's first rows inside."""
    from .. import rnn_ops                          # noqa: F401 - registers torch.ops.hbp.*
    return torch.ops.hbp.reverse_linear_scan(a, k.expand(a.shape[0] - 1, *a.shape[1:]), form, v)


def reverse_scan(a: torch.Tensor, k, form: str) -> torch.Tensor:
    """g_l = a_l + k_l g_{l+1} in the form choose_scan picked; k a tensor (diagonal K_l, as in
    reverse_linear_scan) or a float (K = k I; 0 is no scan, 1 a reverse sum)."""
    scalar = not isinstance(k, torch.Tensor)
    if scalar and k == 0.0:
        return a
    if form == "op":
        k = a.new_full((1,) * a.dim(), k) if scalar else k.to(a.dtype)
        return reverse_scan_op(a, k)
    if form == "sequential":
        return reverse_linear_scan_sequential(a, k)
    if form == "chunked":
        return reverse_linear_scan_chunked(a, k)
    return reverse_scan_scalar(a, k) if scalar else reverse_linear_scan(a, k)


# Longest stream (L + 1 positions) that scans sequentially under scan="auto", per device type.
# CPU, measured by benchmarks/bench_scan.py (results/bench_scan_cpu.json, Inductor, (32, 64)
# per position, 1 thread): the loop's n - 1 fused multiply-adds beat doubling's n log2(n) work
# at every length (1.4 vs 12.3 ms at n = 256), but its unrolled graph compiles ever longer
# (6 s at 64, 17 s at 128, 42 s at 256, vs about 3 s for doubling). Past 32 positions "auto"
# takes the opaque op: the same recurrence, in place, with a graph of one node (a GRU loop's
# backward compile then no longer grows with T). CUDA: not measured yet (no GPU so far);
# doubling's log2(n) steps are assumed to win from short lengths on, as in the paper.
SEQUENTIAL_MAX = {"cpu": 32, "cuda": 8}


def choose_scan(n: int, device_type: str, scan: str = "auto") -> str:
    """"sequential", "op" or "log-depth" for a diagonal scan over n positions on this device.

    On a CPU, past SEQUENTIAL_MAX the opaque op (the chunked scan, O(sqrt(n)) graph steps, is
    still there by name; the doubling scan's n log2(n) work cost a 257-step GRU 26 ms of a
    36 ms backward, profiled); on a GPU the doubling scan's log2(n) depth."""
    if scan != "auto":
        return scan
    # a symbolic length is compared with nothing (no guard): it takes the long-stream form
    if isinstance(n, int) and n <= SEQUENTIAL_MAX.get(device_type, 8):
        return "sequential"
    return "op" if device_type == "cpu" else "log-depth"


def choose_matrix_scan(n: int, scan: str) -> str:
    """"sequential" or "log-depth" for a widened (m x m) scan: neither the chunked scan nor
    the opaque op has that form; a CPU keeps the loop up to 128 positions (compile time)."""
    if scan in ("sequential", "log-depth"):
        return scan
    return "sequential" if scan == "op" and n <= 128 else "log-depth"


# Widened states (an LSTM's (c, h)): m components per position and an m x m Jacobian per
# coordinate. a: (n, m, *x.shape); k: (n - 1, m, m, *x.shape) with k[l, j, i] = dr_j/dx_i
# between positions l and l + 1, so g_l[i] = a_l[i] + sum_j k_l[j, i] g_{l+1}[j].

def reverse_matrix_scan_sequential(a: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """g_l = a_l + k_l^T g_{l+1} per coordinate: the plain recurrence."""
    n = a.shape[0]
    rows = [None] * n
    rows[n - 1] = a[n - 1]
    for l in range(n - 2, -1, -1):
        rows[l] = a[l] + (k[l] * rows[l + 1].unsqueeze(1)).sum(0)      # sum over j
    return torch.stack(rows)


def reverse_matrix_scan(a: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """reverse_matrix_scan_sequential as a Hillis-Steele doubling scan (log2(n) steps).

    p_l maps g_{l+d} to its contribution at l (p[l, i, j], the transposed k's product):
    g_l += p_l g_{l+d}, then p_l = p_l p_{l+d}."""
    n = a.shape[0]
    if n == 1:
        return a
    p = torch.cat([k.transpose(1, 2).to(a.dtype), torch.zeros_like(k[:1]).to(a.dtype)])
    g, d = a, 1
    while d < n:
        g_far = torch.cat([g[d:], torch.zeros_like(g[:d])])             # (n, m, *x)
        g = g + (p * g_far.unsqueeze(1)).sum(2)
        p_far = torch.cat([p[d:], torch.zeros_like(p[:d])])             # (n, m, m, *x)
        p = (p.unsqueeze(3) * p_far.unsqueeze(1)).sum(2)
        d *= 2
    return g
