"""Style transfer: CycleGAN training/resume, patch inference, correlation loss, T2 remapping."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from torch import nn

from brainshift.style import StyleModel, StyleTrainConfig, load_style_model, synthesize_t1, t2_to_t1_like, train_style
from brainshift.style.data import make_case, normalise
from brainshift.style.losses import correlation_loss, local_ncc
from brainshift.style.networks import PatchGAN3D, UNet3D, max_depth

torch.set_num_threads(1)


def _fan(shape, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """A toy iUS (smooth speckle inside a ball-shaped field of view, 0 outside) and a toy T1."""
    rng = np.random.default_rng(seed)
    t1 = gaussian_filter(rng.random(shape).astype(np.float32), 2) * 1000
    grid = np.indices(shape).astype(np.float32)
    r = np.sqrt(((grid - (np.array(shape)[:, None, None, None] - 1) / 2) ** 2).sum(0))
    fov = r < min(shape) * 0.4
    us = np.where(fov, 255 - t1 / 1000 * 200 + rng.random(shape) * 20 + 1, 0).astype(np.float32)
    return us, t1


def test_unet_depth_reaches_one_voxel_and_keeps_shape():
    net = UNet3D(base=2, depth=7)
    x = torch.zeros(1, 1, 128, 128, 128)
    assert net(x).shape == x.shape
    assert max_depth(64) == 6 and max_depth(48) == 4
    with pytest.raises(ValueError):
        UNet3D(base=2, depth=5)(torch.zeros(1, 1, 48, 48, 48))
    assert PatchGAN3D(base=2)(torch.zeros(1, 1, 32, 32, 32)).shape[1] == 1


def test_train_two_iterations_checkpoint_and_resume(tmp_path):
    cases = [make_case(str(i), *_fan((20, 18, 16), seed=i)) for i in range(2)]
    cfg = StyleTrainConfig(out=str(tmp_path), epochs=5, patch=16, base_width=2, patches_per_volume=1,
                           max_steps=2, val_every=1, threads=1)
    card = train_style(cfg, cases=cases, progress=False)
    assert card["step"] == 2 and card["epoch"] == 1          # 2 volumes x 1 patch = 2 steps = 1 epoch
    for name in ("checkpoint.pt", "us2t1.pt", "loss_log.csv", "train_card.json", "val_epoch0001.png"):
        assert (tmp_path / name).is_file(), name
    before = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["g_us2t1"]
    cfg2 = StyleTrainConfig(out=str(tmp_path), epochs=5, patch=16, base_width=2, patches_per_volume=1,
                            max_steps=4, val_every=1, threads=1, resume=True)
    card2 = train_style(cfg2, cases=cases, progress=False)
    assert card2["step"] == 4 and card2["epoch"] == 2        # the counters continue
    rows = list(csv.DictReader(open(tmp_path / "loss_log.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(np.isfinite(float(r["g_total"])) for r in rows)
    after = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["g_us2t1"]
    assert any(not torch.equal(before[k], after[k]) for k in before)  # weights moved on from the resumed state
    model = load_style_model(tmp_path / "us2t1.pt", device="cpu")
    assert model.spacing is None        # simulated/in-memory volumes: no working spacing is claimed
    us, _ = _fan((20, 18, 16), seed=5)
    synth = synthesize_t1(us, model, device="cpu")
    assert synth.shape == us.shape and np.isfinite(synth).all()


class _Constant(nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.value = value
        self.seen = 0

    def forward(self, x):
        self.seen += x.shape[0]
        return torch.full_like(x, self.value)


def test_inference_shape_zero_outside_fov_and_no_seams():
    us, _ = _fan((41, 37, 30), seed=3)
    us[20, 18, 15] = 0.0                                       # a hole inside the fan is outside the FOV too
    model = StyleModel(_Constant(0.3), patch=12)
    out = synthesize_t1(us, model, device="cpu")
    assert out.shape == us.shape and out.dtype == np.float32
    assert np.all(out[us == 0] == 0.0)
    assert np.allclose(out[us > 0], 0.65, atol=1e-5)           # constant in, constant out: no seams
    assert model.net.seen > 8                                  # really several overlapping windows


def test_inference_volume_smaller_than_patch_and_position_consistency():
    us, _ = _fan((10, 12, 9), seed=1)
    net = UNet3D(base=2, depth=4).eval()
    out = synthesize_t1(us, StyleModel(net, 16), device="cpu")
    assert out.shape == us.shape and np.all(out[us == 0] == 0) and np.all(out[us > 0] > 0)


def test_correlation_loss_sign_insensitive():
    rng = np.random.default_rng(0)
    img = torch.from_numpy(gaussian_filter(rng.standard_normal((24, 24, 24)), 1.5).astype(np.float32))[None, None]
    noise = torch.from_numpy(rng.standard_normal((24, 24, 24)).astype(np.float32))[None, None]
    inverted = 1.0 - 3.0 * img
    l_inv = float(correlation_loss(img, inverted))
    l_noise = float(correlation_loss(img, noise))
    assert l_inv < 0.05 and l_noise > 0.8 and l_inv < l_noise
    assert float(local_ncc(img, inverted).mean()) < -0.9      # the NCC itself is signed
    mask = torch.zeros_like(img)
    mask[..., 4:20, 4:20, 4:20] = 1
    assert float(correlation_loss(img, inverted, mask)) < float(correlation_loss(img, noise, mask))


def test_normalise_range_and_background():
    v = np.zeros((8, 8, 8), np.float32)
    v[2:6, 2:6, 2:6] = np.arange(64).reshape(4, 4, 4) + 1
    n = normalise(v)
    assert n.min() >= -1 and n.max() <= 1 and np.all(n[v == 0] == -1)


def test_t2_to_t1_like_monotone_decreasing_preserves_zeros():
    rng = np.random.default_rng(2)
    labels = rng.integers(1, 4, size=(20, 20, 20))             # 1 WM, 2 GM, 3 CSF
    labels[:3] = 0                                             # background (noise, dark in T1 and T2)
    t1_level = np.array([0, 900, 600, 150], np.float32)[labels]
    t2_level = np.array([0, 200, 300, 800], np.float32)[labels]
    t2 = np.where(labels > 0, t2_level * (1 + 0.05 * rng.standard_normal(labels.shape)), 0).astype(np.float32)
    t2[:3, :, ::2] = rng.integers(1, 10, size=t2[:3, :, ::2].shape)  # dark non-zero background stays dark
    brain = labels > 0
    for ref in (None, np.linspace(50, 1000, 101)):
        out = t2_to_t1_like(t2, reference=ref)
        assert out.shape == t2.shape and np.all(out[~brain] == 0)
        order = np.argsort(t2[brain], kind="stable")
        assert np.all(np.diff(out[brain][order]) <= 1e-6)       # monotone non-increasing in T2
        assert out[brain].max() > out[brain].min()
        assert np.corrcoef(out[brain], t1_level[brain])[0, 1] > 0.8   # T1-like tissue order
    mask = np.zeros_like(brain)
    mask[5:15] = True
    out = t2_to_t1_like(t2, mask=mask)
    assert np.all(out[~mask] == 0)


def test_shipped_model_loads_and_runs():
    try:
        model = load_style_model(device="cpu")
    except FileNotFoundError:
        pytest.skip("no shipped style model")
    assert model.patch % (2 ** model.net.depth) == 0
    us, _ = _fan((40, 40, 40), seed=7)
    out = synthesize_t1(us, model, device="cpu")
    assert out.shape == us.shape and np.all(out[us == 0] == 0) and 0 <= out.min() and out.max() <= 1


def _seam_ratio(out: np.ndarray, borders: list[int]) -> float:
    """Mean |step| along axis 0 across window borders over the mean |step| elsewhere (inside windows),
    4 voxels away from the volume's own faces."""
    step = np.abs(np.diff(out, axis=0))[:, 4:-4, 4:-4]
    at = [b - 1 for b in borders]
    inside = [i for i in range(4, step.shape[0] - 4) if i not in at]
    return float(step[at].mean() / step[inside].mean())


def test_no_seams_gradient_across_patch_borders_no_larger_than_inside():
    from monai.inferers import sliding_window_inference

    net = nn.Conv3d(1, 1, 7, padding=3, bias=False).eval()    # a blur: zero padding darkens a window's border
    nn.init.constant_(net.weight, 1 / 7 ** 3)
    rng = np.random.default_rng(0)
    us = (gaussian_filter(rng.random((40, 40, 40)), 3) * 400 + 20).astype(np.float32)   # smooth, all inside the FOV
    with torch.no_grad():                                      # hard tiling (no overlap, no blending) has seams:
        x = torch.from_numpy(normalise(us))[None, None]
        hard = sliding_window_inference(x, 16, 1, net, overlap=0.0, mode="constant")[0, 0].numpy()
    assert _seam_ratio(hard, [16, 32]) > 1.5                   # ... so the measure can see one
    out = synthesize_t1(us, StyleModel(net, 16), device="cpu")
    assert _seam_ratio(out, [8, 16, 24, 32]) <= 1.1            # Gaussian-blended windows (starts 0, 8, 16, 24)


def test_inference_at_the_working_spacing_returns_the_input_grid():
    us, _ = _fan((40, 36, 30), seed=4)
    model = StyleModel(_Constant(0.3), patch=8, meta={"spacing_mm": 1.0})
    out = synthesize_t1(us, model, device="cpu", spacing=0.5)   # 0.5 mm iUS -> 1 mm network grid -> back
    assert model.net.seen > 0 and out.shape == us.shape
    assert np.all(out[us == 0] == 0.0)
    assert np.allclose(out[us > 0], 0.65, atol=1e-4)           # the FOV border is not darkened on the way back
    seen = model.net.seen
    synthesize_t1(us, model, device="cpu", spacing=2.0)        # coarser than the model: runs at its own grid
    assert model.net.seen > seen


def test_to_spacing_halves_grid_and_keeps_fov_border_level():
    from brainshift.style.real import to_spacing

    us, _ = _fan((40, 40, 40), seed=6)
    flat = np.where(us > 0, 100.0, 0.0).astype(np.float32)
    img, fov = to_spacing(flat, np.array([0.5, 0.5, 0.5]), 1.0)
    assert img.shape == (20, 20, 20) and fov.dtype == bool
    assert np.allclose(img[fov], 100.0, atol=1e-3) and np.all(img[~fov] == 0)
    assert abs(fov.mean() - (us > 0).mean()) < 0.05           # same share of the box


def test_t1_crops_follow_real_fov_shapes_inside_the_brain_and_sampler_keeps_domains_apart():
    from brainshift.style.data import PatchSampler
    from brainshift.style.real import t1_crops

    grid = np.indices((90, 90, 90)).astype(np.float32)
    brain = np.sqrt(((grid - 44.5) ** 2).sum(0)) < 42          # a 84 mm ball at 1 mm
    t1 = np.where(brain, 500.0 + 100 * np.sin(grid[0] / 3), 0).astype(np.float32)
    us, _ = _fan((30, 26, 24), seed=0)
    fov = us > 0
    rng = np.random.default_rng(0)
    crops = t1_crops(t1, brain, [fov], 5, rng)
    assert len(crops) == 5
    for c in crops:
        assert c.us is None and sorted(c.fov.shape) == sorted(fov.shape)   # the FOV's box, axes permuted
        assert MIN_INSIDE <= c.fov.sum() / fov.sum() <= 1.0               # mostly inside the brain
        assert np.all(c.t1[~c.fov] == -1) and c.t1[c.fov].max() <= 1
    ius = make_case("us", us, None)
    sampler = PatchSampler([ius, *crops], patch=8, seed=1)
    assert len(sampler.domains["us"]) == 1 and len(sampler.domains["t1"]) == 5
    a, ma, b, mb = sampler.sample(2)
    assert a.shape == b.shape == (2, 1, 8, 8, 8) and np.all(a[ma == 0] == -1) and np.all(b[mb == 0] == -1)
    with pytest.raises(ValueError, match="t1 domain"):
        PatchSampler([ius], patch=8)


MIN_INSIDE = 0.85


def test_paired_patches_share_place_and_flips_and_supervised_term_is_logged(tmp_path):
    """A simulated pair's iUS and aligned T1 are cut at one centre with the same flips (a T1 equal
    to its iUS gives equal patches), and a run with ``lam_sup`` logs a finite, positive ``sup``."""
    from brainshift.style.data import PatchSampler

    us, _ = _fan((24, 22, 20), seed=3)
    case = make_case("pair", us, us.copy())
    case.paired = True
    other = make_case("unpaired", *_fan((24, 22, 20), seed=4))   # not paired: never drawn by sample_paired
    sampler = PatchSampler([case, other], patch=12, seed=2)
    for _ in range(5):
        a, t, m = sampler.sample_paired(2)
        assert a.shape == t.shape == m.shape == (2, 1, 12, 12, 12)
        assert np.array_equal(a, t) and np.all(a[m == 0] == -1) and m.any()
    with pytest.raises(ValueError, match="paired"):
        PatchSampler([other], patch=12).sample_paired(1)
    real_only = PatchSampler([case, other], patch=12, paired_in_domains=False)   # the pair only supervises
    assert real_only.domains == {"us": [other], "t1": [other]} and real_only.paired == [case]
    with pytest.raises(ValueError, match="domain"):
        PatchSampler([case], patch=12, paired_in_domains=False)
    cfg = StyleTrainConfig(out=str(tmp_path), epochs=1, patch=16, base_width=2, patches_per_volume=1,
                           max_steps=2, val_every=1, threads=1, lam_sup=1.0, lam_ssc=1.0)
    train_style(cfg, cases=[case, other], progress=False)
    rows = list(csv.DictReader(open(tmp_path / "loss_log.csv")))
    assert 0 < float(rows[-1]["sup"]) < 10 and 0 < float(rows[-1]["ssc"]) < 1


def test_differentiable_ssc_equals_the_pipelines_ssc_and_has_gradients():
    """The training loss's SSC descriptor is the pipeline's (brainshift.ssc), and gradients reach the input."""
    from brainshift.ssc import ssc_descriptor
    from brainshift.style.losses import ssc_descriptors, ssc_loss

    vol = gaussian_filter(np.random.default_rng(0).random((20, 18, 16)), 2).astype(np.float32)
    ours = ssc_descriptors(torch.from_numpy(vol)[None, None])[0].numpy()
    assert np.abs(ours - ssc_descriptor(vol).numpy()).max() < 1e-5
    x = torch.from_numpy(vol)[None, None].clone().requires_grad_(True)
    y = torch.from_numpy(1.0 - vol)[None, None]          # an inverted contrast has the same SSC
    assert float(ssc_loss(x, y)) < 1e-6
    loss = ssc_loss(x, torch.from_numpy(np.roll(vol, 3, axis=0))[None, None])
    loss.backward()
    assert float(loss) > 0.01 and float(x.grad.abs().sum()) > 0


def test_load_paired_cases_aligns_the_t1_with_the_true_field(tmp_path):
    """The T1 of a simulated pair, pulled with the true field, fits the iUS grid's tissue labels
    better (less variance inside each label) than the T1 as the simulator wrote it (moving grid)."""
    from brainshift.io import load_volume
    from brainshift.style.data import load_paired_cases
    from brainshift.synth import simulate_dataset

    simulate_dataset(tmp_path, 1, seed=3, shape=48, spacing=3.0, progress=False)
    (case,) = load_paired_cases(tmp_path)
    us = load_volume(next((tmp_path / "imagesTr").glob("*_0000.nii.gz"))).data
    t1 = load_volume(next((tmp_path / "imagesTr").glob("*_0001.nii.gz"))).data
    labels = load_volume(next((tmp_path / "labels").glob("*_0000.nii.gz"))).data.astype(int)
    assert case.paired and case.t1.shape == us.shape and np.array_equal(case.fov, us > 0)
    unaligned = make_case("raw", us, t1).t1

    def within_label_variance(img: np.ndarray) -> float:
        m = case.fov
        return float(sum(img[m & (labels == k)].var() * (m & (labels == k)).sum() for k in np.unique(labels[m])) / m.sum())

    assert within_label_variance(case.t1) < 0.9 * within_label_variance(unaligned)
    half = load_paired_cases(tmp_path, spacing=6.0)[0]          # at a coarser working spacing
    assert half.us.shape == tuple((np.array(us.shape) + 1) // 2) or half.us.shape == tuple(np.array(us.shape) // 2)


def test_learning_curve_plot_reads_the_trainer_log(tmp_path):
    """``plot_losses`` draws a trainer's loss_log.csv (with and without held-out numbers) to a PNG."""
    from brainshift.style.evaluate import plot_losses

    log = tmp_path / "loss_log.csv"
    log.write_text("epoch,step,lr,wall_s,g_gan,cycle,identity,corr,sup,ssc,g_total,d_t1,d_us,val_ncc_synth_t1,val_ncc_us_t1\n"
                   "1,10,0.0002,5,1.0,0.5,0.0,0.9,1.1,,9.0,0.3,0.3,nan,nan\n"       # ssc added on resuming
                   "2,20,0.0001,10,0.9,0.4,0.0,0.8,0.7,0.1,7.0,0.2,0.2,nan,nan\n")
    plot_losses(str(tmp_path / "a.png"), str(log))
    plot_losses(str(tmp_path / "b.png"), str(log), {0: dict(ncc=0.1, ssc=0.15, ncc_raw=0.0, ssc_raw=0.14),
                                                    2: dict(ncc=0.4, ssc=0.12, ncc_raw=0.0, ssc_raw=0.14)})
    for name in ("a.png", "b.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_csv_log_resumed_under_a_new_header_keeps_old_rows_by_column(tmp_path):
    """A run resumed with a new loss column (e.g. ``ssc``) keeps its earlier rows, each value under
    its own column name and the new column empty, and drops rows past the checkpoint."""
    from brainshift.training import CsvLog

    path = tmp_path / "log.csv"
    log = CsvLog(path, ["epoch", "a", "b"], restart=True)
    for e in (1, 2, 3):
        log.row([e, 10 * e, 100 * e])
    log = CsvLog(path, ["epoch", "a", "new", "b"], restart=False, keep_until=2)
    log.row([3, 31, 0.5, 301])
    rows = list(csv.DictReader(open(path)))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert rows[1] == {"epoch": "2", "a": "20", "new": "", "b": "200"} and rows[2]["new"] == "0.5"


def test_appearance_scores_a_perfect_synthetic_t1_best_despite_the_fov_border():
    """A synthetic T1 equal to the true T1 inside the field of view (0 outside, as inference writes
    it) scores SSC-MSE 0 and beats a noise image; against the T1 left running past the border (the
    ``_open`` columns) the same perfect image scores a false step at the edge."""
    from brainshift.style.evaluate import appearance

    rng = np.random.default_rng(4)
    t1 = gaussian_filter(rng.random((40, 40, 40)), 2).astype(np.float32) + 0.5
    fov = np.zeros(t1.shape, bool)
    fov[6:34, 6:34, 6:34] = True
    us = np.where(fov, rng.random(t1.shape) + 0.01, 0).astype(np.float32)
    perfect = np.where(fov, t1, 0).astype(np.float32)
    r = appearance(perfect, us, t1)
    assert r["ssc_synth_t1"] < 1e-6 < 0.01 < r["ssc_us_t1"]
    assert r["ncc_synth_t1"] > 0.999 > 0.2 > r["ncc_us_t1"]
    assert r["ssc_synth_t1_open"] > 0.01


@pytest.mark.parametrize("seed", [0, 1])
def test_resize_upsampling_leaves_no_checkerboard(seed):
    """On a smooth input, a randomly initialised U-Net with transposed convolutions puts a period-2
    pattern (the Nyquist component along an axis) into its output; trilinear resizing + a 3^3
    convolution does not."""
    from brainshift.style.networks import init_weights

    x = gaussian_filter(np.random.default_rng(seed).standard_normal((32, 32, 32)), 4).astype(np.float32)
    x = torch.from_numpy(x / np.abs(x).max())[None, None]

    def checkerboard(upsample: str) -> float:
        torch.manual_seed(seed)
        net = init_weights(UNet3D(base=4, depth=3, upsample=upsample), gain=0.2).eval()
        with torch.no_grad():
            y = net(x)[0, 0, 4:-4, 4:-4, 4:-4]
        sign = (-1.0) ** torch.arange(y.shape[0], dtype=torch.float32)
        axes = ((-1, 1, 1), (1, -1, 1), (1, 1, -1))
        return max(float((y * sign.reshape(shape)).mean().abs()) for shape in axes) / float(y.std())

    assert checkerboard("transpose") > 0.1 > 0.05 > checkerboard("resize")


def test_resize_generator_saves_loads_and_starts_from_a_transpose_encoder(tmp_path):
    """A resize-decoder generator keeps its decoder type through save/load, and a run started from
    a transpose-decoder file copies the encoder (same tensors) and leaves the decoder fresh."""
    from brainshift.style.infer import save_generator
    from brainshift.style.networks import load_matching

    net = UNet3D(base=2, depth=4, upsample="resize").eval()
    path = save_generator(tmp_path / "g.pt", net, 16)
    loaded = load_style_model(path, device="cpu")
    assert loaded.net.upsample == "resize"
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(loaded(x), net(x))
    old = UNet3D(base=2, depth=4, upsample="transpose")
    fresh = UNet3D(base=2, depth=4, upsample="resize")
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    n = load_matching(fresh, old.state_dict())
    encoder = [k for k in before if k.startswith("down.")]
    assert n == len(encoder) > 0                       # the encoder, and nothing of the decoder
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, old.state_dict()[k] if k in encoder else before[k])
    with pytest.raises(ValueError, match="upsample"):
        UNet3D(base=2, depth=4, upsample="nearest")


def test_adversarial_weight_scales_the_gan_term_and_a_zero_identity_weight_skips_it(tmp_path):
    """Same seed, one step: ``lam_gan`` 3 adds 2 x the (same) adversarial loss to the generators' total;
    with ``lam_idt`` 0 the identity term is not computed (logged 0)."""
    cases = [make_case("0", *_fan((20, 18, 16), seed=0))]
    rows = {}
    for lam_gan in (1.0, 3.0):
        cfg = StyleTrainConfig(out=str(tmp_path / str(lam_gan)), epochs=1, patch=16, base_width=2,
                               patches_per_volume=1, max_steps=1, val_every=1, threads=1, lam_idt=0.0, lam_gan=lam_gan)
        train_style(cfg, cases=cases, progress=False)
        first = next(csv.DictReader(open(tmp_path / str(lam_gan) / "loss_log.csv")))
        rows[lam_gan] = {k: float(v) for k, v in first.items()}
    a, b = rows[1.0], rows[3.0]
    assert a["g_gan"] == pytest.approx(b["g_gan"]) and a["g_gan"] > 0
    assert b["g_total"] - a["g_total"] == pytest.approx(2 * a["g_gan"], rel=1e-4)
    assert a["identity"] == 0 == b["identity"]


def test_tissue_contrast_reads_the_t1_order_and_its_inversion():
    """WM > GM > CSF gives both contrasts > 0 (in standard deviations), the inverted image both < 0,
    and a class missing from the field of view gives NaN rather than a number."""
    from brainshift.style.evaluate import tissue_contrast
    from brainshift.ultrasound import LABELS

    rng = np.random.default_rng(0)
    labels = rng.choice([LABELS["csf"], LABELS["gm"], LABELS["wm"]], size=(12, 12, 12)).astype(np.uint8)
    t1 = np.choose(labels - LABELS["csf"], [0.2, 0.6, 1.0]) + rng.normal(0, 0.05, labels.shape)
    fov = np.ones(labels.shape, bool)
    c = tissue_contrast(t1, labels, fov)
    assert c["wm_gm"] > 1 and c["gm_csf"] > 1
    inv = tissue_contrast(1 - t1, labels, fov)
    assert inv["wm_gm"] == pytest.approx(-c["wm_gm"]) and inv["gm_csf"] == pytest.approx(-c["gm_csf"])
    assert np.isnan(tissue_contrast(t1, labels, labels != LABELS["csf"])["gm_csf"])


def test_discriminators_learn_at_their_own_rate(tmp_path):
    """``d_lr_factor`` 4: the discriminators' optimiser runs at 4 x the generators' rate, through the schedule."""
    cases = [make_case("0", *_fan((20, 18, 16), seed=0))]
    cfg = StyleTrainConfig(out=str(tmp_path), epochs=4, patch=16, base_width=2, patches_per_volume=1,
                           max_steps=3, val_every=9, threads=1, lam_idt=0.0, d_lr_factor=4.0)
    train_style(cfg, cases=cases, progress=False)
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    lr_g, lr_d = ck["opt_g"]["param_groups"][0]["lr"], ck["opt_d"]["param_groups"][0]["lr"]
    assert lr_g < cfg.lr and lr_d == pytest.approx(4 * lr_g)      # epoch 3 of 4: already decaying, 4 x apart


def test_instance_normalised_critic_cannot_see_a_patch_s_contrast_and_the_plain_one_can():
    """At initialisation (zero biases), the pix2pix critic gives the same logits for a patch and for
    the patch with 3 x its contrast: instance norm divides the spread out, so "too smooth" is invisible
    to it. ``norm="none"`` answers differently; the instance variant keeps its parameter names
    (checkpoints written before the option load)."""
    from brainshift.style.networks import PatchGAN3D, init_weights

    torch.manual_seed(0)
    x = torch.randn(1, 1, 32, 32, 32)
    inst, plain = init_weights(PatchGAN3D(4, 3)), init_weights(PatchGAN3D(4, 3, norm="none"))
    rel = lambda a, b: float((a - b).norm() / a.norm())   # noqa: E731
    with torch.no_grad():
        assert rel(inst(x), inst(3 * x)) < 0.01          # the same answer (up to the norm's epsilon)
        assert rel(plain(x), plain(3 * x)) > 1.5         # 3 x the logits: it sees the contrast
    assert not any(isinstance(m, nn.InstanceNorm3d) for m in plain.modules())
    assert [k for k in inst.state_dict() if "net.2." in k or "net.3." in k] == [
        "net.2.weight", "net.3.weight", "net.3.bias"]   # conv (no bias), InstanceNorm3d (affine), as before
    with pytest.raises(ValueError, match="norm"):
        PatchGAN3D(4, 3, norm="batch")


def test_highpass_critic_sees_the_laplacian_and_resumes_with_it(tmp_path):
    """The Laplacian is +6 at a bright dot and -1 at its 6 neighbours, 0 inside a linear ramp; the
    high-pass critic's first layer reads (image, Laplacian); a resumed run rebuilds such critics from
    the checkpoint (their state would not load into one-channel critics)."""
    from brainshift.style.networks import laplacian

    dot = torch.zeros(1, 1, 5, 5, 5)
    dot[0, 0, 2, 2, 2] = 1.0
    lap = laplacian(dot)
    assert lap[0, 0, 2, 2, 2] == 6 and lap[0, 0, 1, 2, 2] == -1 and lap[0, 0, 2, 2, 3] == -1
    assert float(lap.sum()) == 0 and lap[0, 0, 0, 0, 0] == 0
    ramp = torch.arange(6.0).reshape(6, 1, 1).expand(6, 6, 6)[None, None] * 0.3 + 0.1
    assert laplacian(ramp)[..., 1:-1, 1:-1, 1:-1].abs().max() < 1e-6

    torch.manual_seed(0)
    critic = PatchGAN3D(4, 3, norm="none", highpass=True)
    first = critic.net[0]
    assert first.in_channels == 2
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        direct = critic.net(torch.cat([x, laplacian(x)], 1))
        assert torch.equal(critic(x), direct)

    cases = [make_case("0", *_fan((20, 18, 16), seed=0))]
    kw = dict(out=str(tmp_path), epochs=4, patch=16, base_width=2, patches_per_volume=1, val_every=9, threads=1,
              lam_idt=0.0)
    train_style(StyleTrainConfig(max_steps=1, d_norm="none", d_highpass=True, **kw), cases=cases, progress=False)
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ck["config"]["d_highpass"] and ck["d_t1"]["net.0.weight"].shape[1] == 2
    card = train_style(StyleTrainConfig(max_steps=2, resume=True, **kw), cases=cases, progress=False)
    assert card["step"] == 2
