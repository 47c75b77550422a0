"""Video-prediction metrics, scored the way Open-Sora's eval and video-prediction papers do.

Per frame, RGB, floats in [0, 1] (predictions are never rounded to uint8), mean over the
frames after the conditioning prefix: the conditioning frames were given to the model, so
scoring them would reward copying.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hparray.errors import ConfigError, MetricsError

METRICS = ("psnr", "ssim", "lpips")
"""The metrics hparray scores, in the order tables show them (their one definition)."""
METRIC_LABELS = {"psnr": "PSNR", "ssim": "SSIM", "lpips": "LPIPS"}
METRIC_UNITS = {"psnr": " dB", "ssim": "", "lpips": ""}
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips": False}

PSNR_CAP_DB = 100.0
"""PSNR of (near-)identical frames: 10*log10(1/1e-10), the cap Open-Sora's eval applies."""

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
ALEXNET_URL = f"https://download.pytorch.org/models/{ALEXNET_FILE}"
ALEXNET_SHA256_PREFIX = "7be5be79"

_LPIPS_BATCH = 16  # frames per LPIPS forward pass: bounds memory on long or large videos


def psnr(pred: np.ndarray, truth: np.ndarray) -> float:
    """PSNR in dB of one frame, data range 1.

    Identical frames have infinite PSNR, which would poison a mean over frames; as in
    Open-Sora's eval, a frame whose MSE is below 1e-10 scores exactly 100 dB (the value the
    formula gives at that MSE, so the cap is continuous).
    """
    mse = float(np.mean((np.asarray(pred, np.float64) - np.asarray(truth, np.float64)) ** 2))
    if mse < 1e-10:
        return PSNR_CAP_DB
    return float(10.0 * np.log10(1.0 / mse))


def ssim(pred: np.ndarray, truth: np.ndarray) -> float:
    """SSIM of one RGB frame: Gaussian window sigma 1.5, population covariance, mean over channels.

    Exactly scikit-image's `structural_similarity` with the settings of the original SSIM
    paper (which also drops a 5 px border); torchmetrics' default keeps borders and differs.
    """
    from skimage.metrics import structural_similarity

    return float(
        structural_similarity(
            np.asarray(pred, np.float64),
            np.asarray(truth, np.float64),
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
            channel_axis=-1,
        )
    )


@dataclass(frozen=True)
class LpipsWeights:
    """Which AlexNet weights LPIPS would load, so every LPIPS score can say what it used."""

    path: Path
    present: bool
    sha256_prefix: str | None
    genuine: bool


def _checkpoint_dir() -> Path:
    """torch.hub's checkpoint folder, worked out as torch.hub.get_dir() does, without importing
    torch (seconds at every start, and absent from a core install)."""
    cache = os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    torch_home = os.path.expanduser(os.environ.get("TORCH_HOME", os.path.join(cache, "torch")))
    return Path(torch_home) / "hub" / "checkpoints"


_sha_cache: dict[tuple[str, int, int], str] = {}


def _sha256(path: Path) -> str:
    """Hash of the file, cached on (path, size, mtime): the file is 233 MB."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _sha_cache:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        _sha_cache[key] = digest.hexdigest()
    return _sha_cache[key]


def lpips_weights_status() -> LpipsWeights:
    """Look at `$TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth` without loading it.

    torchvision loads that file with no hash check, so a file of the right shapes but the
    wrong values would silently give meaningless scores; the sha256 prefix tells them apart.
    """
    path = _checkpoint_dir() / ALEXNET_FILE
    if not path.is_file():
        return LpipsWeights(path=path, present=False, sha256_prefix=None, genuine=False)
    prefix = _sha256(path)[:8]
    return LpipsWeights(
        path=path, present=True, sha256_prefix=prefix, genuine=prefix == ALEXNET_SHA256_PREFIX
    )


def require_lpips(allow_nongenuine: bool = False) -> LpipsWeights:
    """Fail early, with the fix, when LPIPS cannot be computed honestly.

    Offline nodes cannot download the backbone (torchvision raises a bare URLError mid-run),
    so a missing file is reported before any work starts.
    """
    import importlib.util

    missing = [name for name in ("lpips", "torch", "torchvision") if importlib.util.find_spec(name) is None]
    if missing:
        raise MetricsError(
            f"LPIPS needs {', '.join(missing)}, not installed here: pip install 'hparray[lpips]', "
            "or drop lpips from metrics"
        )
    status = lpips_weights_status()
    if not status.present:
        raise MetricsError(
            f"LPIPS needs the AlexNet weights {ALEXNET_FILE}: copy it into "
            f"{status.path.parent}{os.sep} (download from {ALEXNET_URL} on a machine with "
            "internet), or drop lpips from metrics"
        )
    if not status.genuine and not allow_nongenuine:
        raise MetricsError(
            f"LPIPS weights {status.path} are not the genuine AlexNet weights (sha256 starts "
            f"with {status.sha256_prefix}, expected {ALEXNET_SHA256_PREFIX}): replace the file "
            f"with {ALEXNET_URL}, or drop lpips from metrics"
        )
    return status


_lpips_models: dict[tuple[str, str, str], Any] = {}


def _lpips_model(status: LpipsWeights, device: str) -> Any:
    """The LPIPS-alex network, built once per process per weights file and device."""
    key = (str(status.path), status.sha256_prefix or "", device)
    if key not in _lpips_models:
        import lpips

        if not status.present:
            raise MetricsError(f"LPIPS weights {status.path} vanished before loading")
        with warnings.catch_warnings():
            # lpips 0.1.4 still calls torchvision's deprecated `pretrained=True`.
            warnings.simplefilter("ignore", UserWarning)
            model = lpips.LPIPS(net="alex", verbose=False).eval().to(device)
        for param in model.parameters():
            param.requires_grad_(False)
        _lpips_models[key] = model
    return _lpips_models[key]


def _check_video(name: str, video: np.ndarray) -> np.ndarray:
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise MetricsError(f"{name} video has shape {video.shape}, expected (T, H, W, 3)")
    if not np.issubdtype(video.dtype, np.floating):
        raise MetricsError(f"{name} video has dtype {video.dtype}, expected floats in [0, 1]")
    if not np.all(np.isfinite(video)):
        raise MetricsError(f"{name} video contains NaN or inf")
    return video


class Scorer:
    """Scores predicted videos against the truth with a fixed list of metrics.

    Built once per worker: LPIPS weights are checked (and the network loaded) at construction,
    so a missing file fails before any fine-tuning is spent.
    """

    def __init__(
        self, metrics: Sequence[str], device: str = "cpu", allow_nongenuine_lpips: bool = False
    ) -> None:
        unknown = [m for m in metrics if m not in METRICS]
        if unknown or not metrics:
            raise ConfigError(
                f"metrics {list(metrics)!r}: choose one or more of {', '.join(METRICS)}"
            )
        self.metrics = tuple(m for m in METRICS if m in metrics)
        self.device = device
        self.lpips_weights: str | None = None
        self._lpips: Any = None
        if "lpips" in self.metrics:
            status = require_lpips(allow_nongenuine=allow_nongenuine_lpips)
            self.lpips_weights = status.sha256_prefix
            self._lpips = _lpips_model(status, device)

    def score(
        self, pred_video: np.ndarray, truth_video: np.ndarray, condition_frames: int
    ) -> dict[str, float]:
        """Mean per-frame scores over frames [condition_frames:], never the conditioning frames."""
        return {name: float(np.mean(values)) for name, values in
                self.score_frames(pred_video, truth_video, condition_frames).items()}

    def score_frames(
        self, pred_video: np.ndarray, truth_video: np.ndarray, condition_frames: int
    ) -> dict[str, list[float]]:
        """Each metric of each frame from `condition_frames` on (frame condition_frames first)."""
        pred = _check_video("predicted", pred_video)
        truth = _check_video("ground-truth", truth_video)
        if pred.shape != truth.shape:
            raise MetricsError(
                f"predicted video has shape {pred.shape}, ground truth {truth.shape}"
            )
        if not 0 <= condition_frames < truth.shape[0]:
            raise MetricsError(
                f"condition_frames={condition_frames} leaves no frame to score in a "
                f"{truth.shape[0]}-frame video"
            )
        pred, truth = pred[condition_frames:], truth[condition_frames:]
        scores: dict[str, list[float]] = {}
        if "psnr" in self.metrics:
            scores["psnr"] = [psnr(p, t) for p, t in zip(pred, truth)]
        if "ssim" in self.metrics:
            scores["ssim"] = [ssim(p, t) for p, t in zip(pred, truth)]
        if "lpips" in self.metrics:
            scores["lpips"] = [float(v) for v in self._lpips_per_frame(pred, truth)]
        return scores

    def _lpips_per_frame(self, pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
        import torch

        def to_tensor(frames: np.ndarray) -> torch.Tensor:
            x = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32))
            return (x.permute(0, 3, 1, 2) * 2.0 - 1.0).to(self.device)

        out = []
        with torch.no_grad():
            for start in range(0, len(pred), _LPIPS_BATCH):
                end = start + _LPIPS_BATCH
                d = self._lpips(to_tensor(pred[start:end]), to_tensor(truth[start:end]))
                out.append(d.reshape(-1).double().cpu().numpy())
        return np.concatenate(out)


def trivial_prediction(truth: np.ndarray, condition_frames: int) -> np.ndarray:
    """The copy-last-frame baseline: conditioning frames copied, the last one repeated after.

    Any model worth its fine-tuning must beat this on the unseen frames.
    """
    truth = np.asarray(truth)
    if not 1 <= condition_frames <= truth.shape[0]:
        raise MetricsError(
            f"condition_frames={condition_frames} outside 1..{truth.shape[0]} frames"
        )
    pred = truth.copy()
    pred[condition_frames:] = truth[condition_frames - 1]
    return pred
