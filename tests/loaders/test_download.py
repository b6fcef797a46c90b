"""The download cache against a real, misbehaving HTTP server."""
import hashlib
import os
import threading
import time

import pytest
import torch

import ckptmgr
from ckptmgr.errors import CheckpointNotFoundError, ChecksumError, DownloadError
from ckptmgr.hub import cache

DATA = os.urandom(3 * 1024 * 1024 + 17)
SHA = hashlib.sha256(DATA).hexdigest()


def cache_files():
    """Everything in the cache directory (promoted files and leftovers alike)."""
    try:
        return sorted(os.listdir(cache.cache_dir()))
    except FileNotFoundError:
        return []


def read(path):
    with open(path, "rb") as fh:
        return fh.read()


def test_plain_download_is_cached_and_reused(http_server):
    url = http_server.add("/files/blob.bin", DATA)
    path = ckptmgr.cached_path(url)
    assert read(path) == DATA
    assert os.path.dirname(path) == cache.cache_dir()
    assert ckptmgr.cached_path(url) == path
    assert http_server.gets("/files/blob.bin") == 1
    assert cache_files() == [os.path.basename(path)]


def test_truncated_body_is_never_promoted(http_server):
    url = http_server.add("/t.bin", DATA, cut_after=1000, ranges=False)  # every response is cut
    with pytest.raises(DownloadError, match="after"):
        ckptmgr.cached_path(url, retries=2)
    assert cache_files() == []


def test_lying_content_length_is_never_promoted(http_server):
    url = http_server.add("/long.bin", DATA, length_delta=10)  # promises 10 bytes it never sends
    with pytest.raises(DownloadError):
        ckptmgr.cached_path(url, retries=1)
    assert cache_files() == []


def test_short_content_length_fails_the_hash_check(http_server):
    url = http_server.add(f"/short-{SHA[:10]}.bin", DATA, length_delta=-10)
    with pytest.raises(ChecksumError):
        ckptmgr.cached_path(url)
    assert cache_files() == []


def test_503_twice_then_200_honours_retry_after(http_server, monkeypatch):
    from ckptmgr.hub.http import RetryPolicy
    waits = []
    real_wait = RetryPolicy.wait

    def recording(self, failures, retry_after):
        waits.append(real_wait(self, failures, retry_after))
        return waits[-1]
    monkeypatch.setattr(RetryPolicy, "wait", recording)
    url = http_server.add("/busy.bin", DATA, fail_times=2, retry_after="1")
    assert read(ckptmgr.cached_path(url)) == DATA
    assert waits == [1.0, 1.0]  # each wait is the server's Retry-After, not the client's own back-off
    assert http_server.gets("/busy.bin") == 3


def test_retries_are_bounded(http_server):
    url = http_server.add("/down.bin", DATA, fail_times=100, fail_status=502)
    with pytest.raises(DownloadError, match="3 attempts"):
        ckptmgr.cached_path(url, retries=2)
    assert http_server.gets("/down.bin") == 3
    assert cache_files() == []


@pytest.mark.parametrize("reset", [False, True], ids=["close", "reset"])
def test_range_resume_is_byte_identical(http_server, reset):
    url = http_server.add("/big.bin", DATA, cut_after=1024 * 1024 + 3, cut_times=2, reset=reset)
    assert read(ckptmgr.cached_path(url)) == DATA
    headers = http_server.request_headers("/big.bin")
    assert len(headers) == 3
    assert "Range" not in headers[0]
    if not reset:  # a clean close keeps what was sent; a reset may drop the socket buffer
        assert headers[1]["Range"] == f"bytes={1024 * 1024 + 3}-"
        assert headers[2]["Range"] == f"bytes={2 * (1024 * 1024 + 3)}-"
        assert headers[1]["If-Range"]


def test_server_ignoring_range_restarts_from_zero(http_server):
    url = http_server.add("/norange.bin", DATA, cut_after=500_000, cut_times=1, ranges=False)
    assert read(ckptmgr.cached_path(url)) == DATA
    assert http_server.gets("/norange.bin") == 2


def test_wrong_content_range_restarts_from_zero(http_server):
    url = http_server.add("/badrange.bin", DATA, cut_after=500_000, cut_times=1, bad_content_range=True)
    assert read(ckptmgr.cached_path(url)) == DATA
    headers = http_server.request_headers("/badrange.bin")
    assert "Range" in headers[1] and "Range" not in headers[2]


def test_matching_hash_in_name_passes(http_server):
    url = http_server.add(f"/models/net-{SHA[:8]}.pth", DATA)
    path = ckptmgr.cached_path(url)
    assert os.path.basename(path) == f"net-{SHA[:8]}.pth"  # hub-hash names are kept: still checkable
    assert read(path) == DATA


def test_wrong_hash_raises_and_caches_nothing(http_server):
    url = http_server.add("/models/net-deadbeef.pth", DATA)
    with pytest.raises(ChecksumError, match="deadbeef"):
        ckptmgr.cached_path(url)
    assert cache_files() == []
    path = ckptmgr.cached_path(url, check_hash=False)  # the explicit opt-out
    assert read(path) == DATA and os.path.basename(path) != "net-deadbeef.pth"


@pytest.mark.parametrize("status,error,text", [
    (404, CheckpointNotFoundError, "does not exist"),
    (410, CheckpointNotFoundError, "does not exist"),
    (403, DownloadError, "refused"),
    (401, DownloadError, "refused"),
    (400, DownloadError, "HTTP 400"),
])
def test_client_errors_fail_fast_with_a_typed_error(http_server, status, error, text):
    url = http_server.add("/e.bin", DATA, status=status)
    with pytest.raises(error, match=text) as info:
        ckptmgr.cached_path(url)
    assert info.value.hint
    assert http_server.gets("/e.bin") == 1
    assert cache_files() == []


def test_unknown_path_is_not_found(http_server):
    with pytest.raises(CheckpointNotFoundError):
        ckptmgr.cached_path(http_server.url("/nothing/here.pth"))


def test_dns_failure_is_a_download_error():
    with pytest.raises(DownloadError, match="resol"):  # "cannot resolve" or "...name resolution"
        ckptmgr.cached_path("http://no-such-host.invalid/model.pth", retries=0)


def test_connection_refused_is_a_download_error(http_server):
    url = http_server.url("/x.pth")
    http_server.stop()
    with pytest.raises(DownloadError):
        ckptmgr.cached_path(url, retries=0)


def test_read_timeout_retries_then_fails(http_server):
    url = http_server.add("/slow.bin", DATA, delay=1.0)
    with pytest.raises(DownloadError, match="timed out"):
        ckptmgr.cached_path(url, timeout=0.2, retries=1)
    assert http_server.gets("/slow.bin") == 2   # the first try and one retry, then a typed error
    assert cache_files() == []


def test_stall_mid_body_resumes(http_server):
    url = http_server.add("/stall.bin", DATA, cut_after=200_000, cut_times=1, stall=1.0)
    assert read(ckptmgr.cached_path(url, timeout=0.3)) == DATA


def test_mirror_rewrites_the_download_but_not_the_cache_key(http_server, monkeypatch):
    http_server.add("/mirror/pt/models/w.bin", DATA)
    monkeypatch.setenv("CKPTMGR_URL_MIRRORS",
                       f"https://download.example.org/={http_server.url('/mirror/pt/')},"
                       f"https://other.example.org/=http://unused.invalid/")
    original = "https://download.example.org/models/w.bin"
    path = ckptmgr.cached_path(original)
    assert read(path) == DATA
    assert os.path.basename(path) == cache.cache_filename(original)
    assert http_server.gets("/mirror/pt/models/w.bin") == 1


def test_concurrent_callers_download_once(http_server):
    url = http_server.add("/shared.bin", DATA, delay=0.3)
    results, errors = [], []

    def fetch():
        try:
            results.append(ckptmgr.cached_path(url))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert len(set(results)) == 1 and len(results) == 4
    assert http_server.gets("/shared.bin") == 1


def test_progress_bar_only_when_asked(http_server, capsys):
    url = http_server.add("/p.bin", DATA)
    ckptmgr.cached_path(url)  # stderr is not a terminal under pytest: silent
    assert capsys.readouterr().err == ""
    url2 = http_server.add("/p2.bin", DATA)
    ckptmgr.cached_path(url2, progress=True)
    assert "p2" in capsys.readouterr().err


def test_tls_verification_stays_on(monkeypatch, tmp_path):
    pytest.importorskip("cryptography")
    import ssl

    from tests.support.httpserver import FileServer
    from tests.support.tlscert import write_self_signed
    cert, key = write_self_signed(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    with FileServer(ssl_context=context) as server:
        url = server.add("/secure.bin", DATA)
        with pytest.raises(DownloadError, match="certificate") as info:
            ckptmgr.cached_path(url, retries=0)
        assert "cannot be turned off" in str(info.value)
        monkeypatch.setenv("SSL_CERT_FILE", cert)  # trusting the CA is the way in
        assert read(ckptmgr.cached_path(url)) == DATA


def test_http_loader_loads_a_checkpoint_and_honours_map_location(http_server, tmp_path, registry):
    local = tmp_path / "w.pth"
    torch.save({"state_dict": {"w": torch.arange(4.0)}}, local)
    url = http_server.add("/ckpt/w.pth", local.read_bytes())
    ckpt = registry.load_checkpoint(url, map_location="meta")
    assert ckpt["state_dict"]["w"].device.type == "meta"
    assert torch.equal(registry.load_checkpoint(url)["state_dict"]["w"], torch.arange(4.0))
    assert http_server.gets("/ckpt/w.pth") == 1


def test_cache_home_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("CKPTMGR_HOME", str(tmp_path / "home"))
    assert cache.cache_dir() == str(tmp_path / "home" / "hub" / "checkpoints")
    monkeypatch.delenv("CKPTMGR_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.ckptmgr_home() == str(tmp_path / "xdg" / "ckptmgr")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert cache.ckptmgr_home() == str(tmp_path / "user" / ".cache" / "ckptmgr")


def test_cache_names_never_collide():
    a = cache.cache_filename("https://a.example/models/model.pth")
    b = cache.cache_filename("https://b.example/models/model.pth")
    c = cache.cache_filename("https://a.example/models/model.pth?version=2")
    assert len({a, b, c}) == 3 and all(n.startswith("model.") and n.endswith(".pth") for n in (a, b, c))
    hub = "https://download.pytorch.org/models/resnet50-0676ba61.pth"
    assert cache.cache_filename(hub) == "resnet50-0676ba61.pth"
    unchecked = cache.cache_filename(hub, check_hash=False)
    assert unchecked != "resnet50-0676ba61.pth" and cache.hash_prefix(unchecked) == "0676ba61"
    assert cache.cache_filename("https://x.example/") .startswith("download.")
    assert "/" not in cache.cache_filename("https://x.example/a/..%2F..%2Fetc")


def test_hash_prefix_follows_the_hub_convention():
    assert cache.hash_prefix("resnet50-0676ba61.pth") == "0676ba61"
    assert cache.hash_prefix("resnet50_8xb32_in1k_20210831-ea4938fc.pth") == "ea4938fc"
    assert cache.hash_prefix("resnext50-32x4d-0ab1a123.pth") == "0ab1a123"
    assert cache.hash_prefix("model-v2.pth") is None
    assert cache.hash_prefix("model-abc.pth") is None  # fewer than 8 hex digits
    assert cache.hash_prefix("model.pth") is None


def test_bad_mirror_setting_is_reported(monkeypatch):
    monkeypatch.setenv("CKPTMGR_URL_MIRRORS", "https://a.example/")
    with pytest.raises(DownloadError, match="PREFIX=REPLACEMENT"):
        cache.apply_mirrors("https://a.example/x")


def test_longest_mirror_prefix_wins(monkeypatch):
    monkeypatch.setenv("CKPTMGR_URL_MIRRORS", "https://h/=http://m1/, https://h/deep/=http://m2/")
    assert cache.apply_mirrors("https://h/deep/x.pth") == "http://m2/x.pth"
    assert cache.apply_mirrors("https://h/x.pth") == "http://m1/x.pth"
    assert cache.apply_mirrors("https://elsewhere/x.pth") == "https://elsewhere/x.pth"


def test_cached_path_of_local_and_memory_urls(tmp_path):
    local = tmp_path / "f.bin"
    local.write_bytes(b"abc")
    assert ckptmgr.cached_path(str(local)) == str(local)
    assert ckptmgr.cached_path(f"file://{local}") == str(local)
    with pytest.raises(CheckpointNotFoundError):
        ckptmgr.cached_path(str(tmp_path / "missing.bin"))
    import fsspec
    with fsspec.open("memory://cache-test/obj.bin", "wb") as fh:
        fh.write(DATA)
    path = ckptmgr.cached_path("memory://cache-test/obj.bin")
    assert read(path) == DATA
    with pytest.raises(ckptmgr.UnknownSchemeError):
        ckptmgr.cached_path("nosuchscheme://x/y.pth")


def test_every_response_cut_still_completes_when_range_works(http_server):
    url = http_server.add("/dribble.bin", DATA, cut_after=700_000)  # each attempt gets a bit further
    assert read(ckptmgr.cached_path(url, retries=1)) == DATA
    assert http_server.gets("/dribble.bin") == 5


def test_retry_after_parsing_and_bounds():
    import email.utils

    from ckptmgr.hub.http import RetryPolicy, _retry_after
    assert _retry_after("2") == 2.0
    assert _retry_after(None) is None and _retry_after("soon") is None
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= _retry_after(later) <= 31
    policy = RetryPolicy(backoff=0.5, max_wait=3)
    assert policy.wait(1, 1000.0) == 3  # a huge Retry-After is capped
    assert 0.5 <= policy.wait(1, None) <= 0.625 and 2.0 <= policy.wait(3, None) <= 2.5


def test_429_is_retried(http_server):
    url = http_server.add("/limited.bin", DATA, fail_times=1, fail_status=429, retry_after="0")
    assert read(ckptmgr.cached_path(url)) == DATA
    assert http_server.gets("/limited.bin") == 2


def test_https_on_a_plain_http_port_fails_at_once_as_a_tls_error(http_server, caplog):
    url = http_server.add("/plain.bin", DATA).replace("http://", "https://")
    with caplog.at_level("INFO", logger="ckptmgr"), pytest.raises(DownloadError) as info:
        ckptmgr.cached_path(url)
    assert "TLS handshake" in str(info.value) and "http://" in info.value.hint
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]  # permanent: never retried
    assert cache_files() == []


def test_a_damaged_download_says_how_to_fetch_it_again(http_server, registry):
    url = http_server.add("/garbled.pth", b"PK\x03\x04" + os.urandom(200))   # a zip header, then garbage
    with pytest.raises(ckptmgr.CorruptCheckpointError) as info:
        registry.load_checkpoint(url)
    assert "delete the cached copy" in info.value.hint and "download it afresh" in info.value.hint
