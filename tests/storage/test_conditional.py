"""Conditional writes of a Store: create-only and compare-and-swap on S3 (moto), local disk and memory://."""
import os
import threading
import uuid

import pytest

from ckptmgr.errors import WriteConflictError
from ckptmgr.io import conditional
from ckptmgr.io.access import open_store
from tests.support.s3cond import atomic_conditional_puts

pytestmark = pytest.mark.timeout(180)


def _race(store, name, writers):
    """``writers`` threads create ``name`` at the same instant; returns the payloads whose create succeeded."""
    barrier = threading.Barrier(writers)
    won, errors = [], []

    def write(i):
        payload = f"writer {i} {uuid.uuid4().hex}".encode()
        barrier.wait(timeout=60)
        try:
            store.create_exclusive(name, payload)
            won.append(payload)
        except WriteConflictError:
            pass
        except Exception as exc:  # anything else fails the test below
            errors.append(exc)
    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return won


def _own_client_store(moto_server, monkeypatch, prefix):
    """A fresh bucket on the moto server and a Store on it whose s3fs client is its own (a test hooks its
    requests); returns (bucket, store)."""
    import s3fs
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": moto_server}.items():
        monkeypatch.setenv(name, value)
    bucket = f"{prefix}-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
    return bucket, open_store(f"s3://{bucket}/run", {"skip_instance_cache": True})


def test_s3_create_only_and_compare_and_swap(s3):
    store = open_store(f"{s3}/run")
    assert store.conditional_writes()                  # moto honours If-None-Match: the probe says so
    store.create_exclusive("a.json", b"first")
    with pytest.raises(WriteConflictError):
        store.create_exclusive("a.json", b"second")
    assert store.read_bytes("a.json") == b"first"
    data, tag = store.read_tagged("a.json")
    assert data == b"first" and tag
    store.replace_if("a.json", b"third", tag)          # the version read is still there: swapped
    with pytest.raises(WriteConflictError):
        store.replace_if("a.json", b"stale", tag)      # the version read is gone
    with pytest.raises(WriteConflictError):
        store.replace_if("a.json", b"create", None)    # None: only if missing
    assert store.read_bytes("a.json") == b"third"
    assert store.read_tagged("missing.json") == (None, None)
    assert [n for n in store.listdir() if n.startswith(".ckptmgr-probe")] == []  # the probe cleans up


def test_s3_exactly_one_of_eight_racing_creates_wins(s3, monkeypatch):
    atomic_conditional_puts(monkeypatch)  # moto's own check is not atomic under load; S3's is
    store = open_store(f"{s3}/race")
    assert store.conditional_writes()
    for round_ in range(20):
        won = _race(store, f"r{round_}/manifest.json", 8)
        assert len(won) == 1, f"round {round_}: {len(won)} winners"
        assert store.read_bytes(f"r{round_}/manifest.json") == won[0]


def test_s3_endpoint_that_ignores_the_header_falls_back(moto_server, monkeypatch):
    """A server that drops If-None-Match (older S3 clones) is detected by the probe, not trusted."""
    bucket, store = _own_client_store(moto_server, monkeypatch, "ignore")

    def drop_condition(request, **_):  # what such a server does with the header
        request.headers.pop("If-None-Match", None)
    store.fs.s3.meta.events.register("before-send.s3", drop_condition)
    assert not store.conditional_writes()
    store.create_exclusive("m.json", b"one")           # the fallback still refuses an existing name
    with pytest.raises(WriteConflictError):
        store.create_exclusive("m.json", b"two")
    assert (f"{moto_server}", bucket) in conditional._probed and not conditional._probed[(moto_server, bucket)]


def test_local_create_is_atomic_and_leaves_no_temp_files(tmp_path):
    store = open_store(str(tmp_path / "d"))
    for round_ in range(20):
        won = _race(store, f"m{round_}.json", 8)
        assert len(won) == 1 and store.read_bytes(f"m{round_}.json") == won[0]
    assert sorted(os.listdir(tmp_path / "d")) == sorted(f"m{i}.json" for i in range(20))
    store.write_bytes("plain.json", b"{}")
    mode = os.stat(tmp_path / "d" / "plain.json").st_mode
    assert os.stat(tmp_path / "d" / "m0.json").st_mode == mode  # the usual file mode, not mkstemp's 0600


def test_memory_store_has_no_conditional_writes_but_checks(tmp_path):
    store = open_store(f"memory://cond-{uuid.uuid4().hex[:8]}")
    assert not store.conditional_writes()
    store.create_exclusive("x", b"1")
    with pytest.raises(WriteConflictError):
        store.create_exclusive("x", b"2")
    data, tag = store.read_tagged("x")
    store.replace_if("x", b"3", tag)
    with pytest.raises(WriteConflictError):
        store.replace_if("x", b"4", tag)
    assert store.read_bytes("x") == b"3"


def test_s3_endpoint_that_rejects_the_header_falls_back(moto_server, monkeypatch):
    """A server that answers 501 NotImplemented to a conditional PUT is detected too; saves still work."""
    from aiobotocore.awsrequest import AioAWSResponse
    _, store = _own_client_store(moto_server, monkeypatch, "reject")
    body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>NotImplemented</Code>'
            b"<Message>A header you provided implies functionality that is not implemented</Message></Error>")

    class _Raw:
        async def read(self):
            return body

    def reject(request, **_):  # what such a server answers
        if "If-None-Match" in request.headers:
            return AioAWSResponse(request.url, 501, {"Content-Type": "application/xml"}, _Raw())
        return None
    store.fs.s3.meta.events.register("before-send.s3.PutObject", reject)
    assert not store.conditional_writes()
    store.create_exclusive("m.json", b"one")
    assert store.read_bytes("m.json") == b"one"
    with pytest.raises(WriteConflictError):
        store.create_exclusive("m.json", b"two")
