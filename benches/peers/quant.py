"""Peer of benches/quant.rs' online Hadamard rows: what a user without a fused kernel does in PyTorch,
x (bf16 [t][n]) times the explicit normalised Hadamard matrix (bf16 matmul, H_n = H_m ⊗ H_2^k built
with Sylvester and a Paley factor of the same order as fusekit's, any sign pattern costs the same), then
per-token asymmetric int4 quantisation in tensor ops (min/max, scale, round, clamp) and two codes per
byte. Prints `FUSEKIT_PEER {json}` lines under fusekit's bench names."""
import json

import torch

from _common import QUICK, out_of_time, timed

dev = "cuda"


def hadamard(n):
    # Sylvester for the power-of-two part; a random ±1 m×m block stands in for the Paley factor (the
    # timing of a dense matmul does not depend on the signs).
    p = n & -n
    m = n // p
    h = torch.ones(1, 1)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    if m > 1:
        g = torch.Generator().manual_seed(m)
        hm = torch.randint(0, 2, (m, m), generator=g).float() * 2 - 1
        h = torch.kron(hm, h)
    return (h / n ** 0.5).to(dev, torch.bfloat16)


def rotate_quantize(x, h):
    r = (x @ h).float()
    lo = r.amin(1, keepdim=True).clamp(max=0)
    hi = r.amax(1, keepdim=True).clamp(min=0)
    s = ((hi - lo) / 15).clamp(min=torch.finfo(torch.float32).tiny)
    z = (-lo / s).round().clamp(0, 15)
    q = ((r / s).round() + z).clamp(0, 15).to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4), s, z


def main():
    for n in ((4096,) if QUICK else (576, 1536, 4096, 14336)):
        h = hadamard(n)
        for t in (1, 16, 256, 4096):
            if out_of_time(f"hadq {t}x{n}"):
                return
            x = torch.randn(t, n, device=dev).to(torch.bfloat16)
            ms, lo, _ = timed(lambda: rotate_quantize(x, h), iters=30)
            print("FUSEKIT_PEER " + json.dumps({"bench": f"quant/hadq_int4/{t}x{n}", "peer": "torch_matmul_quant",
                                                 "t": t, "n": n, "median_us": ms * 1e3, "min_us": lo * 1e3,
                                                 "device": torch.cuda.get_device_name()}), flush=True)


if __name__ == "__main__":
    main()
