"""A Generator that fails on one prompt: for tests that a model fault costs only its own row."""

from __future__ import annotations


def fail_on_prompt(monkeypatch, generator, poisoned: list[int], message: str = "kernel fault") -> None:
    """Make `generator.generate` raise RuntimeError(message) for any call holding a request whose
    input ids are `poisoned`; other calls run as before."""
    real = generator.generate

    def flaky(requests):
        if any(r.input_ids == poisoned for r in requests):
            raise RuntimeError(message)
        return real(requests)

    monkeypatch.setattr(generator, "generate", flaky)
