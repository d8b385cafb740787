"""Speed options keep the numbers: channels-last, bf16 autocast and torch.compile against float32.

With every option off the model is the exact float32 reference (the golden tests in test_unet.py
and test_diffusion_golden.py pin it to upstream). With an option on, outputs must stay within these
documented tolerances of that reference (relative = max |a - b| / max |b|):

| option                          | what is compared                          | tolerance            |
|---------------------------------|-------------------------------------------|----------------------|
| channels_last (fp32)            | forward output and every gradient         | rtol 1e-4, atol 1e-5 |
| torch.compile (fp32, inductor)  | forward output                            | rtol 1e-4, atol 1e-5 |
| bf16 autocast                   | forward output                            | relative 5e-2        |
| bf16 autocast                   | every gradient (as one vector)            | relative 2e-2        |
| bf16 autocast                   | one training step's loss                  | relative 1e-2        |
| bf16 attention when training    | float32 attention rounded once to bf16    | bitwise              |
| bf16 sampling (DDIM, 10 steps)  | uint8 images                              | mean |Δ| <= 1 level  |

The benchmark baseline (benchmarks/baseline_unet.py, the original's code paths) is checked here
too: it must compute what our model computes, so the speed-ups it measures are like for like.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

from debias.config import config_from_dict
from debias.data.datasets import ImageDataset
from debias.diffusion.schedule import Schedule
from debias.models.factory import DiffusionModel, unet_kwargs_for
from debias.models.layers import qkv_attention
from debias.models.unet import UNetModel
from debias.runtime import Ranks, inference_network
from debias.solvers.denoiser import Denoiser
from debias.sampling import generate, plan_for
from debias.train.loop import Trainer, run_logs

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from baseline_unet import UpstreamAttentionBlock, make_baseline, upstream_ddim  # noqa: E402

GOLDEN = torch.load(Path(__file__).parent / "fixtures" / "unet_adm_small.pt", weights_only=True)
CONFIG = json.loads(GOLDEN["config_json"])  # 16x16x3, 32 channels [1, 2, 2], attention at 8x8, learned sigma
X, T = GOLDEN["x"], GOLDEN["t"]

FP32_TOL = dict(rtol=1e-4, atol=1e-5)
BF16_FORWARD_REL = 5e-2
BF16_GRAD_REL = 2e-2
BF16_LOSS_REL = 1e-2
BF16_SAMPLE_MEAN_LEVELS = 1.0


def golden_model() -> UNetModel:
    model = UNetModel(**CONFIG)
    model.load_state_dict(GOLDEN["state_dict"], strict=True)
    return model.eval()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected).abs().max() / expected.abs().max()).item()


def forward_and_grads(model: UNetModel, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = model.train()
    model.zero_grad(set_to_none=True)
    out = model(x, T)
    (out**2).mean().backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_everything_off_is_the_golden_reference():
    with torch.no_grad():
        out = golden_model()(X, T)
    torch.testing.assert_close(out, GOLDEN["out"], rtol=0, atol=1e-4)


def test_baseline_is_the_original_and_agrees_with_ours():
    baseline = make_baseline(golden_model())
    assert sum(isinstance(m, UpstreamAttentionBlock) for m in baseline.modules()) == 4  # down, middle, 2 up
    assert baseline.state_dict().keys() == golden_model().state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(baseline(X, T), GOLDEN["out"], rtol=0, atol=1e-4)
    out, grads = forward_and_grads(golden_model(), X)
    base_out, base_grads = forward_and_grads(baseline, X)
    torch.testing.assert_close(base_out, out, **FP32_TOL)
    for name, grad in grads.items():
        torch.testing.assert_close(base_grads[name], grad, **FP32_TOL, msg=name)


def test_baseline_ddim_loop_samples_what_our_ddim_samples():
    """upstream_ddim (guided-diffusion's loop, for the sampling benchmark) and our DDIM agree from one x_T."""
    from debias.solvers import sample

    model, original = golden_model().requires_grad_(False), make_baseline(golden_model())
    schedule, shape = Schedule.named("linear", 1000), (2, 3, 16, 16)
    torch.manual_seed(0)
    ours = sample("ddim", Denoiser(model, schedule, "eps", True), torch.randn(shape), 5, spacing="even")
    torch.manual_seed(0)  # upstream draws x_T inside its loop
    upstream = upstream_ddim(original, shape, 5, schedule, True)
    torch.testing.assert_close(upstream, ours, rtol=0, atol=1e-4)


def test_channels_last_matches_forward_and_gradients():
    out, grads = forward_and_grads(golden_model(), X)
    model = golden_model().to(memory_format=torch.channels_last)
    cl_out, cl_grads = forward_and_grads(model, X.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(cl_out, out, **FP32_TOL)
    for name, grad in grads.items():
        torch.testing.assert_close(cl_grads[name], grad, **FP32_TOL, msg=name)


def test_bf16_autocast_forward_within_tolerance():
    model = golden_model()
    with torch.no_grad():
        reference = model(X, T)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(X, T)
    error = relative_error(out, reference)
    print(f"bf16 forward relative error {error:.2e}")
    assert 0 < error <= BF16_FORWARD_REL


def test_bf16_autocast_gradients_within_tolerance():
    model = golden_model()
    _, reference = forward_and_grads(model, X)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, grads = forward_and_grads(model, X)
    error = relative_error(torch.cat([g.flatten() for g in grads.values()]),
                           torch.cat([g.flatten() for g in reference.values()]))
    print(f"bf16 gradient relative error {error:.2e}")
    assert 0 < error <= BF16_GRAD_REL


def test_bf16_attention_is_float32_when_training_on_cpu():
    """Training (qkv needs grad) attends in float32 and rounds once: bitwise the float32 attention in
    bf16. Inference keeps the bf16 kernel (faster forward), within bf16 rounding of it."""
    qkv = torch.randn(4, 3 * 2 * 16, 64, generator=torch.Generator().manual_seed(0)).bfloat16()
    expected = qkv_attention(qkv.float(), 2, legacy_order=False).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trained = qkv_attention(qkv.clone().requires_grad_(), 2, legacy_order=False)
        with torch.inference_mode():
            inferred = qkv_attention(qkv, 2, legacy_order=False)
    assert trained.dtype == inferred.dtype == torch.bfloat16
    assert torch.equal(trained.detach(), expected)
    assert relative_error(inferred, expected.float()) <= 2e-2


def trainer(precision: str, tmp: Path, compile: bool = False) -> Trainer:
    cfg = config_from_dict({"data": {"image_size": 16, "channels": 3},
                            "model": {"model_channels": 32, "channel_mult": [1, 2], "attention_resolutions": [8]},
                            "train": {"batch_size": 8, "precision": precision, "compile": compile}})
    images = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    dataset = ImageDataset(images=images, labels=torch.zeros(16, dtype=torch.int64), num_classes=1)
    kwargs = unet_kwargs_for(cfg, 1)
    return Trainer(cfg, dataset, kwargs, torch.device("cpu"), Ranks(), run_logs(cfg, tmp, torch.device("cpu"), Ranks()))


def test_bf16_training_step_loss_within_tolerance(tmp_path):
    losses = {}
    for precision in ("fp32", "bf16"):
        run = trainer(precision, tmp_path / precision)
        with torch.no_grad():  # non-zero output layers, so the loss depends on the whole network
            for p in run.model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        run.step(0)
        losses[precision] = run.logs.interval[0].item()
    error = abs(losses["bf16"] - losses["fp32"]) / abs(losses["fp32"])
    print(f"bf16 training loss relative error {error:.2e}")
    assert error <= BF16_LOSS_REL


def golden_diffusion(network) -> DiffusionModel:
    """The golden UNet (16×16 RGB, learned σ) as an ε-model of the 1000-step linear schedule."""
    return DiffusionModel(network, Schedule.named("linear", 1000), "eps", True, (3, 16, 16))


def test_bf16_sampling_within_tolerance():
    model = golden_model().requires_grad_(False)
    images = {precision: generate(golden_diffusion(inference_network(model, torch.device("cpu"), precision=precision)),
                                  plan_for("ddim", seed=0, batch_size=4), 10, 4)
              for precision in ("fp32", "bf16")}
    diff = (images["bf16"].float() - images["fp32"].float()).abs()
    print(f"bf16 DDIM images: mean |diff| {diff.mean():.2f}, max {diff.max():.0f} levels")
    assert diff.mean() <= BF16_SAMPLE_MEAN_LEVELS


def test_precision_is_checked():
    model = golden_model()
    with pytest.raises(ValueError, match="unknown precision"):
        inference_network(model, torch.device("cpu"), precision="int8")
    with pytest.raises(ValueError, match="needs CUDA"):
        inference_network(model, torch.device("cpu"), precision="fp16")
    assert inference_network(model, torch.device("cpu")) is model  # every option off: the model itself


def test_compile_options_are_wired(monkeypatch, tmp_path):
    compiled = []

    def fake_compile(model, *args, **kwargs):
        compiled.append(model)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    model = golden_model().requires_grad_(False)
    generate(golden_diffusion(inference_network(model, torch.device("cpu"), compile=True)), plan_for("ddim", seed=0, batch_size=2), 2, 2)
    assert compiled == [model]
    run = trainer("fp32", tmp_path, compile=True)
    assert compiled[-1] is run.network  # the UNet with the learned-weighting head, as DDP wraps it
    run.step(0)


@pytest.fixture(scope="module")
def compiled_golden():
    """The golden UNet as sampling compiles it (static shapes), shared by the tests below: the forward test
    compiles it for batches of 2, which the sampling test then reuses (compiling costs ~40 s on a CPU core)."""
    return inference_network(golden_model().requires_grad_(False), torch.device("cpu"), compile=True)


@pytest.mark.slow
def test_compiled_forward_matches_eager(compiled_golden):
    with torch.no_grad():
        for rows in (slice(0, 2), slice(2, 4)):
            torch.testing.assert_close(compiled_golden(X[rows], T[rows], None), golden_model()(X[rows], T[rows]),
                                       **FP32_TOL)


@pytest.mark.parametrize("target", ["eps", "x0", "v"])
@pytest.mark.parametrize("clip_x0", [True, False])
def test_lighter_ddim_step_equals_the_full_reverse_step(target, clip_x0):
    """DDIM no longer computes the posterior mean/variance it never used; its step is bitwise the
    one built from p_mean_variance's x̂0 and ε̂ (Song et al. eq. 12 with η = 0)."""
    from debias.diffusion.reverse import p_mean_variance
    from debias.solvers.ddim import ddim_step

    gen = torch.Generator().manual_seed(0)
    chain = Schedule.named("cosine", 1000).respace(range(0, 1000, 50))
    x, output = torch.randn(4, 3, 8, 8, generator=gen), torch.randn(4, 6, 8, 8, generator=gen)
    t = torch.tensor([0, 3, 10, 19])
    p = p_mean_variance(chain, output, x, t, target, True, clip_x0)
    abar_prev = chain.gather(chain.alphas_cumprod_prev, t, x)
    expected = abar_prev.sqrt() * p.pred_x0 + (1 - abar_prev).sqrt() * p.pred_eps
    step = ddim_step(Denoiser(lambda *_: output, chain, target, True, clip_x0), chain, x, t)
    assert torch.equal(step, expected)


@pytest.mark.slow
def test_compiled_sampling_with_a_smaller_last_batch_matches_eager(compiled_golden):
    """Batches of 2 then 1 recompile (static shapes); the images match eager float32 sampling."""
    eager = generate(golden_diffusion(golden_model().requires_grad_(False)), plan_for("ddim", seed=0, batch_size=2), 3, 3)
    compiled = generate(golden_diffusion(compiled_golden), plan_for("ddim", seed=0, batch_size=2), 3, 3)
    assert (compiled.int() - eager.int()).abs().max() <= 1
