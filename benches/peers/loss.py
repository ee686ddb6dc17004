"""Peers of benches/loss.rs, run by the GPU suite in the same invocation: PyTorch eager and torch.compile
cross-entropy (and focal / Poly-1 / GCE written in PyTorch), torchvision sigmoid_focal_loss. Prints one
`FUSEKIT_PEER {json}` line per measurement, under the same bench names as fusekit's records."""
import json
import sys

import torch

from _common import QUICK, out_of_time, timed
import torch.nn.functional as F

dev = "cuda"
torch.backends.cuda.matmul.allow_tf32 = True


def emit(bench, peer, n, v, ms, lo, hi, nbytes):
    print("FUSEKIT_PEER " + json.dumps({"bench": bench, "peer": peer, "n": n, "v": v, "median_ms": ms,
                                         "min_ms": lo, "max_ms": hi, "gbps": nbytes / (ms * 1e-3) / 1e9,
                                         "device": torch.cuda.get_device_name()}), flush=True)


def ce(x, t):
    return F.cross_entropy(x.float(), t)


def focal(x, t, gamma=2.0):
    logp = F.log_softmax(x.float(), -1).gather(1, t[:, None]).squeeze(1)
    return (-(1 - logp.exp()) ** gamma * logp).mean()


def poly1(x, t, eps=1.0):
    logp = F.log_softmax(x.float(), -1).gather(1, t[:, None]).squeeze(1)
    return (-logp + eps * (1 - logp.exp())).mean()


def gce(x, t, q=0.7):
    logp = F.log_softmax(x.float(), -1).gather(1, t[:, None]).squeeze(1)
    return ((1 - (q * logp).exp()) / q).mean()


def fwd_bwd(loss_fn, x, t):
    def run():
        x.grad = None
        loss_fn(x, t).backward()
    return run


def main():
    torch.manual_seed(0)
    sizes = [(4096, 32000), (4096, 128256), (4096, 256000), (16384, 32000), (16384, 128256), (16384, 256000)]
    if QUICK:
        sizes = [s for s in sizes if s[0] == 16384]
    for n, v in sizes:
        if out_of_time(f"CE {n}x{v}"):
            break
        x = (torch.randn(n, v, device=dev) * 2).to(torch.bfloat16).requires_grad_()
        t = torch.randint(0, v, (n,), device=dev)
        nbytes = 2 * n * v * 2
        name = f"loss/ce_fwd_bwd_bf16/{n}x{v}"
        try:
            emit(name, "torch_eager", n, v, *timed(fwd_bwd(ce, x, t)), nbytes)
        except torch.OutOfMemoryError:
            print(f"peer torch_eager OOM at {n}x{v}", file=sys.stderr)
        torch.cuda.empty_cache()
        # torch.compile compiles once per shape: allow it a minute.
        if not out_of_time(f"compiled CE {n}x{v}", need=60):
            try:
                emit(name, "torch_compile", n, v, *timed(fwd_bwd(torch.compile(ce), x, t)), nbytes)
            except torch.OutOfMemoryError:
                print(f"peer torch_compile OOM at {n}x{v}", file=sys.stderr)
        del x
        torch.cuda.empty_cache()
    n, v = 4096, 128256
    x = (torch.randn(n, v, device=dev) * 2).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, v, (n,), device=dev)
    for name, fn in [("focal", focal), ("poly1", poly1), ("gce", gce)]:
        for peer, f in [("torch_eager", fn), ("torch_compile", torch.compile(fn))]:
            if out_of_time(f"{peer} {name}", need=60 if peer == "torch_compile" else 30):
                continue
            emit(f"loss/{name}_fwd_bwd_bf16/{n}x{v}", peer, n, v, *timed(fwd_bwd(f, x, t)), 2 * n * v * 2)
    del x
    torch.cuda.empty_cache()
    linear_ce()
    try:
        from torchvision.ops import sigmoid_focal_loss
    except ImportError:
        print("torchvision missing: no sigmoid focal peer", file=sys.stderr)
        return
    for n, k in [(65536, 80), (16384, 1000)]:
        x = (torch.randn(n, k, device=dev) * 2 - 2).requires_grad_()
        t = (torch.rand(n, k, device=dev) < 0.02).float()
        f = lambda a, b: sigmoid_focal_loss(a, b, alpha=0.25, gamma=2.0, reduction="mean")
        for peer, g in [("torchvision_eager", f), ("torchvision_compile", torch.compile(f))]:
            if out_of_time(f"{peer} sigmoid focal {n}x{k}", need=60 if "compile" in peer else 30):
                continue
            emit(f"loss/sigmoid_focal_f32/{n}x{k}", peer, n, k, *timed(fwd_bwd(g, x, t)), 3 * n * k * 4)


def linear_ce():
    """The logits-materialising path a user writes: h @ W.T, cross_entropy, backward. Reports time and the
    peak memory beyond inputs, weights and their gradients."""
    h_dim, v = 4096, 128256
    w = (torch.randn(v, h_dim, device=dev) * 0.02).to(torch.bfloat16).requires_grad_()
    for n in (8192, 16384):
        if out_of_time(f"linear + CE n={n}"):
            break
        h = (torch.randn(n, h_dim, device=dev) * 0.02).to(torch.bfloat16).requires_grad_()
        t = torch.randint(0, v, (n,), device=dev)

        def run():
            h.grad = None
            w.grad = None
            F.cross_entropy((h @ w.T).float(), t).backward()

        try:
            run()
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()  # inputs, weights and their gradients
            torch.cuda.reset_peak_memory_stats()
            ms, lo, hi = timed(run, iters=10)
            extra = torch.cuda.max_memory_allocated() - base
            print("FUSEKIT_PEER " + json.dumps({"bench": f"loss/linear_ce_bf16/{n}x{h_dim}x{v}", "peer": "torch_eager",
                                                 "n": n, "v": v, "median_ms": ms, "min_ms": lo, "max_ms": hi,
                                                 "extra_bytes": extra, "logits_bytes": n * v * 2,
                                                 "device": torch.cuda.get_device_name()}), flush=True)
        except torch.OutOfMemoryError:
            print(f"peer linear_ce OOM at n={n}", file=sys.stderr)
        del h
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
