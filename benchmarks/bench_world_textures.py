"""Does the shipped shapes model draw each trained texture when its prompt names it? The oracle's reading, with the
same shapes rendered exactly and passed through the VAE as the references (the AbC benchmark's style models can
only copy a texture the model can draw).

    python benchmarks/bench_world_textures.py [--threads 2] [--n 2] [--seed 777]
    python benchmarks/bench_world_textures.py --benchmark OUT [--models 86]   # + OUT's style models by texture

For each trained texture: prompts "a {colour} {texture} {shape}" over every trained shape and the first three
colours, --n images each (DDIM 25 steps, guidance 5, seeds from --seed), and the same (shape, colour, texture)
rendered large at the centre on white, read as rendered and after a VAE round trip (posterior mean). Prints a
markdown table: the share read as the named texture, and what the generated images read as instead. With
--benchmark, also the fidelity (benchmark.fidelity: the share of a model's queries that show its exemplars' texture
and colour) of a built benchmark's style models (the first --models), by their exemplars' texture. Seconds.
"""
import argparse
from collections import Counter
from pathlib import Path

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=2, help="images per prompt")
    ap.add_argument("--seed", type=int, default=777)
    ap.add_argument("--benchmark", type=Path, default=None, help="a folder built by difflab attribute benchmark")
    ap.add_argument("--models", type=int, default=None, help="with --benchmark: its first N models (default: all)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from difflab.core.data import to_pixels
    from difflab.generate import generate_images
    from difflab.models import load_oracle, load_pipeline
    from difflab.world.draw import FACTORS, render
    pipe, oracle = load_pipeline("shapes"), load_oracle()
    pipe.set_progress_bar_config(disable=True)
    shapes, colours, textures = FACTORS["shape"][0], FACTORS["color"][0][:3], FACTORS["texture"][0]
    print(f"| texture (prompts x {a.n}) | generated, read as named | rendered | rendered, VAE round trip | "
          "generated images read as |\n|---|---|---|---|---|")
    for t in textures:
        pairs = [(s, c) for s in shapes for c in colours]
        images, _ = generate_images(pipe, [f"a {c} {t} {s}" for s, c in pairs], n=a.n, seed=a.seed, progress=False)
        read = [r["texture"] for r in oracle.predict(images)]
        renders = [render({"shape": s, "color": c, "size": "large", "position": "center", "background": "white",
                           "texture": t}) for s, c in pairs]
        with torch.no_grad():
            z = pipe.vae.encode(to_pixels(renders)).latent_dist.mean
            recon = pipe.image_processor.postprocess(pipe.vae.decode(z).sample, output_type="pil")
        share = lambda imgs: sum(r["texture"] == t for r in oracle.predict(imgs)) / len(imgs)
        print(f"| {t} ({len(pairs)} x {a.n}) | {read.count(t) / len(read):.3f} | {share(renders):.3f} | "
              f"{share(recon):.3f} | {', '.join(f'{k} {v}' for k, v in Counter(read).most_common())} |")
    if a.benchmark:
        from difflab.attribute.benchmark import concepts, fidelity, folder_config
        from difflab.core.data import load_folder_images
        cons = concepts(folder_config(a.benchmark))[:a.models]
        by = {}
        for j, c in enumerate(cons):
            if c["kind"] == "style":
                synth = load_folder_images(a.benchmark / "models" / f"{j:02d}" / "synth")
                by.setdefault(c["exemplars"][0]["texture"], []).append(fidelity(synth, c, oracle))
        print(f"\n{a.benchmark}: style models ({len(cons)} models) by their exemplars' texture\n\n"
              "| texture | models | mean fidelity | lowest, highest |\n|---|---|---|---|")
        for t, v in sorted(by.items()):
            print(f"| {t} | {len(v)} | {sum(v) / len(v):.3f} | {min(v):.2f}, {max(v):.2f} |")


if __name__ == "__main__":
    main()
