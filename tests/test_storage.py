import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flm_dist.storage import StorageError, Store, join, split_uri


def test_split_uri_forms(tmp_path):
    assert split_uri("s3://b/k/x") == ("s3", "b/k/x")
    assert split_uri(f"file://{tmp_path}") == ("file", str(tmp_path))
    assert split_uri("rel/path")[0] == "file"
    with pytest.raises(StorageError, match="unsupported URI scheme"):
        split_uri("gs://x/y")


@pytest.mark.parametrize("kind", ["local", "file", "s3"])
def test_roundtrip_and_exclusive_create(kind, tmp_path, s3_store, bucket):
    base = {"local": str(tmp_path), "file": f"file://{tmp_path}", "s3": bucket}[kind]
    store = s3_store if kind == "s3" else Store()
    uri = join(base, "a", "obj.json")
    store.write_json(uri, {"x": 1})
    assert store.read_json(uri) == {"x": 1}
    assert store.exists(uri)
    marker = join(base, "a", "MARK")
    assert store.create_exclusive(marker, b"first") is True
    assert store.create_exclusive(marker, b"second") is False
    assert store.read_bytes(marker) == b"first"
    store.rm(join(base, "a"))
    assert not store.exists(uri)


def test_a_store_sees_what_other_processes_wrote_since_it_listed(s3, s3_store, bucket):
    """Another rank, process or machine writes between two calls of this one (a commit
    marker, a new data file): no answer may come from a listing made before."""
    other = Store.from_config(s3.storage_config())  # its own client, as another process has
    d = join(bucket, "step-00000012")
    s3_store.write_bytes(join(d, "shard-0"), b"x")
    assert [p.rsplit("/", 1)[-1] for p in s3_store.ls(d)] == ["shard-0"]
    assert not s3_store.exists(join(d, "COMMITTED"))
    other.write_bytes(join(d, "COMMITTED"), b"{}")
    assert s3_store.exists(join(d, "COMMITTED"))
    assert sorted(p.rsplit("/", 1)[-1] for p in s3_store.ls(d)) == ["COMMITTED", "shard-0"]
    other.rm(d)
    assert not s3_store.exists(join(d, "shard-0"))


def test_the_data_plan_sees_a_file_rewritten_since_it_was_listed(s3, s3_store, bucket):
    """A resume, or an evaluation after training, plans again in the same process: a
    file rewritten in between must show its new version (resuming is then refused)."""
    from flm_dist.data.plan import list_files

    uri = join(bucket, "log", "part-0.parquet")
    s3_store.write_bytes(uri, b"first")
    before = list_files(s3_store, uri)[0]
    assert [f.uri for f in list_files(s3_store, join(bucket, "log"))] == [uri]  # lists the prefix
    Store.from_config(s3.storage_config()).write_bytes(uri, b"second, longer")
    after = list_files(s3_store, uri)[0]
    assert after.version != before.version and after.size == len(b"second, longer")


def test_max_attempts_counts_every_request_to_a_store_that_is_down(s3, s3_store, bucket):
    """storage.max_attempts is attempts, first request included, on the botocore path as
    on pyarrow's (botocore's own `max_attempts` counts retries: 3 meant 4 requests)."""
    from dataclasses import replace

    from tests.faulty_s3 import FaultyS3

    uri = join(bucket, "obj")
    s3_store.write_bytes(uri, b"x")
    with FaultyS3(s3.url) as px:
        store = Store.from_config(replace(s3.storage_config(), endpoint_url=px.url, max_attempts=3))
        px.down = True
        with pytest.raises(Exception, match="Service Unavailable|SlowDown|503"):
            store.read_bytes(uri)
        assert px.counts["requests"] == 3, px.counts


def test_a_bucket_the_role_may_not_inspect_is_used_not_created(s3, s3_store, bucket):
    """A role allowed objects but not the bucket itself (no s3:ListBucket on it: HEAD
    answers 403) must still run: the bucket is there. Only a bucket the store says is
    missing (404) is created."""
    from dataclasses import replace

    from tests.faulty_s3 import FaultyS3

    with FaultyS3(s3.url) as px:
        store = Store.from_config(replace(s3.storage_config(), endpoint_url=px.url, max_attempts=2))
        px.deny_buckets = {bucket.removeprefix("s3://")}
        store.ensure_bucket(join(bucket, "runs"))
        store.write_bytes(join(bucket, "runs", "x"), b"ok")
        px.deny_buckets = set()
        store.ensure_bucket("s3://a-new-bucket/runs")
        store.write_bytes("s3://a-new-bucket/runs/x", b"ok")
    assert s3_store.read_bytes(join(bucket, "runs", "x")) == s3_store.read_bytes("s3://a-new-bucket/runs/x") == b"ok"


def test_parquet_through_pyarrow_s3_client(s3_store, bucket):
    fs, path = s3_store.arrow_fs(join(bucket, "t.parquet"))
    pq.write_table(pa.table({"a": [1, 2, 3]}), path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).column("a").to_pylist() == [1, 2, 3]
    # and the same object through s3fs
    assert s3_store.read_bytes(join(bucket, "t.parquet"))[:4] == b"PAR1"


def test_missing_object_raises_file_not_found(s3_store, bucket):
    with pytest.raises(FileNotFoundError):
        s3_store.read_bytes(join(bucket, "nope"))


def test_unreachable_endpoint_is_a_clear_error():
    store = Store(endpoint_url="http://127.0.0.1:9", access_key_id="a", secret_access_key="b", max_attempts=1)
    with pytest.raises(StorageError, match="cannot"):
        store.write_bytes("s3://x/y", b"1")


def test_pyarrow_reads_go_to_the_buckets_region_when_none_is_set(monkeypatch):
    """pyarrow's S3 client does not follow S3's redirect to a bucket's region (s3fs's
    botocore does): with no region set and AWS itself as the store, the bucket's region
    is asked once. (The lookup is AWS's; this machine cannot reach it, so it is stubbed.)"""
    import pyarrow.fs as pafs

    for var in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    asked = []
    monkeypatch.setattr(pafs, "resolve_s3_region", lambda b: asked.append(b) or "eu-west-1")
    assert Store().arrow_fs("s3://far-bucket/x")[0].region == "eu-west-1"
    assert Store().arrow_fs("s3://far-bucket/y")[0].region == "eu-west-1" and asked == ["far-bucket"]
    assert Store(region="us-west-2").arrow_fs("s3://far-bucket/x")[0].region == "us-west-2"
    assert Store(endpoint_url="http://127.0.0.1:9").arrow_fs("s3://other/x")[0].region == "us-east-1" and asked == ["far-bucket"]


def test_a_delete_the_store_refuses_key_by_key_is_an_error(s3, s3_store, bucket):
    """S3 answers a batch delete 200 and lists per-key errors inside (access, object
    lock); s3fs drops them. A checkpoint folder left behind by such a delete would be
    taken for the run's own (a --fresh run's step committed over an old marker)."""
    from dataclasses import replace

    from tests.faulty_s3 import FaultyS3

    for k in ("a", "b"):
        s3_store.write_bytes(join(bucket, "run", "step-1", k), b"x")
    with FaultyS3(s3.url) as px:
        store = Store.from_config(replace(s3.storage_config(), endpoint_url=px.url, max_attempts=2))
        px.refuse_keys_in_batch = {"step-1"}
        with pytest.raises(StorageError, match=r"run/step-1.*remain"):
            store.rm(join(bucket, "run", "step-1"))
        px.refuse_keys_in_batch = set()
        store.rm(join(bucket, "run", "step-1"))
    assert not s3_store.exists(join(bucket, "run", "step-1", "a"))



@pytest.mark.parametrize("kind", ["local", "s3"])
def test_put_file_copies_a_file_past_a_multipart_part(kind, tmp_path, s3_store, bucket):
    """Export uploads its files with `put_file` (s3fs's streamed upload); 60 MB is past
    s3fs's 50 MB part size, so on S3 the copy is a multipart upload, reassembled whole.
    (That it never holds the file in memory is s3fs's, not observed here.)"""
    import os

    src = tmp_path / "big.bin"
    data = os.urandom(1 << 20) * 60
    src.write_bytes(data)
    store = s3_store if kind == "s3" else Store()
    uri = join(bucket if kind == "s3" else str(tmp_path / "out"), "x", "big.bin")
    store.put_file(str(src), uri)
    assert store.read_bytes(uri) == data
    with pytest.raises(StorageError, match="nowhere"):
        store.put_file(str(tmp_path / "nowhere"), uri)
