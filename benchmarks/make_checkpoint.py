"""Write a checkpoint of a freshly initialised UNet of one of benchmarks/common.py's configs (for
sampling and FID checks that need a model of the right size, not a trained one).

    python benchmarks/make_checkpoint.py e model.pt
"""

import sys

import torch

from common import CONFIGS
from debias.checkpoints import Checkpoint, save_checkpoint
from debias.config import config_from_dict
from debias.models.factory import unet_kwargs_for
from debias.models.unet import UNetModel


def main() -> None:
    name, out = sys.argv[1], sys.argv[2]
    cfg = config_from_dict(CONFIGS[name][1])
    kwargs = unet_kwargs_for(cfg, None)
    torch.manual_seed(0)
    model = UNetModel(**kwargs)
    save_checkpoint(out, Checkpoint(config=cfg.to_dict(), unet_kwargs=kwargs, model=model.state_dict()))
    print(f"{out}: config {name}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")


if __name__ == "__main__":
    main()
