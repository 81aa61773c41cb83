"""The model body on packed rows: per-sequence log-probs equal those of each sequence run alone."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import spin_kernels
from spin_fast import model as spin_model


@pytest.fixture(scope="module", params=[("llama", False), ("mistral", False), ("qwen2", True)],
                ids=["llama", "mistral", "qwen2-tied"])
def saved_model(request, tmp_path_factory):
    family, tied = request.param
    torch.manual_seed(0)
    config = spin_model.tiny_config(family, vocab_size=300, tie_word_embeddings=tied)
    path = tmp_path_factory.mktemp(family)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path, tied


def test_packed_logprobs_equal_unpacked(saved_model):
    path, tied = saved_model
    model = spin_model.load_causal_lm(path, dtype=torch.float32)
    weight, bias = spin_model.head(model)
    assert (weight is model.get_input_embeddings().weight) == tied
    lengths = [int(n) for n in torch.randint(3, 40, (4,))]
    sequences = [torch.randint(0, 300, (n,)) for n in lengths]
    packed_ids = torch.cat(sequences)
    positions = torch.cat([torch.arange(n) for n in lengths])
    # next-token targets inside each sequence; the last token of each sequence has none
    targets = torch.cat([torch.cat([s[1:], torch.tensor([-100])]) for s in sequences])

    with torch.no_grad():
        hidden = spin_model.packed_hidden_states(model, packed_ids, positions)
        packed = spin_kernels.linear_logprobs(hidden, weight, targets, bias=bias, backend="torch")
        start = 0
        for seq in sequences:
            logits = model(input_ids=seq[None]).logits[0].double()
            alone = logits.log_softmax(-1)[:-1].gather(1, seq[1:, None]).squeeze(1)
            got = packed[start : start + len(seq) - 1].double()
            assert torch.allclose(got, alone, rtol=1e-5, atol=1e-5), (got - alone).abs().max()
            start += len(seq)


def test_gradient_checkpointing_and_attention_choice(saved_model):
    path, _ = saved_model
    model = spin_model.load_causal_lm(path, gradient_checkpointing=True)
    assert model.is_gradient_checkpointing
    assert model.config._attn_implementation == "sdpa"
    assert spin_model.pick_attention(torch.device("cpu")) == "sdpa"
    assert spin_model.pick_attention(torch.device("cpu"), "eager") == "eager"
    with pytest.raises(ValueError, match="attention must be one of"):
        spin_model.pick_attention(torch.device("cpu"), "flash")


def test_refuses_heads_the_kernel_cannot_compute(tmp_path):
    config = spin_model.tiny_config("llama")
    config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        spin_model.check_head_is_plain(config, "gemma-like")
    config = spin_model.tiny_config("llama")
    config.auto_map = {"AutoModelForCausalLM": "modeling_custom.Custom"}
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        spin_model.load_causal_lm(tmp_path)
