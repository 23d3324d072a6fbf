"""Sampling benchmark, with Ray already running.

    .venv/bin/python benchmarks/sample.py [--images 5000] [--deepcache-images 2000] [--steps 25]

The model is the quickstart's latent UNet (Fashion-MNIST, class-conditional, trained by
`pipelines/quickstart.yaml --until model` into .difforge-bench/, cached after the first run;
`--model-storage` points elsewhere).

(a) images/s of `sample.diffusion` (DDIM, classifier-free guidance 2, VAE decode, PNG encode,
    Parquet out) against a bare diffusers loop written out here (the same UNet, scheduler,
    steps, batch size, guidance, VAE decode and PNG encode, no Ray, no Parquet) on the same
    machine; the ratio; and images/s with 1 actor (all CPUs) and with 2 actors (half each).
    The difforge side is a whole step (actor start-up, model load, commit, grid) timed end to
    end, so its fixed cost weighs more at small `--images`;
(b) DeepCache at cache_interval 1 (off), 2, 3, 5 for the same seeds: the measured shallow-pass
    share f of a full UNet pass, the speedup of the sampling loop and its fraction of the bound
    N / (1 + (N - 1) f), and the Fréchet distance (the quickstart classifier's features) of the
    samples against the Fashion-MNIST test images, with its change against no caching;
(c) Faster Diffusion's encoder propagation with key steps every 2nd and 3rd step and a schedule
    dense early (the first 5 steps, then every 4th), same seeds: the measured decoder-only share
    g of a full pass, the speedup and its fraction of the bound N / (K + (N - K) g) for K key
    steps of N, and the Fréchet distance change.

Writes benchmarks/results/sample.json and prints every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def bare_loop(model_dir: str, n: int, steps: int, batch: int, guidance: float) -> float:
    """The same sampling written directly against diffusers and torch; returns images/s."""
    import io

    import diffusers
    import numpy as np
    import torch
    from PIL import Image

    info = json.load(open(os.path.join(model_dir, "difforge.json")))
    unet = diffusers.UNet2DModel.from_pretrained(os.path.join(model_dir, "ema")).eval()
    config = diffusers.DDPMScheduler.load_config(os.path.join(model_dir, "scheduler"))
    scheduler = diffusers.DDIMScheduler.from_config(config)
    from difforge.models.resolve import local_copy

    vae = diffusers.AutoencoderKL.from_pretrained(local_copy(info["vae"]["uri"])).eval()
    null = info["num_classes"]
    shape = tuple(info["sample_shape"])
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        m = min(batch, n - start)
        labels = torch.arange(start, start + m) % null
        x = torch.stack(
            [
                torch.randn(shape, generator=torch.Generator().manual_seed(s))
                for s in range(start, start + m)
            ]
        )
        scheduler.set_timesteps(steps)
        with torch.no_grad():
            for t in scheduler.timesteps:
                both = unet(
                    torch.cat([x, x]),
                    t,
                    class_labels=torch.cat([labels, torch.full_like(labels, null)]),
                ).sample
                cond, uncond = both.chunk(2)
                x = scheduler.step(uncond + guidance * (cond - uncond), t, x).prev_sample
            img = vae.decode(x / vae.config.scaling_factor).sample
        arr = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
        for a in arr:
            Image.fromarray(a[0] if a.shape[0] == 1 else np.moveaxis(a, 0, -1)).save(
                io.BytesIO(), format="PNG"
            )
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=5000, help="images for (a)")
    ap.add_argument("--deepcache-images", type=int, default=2000, help="images per interval in (b)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batch", type=int, default=125)
    ap.add_argument("--model-storage", default=str(ROOT / ".difforge-bench" / "quickstart"))
    args = ap.parse_args()

    import numpy as np
    import ray
    import torch

    import difforge
    from difforge.diffusion.deepcache import DeepCache
    from difforge.diffusion.model_folder import load_model
    from difforge.diffusion.sampling import sample_batch
    from difforge.diffusion.schedules import make_scheduler
    from difforge.models.classifier import classifier_features, load_classifier, load_images
    from difforge.models.metrics import frechet_distance
    from difforge.models.resolve import local_copy

    ray.init(address="local", include_dashboard=False)
    qs = str(ROOT / "pipelines" / "quickstart.yaml")
    storage = f"storage={args.model_storage}"
    t = time.perf_counter()
    base = difforge.run(qs, [storage], until="model")
    difforge.run(qs, [storage], until="classifier")
    print(f"model ready in {time.perf_counter() - t:.0f}s (cached after the first run)")
    model_uri = difforge.open_dataset(base.step("model").uri).to_arrow().to_pylist()[0]["model_uri"]
    model_dir = local_copy(model_uri)
    results: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
        "images": args.images,
        "deepcache_images": args.deepcache_images,
        "steps": args.steps,
        "batch": args.batch,
    }

    # (a) sample.diffusion against the bare loop; 1 and 2 actors
    sets = [
        storage,
        f"plan.params.num_images={args.images}",
        f"samples.params.num_inference_steps={args.steps}",
        f"samples.resources.batch_size={args.batch}",
        "plan.params.guidance_scales=[2.0]",
    ]
    rates = {}
    for actors in (1, 2):
        t = time.perf_counter()
        difforge.run(
            qs,
            [*sets, f"samples.resources.max_actors={actors}"],
            until="samples",
            force=["samples"],
        )
        rates[actors] = args.images / (time.perf_counter() - t)
    torch.set_num_threads(os.cpu_count())
    bare = bare_loop(model_dir, args.images, args.steps, args.batch, 2.0)
    best = max(rates.values())
    print(
        f"(a) sample.diffusion: {rates[1]:.1f} images/s with 1 actor, {rates[2]:.1f} with 2; "
        f"bare diffusers loop {bare:.1f} images/s; ratio {best / bare:.2f} (target 0.9)"
    )
    results["sample_diffusion_images_per_s"] = {
        "1_actor": round(rates[1], 1),
        "2_actors": round(rates[2], 1),
    }
    results["bare_loop_images_per_s"] = round(bare, 1)
    results["ratio"] = round(best / bare, 3)

    # (b) DeepCache: f, speedup against the bound, Fréchet distance, same seeds
    model, info, config, vae = load_model(model_uri)
    scheduler = make_scheduler("ddim", config)
    null = info["num_classes"]
    n = args.deepcache_images
    seeds, labels = list(range(n)), torch.arange(n) % null
    x = torch.randn(2 * args.batch, *info["sample_shape"])
    tt = torch.full((2 * args.batch,), 500)
    yy = torch.arange(2 * args.batch) % (null + 1)
    cache = DeepCache(model, info["backbone"], 0)

    def timed(ctx, reps=5):
        with torch.no_grad():
            with ctx():
                model(x, tt, class_labels=yy)
            t0 = time.perf_counter()
            for _ in range(reps):
                with ctx():
                    model(x, tt, class_labels=yy)
        return (time.perf_counter() - t0) / reps

    full = timed(cache.capture)  # also fills the cache the shallow passes reuse
    f = timed(cache.shallow) / full
    print(f"(b) shallow-pass share of a full UNet pass f = {f:.3f} (branch 0)")
    planned = {s.id: s.uri for s in difforge.plan(qs, [storage]).steps}
    clf = difforge.open_dataset(planned["classifier"]).to_arrow().to_pylist()[0]
    net, _ = load_classifier(clf["model_uri"])
    test_uri = planned["test_images"]
    real = classifier_features(
        net, load_images(difforge.open_dataset(test_uri).file_uris(), "L", with_labels=False)[0]
    )[0]
    from difforge.diffusion.sampling import to_pil

    rows = []
    for interval in (1, 2, 3, 5):
        imgs, t0 = [], time.perf_counter()
        for s in range(0, n, args.batch):
            z = sample_batch(
                model,
                info["backbone"],
                scheduler,
                tuple(info["sample_shape"]),
                seeds[s : s + args.batch],
                labels[s : s + args.batch],
                [2.0] * len(seeds[s : s + args.batch]),
                null,
                args.steps,
                deepcache=(interval, 0) if interval > 1 else None,
            )
            imgs += [np.asarray(im)[None] for im in to_pil(z, vae)]
        seconds = time.perf_counter() - t0
        fd = frechet_distance(real, classifier_features(net, np.stack(imgs))[0])
        rows.append({"cache_interval": interval, "seconds": seconds, "fd": fd})
    base_s, base_fd = rows[0]["seconds"], rows[0]["fd"]
    print(
        f"    {'interval':>8} {'speedup':>8} {'bound':>6} {'of bound':>9} {'FD':>8} {'FD change':>10}"
    )
    for r in rows:
        k = r["cache_interval"]
        r["speedup"] = base_s / r["seconds"]
        r["bound"] = k / (1 + (k - 1) * f)
        r["fraction_of_bound"] = r["speedup"] / r["bound"]
        r["fd_change"] = r["fd"] / base_fd - 1
        print(
            f"    {k:>8} {r['speedup']:>7.2f}x {r['bound']:>5.2f}x {r['fraction_of_bound']:>8.0%} "
            f"{r['fd']:>8.3f} {r['fd_change']:>+9.1%}"
        )
    results["deepcache"] = {
        "f": round(f, 4),
        "rows": [
            {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows
        ],
    }

    # (c) Faster Diffusion: g, speedup against the bound, Fréchet distance, same seeds
    from difforge.diffusion.faster import EncoderPropagation, key_schedule

    prop = EncoderPropagation(model, info["backbone"])
    full = timed(prop.capture)
    g = timed(prop.propagate) / full
    print(f"(c) decoder-only share of a full UNet pass g = {g:.3f}")
    dense_early = [*range(5), *range(8, args.steps, 4)]
    schedules = {"every 2nd": (None, 2), "every 3rd": (None, 3), "dense early": (dense_early, 1)}
    frows = []
    for name, faster in schedules.items():
        imgs, t0 = [], time.perf_counter()
        for s in range(0, n, args.batch):
            z = sample_batch(
                model,
                info["backbone"],
                scheduler,
                tuple(info["sample_shape"]),
                seeds[s : s + args.batch],
                labels[s : s + args.batch],
                [2.0] * len(seeds[s : s + args.batch]),
                null,
                args.steps,
                faster=faster,
            )
            imgs += [np.asarray(im)[None] for im in to_pil(z, vae)]
        seconds = time.perf_counter() - t0
        keys = sum(key_schedule(args.steps, *faster))
        fd = frechet_distance(real, classifier_features(net, np.stack(imgs))[0])
        bound = args.steps / (keys + (args.steps - keys) * g)
        frows.append(
            {
                "schedule": name,
                "key_steps": keys,
                "speedup": base_s / seconds,
                "bound": bound,
                "fraction_of_bound": base_s / seconds / bound,
                "fd": fd,
                "fd_change": fd / base_fd - 1,
            }
        )
    print(
        f"    {'schedule':>12} {'keys':>5} {'speedup':>8} {'bound':>6} {'of bound':>9} {'FD':>8} {'FD change':>10}"
    )
    for r in frows:
        print(
            f"    {r['schedule']:>12} {r['key_steps']:>5} {r['speedup']:>7.2f}x {r['bound']:>5.2f}x "
            f"{r['fraction_of_bound']:>8.0%} {r['fd']:>8.3f} {r['fd_change']:>+9.1%}"
        )
    results["faster_diffusion"] = {
        "g": round(g, 4),
        "rows": [
            {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in frows
        ],
    }
    out = ROOT / "benchmarks" / "results" / "sample.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
