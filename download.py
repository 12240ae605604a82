"""Download the public checkpoints (Qwen2.5, CLIP ViT-L/14-336, DINOv2-L) from the Hugging Face Hub.

    python download.py all-3b                     # Qwen2.5-3B-Instruct + CLIP-L/336 + DINOv2-L into weights/
    python download.py qwen2.5-1.5b dinov2-l --out weights/
    python download.py Qwen/Qwen2.5-7B-Instruct --out weights/qwen2.5-7b     # any Hub repo id, into that folder

A named checkpoint lands in OUT/<name>/ (config.json, tokenizer.json for Qwen, weights); a repo id in OUT
itself (default weights/<its name, lowercased>), with config.json, tokenizer.json if it has one, and its
weights. Files are fetched from
`{HF_ENDPOINT or https://huggingface.co}/{repo}/resolve/main/{file}` with `HF_TOKEN` as a Bearer token.
Downloads go to `<file>.part` and are renamed only once the size matches, so an interrupted run resumes
where it stopped (HTTP Range) when rerun, and finished files are skipped.
"""

import argparse
import hashlib
import json
import os
import re
import sys
from pathlib import Path

import requests
from tqdm import tqdm

# Instruct, not base: our conversations are ChatML, and the Instruct models already answer in that template
# and stop on <|im_end|>; the paper fine-tunes all weights anyway, so nothing of base is lost.
MODELS = {f"qwen2.5-{size}": (f"Qwen/Qwen2.5-{size.upper()}-Instruct", ["config.json", "tokenizer.json"])
          for size in ("0.5b", "1.5b", "3b", "7b")}
MODELS["clip-l-336"] = ("openai/clip-vit-large-patch14-336", ["config.json"])
MODELS["dinov2-l"] = ("facebook/dinov2-large", ["config.json"])
BUNDLES = {
    f"all-{size}": [f"qwen2.5-{size}", "clip-l-336", "dinov2-l"] for size in ("0.5b", "1.5b", "3b", "7b")}


class DownloadError(RuntimeError):
    pass


class NotOnHub(DownloadError):
    """404: the file is not in the repository (used to probe the weight layouts)."""


def hub_url(repo: str, filename: str) -> str:
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    return f"{endpoint.rstrip('/')}/{repo}/resolve/main/{filename}"


def new_session() -> requests.Session:
    session = requests.Session()
    # identity: a gzip-encoded body would not match Content-Length nor allow byte-range resumes
    session.headers["Accept-Encoding"] = "identity"
    if os.environ.get("HF_TOKEN"):
        session.headers["Authorization"] = f"Bearer {os.environ['HF_TOKEN']}"
    return session


def plain_file_name(name, source: str) -> str:
    """`name` if it is a plain file name (what the Hub's shards are called); else a DownloadError: a name
    from a mirror or repo must not reach outside the checkpoint's folder (../x, /etc/x, sub/x)."""
    if not (isinstance(name, str) and re.fullmatch(r"[\w.\-]+", name) and name not in (".", "..")):
        raise DownloadError(f"{source}: {name!r} is not a plain file name; refusing to write it")
    return name


def sha256_of(response: requests.Response) -> str | None:
    """The file's sha256 when the Hub says it: X-Linked-Etag (an LFS file's hash, on the redirect to the
    CDN) or an ETag of 64 hex digits; None otherwise."""
    for r in [*response.history, response]:
        for key in ("X-Linked-Etag", "ETag"):
            tag = r.headers.get(key, "").removeprefix("W/").strip('"')
            if re.fullmatch(r"[0-9a-f]{64}", tag):
                return tag
    return None


def download_file(session: requests.Session, repo: str, filename: str, out_dir: Path) -> Path:
    """Fetch one file into out_dir (resuming `<file>.part`), check its size and (when the Hub gives it) its
    sha256, rename it into place. A resume asks `If-Range` with the validator of the first try, so a file
    changed on the server in between is fetched whole again, never stitched."""
    dest, url = out_dir / plain_file_name(filename, repo), hub_url(repo, filename)
    if dest.exists():  # only complete files are ever renamed into place
        return dest
    part, tag_file = dest.with_name(dest.name + ".part"), dest.with_name(dest.name + ".part.etag")
    validator = tag_file.read_text() if tag_file.exists() else ""
    have = part.stat().st_size if part.exists() and validator else 0  # no validator: the part can't be trusted
    headers = {"Range": f"bytes={have}-", "If-Range": validator} if have else {}
    try:
        with session.get(url, stream=True, timeout=(15, 60), headers=headers) as resp:
            if resp.status_code in (401, 403):
                raise DownloadError(f"{url}: HTTP {resp.status_code} (gated, private or missing repo); set "
                                    "HF_TOKEN to a Hub token that can read it and accept the model's terms")
            if resp.status_code == 404:
                raise NotOnHub(f"{url}: HTTP 404, file {filename!r} is not in {repo}")
            if resp.status_code == 416 and have:  # our .part is not a prefix the server can continue: start over
                part.unlink(missing_ok=True)
                tag_file.unlink(missing_ok=True)
                return download_file(session, repo, filename, out_dir)
            if resp.status_code not in (200, 206):
                raise DownloadError(f"{url}: HTTP {resp.status_code}; rerun to retry")
            if resp.status_code == 206:  # Content-Range: bytes START-END/TOTAL
                span, _, total = resp.headers.get("Content-Range", "").removeprefix("bytes ").partition("/")
                if span.split("-")[0] != str(have) or not total.isdigit():
                    raise DownloadError(f"{url}: bad Content-Range {resp.headers.get('Content-Range')!r} for "
                                        f"a resume at byte {have}; delete {part} and rerun")
                total, mode = int(total), "ab"
            else:  # 200: the whole file (a first try, or the file changed since the part was fetched)
                length = resp.headers.get("Content-Length", "-1")
                if not length.lstrip("-").isdigit():
                    raise DownloadError(f"{url}: Content-Length {length!r} is not a number; rerun to retry")
                total, have, mode = int(length), 0, "wb"
                tag_file.write_text(resp.headers.get("ETag") or resp.headers.get("Last-Modified") or "")
            sha256, chunked = sha256_of(resp), "chunked" in resp.headers.get("Transfer-Encoding", "")
            if total < 0 and sha256 is None and not chunked:
                raise DownloadError(f"{url}: the server sent neither a length nor a hash, so a body cut short "
                                    "could not be told from a whole one; refusing it")
            with open(part, mode) as f, tqdm(total=total if total >= 0 else None, initial=have, unit="B",
                                             unit_scale=True, unit_divisor=1024, desc=filename) as bar:
                for chunk in resp.iter_content(chunk_size=1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except requests.RequestException as e:  # connection reset, timeout, body cut short (IncompleteRead)
        raise DownloadError(f"{url}: network error ({e}); rerun the same command to resume {part}") from e
    size = part.stat().st_size
    if total >= 0 and size != total:
        raise DownloadError(f"{url}: got {size} of {total} bytes; rerun the same command to resume {part}")
    if sha256 is not None and file_sha256(part) != sha256:
        part.unlink()
        tag_file.unlink(missing_ok=True)
        raise DownloadError(f"{url}: the file's sha256 is not the {sha256} the Hub gives; deleted, rerun to "
                            "fetch it again")
    part.replace(dest)  # atomic on one filesystem: dest exists only when complete
    tag_file.unlink(missing_ok=True)
    return dest


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def download_weights(session: requests.Session, repo: str, out_dir: Path) -> list[Path]:
    """Sharded safetensors (index + shards), else one model.safetensors, else pytorch_model.bin."""
    layouts = ["model.safetensors.index.json", "model.safetensors", "pytorch_model.bin"]
    present = [name for name in layouts if (out_dir / name).exists()]  # reuse a finished layout, no probing
    for name in present[:1] + layouts:
        try:
            path = download_file(session, repo, name, out_dir)
        except NotOnHub:
            continue
        if not name.endswith(".index.json"):
            return [path]
        try:
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError, TypeError) as e:
            raise DownloadError(f"{path}: not a safetensors index with a 'weight_map' ({e}); delete it and "
                                "rerun") from e
        shards = [plain_file_name(shard, str(path)) for shard in shards]  # before any is fetched
        return [path] + [download_file(session, repo, shard, out_dir) for shard in shards]
    raise DownloadError(f"{repo}: no model.safetensors[.index.json] nor pytorch_model.bin on the Hub")


def repo_for(path: str, component: str) -> str:
    """The Hub repo whose snapshot a directory named like `path` should hold (weights/qwen2.5-7b ->
    Qwen/Qwen2.5-7B-Instruct); the paper's default for the component (clip, dino, qwen) otherwise."""
    base = os.path.basename(os.path.normpath(path)).lower()
    for name, (repo, _) in MODELS.items():
        if name in base or repo.lower().endswith("/" + base):
            return repo
    return MODELS[{"clip": "clip-l-336", "dino": "dinov2-l", "qwen": "qwen2.5-3b"}[component]][0]


def download_repo(repo: str, out_dir: str | Path, files: list[str] | None = None) -> Path:
    """Download `files` (default: config.json, and tokenizer.json when the repo has one) and the weights of
    Hub repo `repo` into out_dir, and return it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with new_session() as session:
        for filename in files or ["config.json"]:
            download_file(session, repo, filename, out_dir)
        if files is None:
            try:
                download_file(session, repo, "tokenizer.json", out_dir)
            except NotOnHub:
                pass
        download_weights(session, repo, out_dir)
    return out_dir


def download(name: str, out: str | Path = "weights") -> Path:
    """Download checkpoint `name` (a key of MODELS) into out/name and return that directory."""
    repo, files = MODELS[name]
    return download_repo(repo, Path(out) / name, files)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="+", metavar="NAME",
                        help=f"one or more of: {', '.join([*MODELS, *BUNDLES])}, or Hub repo ids (org/name)")
    parser.add_argument("--out", help="for NAMEs: the parent folder (default: weights/); for one repo id: the "
                                      "checkpoint's own folder (default: weights/<name>)")
    args = parser.parse_args(argv)
    repos = [n for n in args.names if "/" in n]
    unknown = [n for n in args.names if "/" not in n and n not in MODELS and n not in BUNDLES]
    if unknown:
        parser.error(f"unknown NAME {unknown[0]!r}: one of {', '.join([*MODELS, *BUNDLES])}, or a repo id org/name")
    if repos and args.out and len(args.names) > 1:
        parser.error("--out with a repo id names that checkpoint's folder: give one repo id per command")
    jobs = []
    for name in dict.fromkeys(n for given in args.names for n in BUNDLES.get(given, [given])):  # dedupe, in order
        if "/" in name:
            jobs.append((name, Path(args.out or Path("weights") / name.split("/")[-1].lower()), None))
        else:
            jobs.append((MODELS[name][0], Path(args.out or "weights") / name, MODELS[name][1]))
    for repo, out_dir, files in jobs:
        print(f"{repo} -> {out_dir}")
        try:
            download_repo(repo, out_dir, files)
        except DownloadError as e:
            sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
