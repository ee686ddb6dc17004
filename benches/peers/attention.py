"""Peer of benches/attention.rs: PyTorch scaled_dot_product_attention, what a user without a paged kernel
would call. Decode: one query per sequence over contiguous bf16 K/V [batch, 8, ctx, 128] (GQA through
enable_gqa; SDPA has no paged or quantised cache, so the int8/int4 rows compare against this bf16 time).
Prefill: causal self-attention of n tokens (is_causal, the flash backend when available).
Prints `FUSEKIT_PEER {json}` lines under fusekit's bench names."""
import json

import torch
import torch.nn.functional as F

from _common import QUICK, out_of_time, timed

dev = "cuda"
HQ, HKV, D = 32, 8, 128


def emit(rec):
    rec["device"] = torch.cuda.get_device_name()
    print("FUSEKIT_PEER " + json.dumps(rec), flush=True)


def main():
    contexts = (4096, 32768) if QUICK else (4096, 32768, 131072)
    for batch in (1, 16, 64):
        for ctx in contexts:
            if out_of_time(f"sdpa decode b{batch} ctx{ctx}"):
                continue
            q = torch.randn(batch, HQ, 1, D, device=dev, dtype=torch.bfloat16)
            k = torch.zeros(batch, HKV, ctx, D, device=dev, dtype=torch.bfloat16)
            v = torch.zeros_like(k)
            ms, lo, _ = timed(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), iters=20)
            kv_bytes = 2 * k.numel() * 2
            for fmt in ("bf16", "int8", "int4"):
                emit({"bench": f"attention/decode_{fmt}/b{batch}_ctx{ctx}", "peer": "torch_sdpa_bf16",
                      "batch": batch, "ctx": ctx, "median_us": ms * 1e3, "min_us": lo * 1e3,
                      "gbps": kv_bytes / (ms * 1e-3) / 1e9})
            del q, k, v
            torch.cuda.empty_cache()
    for n in ((512, 4096) if QUICK else (512, 2048, 8192, 16384)):
        if out_of_time(f"sdpa prefill {n}"):
            continue
        q = torch.randn(1, HQ, n, D, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, HKV, n, D, device=dev, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        ms, lo, _ = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), iters=20)
        flops = 4.0 * HQ * D * n * (n + 1) / 2
        emit({"bench": f"attention/prefill/{n}", "peer": "torch_sdpa", "n": n, "median_us": ms * 1e3,
              "min_us": lo * 1e3, "tflops": flops / (ms * 1e-3) / 1e12})


if __name__ == "__main__":
    main()
