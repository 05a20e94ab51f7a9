"""Sampling with a KV cache (models/generation.py, tools/generate.py): the cached forward is
the model's forward, greedy decoding of an HF folder gives transformers' tokens, and sampling
is seeded."""

from __future__ import annotations

import pytest
import torch

from data.tokenizers import ByteTokenizer
from models import build_model
from models.generation import KVCache, forward_cached, generate
from models.hf import load_hf, save_hf
from models.llama import LlamaConfig
from tools.generate import main

PROMPT = "def main():\n    "
TOKENS = 24


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny GQA Llama with weights large enough that its next-token choices are clear."""
    cfg = LlamaConfig(initializer_range=0.2, rope_theta=10000.0)
    model = build_model(cfg, torch.float32).to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(3))
    folder = tmp_path_factory.mktemp("hf")
    save_hf(model, folder)
    return folder


def test_the_cached_forward_gives_the_full_forwards_logits(hf_folder):
    model = load_hf(hf_folder).eval()
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    full = model(input_ids=ids).logits
    cache = KVCache.empty(len(model.model.layers))
    parts = [forward_cached(model, ids[:, :6], cache)]  # the prompt, then token by token
    parts += [forward_cached(model, ids[:, t : t + 1], cache) for t in range(6, 11)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-4, rtol=1e-4)


def test_greedy_decoding_of_an_hf_folder_matches_transformers_generate(hf_folder, capsys):
    import transformers

    tok = ByteTokenizer()
    ids = tok.encode(PROMPT)
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_folder).eval()
    expected = hf.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=TOKENS,
        do_sample=False,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
    )[0, len(ids) :].tolist()
    ours = generate(load_hf(hf_folder).eval(), ids, TOKENS, eos_id=tok.eos_id)
    assert ours == expected
    assert len(set(ours)) > 3  # a real sequence, not one token repeated
    # The command line: the same tokens, as text after the prompt.
    text = main([str(hf_folder), "--prompt", PROMPT, "--max-new-tokens", str(TOKENS)])
    assert text == tok.decode([t for t in expected if t != tok.eos_id])
    assert capsys.readouterr().out == PROMPT + text + "\n"


def test_sampling_is_seeded_and_top_p_narrows_the_choice(hf_folder):
    model = load_hf(hf_folder).eval()
    ids = ByteTokenizer().encode(PROMPT)
    draw = [generate(model, ids, TOKENS, temperature=1.0, seed=s) for s in (1, 1, 2)]
    assert draw[0] == draw[1] and draw[0] != draw[2]
    # a nucleus this small holds only the most likely token: greedy, whatever the seed
    greedy = generate(model, ids, TOKENS)
    assert generate(model, ids, TOKENS, temperature=1.0, top_p=1e-6, seed=5) == greedy


def test_a_folder_that_is_no_model_is_an_error_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), "--prompt", "x"])
    assert exit_info.value.code == 2
    assert f"{tmp_path}: neither an HF folder" in capsys.readouterr().err
