"""Google Translate for the class-name builder: deep-translator's GoogleTranslator with batching,
a disk cache, backoff on "too many requests" and a deadline per request. Asked only for classes
no better source names, and only when the network allows:

    python -m imagenet_ddp.labels build --langs es --online
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

GOOGLE_URL = "https://translate.google.com/m"  # what deep-translator 1.11 calls
CACHE_DIR = Path.home() / ".cache" / "imagenet-ddp" / "translations"


def _with_deadline(fn, timeout: float):
    """fn() in a daemon thread; TimeoutError after `timeout` s (deep-translator sets none)."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller below
            box["error"] = e

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise TimeoutError(f"no answer from Google Translate within {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


@dataclass
class Google:
    """deep-translator's GoogleTranslator with batching, a disk cache, backoff and a deadline."""

    cache_dir: Path
    endpoint: str = GOOGLE_URL
    timeout: float = 10.0  # seconds per request
    retries: int = 5  # on "too many requests", waiting backoff, 2*backoff, 4*backoff, ...
    backoff: float = 2.0
    batch_chars: int = 1500  # names joined by newlines into one request
    requests: int = 0  # HTTP requests made, for reports and tests

    def _cache_file(self, lang: str) -> Path:
        return Path(self.cache_dir) / f"google.en-{lang}.json"

    def _request(self, text: str, lang: str) -> str:
        from deep_translator import GoogleTranslator
        from deep_translator.exceptions import TooManyRequests

        attempt = 0
        while True:
            translator = GoogleTranslator(source="en", target=lang)
            translator._base_url = self.endpoint  # no public setter; tests use a local server
            self.requests += 1
            try:
                return _with_deadline(lambda t=translator: t.translate(text), self.timeout) or ""
            except TooManyRequests:
                if attempt == self.retries:
                    raise
                time.sleep(self.backoff * 2**attempt)
                attempt += 1

    def cached(self, lang: str) -> dict[str, str]:
        path = self._cache_file(lang)
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def translate(self, texts: list[str], lang: str) -> dict[str, str]:
        """English text -> translation; cached texts make no request. Raises on network errors."""
        path, cached = self._cache_file(lang), self.cached(lang)
        todo = [t for t in dict.fromkeys(texts) if t not in cached]
        batches: list[list[str]] = []
        for text in todo:
            if batches and len("\n".join([*batches[-1], text])) <= self.batch_chars:
                batches[-1].append(text)
            else:
                batches.append([text])
        for batch in batches:
            got = self._request("\n".join(batch), lang).split("\n")
            if len(got) != len(batch):  # the service merged or split lines: one at a time
                got = [self._request(text, lang) for text in batch]
            cached.update((t, g.strip()) for t, g in zip(batch, got, strict=True) if g.strip())
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(cached, ensure_ascii=False, indent=0), encoding="utf-8")
            tmp.replace(path)
        return {t: cached[t] for t in texts if t in cached}
