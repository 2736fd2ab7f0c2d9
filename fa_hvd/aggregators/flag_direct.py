"""A direct, slow transcription of the released Flag Aggregator (DESIGN.md 3.1).

The yardstick for the tests and the benchmark (``fa-hvd-bench aggregators
--direct``), not for training: it forms the ``n x (p + p(p-1))`` stacked matrix and
takes its SVD at every IRLS step, exactly as the release does, so the Gram-space
implementation (:mod:`.flag`, ``mode="reference"``) can be checked and timed
against it. Memory is O(n p^2).
"""

import torch


def flag_direct(G: torch.Tensor, r: int, lambda_: float, T: int, eps: float = 1e-7) -> torch.Tensor:
    """The released FA of ``G`` (``(p, n)``): rank ``r``, pair weight ``lambda_``, up to ``T`` IRLS steps."""
    p, n = G.shape
    H = (G / G.norm(dim=1, keepdim=True)).T  # (n, p)
    torch.manual_seed(1)
    U = torch.rand(n, r).to(device=G.device, dtype=G.dtype)
    Y, _ = torch.linalg.qr(U - 0.5)
    Y = Y[:, :r]

    def objective(Y):
        return (1 - ((Y.T @ H) ** 2).sum(0)).clamp_min(0).sqrt().sum()

    def step(Y):
        w = ((1 - ((Y.T @ H) ** 2).sum(0)).abs() + eps) ** -0.25
        columns = [w[i] * H[:, i] for i in range(p)]
        if lambda_ > 0:
            for i in range(p):
                for j in range(p):
                    if i != j:
                        d = H[:, i] - H[:, j]
                        v = ((1 - ((Y.T @ d) ** 2).sum()).abs() + eps) ** -0.25 * lambda_ / (p * (p - 1))
                        columns.append(v * d)
        left, _, _ = torch.linalg.svd(torch.stack(columns, dim=1), full_matrices=False)
        return left[:, :r]

    E = objective(Y)
    previous, decrease, steps = Y, float("inf"), 0
    while steps < T and decrease > 1e-10 and E > 1e-10:
        Y_new = step(Y)
        E_new = objective(Y_new)
        decrease = float(E - E_new)
        previous, Y, E = Y, Y_new, E_new
        steps += 1
    if steps and not decrease > 0:
        Y = previous
    return Y @ (Y.T @ H).sum(1) / r
