"""Peer of benches/moe.rs: the PyTorch composite a user would write (sigmoid + bias + group top-k + top-k +
gather + normalise + expert histogram + stable argsort; index_select / index_add for permute and combine).
Prints `FUSEKIT_PEER {json}` lines under fusekit's bench names."""
import json

import torch

from _common import QUICK, out_of_time, timed

dev = "cuda"


def route(logits, bias, k, n_group, topk_group, scale):
    s = torch.sigmoid(logits.float())
    b = s + bias
    if n_group > 1:
        t, e = b.shape
        g = b.view(t, n_group, e // n_group).topk(2, dim=-1).values.sum(-1)
        keep = g.topk(topk_group, dim=-1).indices
        mask = torch.zeros_like(g, dtype=torch.bool).scatter_(1, keep, True)
        b = b.masked_fill(~mask.repeat_interleave(e // n_group, dim=1), float("-inf"))
    ids = b.topk(k, dim=-1).indices
    w = s.gather(1, ids)
    w = w / w.sum(-1, keepdim=True) * scale
    counts = torch.zeros(logits.shape[1], dtype=torch.int32, device=dev).scatter_add_(
        0, ids.flatten(), torch.ones_like(ids.flatten(), dtype=torch.int32))
    order = torch.argsort(ids.flatten(), stable=True)
    return ids, w, counts, order


def main():
    configs = [("e64k6", 64, 6, 1, 1, 1.0), ("e256k8g8", 256, 8, 8, 4, 2.5), ("e160k6", 160, 6, 1, 1, 1.0),
               ("e512k10", 512, 10, 1, 1, 1.0)]
    for name, e, k, ng, tg, sc in configs:
        bias = torch.randn(e, device=dev) * 0.05
        for t in ((64, 16384) if QUICK else (1, 64, 4096, 16384, 65536)):
            logits = torch.randn(t, e, device=dev).to(torch.bfloat16)
            f = lambda: route(logits, bias, k, ng, tg, sc)
            for peer, fn in (("torch_eager", f), ("torch_compile", torch.compile(lambda: route(logits, bias, k, ng, tg, sc)))):
                if out_of_time(f"{peer} gate {name} T={t}", need=60 if peer == "torch_compile" else 20):
                    continue
                ms, lo, _ = timed(fn, iters=30)
                print("FUSEKIT_PEER " + json.dumps({"bench": f"moe/gate_{name}/{t}", "peer": peer, "t": t, "e": e, "k": k,
                                                     "median_us": ms * 1e3, "min_us": lo * 1e3,
                                                     "device": torch.cuda.get_device_name()}), flush=True)
    k, e = 8, 256
    for t in (4096, 16384):
        if out_of_time(f"permute/combine T={t}"):
            break
        ids = torch.randint(0, e, (t, k), device=dev)
        w = torch.rand(t, k, device=dev)
        order = torch.argsort(ids.flatten(), stable=True)
        tok = order // k
        for h in (4096, 7168):
            hidden = torch.randn(t, h, device=dev).to(torch.bfloat16)
            ms, _, _ = timed(lambda: hidden.index_select(0, tok), iters=30)
            rows = t * k
            print("FUSEKIT_PEER " + json.dumps({"bench": f"moe/gather/{t}x{h}", "peer": "torch_index_select", "t": t, "h": h,
                                                 "median_us": ms * 1e3, "gbps": (rows + t) * h * 2 / (ms * 1e-3) / 1e9}), flush=True)
            expert_out = hidden.index_select(0, tok)
            wf = w.flatten()[order]

            def comb():
                out = torch.zeros(t, h, device=dev, dtype=torch.float32)
                out.index_add_(0, tok, expert_out.float() * wf[:, None])
                return out.to(torch.bfloat16)

            ms, _, _ = timed(comb, iters=30)
            print("FUSEKIT_PEER " + json.dumps({"bench": f"moe/combine/{t}x{h}", "peer": "torch_index_add", "t": t, "h": h,
                                                 "median_us": ms * 1e3, "gbps": ((t * k + t) * h * 2 + t * k * 8) / (ms * 1e-3) / 1e9}), flush=True)


if __name__ == "__main__":
    main()
