"""Build local CLIP models with random weights, for tests and benchmarks (no download needed)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

# LAION CLIP-ViT-H-14's preprocessor_config.json, which PickScore_v1 is used with.
LAION_PREPROCESSOR_CONFIG: dict = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 224,
}

# PickScore_v1's architecture (CLIP ViT-H/14): same compute as the real model.
PICKSCORE_ARCH: dict = {
    "vision": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, intermediate_size=5120,
                   patch_size=14, image_size=224),
    "text": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                 max_position_embeddings=77, vocab_size=49408),
    "projection_dim": 1024,
}

# A tiny model: a few layers, seconds to build, same code path as the real one.
TINY_ARCH: dict = {
    "vision": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                   patch_size=32, image_size=224),
    "text": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=77, vocab_size=None),
    "projection_dim": 32,
}

_CORPUS = (
    "a photo of a red cat sitting on a blue sofa in the sun . a painting of a mountain lake at sunset with "
    "green trees and a small boat . an astronaut riding a horse on the moon , digital art , highly detailed . "
    "a bowl of fruit with apples oranges and bananas on a wooden table . a city street at night with neon "
    "lights and rain , cinematic . portrait of an old man with a white beard , oil painting . a yellow "
    "circle , a square , a triangle , the sky , the sea , a house , a dog , a bird , a flower garden"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_clip_tokenizer(folder: Path, n_merges: int = 300) -> int:
    """Write a CLIP-style BPE tokenizer (vocab.json, merges.txt, configs) learned on a tiny corpus; return vocab size."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab: list[str] = chars + [c + "</w>" for c in chars]
    words = Counter(_CORPUS.split())
    # Each word as a symbol tuple with CLIP's end-of-word marker on the last symbol.
    splits = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in words}
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: Counter = Counter()
        for w, syms in splits.items():
            for a, b in zip(syms, syms[1:]):
                pairs[(a, b)] += words[w]
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        vocab.append(best[0] + best[1])
        for w, syms in splits.items():
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    out.append(syms[i] + syms[i + 1])
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            splits[w] = tuple(out)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "!", "model_max_length": 77,
    }))
    from transformers import AutoTokenizer

    # Round-trip through transformers so that its own files (tokenizer.json) are written too.
    AutoTokenizer.from_pretrained(str(folder)).save_pretrained(str(folder))
    return len(vocab)


def build_model(folder: str | Path, arch: dict | None = None, seed: int = 0) -> Path:
    """Save a CLIPModel with random weights (fixed seed), a tokenizer and the LAION preprocessor config to folder."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    folder = Path(folder)
    arch = arch or TINY_ARCH
    vocab_size = write_clip_tokenizer(folder)
    text = dict(arch["text"])
    if text.get("vocab_size") is None:
        text["vocab_size"] = vocab_size
    # Real CLIP: <|startoftext|> and <|endoftext|> are the last two ids; pad is "!" (id 0).
    text.update(bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=0)
    config = CLIPConfig(text_config=text, vision_config=dict(arch["vision"]),
                        projection_dim=arch["projection_dim"])
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    with torch.no_grad():
        # Spread the random weights a little more so that scores differ visibly between images.
        model.logit_scale.fill_(4.6052)  # exp(4.6052) = 100, PickScore's scale
    model.save_pretrained(str(folder), safe_serialization=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(LAION_PREPROCESSOR_CONFIG, indent=2))
    return folder


ARCHS: dict[str, dict] = {"tiny": TINY_ARCH, "pickscore": PICKSCORE_ARCH}

HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the commit LocalHub says every file is at


class LocalHub:
    """A stand-in for the Hugging Face hub on 127.0.0.1, for tests and benchmarks that cannot reach the real one:
    every repo id is `folder`, served as the hub serves a model without Xet storage (HEAD and GET on
    /<repo>/resolve/<revision>/<file>, with the ETag, size and commit headers huggingface_hub reads). Point
    HF_ENDPOINT at `url`; `asked` lists the requests ("GET /org/repo/resolve/main/file")."""

    def __init__(self, folder: str | Path) -> None:
        self.folder, self.asked = Path(folder), []  # type: list[str]
        self.etags: dict[str, str] = {}

    def __enter__(self) -> "LocalHub":
        import http.server
        import threading

        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
                hub.answer(self, body=False)

            def do_GET(self) -> None:  # noqa: N802
                hub.answer(self, body=True)

            def log_message(self, *args: object) -> None:
                """Quiet."""

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, name="local-hub", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def etag(self, path: Path) -> str:
        """The file's SHA-256, as the hub's ETag for an LFS file; hashed once (the hub answers at once: a
        benchmark calls this for the big files before its clock starts)."""
        import hashlib

        key = str(path.resolve())
        if key not in self.etags:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    digest.update(block)
            self.etags[key] = digest.hexdigest()
        return self.etags[key]

    def answer(self, request: Any, body: bool) -> None:
        """One request: the file's headers (and bytes, streamed), or 404 for a file the folder lacks."""
        self.asked.append(f"{request.command} {request.path}")
        parts = request.path.split("?")[0].strip("/").split("/")
        path = self.folder / "/".join(parts[4:]) if len(parts) >= 5 and parts[2] == "resolve" else None
        if path is None or not path.is_file():
            request.send_response(404)
            request.send_header("X-Error-Code", "EntryNotFound")
            request.send_header("Content-Length", "0")
            request.end_headers()
            return
        request.send_response(200)
        request.send_header("Content-Length", str(path.stat().st_size))
        request.send_header("ETag", f'"{self.etag(path)}"')
        request.send_header("X-Repo-Commit", HUB_COMMIT)
        request.end_headers()
        if body:
            try:
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        request.wfile.write(block)
            except (BrokenPipeError, ConnectionResetError):  # the client stopped reading: its own business
                pass


def run_in_pty(argv: list[str], env: dict[str, str], cwd: str | Path, cols: int = 100, timeout: float = 180,
               typed: str | None = None, stamps: list | None = None) -> tuple[int, str]:
    """Run `argv` in a pseudo-terminal `cols` wide, as a person at a terminal would (stdout and stderr both the
    terminal; with `typed`, stdin too, and `typed` is what they type): (exit code, everything it wrote, escapes
    included). `stamps` gets (seconds since the start, text) for each piece of output as it came. POSIX only."""
    import fcntl
    import os
    import pty
    import select
    import struct
    import subprocess
    import termios
    import time

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, cols, 0, 0))
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL if typed is None else slave, stdout=slave, stderr=slave,
                            env={**env, "COLUMNS": str(cols)}, cwd=cwd, close_fds=True)
    os.close(slave)
    if typed is not None:
        os.write(master, typed.encode())
    out = b""
    try:
        while select.select([master], [], [], timeout)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
            if stamps is not None:
                stamps.append((time.monotonic() - start, chunk.decode("utf-8", "replace")))
        else:
            raise TimeoutError(f"no output for {timeout} s: {out[-500:]!r}")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        os.close(master)
    return proc.returncode, out.decode("utf-8", "replace")


def main(argv: list[str] | None = None) -> int:
    """`python -m pickrank.devtools FOLDER [tiny|pickscore] [--seed N]`: build a random CLIP model in FOLDER."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m pickrank.devtools",
        description="Build a local CLIP model with random weights (a tokenizer, the LAION preprocessor config, "
                    "safetensors weights), for tests, benchmarks and demos; no download. Its scores mean nothing.")
    parser.add_argument("folder", help="where to write the model (made if missing)")
    parser.add_argument("arch", nargs="?", choices=sorted(ARCHS), default="tiny",
                        help="tiny: a few layers, seconds to build (default); pickscore: PickScore_v1's "
                             "architecture (ViT-H/14, about 4 GB, same compute as the real model)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    args = parser.parse_args(argv)
    print(build_model(args.folder, ARCHS[args.arch], seed=args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
