"""backend.images: decoding bad image bytes and fetching task URLs (local files under
LOCAL_FILES_DOCUMENT_ROOT, unsupported schemes, missing URLs) fail with a clear ImageError."""

from __future__ import annotations

import io
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image

from backend.images import ImageError, decode_image, fetch_image_bytes, load_image
from tests.helpers_unit import jpeg_bytes, local_url, make_settings, write_jpeg

BIG = 10**8


# --- decode_image -----------------------------------------------------------------------------
def test_decode_good_jpeg():
    img = decode_image(jpeg_bytes(64, 48, color=(200, 120, 40)), BIG)
    assert (img.width, img.height) == (64, 48)
    assert img.array.shape == (48, 64, 3) and img.array.dtype == np.uint8
    assert np.abs(img.array.astype(int).mean(axis=(0, 1)) - [200, 120, 40]).max() < 4  # RGB, not BGR


def test_decode_png_with_alpha_and_grey_becomes_rgb():
    for mode in ("RGBA", "L", "P"):
        buf = io.BytesIO()
        Image.new(mode, (10, 7)).save(buf, "PNG")
        img = decode_image(buf.getvalue(), BIG)
        assert img.array.shape == (7, 10, 3)


def test_decode_empty():
    with pytest.raises(ImageError, match=r"image is empty \(0 bytes\)"):
        decode_image(b"", BIG)


@pytest.mark.parametrize("data", [b"hello, I am a text file, not an image",
                                  b"\xff\xd8\xff\xe0" + b"\x00" * 64,  # JPEG magic, then garbage
                                  b"%PDF-1.4\n"])
def test_decode_not_an_image(data):
    with pytest.raises(ImageError, match="not a readable image"):
        decode_image(data, BIG)


@pytest.mark.parametrize("fraction", [0.5, 0.8])
def test_decode_truncated_jpeg(fraction):
    data = jpeg_bytes(64, 48)
    with pytest.raises(ImageError, match="broken image data"):
        decode_image(data[: int(len(data) * fraction)], BIG)


def test_decode_truncated_png():
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, "PNG")
    with pytest.raises(ImageError, match="broken image data"):
        decode_image(buf.getvalue()[:200], BIG)


def test_decode_too_many_pixels():
    # 64 x 48 = 3072 px > 3000: a PNG is refused, a JPEG is decoded at half scale (32 x 24)
    buf = io.BytesIO()
    Image.new("RGB", (64, 48)).save(buf, "PNG")
    with pytest.raises(ImageError, match=r"image is too large: 64x48 px \(limit 3000 px\)"):
        decode_image(buf.getvalue(), 3000)
    assert decode_image(buf.getvalue(), 3072).width == 64  # the limit itself is allowed
    half = decode_image(jpeg_bytes(64, 48), 3000)
    assert (half.width, half.height) == (32, 24)
    assert decode_image(jpeg_bytes(64, 48), 3072).width == 64
    with pytest.raises(ImageError, match=r"image is too large: 64x48 px \(limit 40 px\)"):
        decode_image(jpeg_bytes(64, 48), 40)  # even 1/8 (8 x 6) is over


# --- fetch_image_bytes ------------------------------------------------------------------------
@pytest.fixture
def root(tmp_path):
    r = tmp_path / "docroot"
    write_jpeg(r / "faces" / "a.jpg", width=30, height=20)
    (tmp_path / "secret.jpg").write_bytes(jpeg_bytes(8, 8))  # outside the root
    return r


@pytest.fixture
def settings(tmp_path, root):
    return make_settings(tmp_path / "var", local_files_document_root=str(root))


def test_local_file(settings, root):
    data = fetch_image_bytes(local_url("faces/a.jpg"), settings)
    assert data == (root / "faces" / "a.jpg").read_bytes()
    img = load_image(local_url("faces/a.jpg"), settings)
    assert (img.width, img.height) == (30, 20)


def test_local_file_with_leading_slash_and_spaces(settings, root):
    write_jpeg(root / "my faces" / "b c.jpg", width=20, height=24)
    assert load_image(local_url("/my faces/b c.jpg"), settings).height == 24


def test_local_file_whose_name_has_a_percent_sign(settings, root):
    # Label Studio decodes ?d= once (Django's request.GET); a file literally named "a%20b.jpg" is
    # sent as d=a%2520b.jpg and must not be read as "a b.jpg".
    write_jpeg(root / "a%20b.jpg", width=17, height=19)
    write_jpeg(root / "a b.jpg", width=16, height=16)
    assert load_image(local_url("a%20b.jpg"), settings).width == 17


def test_local_file_missing(settings):
    with pytest.raises(ImageError, match="local file not found"):
        fetch_image_bytes(local_url("faces/nope.jpg"), settings)


@pytest.mark.parametrize("rel", ["../secret.jpg", "faces/../../secret.jpg", "%2E%2E/secret.jpg"])
def test_local_file_path_traversal_rejected(settings, rel):
    url = f"/data/local-files/?d={rel}" if "%" in rel else local_url(rel)
    with pytest.raises(ImageError, match="outside LOCAL_FILES_DOCUMENT_ROOT"):
        fetch_image_bytes(url, settings)


def test_local_file_symlink_out_of_root_rejected(settings, root, tmp_path):
    write_jpeg(tmp_path / "secret.jpg", width=8, height=8)
    (root / "link.jpg").symlink_to(tmp_path / "secret.jpg")
    with pytest.raises(ImageError, match="is a link to a file outside its image folder .*copy the file into the folder"):
        fetch_image_bytes(local_url("link.jpg"), settings)


def test_local_file_absolute_path_stays_under_root(settings, tmp_path):
    # d=/abs/path is taken relative to the root (as Label Studio does), never as an absolute path
    with pytest.raises(ImageError, match="local file not found"):
        fetch_image_bytes(local_url(str(tmp_path / "secret.jpg")), settings)


def test_local_file_directory_is_not_a_file(settings):
    with pytest.raises(ImageError, match="local file not found"):
        fetch_image_bytes(local_url("faces"), settings)


def test_local_file_too_big(tmp_path, root):
    s = make_settings(tmp_path / "var", local_files_document_root=str(root), max_image_bytes=100)
    with pytest.raises(ImageError, match="image file is too large"):
        fetch_image_bytes(local_url("faces/a.jpg"), s)


@pytest.mark.parametrize("url", ["s3://bucket/face.jpg", "gs://bucket/face.jpg", "ftp://host/face.jpg",
                                 "file:///etc/passwd", "faces/a.jpg"])
def test_unsupported_scheme(settings, url):
    with pytest.raises(ImageError, match="unsupported image URL"):
        fetch_image_bytes(url, settings)


@pytest.mark.parametrize("url", [None, "", "   ", 42])
def test_missing_url(settings, url):
    with pytest.raises(ImageError, match="task has no image URL"):
        fetch_image_bytes(url, settings)


def test_relative_url_without_api_key(tmp_path):
    # /data/upload/... must come from Label Studio, which needs a token: say so
    s = make_settings(tmp_path, label_studio_api_key="")
    with pytest.raises(ImageError, match="LABEL_STUDIO_API_KEY is not set"):
        fetch_image_bytes("/data/upload/1/face.jpg", s)


def test_http_unreachable_host(tmp_path):
    # nothing listens on port 1: a connection error becomes an ImageError naming the URL (private
    # addresses allowed here; by default they are refused before any request: tests/security)
    s = make_settings(tmp_path, image_urls_allow_private=True)
    with pytest.raises(ImageError, match=r"could not fetch http://127\.0\.0\.1:1/face\.jpg"):
        fetch_image_bytes("http://127.0.0.1:1/face.jpg", s, ls_url="http://127.0.0.2:9")


def test_local_files_url_without_document_root_goes_to_label_studio(tmp_path):
    # no LOCAL_FILES_DOCUMENT_ROOT: the URL is Label Studio's, which needs a token
    s = make_settings(tmp_path, local_files_document_root="")
    with pytest.raises(ImageError, match="LABEL_STUDIO_API_KEY"):
        fetch_image_bytes(local_url("faces/a.jpg"), s)


def test_quote_helper_matches_label_studio():
    assert local_url("my faces/a b.jpg") == "/data/local-files/?d=" + quote("my faces/a b.jpg")


def test_decode_not_an_image_after_ultralytics_is_imported():
    # ultralytics patches PIL.Image.open to import pi-heif on an unidentified file
    import facemodels.detector  # noqa: F401

    with pytest.raises(ImageError, match="not a readable image"):
        decode_image(b"plain text, not an image", BIG)
    assert decode_image(jpeg_bytes(8, 6), BIG).width == 8


def test_local_file_through_a_folder_link_in_the_root(settings, root, tmp_path):
    # `faceloop up` links each image folder into its document root (root/<name>-<hash> -> folder)
    folder = tmp_path / "elsewhere" / "faces"
    folder.mkdir(parents=True)
    write_jpeg(folder / "a.jpg", width=21, height=18)
    (root / "faces-0123abcd").symlink_to(folder, target_is_directory=True)
    assert load_image(local_url("faces-0123abcd/a.jpg"), settings).width == 21
    # a link deeper down that leaves the linked folder stays refused
    (folder / "out.jpg").symlink_to(tmp_path / "secret.jpg")
    with pytest.raises(ImageError, match="is a link to a file outside its image folder"):
        fetch_image_bytes(local_url("faces-0123abcd/out.jpg"), settings)
    with pytest.raises(ImageError, match="outside LOCAL_FILES_DOCUMENT_ROOT"):
        fetch_image_bytes(local_url("faces-0123abcd/../../secret.jpg"), settings)


def test_linked_out_images_names_links_out_of_the_folder(tmp_path):
    """A folder of links to images elsewhere (a new user's trial: every task showed its image in Label
    Studio and none got a pre-annotation, with no word from `faceloop up`): each link out is named with
    its target; files and links that stay inside the folder are not."""
    from backend.images import linked_out_images
    from backend.lsapi import IMAGE_SUFFIXES

    folder, elsewhere = tmp_path / "faces", tmp_path / "elsewhere"
    (folder / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    write_jpeg(folder / "real.jpg", width=8, height=8)
    write_jpeg(elsewhere / "b.jpg", width=8, height=8)
    (folder / "sub" / "b.jpg").symlink_to(elsewhere / "b.jpg")
    (folder / "inside.jpg").symlink_to(folder / "real.jpg")
    (folder / "notes.txt").symlink_to(elsewhere / "b.jpg")  # not an image suffix: not looked at
    linked, total = linked_out_images(folder, IMAGE_SUFFIXES)
    assert total == 3 and linked == [("sub/b.jpg", str((elsewhere / "b.jpg").resolve()))]


def test_unreadable_images_names_each_broken_file_and_passes_good_ones(tmp_path):
    """The files a new user added to a folder by mistake (the fifth trial): random bytes, an empty
    file, text named .png, a JPEG cut half way and a PNG cut half way are each named with a reason;
    whole JPEG/PNG files (a big one too) pass; files without an image suffix are not looked at."""
    from backend.images import unreadable_images
    from backend.lsapi import IMAGE_SUFFIXES

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
    jpg, png = io.BytesIO(), io.BytesIO()
    Image.fromarray(pixels).save(jpg, "JPEG", quality=90)
    Image.fromarray(pixels).save(png, "PNG")
    (tmp_path / "sub").mkdir()
    files = {
        "good.jpg": jpg.getvalue(), "sub/good.png": png.getvalue(),
        "random.jpg": rng.integers(0, 255, 3000, dtype=np.uint8).tobytes(), "empty.jpg": b"",
        "fake.png": b"hello, not an image\n", "cut.jpg": jpg.getvalue()[: len(jpg.getvalue()) // 2],
        "sub/cut.png": png.getvalue()[: len(png.getvalue()) // 2], "notes.txt": b"ignored",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    bad, checked, total = unreadable_images(tmp_path, IMAGE_SUFFIXES)
    assert (checked, total) == (7, 7)
    reasons = dict(bad)
    assert sorted(reasons) == ["cut.jpg", "empty.jpg", "fake.png", "random.jpg", "sub/cut.png"]
    assert reasons["empty.jpg"] == "image is empty (0 bytes)"
    assert reasons["fake.png"].startswith("not a readable image (20 bytes")
    assert "truncated" in reasons["cut.jpg"] and reasons["sub/cut.png"].startswith("broken image data")
    # a time budget already spent checks nothing and says so through the counts
    assert unreadable_images(tmp_path, IMAGE_SUFFIXES, budget_s=-1) == ([], 0, 7)
