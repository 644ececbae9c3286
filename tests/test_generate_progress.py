"""`compress generate` shows progress once generating takes a while: the prompt's forward, then the new tokens
(a 32k prompt read for 27 s and 64 tokens decoded for minutes said nothing until the text came out)."""
from __future__ import annotations

import time

import torch

import compress
from compress.progress import GenerationProgress


def test_prompt_then_tokens_are_shown_once_slow_and_nothing_when_quick(capsys):
    model = compress.load("builtin:tiny", dtype="float32")
    ids = torch.randint(100, 8000, (1, 40), generator=torch.Generator().manual_seed(0))

    def generate(progress):
        with torch.no_grad():
            model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, streamer=progress, pad_token_id=0)
        progress.end()
        return capsys.readouterr().err

    assert generate(GenerationProgress(40, 6)) == ""  # quick: nothing

    def slow_prefill(module, args, kwargs, output):  # the prompt's forward (40 tokens) takes a second
        if kwargs.get("input_ids") is not None and kwargs["input_ids"].shape[1] > 1:
            time.sleep(1.0)

    hook = model.model.register_forward_hook(slow_prefill, with_kwargs=True)
    try:
        err = generate(GenerationProgress(40, 6, after=0.05))
    finally:
        hook.remove()
    assert "reading the 40-token prompt ..." in err and "reading the 40-token prompt: done" in err
    assert "generating 6 tokens: 6/6" in err


def test_the_cli_prints_the_text_alone_on_stdout(tmp_path):
    from click.testing import CliRunner

    from compress.cli import main

    result = CliRunner().invoke(main, ["generate", "builtin:tiny", "--prompt", "The", "--max-new-tokens", "4"])
    assert result.exit_code == 0 and result.stdout.startswith("The") and result.stderr == ""


def test_a_prompt_read_that_fails_says_stopped(capsys):
    model = compress.load("builtin:tiny", dtype="float32")

    def fail(module, args, kwargs, output):
        time.sleep(0.5)
        raise RuntimeError("out of memory")

    hook = model.model.register_forward_hook(fail, with_kwargs=True)
    progress = GenerationProgress(12, 4, after=0.05)
    try:
        with torch.no_grad():
            model.generate(torch.ones(1, 12, dtype=torch.long), max_new_tokens=4, streamer=progress, pad_token_id=0)
    except RuntimeError as exc:
        progress.end(exc)
    finally:
        hook.remove()
    progress.end()  # (twice: harmless)
    err = capsys.readouterr().err
    assert "reading the 12-token prompt: stopped" in err and "done" not in err
