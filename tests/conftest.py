"""Fixtures shared by the test files: one torch thread, and a tiny random shapes checkpoint on disk."""

import contextlib
import os
import threading

import pytest
import torch

import data
import shapes
from model import TinyGroundingGPT


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a busy 2-core machine two OpenMP threads stall each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_tiny_checkpoint(out: str, std: float | None = None) -> str:
    """A random tiny shapes model (towers frozen) saved as train.py exports it. `std` redraws the matrices
    wider than the default init (std 0.02 answers every prompt alike), so that answers depend on the input."""
    torch.manual_seed(0)
    model = shapes.new_model()
    if std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, std)
    model.save_pretrained(out, shapes.SHAPES_TOKENIZER)
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return save_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt")), std=0.1)


def load(ckpt: str):
    """An export and its tokenizer, as sample.py and eval.py load them."""
    return TinyGroundingGPT.from_pretrained(ckpt), data.Tokenizer.from_file(os.path.join(ckpt, "tokenizer.json"))


@contextlib.contextmanager
def serving(model, tok, name: str):
    """sample.py's OpenAI-compatible server on a free loopback port, in a thread; yields its base URL."""
    import sample

    httpd = sample.serve(model, tok, name, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)
