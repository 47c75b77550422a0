"""Metrics against scikit-image and lpips themselves, on real images shipped with scikit-image."""

from __future__ import annotations

import hashlib
from pathlib import Path

import lpips
import numpy as np
import pytest
import torch
import torchvision
from scipy.ndimage import gaussian_filter
from skimage import data, img_as_float
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from hparray.errors import ConfigError, MetricsError
from hparray.metrics import (
    ALEXNET_FILE,
    PSNR_CAP_DB,
    Scorer,
    lpips_weights_status,
    psnr,
    require_lpips,
    ssim,
    trivial_prediction,
)

torch.set_num_threads(1)


def natural_images() -> dict[str, np.ndarray]:
    return {
        name: img_as_float(getattr(data, name)()) for name in ("astronaut", "chelsea", "coffee")
    }


def degradations(image: np.ndarray) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "blur": gaussian_filter(image, sigma=(1.5, 1.5, 0)),
        "roll": np.roll(image, 2, axis=1),
        "noise": np.clip(image + rng.normal(0, 0.05, image.shape), 0, 1),
    }


def skimage_ssim(pred: np.ndarray, truth: np.ndarray) -> float:
    return structural_similarity(
        pred,
        truth,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1,
        channel_axis=-1,
    )


def video(frames: int = 6, size: int = 64, seed: int = 0) -> np.ndarray:
    """A short float32 clip: crops of the astronaut sliding right by 3 px per frame."""
    image = img_as_float(data.astronaut()).astype(np.float32)
    return np.stack(
        [image[100 : 100 + size, 150 + 3 * t : 150 + 3 * t + size] for t in range(frames)]
    )


def test_psnr_and_ssim_match_skimage_on_natural_images() -> None:
    for name, image in natural_images().items():
        for kind, degraded in degradations(image).items():
            assert psnr(degraded, image) == pytest.approx(
                peak_signal_noise_ratio(image, degraded, data_range=1), abs=1e-6
            ), (name, kind)
            assert ssim(degraded, image) == pytest.approx(
                skimage_ssim(degraded, image), abs=1e-6
            ), (
                name,
                kind,
            )


def test_reference_values_pin_the_conventions() -> None:
    astronaut = img_as_float(data.astronaut())
    blurred = gaussian_filter(astronaut, sigma=(1.5, 1.5, 0))
    assert ssim(blurred, astronaut) == pytest.approx(0.865067, abs=1e-6)
    assert psnr(blurred, astronaut) == pytest.approx(26.7360, abs=1e-4)
    rolled = np.roll(astronaut, 2, axis=1)
    assert ssim(rolled, astronaut) == pytest.approx(0.674569, abs=1e-6)
    assert psnr(rolled, astronaut) == pytest.approx(19.7943, abs=1e-4)


def test_uniform_images_closed_form() -> None:
    a = np.full((64, 64, 3), 0.5)
    b = np.full((64, 64, 3), 0.6)
    assert psnr(a, b) == pytest.approx(20.0, abs=1e-9)
    assert ssim(a, b) == pytest.approx(0.983609, abs=1e-6)


def test_identical_frames_are_capped() -> None:
    image = img_as_float(data.chelsea())
    assert psnr(image, image) == PSNR_CAP_DB
    assert psnr(image, image + 1e-6) == PSNR_CAP_DB  # mse 1e-12 < 1e-10
    assert ssim(image, image) == pytest.approx(1.0)


def test_scorer_means_per_frame_scores_over_unseen_frames_only() -> None:
    truth = video()
    rng = np.random.default_rng(3)
    pred = np.clip(truth + rng.normal(0, 0.05, truth.shape), 0, 1).astype(np.float32)
    scores = Scorer(["ssim", "psnr"]).score(pred, truth, condition_frames=2)
    assert set(scores) == {"psnr", "ssim"}
    assert scores["psnr"] == pytest.approx(
        np.mean([peak_signal_noise_ratio(t, p, data_range=1) for p, t in zip(pred[2:], truth[2:])]),
        abs=1e-6,
    )
    assert scores["ssim"] == pytest.approx(
        np.mean(
            [
                skimage_ssim(p.astype(np.float64), t.astype(np.float64))
                for p, t in zip(pred[2:], truth[2:])
            ]
        ),
        abs=1e-6,
    )


def test_conditioning_frames_are_never_scored() -> None:
    truth = video()
    pred = truth.copy()
    pred[:3] = np.random.default_rng(0).random(
        pred[:3].shape
    )  # garbage where the model was given frames
    scores = Scorer(["psnr", "ssim"]).score(pred, truth, condition_frames=3)
    assert scores == {"psnr": PSNR_CAP_DB, "ssim": pytest.approx(1.0)}


def test_scorer_rejects_bad_input() -> None:
    truth = video()
    with pytest.raises(ConfigError, match="psnr, ssim, lpips"):
        Scorer(["psnr", "fvd"])
    scorer = Scorer(["psnr"])
    with pytest.raises(MetricsError, match="shape"):
        scorer.score(truth[:-1], truth, 2)
    with pytest.raises(MetricsError, match="no frame to score"):
        scorer.score(truth, truth, len(truth))
    with pytest.raises(MetricsError, match="floats"):
        scorer.score((truth * 255).astype(np.uint8), truth, 2)
    nan = truth.copy()
    nan[4, 0, 0, 0] = np.nan
    with pytest.raises(MetricsError, match="NaN"):
        scorer.score(nan, truth, 2)


def test_trivial_prediction_repeats_the_last_conditioning_frame() -> None:
    truth = video()
    pred = trivial_prediction(truth, 2)
    np.testing.assert_array_equal(pred[:2], truth[:2])
    for frame in pred[2:]:
        np.testing.assert_array_equal(frame, truth[1])
    assert pred.dtype == truth.dtype
    with pytest.raises(MetricsError):
        trivial_prediction(truth, 0)


# ------------------------------------------------------------------------------ LPIPS


@pytest.fixture(scope="module")
def random_alexnet_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TORCH_HOME holding seeded random AlexNet weights: real mechanics, meaningless scores."""
    home = tmp_path_factory.mktemp("torch_home")
    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        weights = torchvision.models.alexnet().state_dict()
    torch.save(weights, checkpoints / ALEXNET_FILE)
    return home


@pytest.mark.filterwarnings("ignore:.*(pretrained|weight enum).*:UserWarning")
def test_lpips_equals_the_lpips_package(
    random_alexnet_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(random_alexnet_home))
    truth = video(frames=5)
    pred = np.clip(gaussian_filter(truth, sigma=(0, 1.0, 1.0, 0)), 0, 1).astype(np.float32)
    scorer = Scorer(["psnr", "ssim", "lpips"], allow_nongenuine_lpips=True)
    scores = scorer.score(pred, truth, condition_frames=1)

    reference = lpips.LPIPS(net="alex", verbose=False).eval()
    with torch.no_grad():
        to_t = lambda v: torch.from_numpy(v).permute(0, 3, 1, 2) * 2 - 1  # noqa: E731
        per_frame = reference(to_t(pred[1:]), to_t(truth[1:])).reshape(-1).numpy()
    assert scores["lpips"] == pytest.approx(float(per_frame.mean()), abs=1e-6)
    assert scores["lpips"] > 0
    assert scorer.score(truth, truth, condition_frames=1)["lpips"] == pytest.approx(0.0, abs=1e-7)


def test_nongenuine_weights_are_labelled_and_refused_unless_allowed(
    random_alexnet_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(random_alexnet_home))
    path = random_alexnet_home / "hub" / "checkpoints" / ALEXNET_FILE
    prefix = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    status = lpips_weights_status()
    assert (status.path, status.present, status.sha256_prefix, status.genuine) == (
        path,
        True,
        prefix,
        False,
    )
    with pytest.raises(MetricsError, match=f"not the genuine.*{prefix}"):
        require_lpips()
    with pytest.raises(MetricsError, match="not the genuine"):
        Scorer(["lpips"])
    assert require_lpips(allow_nongenuine=True) == status
    assert Scorer(["lpips"], allow_nongenuine_lpips=True).lpips_weights == prefix
    assert Scorer(["psnr"]).lpips_weights is None


def test_missing_weights_name_the_file_and_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    status = lpips_weights_status()
    assert not status.present and status.sha256_prefix is None and not status.genuine
    expected = (
        f"LPIPS needs the AlexNet weights {ALEXNET_FILE}: copy it into {tmp_path}/hub/checkpoints/ "
        f"(download from https://download.pytorch.org/models/{ALEXNET_FILE} on a machine with "
        "internet), or drop lpips from metrics"
    )
    for fails in (require_lpips, lambda: Scorer(["psnr", "lpips"], allow_nongenuine_lpips=True)):
        with pytest.raises(MetricsError) as info:
            fails()
        assert str(info.value) == expected
