"""Deformable stage: synthetic generator, training loop, SynthMorph inference, refinement, guard."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from brainshift import deform, fields, metrics
from brainshift.deform import network as dn
from brainshift.deform import synthetic as syn
from brainshift.deform import train as st

torch.set_num_threads(1)


def smooth_pair(n: int = 40, seed: int = 0, amp: float = 3.0):
    """(fixed, moving, mask, truth): fixed = moving warped by a known smooth voxel pull field."""
    rng = np.random.default_rng(seed)
    moving = gaussian_filter(rng.standard_normal((n,) * 3).astype(np.float32), 2.0)
    moving = (moving - moving.min()) / (moving.max() - moving.min())
    x = np.stack(np.meshgrid(*[np.linspace(0, np.pi, n)] * 3, indexing="ij"), -1)
    truth = np.zeros((n,) * 3 + (3,), np.float32)
    for c in range(3):
        truth[..., c] = amp * np.sin(x[..., (c + 1) % 3] + c) * np.sin(x[..., c])
    fixed = fields.warp(moving, truth)
    mask = np.zeros((n,) * 3, bool)
    mask[6:-6, 6:-6, 6:-6] = True
    return fixed, moving, mask, truth


def epe(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    return float(np.linalg.norm(a - b, axis=-1)[mask].mean())


# ---------------------------------------------------------------------------------------- generator
def test_generator_is_deterministic_per_seed():
    cfg = syn.GeneratorConfig(shape=16, n_labels=8)
    a, b, c = syn.generate_pair(3, cfg), syn.generate_pair(3, cfg), syn.generate_pair(4, cfg)
    assert set(a) == {"fixed", "moving", "fixed_labels", "moving_labels", "truth", "mask"}
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["fixed"], c["fixed"])
    assert not torch.equal(a["moving_labels"], c["moving_labels"])
    assert a["fixed"].shape == (1, 1, 16, 16, 16) and float(a["fixed"].min()) >= 0 and float(a["fixed"].max()) <= 1


def test_generator_truth_field_aligns_the_labels():
    """The returned true pull field maps the moving labels onto the fixed ones better than identity."""
    cfg = syn.GeneratorConfig(shape=24, n_labels=8, svf_std_max=4.0)
    p = syn.generate_pair(11, cfg)
    before = syn.hard_dice(p["fixed_labels"], p["moving_labels"], None, 8)
    after = syn.hard_dice(p["fixed_labels"], p["moving_labels"], p["truth"], 8)
    assert after > before + 0.05


def test_boundary_error_in_the_field_of_view_ignores_what_neither_image_shows():
    """A field right inside the field of view and zero outside it: no in-FOV boundary error, some overall."""
    cfg = syn.GeneratorConfig(shape=24, n_labels=8, mask_prob=1.0, svf_std_max=4.0)
    p = syn.generate_pair(2, cfg)
    inside = (p["mask"] > 0.5).float()
    assert 0 < float(inside.mean()) < 1 and float(p["fixed"][inside == 0].abs().max()) < 0.5
    m = syn.pair_metrics(p, p["truth"] * inside, 8)
    assert m["bepe_fov"] < 1e-6 < m["bepe"]


# ---------------------------------------------------------------------------------------- training
def test_kaiming_init_keeps_the_deep_unet_levels_alive():
    """He init: the bottleneck's activations keep their scale; PyTorch's default shrinks them ~3x per layer."""
    pair = syn.generate_pair(1, syn.GeneratorConfig(shape=32))
    scale = {}
    for init in ("kaiming", "torch"):
        torch.manual_seed(0)
        net = dn.build_network(dn.NetConfig(design="unet", init=init))
        seen = {}
        net.model.lowest_resolution_conv_block.register_forward_hook(lambda m, i, o: seen.update(std=float(o.std())))
        with torch.no_grad():
            net(pair["moving"], pair["fixed"])
        scale[init] = seen["std"]
    assert scale["kaiming"] > 0.1 and scale["torch"] < 0.2 * scale["kaiming"], scale


def _tiny_config(out, iterations: int, **kw) -> st.TrainConfig:
    return st.TrainConfig(out=str(out), iterations=iterations, threads=1, checkpoint_every=1, val_every=0, val_pairs=1,
                          generator=syn.GeneratorConfig(shape=16, n_labels=4, related_prob=0.5),
                          net=dn.NetConfig(radius=2, width=8, features=8), **kw)


def _curve(out) -> list[list[str]]:
    """The learning curve's (iteration, loss, dice_loss, grad, sup) rows."""
    rows = (Path(out) / f"{st.model_stem(0.5)}.log.csv").read_text().strip().splitlines()[1:]
    return [r.split(",")[:5] for r in rows]


def test_training_checkpoints_and_resumes_exactly(tmp_path):
    """Interrupted after 2 iterations and resumed to 4 = 4 straight: the same curve and the same weights."""
    st.train(_tiny_config(tmp_path / "straight", 4), progress_bar=False)
    card = st.train(_tiny_config(tmp_path / "pieces", 2), progress_bar=False)
    stem = st.model_stem(0.5)
    ck = torch.load(tmp_path / "pieces" / f"{stem}.ckpt.pt", weights_only=False)
    assert ck["iteration"] == 2 == card["iterations"]
    assert json.loads((tmp_path / "pieces" / f"{stem}.json").read_text())["iterations"] == 2
    st.train(_tiny_config(tmp_path / "pieces", 4, resume=True), progress_bar=False)
    assert [r[0] for r in _curve(tmp_path / "pieces")] == ["1", "2", "3", "4"]   # the log was continued
    assert _curve(tmp_path / "pieces") == _curve(tmp_path / "straight")
    a = torch.load(tmp_path / "pieces" / f"{stem}.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "straight" / f"{stem}.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    # the weights load for inference and give a zero field outside the crop
    model = deform.load_model(tmp_path / "pieces")
    fixed, moving, mask, _ = smooth_pair(24, amp=1.0)
    mask[:] = False
    mask[8:16, 8:16, 8:16] = True
    disp = deform.predict_field(fixed, moving, mask, model=model, margin_vox=2)
    assert disp.shape == (24, 24, 24, 3) and disp.dtype == np.float32
    assert np.all(disp[:5] == 0) and np.all(disp[:, 19:] == 0)


def test_lr_decays_by_cosine_over_the_last_iterations_and_a_stable_checkpoint_resumes_into_it(tmp_path):
    """Warmup-stable-decay: constant lr, then a cosine to 0 over the last ``decay`` iterations; a run
    stopped at the stable rate and resumed with ``--decay`` gives the straight decayed run exactly."""
    cfg = st.TrainConfig(iterations=10, decay=4, lr=1e-3)
    lrs = [st.lr_at(cfg, i) for i in range(10)]
    assert lrs[:7] == [1e-3] * 7
    assert all(a > b > 0 for a, b in zip(lrs[6:], lrs[7:])) and lrs[9] < 0.2e-3
    assert st.lr_at(st.TrainConfig(iterations=10, lr=1e-3), 9) == 1e-3          # decay 0: constant

    st.train(_tiny_config(tmp_path / "straight", 4, decay=2), progress_bar=False)
    st.train(_tiny_config(tmp_path / "pieces", 2), progress_bar=False)           # stable piece, no decay
    st.train(_tiny_config(tmp_path / "pieces", 4, decay=2, resume=True), progress_bar=False)
    assert _curve(tmp_path / "pieces") == _curve(tmp_path / "straight")
    ck = torch.load(tmp_path / "pieces" / f"{st.model_stem(0.5)}.ckpt.pt", weights_only=False)
    assert ck["optimizer"]["param_groups"][0]["lr"] == pytest.approx(st.lr_at(_tiny_config(tmp_path, 4, decay=2), 3))
    # and the decay changes the weights (the schedule reached the optimiser)
    st.train(_tiny_config(tmp_path / "constant", 4), progress_bar=False)
    a = torch.load(tmp_path / "pieces" / f"{st.model_stem(0.5)}.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "constant" / f"{st.model_stem(0.5)}.pt", weights_only=False)["model"]
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_warm_start_copies_the_weights_and_rejects_another_architecture(tmp_path):
    """``init_weights``: the new run's network starts as the saved one (same field), with a fresh optimiser
    and its own iteration count; weights of another architecture are a clear error."""
    st.train(_tiny_config(tmp_path / "first", 2), progress_bar=False)
    first = tmp_path / "first" / f"{st.model_stem(0.5)}.pt"
    cfg = _tiny_config(tmp_path / "warm", 1, init_weights=str(first))
    net = dn.build_network(cfg.net)
    st.init_from(net, first)
    saved = torch.load(first, weights_only=False)["model"]
    assert all(torch.equal(net.state_dict()[k], saved[k]) for k in saved)
    card = st.train(cfg, progress_bar=False)
    assert card["iterations"] == 1 and card["config"]["init_weights"] == str(first)
    with pytest.raises(ValueError, match="do not fit"):
        st.init_from(dn.build_network(dn.NetConfig(radius=1, width=8, features=8)), first)


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None, reason="no torchrun")
def test_two_process_torchrun_gives_the_single_process_loss(tmp_path):
    """DDP with 2 gloo ranks of batch 1 = one process of batch 2: same pairs, same averaged gradients."""
    args = ["--shape", "16", "--labels", "4", "--radius", "2", "--width", "8", "--iterations", "3", "--threads", "1",
            "--val-every", "0", "--checkpoint-every", "3", "--device", "cpu", "--related", "0.5", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "brainshift.deform.train", "--out", str(tmp_path / "one"), "--batch", "2",
                    *args], check=True, env=env, capture_output=True)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "brainshift.deform.train", "--out",
                    str(tmp_path / "two"), "--batch", "1", *args], check=True, env=env, capture_output=True)
    one, two = _curve(tmp_path / "one"), _curve(tmp_path / "two")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert np.allclose([float(x) for x in a[1:]], [float(x) for x in b[1:]], rtol=1e-3, atol=1e-5), (a, b)
    assert float(one[0][1]) != float(one[2][1])    # it trained: the loss moved


# ---------------------------------------------------------------------------------------- geometry
def test_taper_is_one_on_the_mask_box_and_zero_at_the_margin_faces():
    mask = np.zeros((30, 30, 30), bool)
    mask[10:18, 0:12, 12:20] = True
    crop = deform.mask_crop(mask, margin_vox=4)
    w = deform.taper(crop)
    full = deform.insert(np.repeat(w[..., None], 3, -1), crop)[..., 0]
    assert np.allclose(full[10:18, 0:12, 12:20], 1.0)
    assert np.all(full[:6] == 0) and np.all(full[22:] == 0) and np.all(full[:, 16:] == 0)
    assert full[8, 5, 15] > 0 and full[8, 5, 15] < 1           # inside the margin: tapered


class _ConstantVelocity(torch.nn.Module):
    """Stub network: a constant SVF of ``v`` working voxels along axis 0."""

    def __init__(self, v: float):
        super().__init__()
        self.v = v

    def forward(self, moving, fixed, return_field_type="displacement"):
        out = torch.zeros((1, 3) + tuple(moving.shape[2:]))
        out[:, 0] = self.v
        return out


def test_predicted_vectors_are_rescaled_to_fixed_voxels_and_zero_outside_the_crop():
    """A constant working-grid velocity of 1 voxel becomes (crop-1)/(n-1) fixed voxels on the mask box."""
    n_work, grid = 16, (60, 50, 40)
    model = deform.SynthMorphModel(net=_ConstantVelocity(1.0), shape=n_work, lam=0.5, device=torch.device("cpu"),
                                   path=deform.model_dir() / "synthmorph" / "stub.pt", card={})
    mask = np.zeros(grid, bool)
    mask[20:40, 15:35, 12:28] = True
    img = np.random.default_rng(0).random(grid).astype(np.float32)
    disp = deform.predict_field(img, img, mask, model=model, margin_vox=6)
    crop = deform.mask_crop(mask, 6)
    expected = (crop.size - 1) / (n_work - 1)
    inner = disp[24:36, 19:31, 16:24]
    assert np.allclose(inner[..., 0], expected, atol=0.05 * expected)
    assert np.allclose(inner[..., 1:], 0, atol=1e-3)
    outside = np.ones(grid, bool)
    outside[14:46, 9:41, 6:34] = False
    assert np.all(disp[outside] == 0)
    assert metrics.jacobian_stats(disp)["folds"] == 0     # the tapered velocity stays diffeomorphic


# ---------------------------------------------------------------------------------------- recovery
def test_refinement_recovers_a_known_smooth_deformation():
    fixed, moving, mask, truth = smooth_pair()
    refined = deform.refine_field(fixed, moving, mask, np.zeros_like(truth), iterations=30, alpha=0.1, margin_vox=4)
    assert epe(refined, truth, mask) < 0.4 * epe(np.zeros_like(truth), truth, mask)
    assert metrics.jacobian_stats(refined)["folds"] == 0


@pytest.mark.skipif(not deform.available_models(), reason="no shipped SynthMorph weights")
def test_shipped_model_then_refinement_recovers_a_known_smooth_deformation():
    """Shipped network (no worse than identity, diffeomorphic) followed by refinement: recovered."""
    fixed, moving, mask, truth = smooth_pair(40, amp=3.0)
    disp = deform.predict_field(fixed, moving, mask, model=deform.load_model(device="cpu"), margin_vox=4)
    identity = epe(np.zeros_like(truth), truth, mask)
    assert epe(disp, truth, mask) <= 1.05 * identity
    assert metrics.jacobian_stats(disp)["folds"] == 0
    refined = deform.refine_field(fixed, moving, mask, disp, iterations=30, alpha=0.1, margin_vox=4)
    assert epe(refined, truth, mask) < 0.4 * identity


# ---------------------------------------------------------------------------------------- guard
def test_guard_accepts_a_good_field_and_rejects_bad_ones():
    fixed, moving, mask, truth = smooth_pair()
    good = deform.guard(fixed, moving, mask, truth, spacing_mm=1.0)
    assert good.kept and good.folds == 0 and good.ssc_after < good.ssc_before, good.reason

    # planted fold: a strong, sharp local swirl-free compression that flips the Jacobian's sign
    folding = truth.copy()
    g = np.zeros((40,) * 3, np.float32)
    g[20, 20, 20] = 1
    bump = gaussian_filter(g, 1.5)
    bump /= bump.max()
    x = np.arange(40, dtype=np.float32)
    folding[..., 0] -= 6.0 * bump * np.sign(x - 20)[:, None, None]
    bad = deform.guard(fixed, moving, mask, folding, spacing_mm=1.0)
    assert not bad.kept and bad.folds > 0 and "folded" in bad.reason

    huge = truth + np.float32(30.0)          # a 30-voxel (30 mm) shift: implausible
    big = deform.guard(fixed, moving, mask, huge, spacing_mm=1.0)
    assert not big.kept and big.max_disp_mm > 30 and "max displacement" in big.reason

    nothing = deform.guard(fixed, moving, mask, np.zeros_like(truth), spacing_mm=1.0)
    assert not nothing.kept and "does not improve" in nothing.reason


def test_guard_margin_for_fitted_and_unfitted_fields():
    """A small right field lowers SSC-MSE by a few %: enough for the network alone (no margin), not for a field
    fitted on SSC (5%); the same field reversed raises SSC-MSE and is rejected under either."""
    from brainshift.deform.guard import FITTED_MARGIN, UNFITTED_MARGIN

    fixed, moving, mask, truth = smooth_pair()
    small = 0.04 * truth
    unfitted = deform.guard(fixed, moving, mask, small, spacing_mm=1.0, margin=UNFITTED_MARGIN)
    fitted = deform.guard(fixed, moving, mask, small, spacing_mm=1.0, margin=FITTED_MARGIN)
    assert 0 < 1 - unfitted.ssc_after / unfitted.ssc_before < FITTED_MARGIN
    assert unfitted.kept and not fitted.kept and "by 5%" in fitted.reason
    assert not deform.guard(fixed, moving, mask, -small, spacing_mm=1.0, margin=UNFITTED_MARGIN).kept


def test_guard_rejects_a_field_that_fools_ssc_but_not_lc2():
    """A misleading fixed image (a style output that hallucinated a shift) makes SSC-MSE reward a wrong
    field; LC2 against the raw iUS, the second opinion, disagrees and the field is rejected."""
    fixed, moving, mask, truth = smooth_pair()
    ius = fixed                                  # the real iUS: the moving image warped by ``truth``
    wrong = -truth                               # smooth, no folds, but the opposite of the truth
    hallucinated = fields.warp(moving, wrong)    # a fixed image that shows the moving warped the wrong way
    fooled = deform.guard(hallucinated, moving, mask, wrong, spacing_mm=1.0)
    assert fooled.kept, fooled.reason            # SSC alone is fooled: this is the failure the check is for
    assert epe(wrong, truth, mask) > epe(np.zeros_like(truth), truth, mask)   # landmarks move the wrong way
    held = deform.guard(hallucinated, moving, mask, wrong, spacing_mm=1.0, ius=ius)
    assert not held.kept and "LC2" in held.reason and held.lc2_after < held.lc2_before
    right = deform.guard(fixed, moving, mask, truth, spacing_mm=1.0, ius=ius)
    assert right.kept and right.lc2_after > right.lc2_before, right.reason


def test_guard_rejects_a_field_whose_search_is_not_inverse_consistent():
    """Both similarities can be fooled together (they were on the 1 mm demo case): a search whose backward run
    does not find the forward shift (inverse inconsistency above 0.9) is rejected even where SSC and LC2 agree."""
    fixed, moving, mask, truth = smooth_pair()
    consistent = deform.guard(fixed, moving, mask, truth, spacing_mm=1.0, ius=fixed, inconsistency=0.3)
    assert consistent.kept and consistent.inconsistency == 0.3, consistent.reason
    spurious = deform.guard(fixed, moving, mask, truth, spacing_mm=1.0, ius=fixed, inconsistency=1.1)
    assert not spurious.kept and "backward" in spurious.reason
    assert spurious.ssc_after < spurious.ssc_before and spurious.lc2_after > spurious.lc2_before   # both fooled


def test_refinement_keeps_a_large_init():
    """The regulariser acts on the correction only: refining from the true 8-voxel field keeps it."""
    fixed, moving, mask, truth = smooth_pair(40, amp=8.0)
    refined = deform.refine_field(fixed, moving, mask, truth, iterations=30, margin_vox=4)
    assert epe(refined, truth, mask) < 0.15 * epe(np.zeros_like(truth), truth, mask)
