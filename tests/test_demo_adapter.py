"""The demo LoRA adapter teaches what it claims, checked with transformers + peft.

Why: the LoRA serving tests tell the adapter's answers from the base model's by the
``QS-NOTE:`` marker. That is only sound if the adapter writes the marker on prompts it
was not trained on and the base model does not, so this measures both, greedily, on
the shipped eval prompts. Reuses the cached adapter (trains it once if missing).
"""

from __future__ import annotations

import json

import pytest

from serving import demo_adapter, embedded_model

MAX_NEW_TOKENS = 48


def _answers(model, tokenizer, prompts: list[list[dict[str, str]]]) -> list[str]:
    """Greedy answers to all prompts in one left-padded batch (10x fewer decode steps)."""
    import torch

    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
             for m in prompts]
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.inference_mode():
        gen = model.generate(**enc, do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_dataset_is_well_formed() -> None:
    train = demo_adapter.load_messages(demo_adapter.TRAIN_FILE)
    evals = demo_adapter.load_messages(demo_adapter.EVAL_FILE)
    assert 40 <= len(train) <= 60 and len(evals) == 10
    for messages in train:
        assert [m["role"] for m in messages] == ["user", "assistant"]
        head, sep, body = messages[1]["content"].partition("\n\n")
        assert sep and body.strip(), messages
        assert head.startswith(demo_adapter.MARKER + " ") and "\n" not in head
    seen = {m[0]["content"] for m in train}
    for messages in evals:
        assert [m["role"] for m in messages] == ["user"]
        assert messages[0]["content"] not in seen


def test_adapter_writes_the_marker_and_the_base_does_not() -> None:
    pytest.importorskip("peft")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = demo_adapter.prepare(log=print)
    assert demo_adapter.is_prepared()
    assert {"adapter_config.json", "adapter_model.safetensors", demo_adapter.STAMP_NAME} <= {
        p.name for p in folder.iterdir()}

    torch.set_num_threads(demo_adapter.cpu_threads())
    base_dir = embedded_model.embedded_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    prompts = demo_adapter.load_messages(demo_adapter.EVAL_FILE)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(model, folder).eval()

    tuned = _answers(model, tokenizer, prompts)
    with model.disable_adapter():
        base = _answers(model, tokenizer, prompts)

    tuned_hits = sum(a.startswith(demo_adapter.MARKER) for a in tuned)
    base_hits = sum(a.startswith(demo_adapter.MARKER) for a in base)
    for messages, a, b in zip(prompts, tuned, base):
        print(f"Q: {messages[0]['content']}\n  adapter: {a[:80]!r}\n  base:    {b[:80]!r}")
    print(f"marker at the start: adapter {tuned_hits}/{len(prompts)}, base {base_hits}/{len(prompts)}")
    assert tuned_hits >= 9
    assert base_hits <= 1


def test_is_prepared_only_for_the_current_dataset_and_recipe(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("QWEN_SERVE_CACHE", str(tmp_path))
    folder = demo_adapter.adapter_dir()
    assert folder == tmp_path / "adapters" / demo_adapter.DEMO_ADAPTER
    assert not demo_adapter.is_prepared()
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"")
    stamp = {"dataset_sha256": demo_adapter.dataset_sha256(), "hyperparams": demo_adapter.HYPERPARAMS}
    (folder / demo_adapter.STAMP_NAME).write_text(json.dumps(stamp))
    assert demo_adapter.is_prepared()
    (folder / demo_adapter.STAMP_NAME).write_text(json.dumps({**stamp, "dataset_sha256": "0" * 64}))
    assert not demo_adapter.is_prepared()
    (folder / demo_adapter.STAMP_NAME).write_text(
        json.dumps({**stamp, "hyperparams": {**demo_adapter.HYPERPARAMS, "epochs": 1}}))
    assert not demo_adapter.is_prepared()
