"""`compress generate --chat`: the prompt goes in as a user message through the tokenizer's chat template (an
instruct model's), and the reply alone is printed; a tokenizer without a template, or a template that fails, is a
one-line mistake before the model loads."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import compress
from compress import models
from compress.cli import main

# ChatML, as Qwen's instruct tokenizers have it (the builtin models' tokenizers have no template)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def instruct_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "instruct"
    tokenizer = compress.load_tokenizer("builtin:tiny")
    tokenizer.chat_template = CHATML
    compress.load("builtin:tiny").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_chat_sends_the_templated_prompt_and_prints_the_reply_alone(instruct_folder):
    result = run("generate", instruct_folder, "--chat", "--prompt", "What is a module?", "--max-new-tokens", 12)
    assert result.exit_code == 0, result.output
    tokenizer = compress.load_tokenizer(instruct_folder)
    rendered = "<|im_start|>user\nWhat is a module?<|im_end|>\n<|im_start|>assistant\n"  # CHATML's, by hand
    ids = tokenizer(rendered, return_tensors="pt").input_ids
    model = compress.load(instruct_folder)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    reply = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert result.stdout.rstrip("\n") == reply
    # without --chat the same words are continued as plain text: another prompt, another output, prompt included
    plain = run("generate", instruct_folder, "--prompt", "What is a module?", "--max-new-tokens", 12)
    assert plain.exit_code == 0 and plain.stdout.startswith("What is a module?")
    assert not result.stdout.startswith("What is a module?")


def _no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load", refuse)


def test_chat_without_a_template_is_one_line_before_loading(monkeypatch):
    _no_loading(monkeypatch)
    result = run("generate", "builtin:tiny", "--chat", "--prompt", "Hi")
    assert result.exit_code == 2
    assert result.output.strip() == ("error: --chat: the tokenizer of builtin:tiny has no chat template (a base "
                                     "model, or a tokenizer_config.json without `chat_template`); leave --chat out "
                                     "to continue the text")


def test_a_failing_chat_template_is_one_line_before_loading(tmp_path, monkeypatch):
    tokenizer = compress.load_tokenizer("builtin:tiny")
    tokenizer.chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    tokenizer.save_pretrained(tmp_path)
    compress.load("builtin:tiny").save_pretrained(tmp_path)
    _no_loading(monkeypatch)
    result = run("generate", tmp_path, "--chat", "--prompt", "Hi")
    assert result.exit_code == 2
    assert "--chat: the chat template of" in result.output and "roles must alternate" in result.output
    assert len(result.output.strip().splitlines()) == 1

