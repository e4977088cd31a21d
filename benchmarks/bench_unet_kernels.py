"""Do other attention kernels or the channels-last layout make customize's UNet step faster on this CPU? The
shapes UNet's forward + backward as customize runs it (cross-attention K/V trainable, everything else frozen),
each variant timed in turn in one process, several rounds.

    python benchmarks/bench_unet_kernels.py [--threads 2] [--batch 8] [--steps 30] [--rounds 3]

Variants: diffusers' default AttnProcessor2_0 (torch SDPA, which picks its CPU flash kernel), the same with SDPA
forced to the math kernel, diffusers' classic AttnProcessor (baddbmm + softmax), and the classic processor with
the UNet and its input in channels-last memory format. Prints per round the median ms per step of each.
"""
import torch

from bench_unet_compile import median_ms, setup


def main():
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
    from torch.nn.attention import SDPBackend, sdpa_kernel
    a, unet, z, t, cond = setup(__doc__, threads=2)
    ms = lambda x: median_ms(unet, x, t, cond, a.steps)

    with torch.no_grad():
        ref = unet(z, t, cond).sample
    print("| round | SDPA (default) | SDPA, math kernel | classic AttnProcessor | classic + channels-last |\n|---|---|---|---|---|")
    for r in range(a.rounds):
        unet.set_attn_processor(AttnProcessor2_0())
        sdpa = ms(z)
        with sdpa_kernel(SDPBackend.MATH):
            math = ms(z)
        unet.set_attn_processor(AttnProcessor())
        classic = ms(z)
        unet.to(memory_format=torch.channels_last)
        cl = ms(z.contiguous(memory_format=torch.channels_last))
        with torch.no_grad():
            diff = (unet(z, t, cond).sample - ref).abs().max().item()
        unet.to(memory_format=torch.contiguous_format)
        print(f"| {r} | {sdpa:.1f} | {math:.1f} | {classic:.1f} | {cl:.1f} (max output diff {diff:.1e}) |")


if __name__ == "__main__":
    main()
