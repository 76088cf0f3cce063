"""The patch embedding's convolution against the same function as one matmul (``trainables.dinov2_fast.
PatchConv2d``, what ``training.fast_blocks`` makes of DINOv2's), forward and the weight's backward (pixels need
no gradient), as the product runs it: bf16 weights and pixels. Also the matmul without padding the 588 (ViT-B/14)
columns to a multiple of 8, which is why ``PatchConv2d.PAD`` exists. Checks each against the convolution in fp32
first. One JSON row per case (``benchmarks/jsonl.emit``); CUDA only.

    python3 benchmarks/patch_embed.py --out patch_embed.jsonl
"""

from __future__ import annotations

import argparse
import copy

from benchmarks.jsonl import cuda_ms, emit


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args(argv)
    import torch
    from torch import nn

    from trainables.dinov2_fast import PatchConv2d, convert_patch_embed

    dev = torch.device("cuda")
    for name, width, batch in (("vit-b14", 768, 512), ("vit-s14", 384, 256), ("vit-s14", 384, 512)):
        torch.manual_seed(0)
        conv = nn.Conv2d(3, width, 14, 14).to(dev)
        x = torch.randn(batch, 3, 224, 224, device=dev)
        mods = {"conv": conv}
        for pad in (8, 1):
            m = copy.deepcopy(conv)
            convert_patch_embed(m)
            m.PAD = pad  # an instance attribute: this copy only
            mods[f"matmul_pad{pad}"] = m
        # correct first, in fp32, against the convolution
        ref = conv(x)
        errs = {k: float((m(x) - ref).norm() / ref.norm()) for k, m in mods.items() if k != "conv"}
        assert all(e < 1e-3 for e in errs.values()), errs
        row = dict(bench="patch_embed", model=name, width=width, batch=batch,
                   device=torch.cuda.get_device_name(dev), torch=torch.__version__, rel_err_fp32=errs)
        for k, m in mods.items():
            mb = copy.deepcopy(m).to(torch.bfloat16)
            assert isinstance(mb, PatchConv2d) == (k != "conv")
            xb = x.to(torch.bfloat16)
            g = torch.randn(batch, width, 16, 16, device=dev, dtype=torch.bfloat16)

            def fwd():
                mb(xb)

            def fwd_bwd():
                mb(xb).backward(g)

            for _ in range(3):
                fwd_bwd()
            row[f"{k}_fwd_ms"] = round(cuda_ms(fwd, a.iters, 5), 4)
            row[f"{k}_fwd_bwd_ms"] = round(cuda_ms(fwd_bwd, a.iters, 5), 4)
        row["matmul_pad8_over_conv"] = round(row["matmul_pad8_fwd_bwd_ms"] / row["conv_fwd_bwd_ms"], 3)
        emit(row, a.out)


if __name__ == "__main__":
    main()
