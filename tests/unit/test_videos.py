"""Video sources, readers, sampling and the bundled sample set, on real files."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from hparray.demo.sample_videos import CATEGORIES, build_sample_set, generate_video
from hparray.errors import ConfigError, VideoError
from hparray.videos import (
    VideoRef,
    _publish,
    check_videos,
    count_frames,
    list_videos,
    read_video,
    sample_dir,
    stratified_sample,
)

# Frame t of the synthetic clips: a horizontal gradient whose red level encodes t, so that
# decoded frames can be matched to their index even through a lossy codec.
T, H, W = 12, 48, 80


def clip(num_frames: int = T, height: int = H, width: int = W) -> np.ndarray:
    frames = np.zeros((num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        frames[t, ..., 0] = 20 + 15 * t
        frames[t, ..., 1] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
        frames[t, ..., 2] = 128
    return frames


def write_container(path: Path, frames: np.ndarray, codec: str) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=12)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "10"}
        else:
            stream.bit_rate = 4_000_000
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.mark.parametrize(("suffix", "codec"), [(".mp4", "libx264"), (".webm", "libvpx")])
def test_reads_encoded_video(tmp_path: Path, suffix: str, codec: str) -> None:
    frames = clip()
    path = write_container(tmp_path / f"clip{suffix}", frames, codec)
    assert count_frames(str(path)) == T
    video = read_video(str(path), 10, H, W)
    assert video.shape == (10, H, W, 3) and video.dtype == np.float32
    assert 0.0 <= video.min() and video.max() <= 1.0
    expected = frames[:10].astype(np.float32) / 255.0
    assert np.abs(video - expected).mean() < 0.03
    red = video[..., 0].mean(axis=(1, 2)) * 255.0
    assert np.allclose(red, 20 + 15 * np.arange(10), atol=4)


def test_reads_frame_folder_in_natural_order(tmp_path: Path) -> None:
    folder = tmp_path / "shot"
    folder.mkdir()
    frames = clip()
    for t, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"frame{t}.png")  # frame10 must follow frame9
    assert count_frames(str(folder)) == T
    video = read_video(str(folder), T, H, W)
    np.testing.assert_allclose(video, frames / 255.0, atol=1e-6)


def test_reads_npy_uint8_float_and_grayscale(tmp_path: Path) -> None:
    frames = clip()
    np.save(tmp_path / "u8.npy", frames)
    np.save(tmp_path / "f32.npy", frames.astype(np.float32) / 255.0)
    gray = frames[..., 0]
    np.save(tmp_path / "gray.npy", gray)
    Image.fromarray(gray[0]).save(tmp_path / "gray.png")
    for name in ("u8", "f32"):
        video = read_video(str(tmp_path / f"{name}.npy"), T, H, W)
        np.testing.assert_allclose(video, frames / 255.0, atol=1e-6)
    assert count_frames(str(tmp_path / "gray.npy")) == T
    video = read_video(str(tmp_path / "gray.npy"), 3, H, W)
    assert video.shape == (3, H, W, 3)
    for channel in range(3):
        np.testing.assert_allclose(video[..., channel], gray[:3] / 255.0, atol=1e-6)


def test_float_npy_outside_unit_range_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "wide.npy"
    np.save(path, clip().astype(np.float32))  # 0..255 saved as float
    with pytest.raises(VideoError, match=r"wide\.npy.*outside \[0, 1\]"):
        read_video(str(path), T, H, W)


def test_rgba_frames_drop_alpha(tmp_path: Path) -> None:
    frames = np.concatenate([clip(), np.full((T, H, W, 1), 7, dtype=np.uint8)], axis=3)
    np.save(tmp_path / "rgba.npy", frames)
    video = read_video(str(tmp_path / "rgba.npy"), T, H, W)
    np.testing.assert_allclose(video, frames[..., :3] / 255.0, atol=1e-6)


def test_resize_covers_short_side_then_center_crops(tmp_path: Path) -> None:
    # 96 x 160 with a dark 32-pixel band at each side: scaling by 2/3 gives 64 x 107, and
    # the centre crop to 64 x 64 keeps only the bright middle.
    frames = np.full((2, 96, 160, 3), 200, dtype=np.uint8)
    frames[:, :, :32] = 0
    frames[:, :, -32:] = 0
    frames[:, 40:56, 72:88] = 50  # a dark square at the centre stays at the centre
    np.save(tmp_path / "wide.npy", frames)
    video = read_video(str(tmp_path / "wide.npy"), 2, 64, 64)
    assert video.shape == (2, 64, 64, 3)
    assert video[:, :, :4].mean() > 0.7 and video[:, :, -4:].mean() > 0.7
    assert video[:, 30:34, 30:34].mean() < 0.3
    tall = read_video(str(tmp_path / "wide.npy"), 1, 64, 32)
    assert tall.shape == (1, 64, 32, 3)


def test_too_short_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "short.npy"
    np.save(path, clip(num_frames=5))
    with pytest.raises(VideoError, match=r"short\.npy has 5 frames but 8 are needed"):
        read_video(str(path), 8, H, W)


def test_garbage_file_is_a_video_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.mp4"
    path.write_bytes(b"this is not a video" * 100)
    with pytest.raises(VideoError, match=r"broken\.mp4"):
        count_frames(str(path))
    with pytest.raises(VideoError, match=r"broken\.mp4"):
        read_video(str(path), 4, H, W)


def test_directory_source_categories_and_names(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "dogs" / "outdoor").mkdir(parents=True)
    (root / "cats").mkdir()
    (root / "frames_only").mkdir()
    np.save(root / "dogs" / "rex.npy", clip())
    np.save(root / "dogs" / "outdoor" / "fido 2.npy", clip())
    write_container(root / "cats" / "tom.mp4", clip(), "libx264")
    for t, frame in enumerate(clip()):
        Image.fromarray(frame).save(root / "frames_only" / f"{t:03d}.png")
    np.save(root / "loose.npy", clip())
    (root / "notes.txt").write_text("not a video")
    refs = list_videos(str(root), config_dir=tmp_path)
    assert [(r.name, r.category) for r in refs] == [
        ("cats__tom", "cats"),
        ("dogs__outdoor__fido_2", "dogs"),
        ("dogs__rex", "dogs"),
        ("frames_only", "default"),
        ("loose", "default"),
    ]
    assert all(Path(r.path).is_absolute() and Path(r.path).exists() for r in refs)
    check_videos(refs, T)


def test_relative_source_cwd_first_then_config_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configs, cwd = tmp_path / "configs", tmp_path / "cwd"
    for root in (configs, cwd):
        (root / "videos").mkdir(parents=True)
        np.save(root / "videos" / "a.npy", clip())
    monkeypatch.chdir(cwd)
    assert [r.path for r in list_videos("videos", config_dir=configs)] == [
        str(cwd / "videos" / "a.npy")
    ]
    monkeypatch.chdir(tmp_path)
    assert [r.path for r in list_videos("videos", config_dir=configs)] == [
        str(configs / "videos" / "a.npy")
    ]


def test_missing_and_empty_sources(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match="does not exist"):
        list_videos(str(tmp_path / "nowhere"), config_dir=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(VideoError, match="contains no videos"):
        list_videos(str(tmp_path / "empty"), config_dir=tmp_path)


def test_duplicate_names_are_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", clip())
    write_container(tmp_path / "a.mp4", clip(), "libx264")
    with pytest.raises(VideoError, match="both get the video name 'a'"):
        list_videos(str(tmp_path), config_dir=tmp_path)


def test_csv_manifest(tmp_path: Path) -> None:
    (tmp_path / "clips").mkdir()
    np.save(tmp_path / "clips" / "one.npy", clip())
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    np.save(outside / "two.npy", clip())
    manifest = tmp_path / "lists" / "videos.csv"
    manifest.parent.mkdir()
    manifest.write_text(
        "path,category,caption\n"
        '../clips/one.npy,walk,"a person walks, slowly"\n'
        f"{outside / 'two.npy'},run,\n"
    )
    refs = list_videos(str(manifest), config_dir=tmp_path)
    by_category = {r.category: r for r in refs}
    assert by_category["walk"].path == str(tmp_path / "clips" / "one.npy")
    assert by_category["walk"].caption == "a person walks, slowly"
    assert by_category["run"].caption is None
    assert by_category["run"].name.endswith("elsewhere__two")
    assert [r.name for r in refs] == sorted(r.name for r in refs)


def test_csv_without_category_column(tmp_path: Path) -> None:
    np.save(tmp_path / "one.npy", clip())
    manifest = tmp_path / "videos.csv"
    manifest.write_text("path,caption\none.npy,hello\n")
    with pytest.raises(VideoError, match=r"videos\.csv lacks the column\(s\) category"):
        list_videos(str(manifest), config_dir=tmp_path)


def test_csv_rows_pointing_at_missing_files(tmp_path: Path) -> None:
    np.save(tmp_path / "one.npy", clip())
    manifest = tmp_path / "videos.csv"
    manifest.write_text("path,category\none.npy,a\ngone.npy,a\nalso_gone.npy,b\n")
    with pytest.raises(VideoError, match=r"2 bad row\(s\).*gone\.npy does not exist"):
        list_videos(str(manifest), config_dir=tmp_path)


def test_check_videos_reports_every_problem(tmp_path: Path) -> None:
    np.save(tmp_path / "ok.npy", clip())
    np.save(tmp_path / "short.npy", clip(num_frames=4))
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 64)
    refs = [
        VideoRef(name=p.stem, path=str(p), category="x")
        for p in (tmp_path / "ok.npy", tmp_path / "short.npy", tmp_path / "bad.mp4")
    ]
    refs.append(VideoRef(name="gone", path=str(tmp_path / "gone.npy"), category="x"))
    with pytest.raises(VideoError, match=r"^3 of 4 videos") as info:
        check_videos(refs, T)
    message = str(info.value)
    assert "short" in message and "bad.mp4" in message and "gone.npy" in message
    check_videos(refs[:1], T)


def pool(sizes: dict[str, int]) -> list[VideoRef]:
    return [
        VideoRef(name=f"{category}_{i:03d}", path=f"/v/{category}/{i}.mp4", category=category)
        for category, size in sizes.items()
        for i in range(size)
    ]


def test_stratified_sample_is_deterministic_and_proportional() -> None:
    videos = pool({"a": 60, "b": 30, "c": 9, "d": 1})
    first = stratified_sample(videos, 20, seed=3)
    assert first == stratified_sample(list(reversed(videos)), 20, seed=3)
    assert [r.name for r in first] == sorted(r.name for r in first)
    counts = Counter(r.category for r in first)
    assert counts == {"a": 12, "b": 6, "c": 1, "d": 1}  # quotas 12, 6, 1.8, 0.2; d gets its one
    assert len(set(first)) == 20
    others = {tuple(stratified_sample(videos, 20, seed=s)) for s in range(4, 9)}
    assert len(others | {tuple(first)}) > 1


def test_stratified_sample_small_n_and_large_n() -> None:
    videos = pool({"a": 5, "b": 5, "c": 5})
    assert stratified_sample(videos, 100, seed=0) == sorted(videos, key=lambda r: r.name)
    assert len({r.category for r in stratified_sample(videos, 3, seed=0)}) == 3
    assert len(stratified_sample(videos, 2, seed=0)) == 2
    with pytest.raises(ConfigError, match="data.stratify_by"):
        stratified_sample(videos, 2, seed=0, by="duration")


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sample_dir(tmp_path_factory.mktemp("cache"))


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_sample_set(sample_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPARRAY_CACHE", str(sample_root.parent))
    refs = list_videos("sample", config_dir=Path("/nonexistent"))
    assert all(Path(r.path).is_relative_to(sample_root) for r in refs)
    assert len(refs) >= 24
    assert set(Counter(r.category for r in refs)) == set(CATEGORIES) and len(CATEGORIES) >= 4
    assert min(Counter(r.category for r in refs).values()) >= 6
    assert all(r.caption for r in refs)
    assert (sample_root / "README.txt").read_text().startswith("hparray sample set")
    check_videos(refs, 49)
    for ref in refs:
        frames = np.load(ref.path)
        assert frames.shape == (57, 128, 128, 3) and frames.dtype == np.uint8
        steps = np.abs(np.diff(frames.astype(np.int16), axis=0)).mean(axis=(1, 2, 3))
        assert steps.min() > 0.2, f"{ref.name} has still frames"
    video = read_video(refs[0].path, 49, 64, 64)
    assert video.shape == (49, 64, 64, 3)


def test_sample_set_is_deterministic(sample_root: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    again.mkdir()
    build_sample_set(again)
    assert tree_digest(again) == tree_digest(sample_root)
    assert sample_dir(sample_root.parent) == sample_root  # reused, not rebuilt


def test_other_seeds_give_other_videos() -> None:
    sample = generate_video("pan", 0, seed=0, num_frames=8, size=32)
    training = generate_video("pan", 0, seed=1000, num_frames=8, size=32)
    assert sample.shape == training.shape == (8, 32, 32, 3)
    assert not np.array_equal(sample, training)
    np.testing.assert_array_equal(sample, generate_video("pan", 0, seed=0, num_frames=8, size=32))


def test_losing_a_publish_race_keeps_the_winner(tmp_path: Path) -> None:
    final = tmp_path / "sample-v1"
    final.mkdir()
    (final / "winner").write_text("first")
    built = tmp_path / "built"
    built.mkdir()
    (built / "loser").write_text("second")
    _publish(built, final)
    assert [p.name for p in final.iterdir()] == ["winner"]
