"""One optimizer step of the quickstart's VAE (AutoencoderKL, block_out_channels 16/32/32, batch 64
at 32x32), timed with torch on 1 thread and on 2, each in a fresh process, alternating:

    python benchmarks/train_threads.py

Prints the mean seconds per step for each and the ratio. A training step without `num_cpus`
takes the node's CPUs (torch threads = CPUs granted); this says what that buys on this machine.
"""

from __future__ import annotations

import subprocess
import sys
import time

STEP = """
import sys, time, torch
from diffusers import AutoencoderKL
torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 3,
                    up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32),
                    latent_channels=4, layers_per_block=1, norm_num_groups=16, sample_size=32)
opt = torch.optim.AdamW(vae.parameters(), 1e-3)
x = torch.randn(64, 1, 32, 32)
def step():
    vae(x).sample.pow(2).mean().backward(); opt.step(); opt.zero_grad()
for _ in range(3):
    step()
t = time.perf_counter()
for _ in range(15):
    step()
print((time.perf_counter() - t) / 15)
"""


def main() -> None:
    times: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(2):
        for threads in (1, 2):
            out = subprocess.run(
                [sys.executable, "-c", STEP, str(threads)],
                capture_output=True,
                text=True,
                check=True,
            )
            times[threads].append(float(out.stdout.strip().splitlines()[-1]))
    one, two = (sum(t) / len(t) for t in (times[1], times[2]))
    print(
        f"{time.strftime('%Y-%m-%d')}: 1 thread {one:.3f} s/step, 2 threads {two:.3f} s/step, "
        f"2 threads {one / two:.2f}x as fast"
    )


if __name__ == "__main__":
    main()
