"""Scans along the residual path against a plain Python loop written here."""
import pytest
import torch

from hbp_compile.rewrite.scan import (reverse_cumsum, reverse_linear_scan,
                                      reverse_linear_scan_chunked,
                                      reverse_linear_scan_sequential, reverse_matrix_scan,
                                      reverse_matrix_scan_sequential, reverse_scan_scalar)


def loop(a, k):
    """g_l = a_l + k_l g_{l+1}, g_{n-1} = a_{n-1}: the definition, one position at a time."""
    n = a.shape[0]
    g = [None] * n
    g[n - 1] = a[n - 1].clone()
    for l in range(n - 2, -1, -1):
        g[l] = a[l] + k[l] * g[l + 1]
    return torch.stack(g)


@pytest.mark.parametrize("n", [1, 2, 3, 17, 64, 257])
def test_diagonal_scans_equal_the_loop(n):
    torch.manual_seed(n)
    a = torch.randn(n, 3, 5, dtype=torch.float64)
    k = torch.rand(max(n - 1, 0), 3, 5, dtype=torch.float64) * 1.5   # |k| up to 1.5: no decay
    want = loop(a, k)
    torch.testing.assert_close(reverse_linear_scan(a, k), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reverse_linear_scan_sequential(a, k), want, rtol=1e-12, atol=1e-12)
    for chunk in (0, 2, 5, n + 3):                 # default sqrt(n), tiny, uneven, one chunk
        torch.testing.assert_close(reverse_linear_scan_chunked(a, k, chunk), want,
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 3, 17, 64])
@pytest.mark.parametrize("decay", [0.0, 0.3, 0.8, 1.0])
def test_scalar_scan_and_cumsum_equal_the_loop(n, decay):
    torch.manual_seed(n + int(10 * decay))
    a = torch.randn(n, 4, dtype=torch.float64)
    want = loop(a, torch.full((max(n - 1, 0), 4), decay, dtype=torch.float64))
    torch.testing.assert_close(reverse_scan_scalar(a, decay), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reverse_linear_scan_sequential(a, decay), want, rtol=1e-12,
                               atol=1e-12)
    torch.testing.assert_close(reverse_linear_scan_chunked(a, decay), want, rtol=1e-12,
                               atol=1e-12)
    if decay == 1.0:
        torch.testing.assert_close(reverse_cumsum(a), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 3, 17, 64])
@pytest.mark.parametrize("m", [2, 3])
def test_matrix_scans_equal_the_loop(n, m):
    """Widened states: g_l = a_l + K_l^T g_{l+1} with an m x m K_l per coordinate."""
    torch.manual_seed(100 * m + n)
    a = torch.randn(n, m, 4, dtype=torch.float64)
    k = torch.randn(max(n - 1, 0), m, m, 4, dtype=torch.float64) * 0.6
    g = [None] * n
    g[n - 1] = a[n - 1].clone()
    for l in range(n - 2, -1, -1):                 # the definition, one coordinate at a time
        g[l] = a[l].clone()
        for c in range(4):
            g[l][:, c] += k[l][:, :, c].T @ g[l + 1][:, c]
    want = torch.stack(g)
    torch.testing.assert_close(reverse_matrix_scan(a, k), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reverse_matrix_scan_sequential(a, k), want, rtol=1e-12, atol=1e-12)
