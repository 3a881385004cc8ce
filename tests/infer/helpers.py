"""Helpers for the inference tests."""

from __future__ import annotations

import socket
import threading
import time

import torch

from leanmoe import Transformer
from tests.util import micro_config

VOCAB = 320
KEY = "test-key"  # the `server` fixture's api key and model name
MODEL = "micro"


def make_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    cfg = micro_config(vocab_size=VOCAB, max_position_embeddings=256, **overrides)
    return Transformer(cfg).eval()


def pattern(n: int, start: int) -> list[int]:
    """A deterministic token walk: each token is a fixed function of the previous one."""
    out = [start]
    for _ in range(n - 1):
        out.append(10 + (out[-1] * 7 + 3) % 61)
    return out


def greedy_reference(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """The definition of greedy decoding: argmax of a full-sequence forward, token by token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def random_prompts(lengths, seed=0, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(7, vocab, (n,), generator=g).tolist() for n in lengths]


def make_drafting_model(seed: int = 2, eps: float = 0.3) -> Transformer:
    """A model whose MTP module drafts well without training: every block's writes into the
    residual stream (o_proj, down_proj) are scaled by `eps`, so the main model is close to a bigram
    model logits(t+1) ~ head(norm(emb(t+1))), and the MTP module's eh_proj passes the embedding of
    t+1 through, so its draft is close to the same bigram prediction. `eps` sets how often the two
    disagree (drafts rejected)."""
    model = make_model(seed)
    d = model.config.hidden_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
                p.mul_(eps)
        for layer in model.mtp_layers:
            w = torch.zeros(d, 2 * d)
            w[:, :d] = torch.eye(d)
            layer.eh_proj.weight.copy_(w + 0.05 * torch.randn(d, 2 * d))
    return model


class ServerThread:
    """Run an app with uvicorn on a background thread:

        with ServerThread(app) as srv:  # a free loopback port
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x")

    The socket is bound here and handed to uvicorn, so no other process can take the port between
    choosing it and serving on it."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.host = host
        # IPPROTO_TCP named, not 0: asyncio turns Nagle off (TCP_NODELAY) only on accepted sockets
        # whose proto says TCP, and with Nagle on each keep-alive answer waits ~40 ms for a delayed ACK
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> ServerThread:
        from leanmoe.infer.server import freeze_startup_heap

        freeze_startup_heap()  # as `serve` does; conftest unfreezes at the end of the session
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def assert_openai_error(r, status: int, param: str | None = None) -> dict:
    """`r` (an httpx.Response) is `status` with OpenAI's error body; returns the error object."""
    assert r.status_code == status, r.text[:500]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"], err
    if param is not None:
        assert err["param"] == param, err
    return err


def health_latencies_while(url: str, work, min_polls: int = 10) -> tuple[list[float], object]:
    """Run `work()` on a thread while polling `url` + "/health" until it is done: (the latency
    of each poll in seconds, work's result)."""
    import httpx

    result: list = []
    thread = threading.Thread(target=lambda: result.append(work()))
    latencies = []
    with httpx.Client(timeout=30) as c:
        assert c.get(url + "/health").status_code == 200  # connect before the clock starts
        thread.start()
        while thread.is_alive() or len(latencies) < min_polls:
            t0 = time.perf_counter()
            assert c.get(url + "/health").status_code == 200
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.01)
    thread.join()
    return latencies, result[0] if result else None
