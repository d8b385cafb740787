"""Make tests/fixtures/samplers_upstream_attention.pt by running the ORIGINAL code on this machine.

    python scripts/upstream_attention_fixture.py /path/to/Debias      # a checkout holding guided_diffusion/

The original (yuhuUSTC/Debias, i.e. openai/guided-diffusion plus the paper's code) is not part of this
repository: it is imported from the folder given on the command line (its ``guided_diffusion.unet`` and
``guided_diffusion.script_util`` only; they need torch, numpy, and cv2 for the fork's unet.py). The UNet's weights
come from ``seeded_weights`` in tests/test_upstream.py, so the fixture stores a seed and a checksum instead of them.
Runs single-threaded, in about half a minute; tests/fixtures/README.md describes the file.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "samplers_upstream_attention.pt"

# guided-diffusion's UNetModel keyword arguments: use_new_attention_order, 2 heads of num_channels/2 (num_head_channels
# -1), no scale-shift norm, learned sigma; attention at 16x16 and 8x8 (rates 1 and 2), Downsample/Upsample convs
CONFIG = dict(image_size=16, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
              attention_resolutions=[1, 2], dropout=0.0, channel_mult=[1, 2, 2], num_classes=None,
              use_checkpoint=False, use_fp16=False, num_heads=2, num_head_channels=-1, num_heads_upsample=-1,
              use_scale_shift_norm=False, resblock_updown=False, use_new_attention_order=True)
# the same network as the original's command-line flags (what `debias convert --flags` takes)
FLAGS = ("--image_size 16 --num_channels 32 --num_res_blocks 1 --attention_resolutions 16,8 --channel_mult 1,2,2 "
         "--num_heads 2 --num_head_channels -1 --learn_sigma True --use_scale_shift_norm False --resblock_updown False "
         "--use_new_attention_order True --class_cond False --diffusion_steps 1000 --noise_schedule linear")
SEED = 2024
DDIM = (6, 10, 21, 40)      # timestep_respacing "N"   (21: where the running-sum stride matters)
DDIMN = (10, 25)            # timestep_respacing "ddimN"
RECORDED = ("ddim/6", "ddim/21", "ddimN/10", "ddimN/25")  # network outputs kept for these runs (sample 0)


def test_helpers():
    """tests/test_upstream.py as a module, for seeded_weights and weights_sha256."""
    spec = importlib.util.spec_from_file_location("test_upstream", ROOT / "tests" / "test_upstream.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Recording(torch.nn.Module):
    """The network, keeping (timestep, ε channels of sample 0) of every call."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network, self.calls = network, []

    def forward(self, x, t, **kwargs):
        out = self.network(x, t, **kwargs)
        assert bool((t == t[0]).all())
        self.calls.append((int(t[0]), out[0, :3].clone()))
        return out


def cpu_model() -> str:
    """The processor's name (Linux), else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("original", type=Path, help="a checkout of yuhuUSTC/Debias or openai/guided-diffusion")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    sys.path.insert(0, str(args.original.resolve()))
    from guided_diffusion import script_util
    from guided_diffusion.unet import UNetModel

    from debias.convert import parse_flags, unet_kwargs_from_flags

    helpers = test_helpers()
    ours = unet_kwargs_from_flags(parse_flags(FLAGS))
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in ours.items()} == CONFIG, "FLAGS and CONFIG disagree"
    torch.set_num_threads(1)
    model = UNetModel(**CONFIG).eval()
    weights = helpers.seeded_weights({k: tuple(v.shape) for k, v in model.state_dict().items()}, SEED)
    model.load_state_dict(weights, strict=True)
    x_T = torch.from_numpy(np.random.RandomState(SEED + 1).standard_normal((4, 3, 16, 16)).astype(np.float32))
    blob = {"config_json": json.dumps(CONFIG), "flags": FLAGS, "weights_seed": SEED,
            "weights_sha256": helpers.weights_sha256(weights), "x_T": x_T, "probe/t": 999,
            "made_with": f"torch {torch.__version__}, numpy {np.__version__}, {cpu_model()} "
                         f"({torch.backends.cpu.get_cpu_capability()}), 1 thread"}
    with torch.no_grad():
        blob["probe/out"] = model(x_T, torch.full((4,), 999))
    runs = [(f"ddim/{n}", str(n)) for n in DDIM] + [(f"ddimN/{n}", f"ddim{n}") for n in DDIMN]
    for key, respacing in runs:
        diffusion = script_util.create_gaussian_diffusion(steps=1000, learn_sigma=True, noise_schedule="linear",
                                                          timestep_respacing=respacing)
        recording = Recording(model)
        blob[key] = diffusion.ddim_sample_loop(recording, (4, 3, 16, 16), noise=x_T.clone(), clip_denoised=True,
                                               eta=0.0, device=torch.device("cpu"))
        if key in RECORDED:
            blob[f"calls/{key}/t"] = torch.tensor([t for t, _ in recording.calls])
            blob[f"calls/{key}/eps"] = torch.stack([eps for _, eps in recording.calls])
        print(f"{key}: {len(recording.calls)} calls, max |x| {blob[key].abs().max():.4f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(blob, args.out)
    print(f"{args.out}: {args.out.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
