"""download.py against a loopback HTTP server laying files out like the Hub (/{repo}/resolve/main/..., weights
through a redirect)."""

import hashlib
import json
import os
import random

import pytest
from tiny_hub import FakeHub

import download

TOKEN = "hf_test_token"


@pytest.fixture
def hub(monkeypatch):
    server = FakeHub(token=TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", server.url + "/")  # trailing slash as users often write it
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    yield server
    server.close()


def blob(n, seed=0):
    return random.Random(seed).randbytes(n)


def test_all_bundle_single_file_and_bin_fallback(hub, tmp_path):
    qwen, clip, dino = (download.MODELS[n][0] for n in ("qwen2.5-0.5b", "clip-l-336", "dinov2-l"))
    want = {
        "qwen2.5-0.5b": {f: hub.add(qwen, f, blob(n, i)) for i, (f, n) in enumerate(
            [("config.json", 50), ("tokenizer.json", 300), ("model.safetensors", 3 << 20)])},
        "clip-l-336": {f: hub.add(clip, f, blob(n, i)) for i, (f, n) in
                       enumerate([("config.json", 40), ("pytorch_model.bin", 5000)])},
        "dinov2-l": {f: hub.add(dino, f, blob(n, i)) for i, (f, n) in
                     enumerate([("config.json", 30), ("model.safetensors", 7000)])},
    }
    download.main(["all-0.5b", "--out", str(tmp_path)])
    for name, files in want.items():
        assert sorted(os.listdir(tmp_path / name)) == sorted(files)  # no .part left, nothing extra
        for filename, data in files.items():
            assert (tmp_path / name / filename).read_bytes() == data
    assert all(headers.get("Authorization") == f"Bearer {TOKEN}" for _, headers in hub.requests)
    assert f"/{qwen}/resolve/main/model.safetensors.index.json" in hub.paths()  # probed, 404, moved on

    hub.requests.clear()  # a rerun over a complete snapshot asks the server nothing
    download.main(["all-0.5b", "--out", str(tmp_path)])
    assert hub.requests == []


def test_sharded_snapshot(hub, tmp_path):
    repo = download.MODELS["qwen2.5-3b"][0]
    shards = {f"model-0000{i}-of-00002.safetensors": hub.add(repo, f"model-0000{i}-of-00002.safetensors",
                                                              blob(4000 + i, i)) for i in (1, 2)}
    weight_map = {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                  "model.norm.weight": "model-00002-of-00002.safetensors",
                  "lm_head.weight": "model-00002-of-00002.safetensors"}
    index = {"metadata": {"total_size": 8003}, "weight_map": weight_map}
    hub.add(repo, "model.safetensors.index.json", json.dumps(index).encode())
    hub.add(repo, "config.json", b"{}")
    hub.add(repo, "tokenizer.json", b"{}")
    out = download.download("qwen2.5-3b", tmp_path)
    for filename, data in shards.items():
        assert (out / filename).read_bytes() == data
    assert sorted(os.listdir(out)) == sorted([*shards, "model.safetensors.index.json", "config.json",
                                              "tokenizer.json"])
    assert not any(p.endswith("/model.safetensors") for p in hub.paths())  # the index was found first


def etag(data: bytes) -> str:
    return '"' + hashlib.sha256(data).hexdigest() + '"'


def test_partial_file_resumes_with_range_if_unchanged(hub, tmp_path):
    data = hub.add("org/repo", "model.safetensors", blob(10_000))
    (tmp_path / "model.safetensors.part").write_bytes(data[:3000])
    (tmp_path / "model.safetensors.part.etag").write_text(etag(data))  # what the first try was told
    with download.new_session() as session:
        path = download.download_file(session, "org/repo", "model.safetensors", tmp_path)
    assert hub.requests[-1][1].get("Range") == "bytes=3000-" and hub.requests[-1][1].get("If-Range") == etag(data)
    assert path.read_bytes() == data and sorted(os.listdir(tmp_path)) == ["model.safetensors"]


def test_a_file_changed_between_tries_is_fetched_whole_not_stitched(hub, tmp_path):
    old = blob(10_000, seed=1)
    (tmp_path / "model.safetensors.part").write_bytes(old[:3000])
    (tmp_path / "model.safetensors.part.etag").write_text(etag(old))
    new = hub.add("org/repo", "model.safetensors", blob(10_000, seed=2))  # replaced on the server since
    with download.new_session() as session:
        path = download.download_file(session, "org/repo", "model.safetensors", tmp_path)
    assert path.read_bytes() == new  # before: old[:3000] + new[3000:], accepted


def test_a_body_that_fails_its_sha256_is_refused(hub, tmp_path):
    data = hub.add("org/repo", "model.safetensors", blob(5000))
    hub.etags["/org/repo/resolve/main/model.safetensors"] = etag(b"what the Hub hashed")  # the bytes were altered
    with download.new_session() as session, pytest.raises(download.DownloadError, match="sha256"):
        download.download_file(session, "org/repo", "model.safetensors", tmp_path)
    del hub.etags["/org/repo/resolve/main/model.safetensors"]
    assert os.listdir(tmp_path) == []  # nothing kept of it
    with download.new_session() as session:
        assert download.download_file(session, "org/repo", "model.safetensors", tmp_path).read_bytes() == data


def test_a_body_without_length_or_hash_is_refused(hub, tmp_path):
    hub.add("org/repo", "config.json", b"{}")
    hub.bare.add("/org/repo/resolve/main/config.json")  # before: a body cut short here counted as whole
    with download.new_session() as session, pytest.raises(download.DownloadError, match="neither a length nor"):
        download.download_file(session, "org/repo", "config.json", tmp_path)
    assert not (tmp_path / "config.json").exists()


@pytest.mark.parametrize("shard", ["../../planted.safetensors", "/tmp/planted.safetensors", "sub/x.safetensors",
                                   "..", ["a"]])
def test_an_index_naming_files_outside_the_folder_writes_nothing(hub, tmp_path, shard):
    repo = download.MODELS["qwen2.5-3b"][0]
    hub.add(repo, "config.json", b"{}")
    hub.add(repo, "tokenizer.json", b"{}")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": shard}}
    hub.add(repo, "model.safetensors.index.json", json.dumps(index).encode())
    hub.add(repo, "model-00001-of-00002.safetensors", blob(100))
    for path in ("/../../planted.safetensors", "//tmp/planted.safetensors"):
        hub.files[f"/{repo}/resolve/main{path}"] = blob(10)
    out = tmp_path / "deep" / "er" / "weights"
    with pytest.raises(SystemExit, match="is not a plain file name|not a safetensors index"):
        download.main(["qwen2.5-3b", "--out", str(out)])
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == [f"deep/er/weights/qwen2.5-3b/{f}" for f in
                       ("config.json", "model.safetensors.index.json", "tokenizer.json")]  # no shard at all
    assert not os.path.exists("/tmp/planted.safetensors")


def test_complete_part_file_is_restarted_after_416(hub, tmp_path):
    data = hub.add("org/repo", "config.json", blob(100))
    (tmp_path / "config.json.part").write_bytes(data + b"junk")  # longer than the file: cannot be resumed
    (tmp_path / "config.json.part.etag").write_text(etag(data))  # so it is resumed, and answered 416
    with download.new_session() as session:
        assert download.download_file(session, "org/repo", "config.json", tmp_path).read_bytes() == data
    assert hub.requests[0][1].get("Range") == "bytes=104-" and "Range" not in hub.requests[1][1]


def test_a_mirror_that_misbehaves_is_named_not_a_traceback(hub, tmp_path):
    hub.add("org/repo", "config.json", b"{}")
    for status, headers, message in [(416, {"Content-Length": "0"}, "HTTP 416"),  # 416 to a request without Range
                                     (200, {"Content-Length": "abc"}, "Content-Length 'abc' is not a number")]:
        hub.forced["/org/repo/resolve/main/config.json"] = (status, headers)
        with download.new_session() as session, pytest.raises(download.DownloadError, match=message):
            download.download_file(session, "org/repo", "config.json", tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_truncated_response_detected_then_rerun_completes(hub, tmp_path):
    repo = download.MODELS["dinov2-l"][0]
    hub.add(repo, "config.json", b"{}")
    data = hub.add(repo, "model.safetensors", blob(3 << 20))  # > one 1 MiB read, so some bytes are kept
    hub.truncate.add(f"/{repo}/resolve/main/model.safetensors")
    with pytest.raises(download.DownloadError, match="rerun"):
        download.download("dinov2-l", tmp_path)
    part = tmp_path / "dinov2-l" / "model.safetensors.part"
    assert not (tmp_path / "dinov2-l" / "model.safetensors").exists()
    assert 0 < part.stat().st_size < len(data)
    kept = part.stat().st_size
    download.download("dinov2-l", tmp_path)
    assert hub.requests[-1][1].get("Range") == f"bytes={kept}-"
    assert (tmp_path / "dinov2-l" / "model.safetensors").read_bytes() == data and not part.exists()


def test_404_names_the_file(hub, tmp_path):
    repo = download.MODELS["qwen2.5-1.5b"][0]
    hub.add(repo, "config.json", b"{}")  # tokenizer.json is missing
    with pytest.raises(SystemExit, match=r"404.*'tokenizer.json' is not in Qwen/Qwen2.5-1.5B-Instruct"):
        download.main(["qwen2.5-1.5b", "--out", str(tmp_path)])
    assert not (tmp_path / "qwen2.5-1.5b" / "tokenizer.json.part").exists()


def test_missing_token_says_set_hf_token(hub, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    hub.add(download.MODELS["dinov2-l"][0], "config.json", b"{}")
    with pytest.raises(download.DownloadError, match="401.*HF_TOKEN"):
        download.download("dinov2-l", tmp_path)
    assert "Authorization" not in hub.requests[-1][1]


def test_any_repo_id_into_its_folder(hub, tmp_path):
    config = hub.add("someone/Tiny-Model", "config.json", b"{}")
    weights = hub.add("someone/Tiny-Model", "model.safetensors", blob(2000))  # no tokenizer.json: fine
    download.main(["someone/Tiny-Model", "--out", str(tmp_path / "tiny")])
    assert (tmp_path / "tiny" / "config.json").read_bytes() == config
    assert (tmp_path / "tiny" / "model.safetensors").read_bytes() == weights
    assert any(p.startswith("/cdn/") for p in hub.paths())  # the weights came through the redirect
    with pytest.raises(SystemExit):
        download.main(["someone/Tiny-Model", "dinov2-l", "--out", str(tmp_path)])  # --out would mean two things
    with pytest.raises(SystemExit):
        download.main(["qwen2.5-9b"])


def test_repo_for_names_the_repo_a_folder_should_hold():
    assert download.repo_for("weights/qwen2.5-7b", "qwen") == "Qwen/Qwen2.5-7B-Instruct"
    assert download.repo_for("w/Qwen2.5-0.5B-Instruct/", "qwen") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert download.repo_for("elsewhere/vit", "clip") == "openai/clip-vit-large-patch14-336"
    assert download.repo_for("weights/dinov2-l", "dino") == "facebook/dinov2-large"
