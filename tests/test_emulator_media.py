"""The emulator's media side: image fetching and rules, the rendered MP4s, and /files downloads."""

from __future__ import annotations

import hashlib
import io
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import av
import httpx
import pytest
from PIL import Image, ImageChops, ImageStat

from dagster_runway.emulator import Emulator, EmulatorConfig
from dagster_runway.emulator.render import render_video
from dagster_runway.schema import RATIOS, ratio_size
from tests.fixtures.emulator import INSTANT, Api, ImageServer, data_uri, make_png

Factory = Callable[..., Emulator]
Connect = Callable[..., Api]


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def noisy_png(width: int, height: int) -> bytes:
    """A PNG that does not compress (so that cutting it truncates its pixel data)."""
    return png(Image.frombytes("RGB", (width, height), random.Random(1).randbytes(width * height * 3)))


def failure_of(api: Api, image: str) -> dict[str, str]:
    result = api.finish(api.submit_id({"promptImage": image}))
    assert result["status"] == "failed", result
    return result["error"]


def probe(data: bytes) -> dict[str, Any]:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        assert stream.duration is not None
        return {
            "codec": stream.codec_context.name,
            "pix_fmt": stream.codec_context.pix_fmt,
            "width": stream.width,
            "height": stream.height,
            "duration": float(stream.duration * stream.time_base),
            "frames": frames,
        }


# Rendering: every ratio, both durations

CASES = [(ratio, duration) for ratio in RATIOS for duration in (5, 10)]


@pytest.fixture(scope="module")
def rendered() -> Iterator[dict[tuple[str, int], tuple[dict[str, Any], bytes, Any]]]:
    """Each (ratio, duration) submitted at once to one emulator: its result, video bytes and ledger entry."""
    image = data_uri(png(Image.radial_gradient("L").convert("RGB").resize((600, 400))))
    with Emulator(EmulatorConfig(**INSTANT | {"max_concurrency": len(CASES)})) as emulator:
        api = Api(emulator, emulator.token)
        ids = {
            case: api.submit_id({"promptImage": image, "ratio": case[0], "duration": case[1]})
            for case in CASES
        }
        results = {case: api.finish(request_id) for case, request_id in ids.items()}
        entries = {entry.request_id: entry for entry in emulator.ledger().entries}
        videos = {case: api.http.get(result["output"]["video"]).content for case, result in results.items()}
        api.close()
        yield {case: (results[case], videos[case], entries[ids[case]]) for case in CASES}


@pytest.mark.parametrize(("ratio", "duration"), CASES)
def test_the_video_is_h264_of_the_ratio_and_duration(
    rendered: dict[tuple[str, int], tuple[dict[str, Any], bytes, Any]], ratio: str, duration: int
) -> None:
    result, video, entry = rendered[(ratio, duration)]
    assert result["status"] == "succeeded"
    info = probe(video)
    width, height = ratio_size(ratio)
    assert (info["width"], info["height"]) == (round(width * 0.25 / 2) * 2, round(height * 0.25 / 2) * 2)
    assert info["width"] % 2 == 0 and info["height"] % 2 == 0
    # The pixel aspect matches the ratio to within the rounding of one side to an even number.
    assert abs(info["width"] / info["height"] - width / height) <= 2 / info["height"]
    assert info["codec"] == "h264" and info["pix_fmt"] == "yuv420p"
    assert abs(info["duration"] - duration) <= 1 / 8
    assert info["frames"] == duration * 8
    # Fast start: the index comes before the media data.
    assert video.index(b"moov") < video.index(b"mdat")
    assert entry.video_sha256 == hashlib.sha256(video).hexdigest() and entry.video_bytes == len(video)


def test_scale_and_fps_are_configurable(emulator_factory: Factory, http_api: Connect) -> None:
    emulator = emulator_factory(video_scale=0.5, fps=12)
    api = http_api(emulator)
    result = api.finish(api.submit_id({"promptImage": data_uri(make_png(300, 200)), "ratio": "1104:832"}))
    info = probe(api.http.get(result["output"]["video"]).content)
    assert (info["width"], info["height"], info["frames"]) == (552, 416, 60)


def test_reuse_renders_serves_one_clip_per_size_and_still_checks_each_image(
    emulator_factory: Factory, http_api: Connect
) -> None:
    emulator = emulator_factory(reuse_renders=True)
    api = http_api(emulator)

    def video(width: int, ratio: str, duration: int = 5) -> bytes:
        result = api.finish(
            api.submit_id(
                {"promptImage": data_uri(make_png(width, 200)), "ratio": ratio, "duration": duration}
            )
        )
        assert result["status"] == "succeeded", result
        return api.http.get(result["output"]["video"]).content

    first = video(300, "1280:720")
    assert video(320, "1280:720") == first, "a later request of the same size gets the same clip"
    square, long = video(300, "960:960"), video(300, "1280:720", 10)
    assert len({first, square, long}) == 3 and probe(long)["frames"] == 10 * 8
    # The image is still fetched and judged: one the service would refuse fails, and is not a copy.
    refused = api.finish(api.submit_id({"promptImage": data_uri(make_png(900, 200)), "ratio": "1280:720"}))
    assert refused["status"] == "failed"
    emulator.reset()  # the kept clips are removed with the files: the next request renders again
    assert probe(video(300, "1280:720"))["frames"] == 5 * 8


def test_the_motion_depends_on_the_seed(tmp_path: Path) -> None:
    image = Image.radial_gradient("L").convert("RGB").resize((500, 400))

    def last_frame(seed: int, name: str) -> Image.Image:
        video = render_video(
            image, tmp_path / name, ratio="960:960", duration=5, fps=8, scale=0.25, seed=seed
        )
        with av.open(str(video.path)) as container:
            return [frame.to_image() for frame in container.decode(video=0)][-1].convert("L")

    def difference(a: Image.Image, b: Image.Image) -> float:
        return float(ImageStat.Stat(ImageChops.difference(a, b)).mean[0])

    first, again, other = last_frame(1, "a.mp4"), last_frame(1, "b.mp4"), last_frame(2, "c.mp4")
    # The same seed moves the same way (x264 itself may vary a few bits from run to run).
    assert difference(first, again) < 2 < 10 < difference(first, other)
    assert not list(tmp_path.glob("*.part"))


def test_render_time_of_a_5_second_320_wide_clip(tmp_path: Path) -> None:
    image = Image.radial_gradient("L").convert("RGB").resize((1600, 900))
    timings = []
    for attempt in range(3):
        started = time.perf_counter()
        video = render_video(
            image, tmp_path / f"{attempt}.mp4", ratio="1280:720", duration=5, fps=8, scale=0.25, seed=attempt
        )
        timings.append(time.perf_counter() - started)
    print(
        f"render 320x180, 5 s at 8 fps: best {min(timings) * 1000:.0f} ms of {len(timings)}, {video.size} bytes"
    )
    assert video.size > 0


# /files downloads


@pytest.fixture
def video_url(emulator: Emulator, http_api: Connect) -> str:
    api = http_api(emulator)
    return str(api.finish(api.submit_id({"promptImage": data_uri(make_png())}))["output"]["video"])


def test_files_need_no_auth_and_announce_type_and_length(video_url: str, plain_http: httpx.Client) -> None:
    response = plain_http.get(video_url)
    assert response.status_code == 200
    assert response.headers["content-type"] == "video/mp4"
    assert int(response.headers["content-length"]) == len(response.content) > 0
    assert response.headers["accept-ranges"] == "bytes"


def test_head_gives_the_headers_only(video_url: str, plain_http: httpx.Client) -> None:
    full = plain_http.get(video_url)
    head = plain_http.head(video_url)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == full.headers["content-length"]


@pytest.mark.parametrize(
    ("header", "piece"),
    [("bytes=0-99", slice(0, 100)), ("bytes=100-", slice(100, None)), ("bytes=-10", slice(-10, None))],
)
def test_a_single_range_is_served(
    video_url: str, plain_http: httpx.Client, header: str, piece: slice
) -> None:
    full = plain_http.get(video_url).content
    response = plain_http.get(video_url, headers={"Range": header})
    assert response.status_code == 206
    assert response.content == full[piece]
    first = piece.start % len(full) if piece.start is not None else 0
    assert (
        response.headers["content-range"] == f"bytes {first}-{first + len(response.content) - 1}/{len(full)}"
    )


def test_an_unsatisfiable_range_is_416(video_url: str, plain_http: httpx.Client) -> None:
    size = len(plain_http.get(video_url).content)
    response = plain_http.get(video_url, headers={"Range": f"bytes={size + 10}-"})
    assert response.status_code == 416


def test_unfinished_and_unknown_videos_are_404(
    emulator_factory: Factory, http_api: Connect, plain_http: httpx.Client
) -> None:
    emulator = emulator_factory(paused=True)
    request_id = http_api(emulator).submit_id({"promptImage": data_uri(make_png())})
    for name in (request_id, "unknown"):
        response = plain_http.get(f"{emulator.base_url}/files/{name}.mp4")
        assert response.status_code == 404 and response.json()["error_code"] == 404001


# The image rules, checked when the request starts


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((201, 100), "aspect ratio 2.010 (201x100) is outside 0.5..2.0"),
        ((100, 201), "aspect ratio 0.498 (100x201) is outside 0.5..2.0"),
        ((400, 100), "aspect ratio 4.000 (400x100)"),
    ],
)
def test_an_aspect_outside_1_2_to_2_1_fails(
    emulator: Emulator, http_api: Connect, size: tuple[int, int], expected: str
) -> None:
    error = failure_of(http_api(emulator), data_uri(make_png(*size)))
    assert error["code"] == "ASSET.INVALID" and expected in error["message"]


@pytest.mark.parametrize("size", [(200, 100), (100, 200)])
def test_the_aspect_bounds_are_included(emulator: Emulator, http_api: Connect, size: tuple[int, int]) -> None:
    api = http_api(emulator)
    assert api.finish(api.submit_id({"promptImage": data_uri(make_png(*size))}))["status"] == "succeeded"


@pytest.mark.parametrize("size", [(8000, 4000), (4000, 8000), (8001, 10)])
def test_a_side_of_8000_pixels_or_more_fails(
    emulator: Emulator, http_api: Connect, size: tuple[int, int]
) -> None:
    # One bit per pixel: a tiny PNG with a huge size.
    image = data_uri(png(Image.new("1", size)))
    error = failure_of(http_api(emulator), image)
    assert error["code"] == "ASSET.INVALID"
    assert f"{size[0]}x{size[1]} pixels" in error["message"] and "under 8000" in error["message"]


def test_a_file_of_16_mb_or_more_fails(
    emulator: Emulator, http_api: Connect, image_server: ImageServer
) -> None:
    body = make_png() + bytes(16 * 1024 * 1024)
    error = failure_of(http_api(emulator), image_server.serve("/big.png", body))
    assert error["code"] == "ASSET.INVALID"
    assert "file size is" in error["message"] and "less than 16 MB" in error["message"]


def test_a_file_just_under_16_mb_is_accepted(
    emulator: Emulator, http_api: Connect, image_server: ImageServer
) -> None:
    body = make_png(300, 200)
    body += bytes(16 * 1024 * 1024 - 1 - len(body))  # PNG decoders ignore what follows IEND
    api = http_api(emulator)
    result = api.finish(api.submit_id({"promptImage": image_server.serve("/almost.png", body)}))
    assert result["status"] == "succeeded"


def test_something_that_is_not_an_image_fails(emulator: Emulator, http_api: Connect) -> None:
    error = failure_of(http_api(emulator), data_uri(b"GIF89a but not really"))
    assert error["code"] == "ASSET.INVALID" and "not a decodable image" in error["message"]


def test_a_truncated_image_fails(emulator: Emulator, http_api: Connect) -> None:
    whole = noisy_png(160, 120)
    error = failure_of(http_api(emulator), data_uri(whole[: len(whole) // 2]))
    assert error["code"] == "ASSET.INVALID"
    assert "could not be decoded (160x120)" in error["message"] and "truncated" in error["message"]


def test_jpeg_and_webp_images_are_rendered(emulator: Emulator, http_api: Connect) -> None:
    api = http_api(emulator)
    for kind, mime in (("JPEG", "image/jpeg"), ("WEBP", "image/webp")):
        buffer = io.BytesIO()
        Image.new("RGB", (320, 240), (10, 200, 30)).save(buffer, kind)
        result = api.finish(api.submit_id({"promptImage": data_uri(buffer.getvalue(), mime)}))
        assert result["status"] == "succeeded", kind


# URLs: fetched once, when the request starts


def test_a_url_is_fetched_when_the_request_starts_not_at_submit(
    emulator_factory: Factory, http_api: Connect, image_server: ImageServer
) -> None:
    emulator = emulator_factory(paused=True)
    api = http_api(emulator)
    url = image_server.serve("/photo.png", make_png(300, 200)) + "?X-Amz-Signature=abc&X-Amz-Expires=60"
    request_id = api.submit_id({"promptImage": url})
    assert image_server.requests == []
    emulator.resume()
    assert api.finish(request_id)["status"] == "succeeded"
    assert image_server.requests == ["/photo.png?X-Amz-Signature=abc&X-Amz-Expires=60"]


@pytest.mark.parametrize("status", [403, 404, 500])
def test_a_failed_fetch_names_the_http_status(
    emulator: Emulator, http_api: Connect, image_server: ImageServer, status: int
) -> None:
    url = image_server.serve("/gone.png", b"no", status=status) + "?X-Amz-Signature=s3cr3t"
    error = failure_of(http_api(emulator), url)
    assert error["code"] == "ASSET.FETCH_FAILED" and f"HTTP {status}" in error["message"]
    assert "s3cr3t" not in error["message"] and "/gone.png" in error["message"]


def test_redirects_are_not_followed(emulator: Emulator, http_api: Connect, image_server: ImageServer) -> None:
    target = image_server.serve("/real.png", make_png())
    url = image_server.serve("/moved.png", b"", status=302, headers={"Location": target})
    error = failure_of(http_api(emulator), url)
    assert error["code"] == "ASSET.FETCH_FAILED" and "HTTP 302" in error["message"]
    assert image_server.requests == ["/moved.png"]


def test_a_connection_error_fails_the_request(emulator: Emulator, http_api: Connect) -> None:
    closed = ImageServer()
    closed.close()
    error = failure_of(http_api(emulator), f"{closed.base_url}/a.png")
    assert error["code"] == "ASSET.FETCH_FAILED" and "ConnectError" in error["message"]


def test_a_slow_image_host_times_out(
    emulator_factory: Factory, http_api: Connect, image_server: ImageServer
) -> None:
    emulator = emulator_factory(fetch_timeout_seconds=0.2)
    url = image_server.serve("/slow.png", make_png(), delay=1.0)
    error = failure_of(http_api(emulator), url)
    assert error["code"] == "ASSET.FETCH_FAILED" and "timed out after 0.2 s" in error["message"]


@pytest.mark.parametrize("size", [(640, 336), (641, 337), (333, 667), (999, 1997)])
def test_render_handles_images_whose_shrunk_sides_round_down(size: tuple[int, int], tmp_path) -> None:
    # A 640x336 image once failed with "box offset can't be negative": the shrunk image's rounded
    # height was smaller than the crop computed from it.
    from dagster_runway.emulator.render import output_size

    for ratio in ("1584:672", "1280:720", "960:960", "720:1280"):
        video = render_video(
            Image.new("RGB", size, (90, 120, 200)),
            tmp_path / "a.mp4",
            ratio=ratio,
            duration=5,
            fps=2,
            scale=0.25,
            seed=1,
        )
        with av.open(str(video.path)) as container:
            stream = container.streams.video[0]
            assert (stream.codec_context.width, stream.codec_context.height) == output_size(ratio, 0.25)
