"""An eager reference Highway-BP for nn.RNN / nn.GRU / nn.LSTM modules, independent of hbp_compile.

The module's weights are read by name and its forward is redone here with a cell written from
PyTorch's documented equations, one Python step at a time. Each layer and direction is one
stream over time, handed to oracle_general.highway_backward_general with

    state x_t:  h_t (RNN, GRU), or cat(c_t, h_t) for an LSTM (K_t is then a full 2H x 2H VJP)
    block:      the gates from h_{t-1} and the layer input u_t (all the matmuls)
    residual:   RNN: the new h itself (K = 0); GRU: (1 - z) n + z h; LSTM: f c + i g, o tanh(.)

Layers run top down, as exact backprop between layers would: a layer's Highway-BP gradients at
its inputs u_t (through the dropout mask, drawn here in ATen's order from the same seed) become
the injections of the layer below.
"""
import torch

from oracle_general import highway_backward_general


def _params(rnn, layer, reverse):
    sfx = f"_l{layer}" + ("_reverse" if reverse else "")
    names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if rnn.bias else [])
    return [getattr(rnn, n + sfx) for n in names]


def _affine(u, h, params):
    w_ih, w_hh, *b = params
    gi, gh = u @ w_ih.t(), h @ w_hh.t()
    return (gi + b[0], gh + b[1]) if b else (gi, gh)


def cell_steps(mode, params, H):
    """(block(u_t) -> block(x), residual) for one layer's cell; x is the stream state."""
    if mode in ("RNN_TANH", "RNN_RELU"):
        act = torch.tanh if mode == "RNN_TANH" else torch.relu

        def block(u, x):
            gi, gh = _affine(u, x, params)
            return (act(gi + gh),)
        return block, lambda x, a: a
    if mode == "GRU":
        def block(u, x):
            gi, gh = _affine(u, x, params)
            r = torch.sigmoid(gi[..., :H] + gh[..., :H])
            z = torch.sigmoid(gi[..., H:2 * H] + gh[..., H:2 * H])
            return z, torch.tanh(gi[..., 2 * H:] + r * gh[..., 2 * H:])
        return block, lambda x, z, n: (1 - z) * n + z * x

    def block(u, x):                                   # LSTM, x = cat(c, h)
        gi, gh = _affine(u, x[..., H:], params)
        a = gi + gh
        return (torch.sigmoid(a[..., :H]), torch.sigmoid(a[..., H:2 * H]),
                torch.tanh(a[..., 2 * H:3 * H]), torch.sigmoid(a[..., 3 * H:]))

    def residual(x, i, f, g, o):
        c = f * x[..., :H] + i * g
        return torch.cat([c, o * torch.tanh(c)], -1)
    return block, residual


def _run(block, residual, us, x0):
    """The stream's states x_0..x_T, no graph (the oracle's forward)."""
    xs = [x0]
    with torch.no_grad():
        for u in us:
            xs.append(residual(xs[-1], *block(u, xs[-1])))
    return xs


def module_highway(rnn, x, hx, loss_fn, k, seed):
    """Loss and Highway-BP gradients (k rounds) of loss_fn(*rnn(x, hx)) by the module's weights,
    x and hx (each a leaf; their .grad and the parameters' .grad are filled). The dropout masks
    are drawn from `seed`, in the order ATen draws them."""
    mode, H, dirs = rnn.mode, rnn.hidden_size, 2 if rnn.bidirectional else 1
    lstm = mode == "LSTM"
    B = x.shape[0] if rnn.batch_first else x.shape[1]
    T = x.shape[1] if rnn.batch_first else x.shape[0]
    n_states = rnn.num_layers * dirs
    dt = x.dtype
    if hx is None:
        h0 = [torch.zeros(n_states, B, H, dtype=dt)] * (2 if lstm else 1)
    else:
        h0 = list(hx) if lstm else [hx]
    torch.manual_seed(seed)
    u = x.transpose(0, 1) if rnn.batch_first else x                 # (T, B, I)
    layers = []                          # per layer: its leaf inputs and per-direction streams
    for layer in range(rnn.num_layers):
        us = [u[t].detach().requires_grad_() for t in range(T)]
        streams, outs = [], []
        for d in range(dirs):
            i = layer * dirs + d
            block, residual = cell_steps(mode, _params(rnn, layer, d == 1), H)
            seq = us[::-1] if d else us
            x0 = torch.cat([h0[1][i], h0[0][i]], -1) if lstm else h0[0][i]
            x0 = x0.detach().requires_grad_()
            xs = _run(block, residual, seq, x0)
            hs = [xt[..., H:] if lstm else xt for xt in xs[1:]]
            outs.append(torch.stack(hs[::-1] if d else hs))
            steps = [(lambda s, u_t=u_t, block=block: block(u_t, s), residual) for u_t in seq]
            streams.append((i, x0, steps, xs))
        out = torch.cat(outs, -1)
        noise = None
        if rnn.dropout and rnn.training and layer < rnn.num_layers - 1:
            noise = torch.empty_like(out).bernoulli_(1 - rnn.dropout)
            noise.div_(1 - rnn.dropout)
        layers.append((us, streams, noise))
        u = out if noise is None else out * noise

    # the loss on leaf copies of the outputs: their .grad are the top layer's injections
    top = u.detach().requires_grad_()
    finals = torch.stack([xs[-1] for _, streams, _ in layers for *_, xs in streams])
    h_n = finals[..., H:] if lstm else finals
    h_n = h_n.detach().requires_grad_()
    c_n = finals[..., :H].detach().requires_grad_() if lstm else None
    out_user = top.transpose(0, 1) if rnn.batch_first else top
    loss = loss_fn(out_user, (h_n, c_n) if lstm else h_n)
    loss.backward()
    cot_out = top.grad if top.grad is not None else torch.zeros_like(top)
    for li in range(rnn.num_layers - 1, -1, -1):
        us, streams, noise = layers[li]
        for i, x0, steps, xs in streams:
            d = i % dirs
            c = cot_out[..., d * H:(d + 1) * H]
            c = c.flip(0) if d else c                                  # stream order
            last = torch.cat([c_n.grad[i], h_n.grad[i]], -1) if lstm else h_n.grad[i]

            def head(states, c=c, last=last):
                total = (last * states[0][-1]).sum()
                for t in range(T):
                    h = states[0][t + 1][..., H:] if lstm else states[0][t + 1]
                    total = total + (c[t] * h).sum()
                return total

            highway_backward_general([(x0, steps)], head, k)
            for j, g in enumerate([x0.grad[..., H:], x0.grad[..., :H]] if lstm else [x0.grad]):
                _accumulate(h0[j], i, g)
        cot_in = torch.stack([u_t.grad for u_t in us])                # (T, B, I)
        if li > 0:
            below = layers[li - 1][2]
            cot_out = cot_in if below is None else cot_in * below
        else:
            grad_x = cot_in.transpose(0, 1) if rnn.batch_first else cot_in
            if x.requires_grad:
                x.grad = grad_x if x.grad is None else x.grad + grad_x
    return loss.detach()


def _accumulate(h0, i, g):
    """h0[i] receives g (h0 a leaf (n_states, B, H) given by the caller, else nothing)."""
    if h0.requires_grad:
        if h0.grad is None:
            h0.grad = torch.zeros_like(h0)
        h0.grad[i] += g
