"""Peak memory of sampling N images to an .npz: streamed in chunks (`debias sample`) against holding
every image in memory (the former path: ``generate`` then one write), at several N.

    python benchmarks/sample_memory.py --n 1000,20000 --size 32

A small fresh UNet (32 channels, one level, no attention; C×size×size RGB) is sampled with DDIM in
1 step, batch 128, chunks of 1024. Every measurement runs in a fresh Python process and reports its
peak resident set (``ru_maxrss``), so runs do not inherit each other's peak; the images a run holds
are N × 3 × size² bytes as uint8 (the in-memory path also gathers them once as a tensor).
"""

import argparse
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

CHECKPOINT = """
import sys, torch
from debias.checkpoints import Checkpoint, save_checkpoint
from debias.config import Config, DataConfig, ModelConfig
from debias.models.unet import UNetModel
size = int(sys.argv[2])
unet = dict(image_size=size, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
            attention_resolutions=[], channel_mult=(1,), num_head_channels=16)
torch.manual_seed(0)
model = UNetModel(**unet)
config = Config(data=DataConfig(image_size=size, channels=3), model=ModelConfig(learn_sigma=False)).to_dict()
save_checkpoint(sys.argv[1], Checkpoint(config=config, unet_kwargs=dict(unet, num_classes=None), model=model.state_dict()))
"""

MEASURE = """
import resource, sys
mode, checkpoint, n, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
if mode == "streamed":
    from debias.cli import main
    sys.argv = ["debias", "sample", checkpoint, "--solver", "ddim", "--steps", "1", "-n", str(n), "--batch-size", "128",
                "--chunk-size", "1024", "--device", "cpu", "--out", out]
    try:
        main()
    except SystemExit as exit:
        assert not exit.code, exit.code
else:
    from dataclasses import replace
    from debias.config import SampleConfig
    from debias.images import save_npz
    from debias.sampling import sample_checkpoint
    cfg = replace(SampleConfig(), steps=[1], num_samples=n, batch_size=128)
    for _, images in sample_checkpoint(checkpoint, "ddim", cfg):
        save_npz(images, out)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def peak_mib(mode: str, checkpoint: Path, n: int, out: Path) -> float:
    done = subprocess.run([sys.executable, "-c", MEASURE, mode, str(checkpoint), str(n), str(out)],
                          capture_output=True, text=True, check=True)
    return float(done.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="1000,20000", help="comma-separated sample counts")
    parser.add_argument("--size", type=int, default=32, help="image height and width")
    parser.add_argument("--modes", default="streamed,in-memory")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "model.pt"
        subprocess.run([sys.executable, "-c", textwrap.dedent(CHECKPOINT), str(checkpoint), str(args.size)], check=True)
        print("| mode | N | images (MiB, uint8) | peak RSS (MiB) |\n|---|---:|---:|---:|")
        for mode in args.modes.split(","):
            for n in (int(v) for v in args.n.split(",")):
                out = Path(folder) / f"{mode}_{n}.npz"
                peak = peak_mib(mode, checkpoint, n, out)
                print(f"| {mode} | {n} | {n * 3 * args.size ** 2 / 2 ** 20:.0f} | {peak:.0f} |", flush=True)
                out.unlink()


if __name__ == "__main__":
    main()
