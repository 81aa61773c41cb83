"""The model body on packed rows: per-sequence log-probs equal those of each sequence run alone."""

import copy
import sys
import types

import pytest
import torch
from transformers import AutoModelForCausalLM

import spin_kernels
from helpers import assert_close, truth_token_logprobs
from spin_fast import attention
from spin_fast import model as spin_model
from spin_fast.config import TrainConfig
from spin_fast.packing import Sequence, pack_groups


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
    model = spin_model.load_causal_lm(path, dtype=torch.float64)  # rounding far below the bound: a packing error shows
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
            assert torch.allclose(got, alone, rtol=1e-10, atol=1e-10), (got - alone).abs().max()
            start += len(seq)


def test_gradient_checkpointing_and_attention_choice(saved_model):
    path, _ = saved_model
    model = spin_model.load_causal_lm(path, gradient_checkpointing=True)
    assert model.is_gradient_checkpointing
    assert not model.training  # as from_pretrained gives it: the logits check run on loading turns no dropout on
    assert model.config._attn_implementation == "spin_varlen"
    assert spin_model.pick_attention() == "spin_varlen"
    assert spin_model.pick_attention("eager") == "eager"
    with pytest.raises(ValueError, match="attention must be one of"):
        spin_model.pick_attention("flash")


@pytest.mark.parametrize("family, field, value", [("Gemma2", "final_logit_softcapping", 0.02),
                                                  ("Granite", "logits_scaling", 8.0),
                                                  ("Cohere", "logit_scale", 0.0625),
                                                  ("InklingText", "logits_mup_width_multiplier", 24.0)])
def test_refuses_heads_the_kernel_cannot_compute(tmp_path, family, field, value):
    """A model whose forward soft-caps or rescales its logits is refused as it loads, and also where a model
    loaded elsewhere reaches the fused head (scoring, training): its log-probs would be silently wrong."""
    import transformers

    from spin_fast.packing import Sequence
    from spin_fast.scoring import model_logprobs

    sizes = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=2)
    config = getattr(transformers, f"{family}Config")(**sizes, **{field: value})
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # the head alone would give other log-probs than the model's own
        ids = torch.arange(3, 10)[None]
        hidden = model(ids, output_hidden_states=True).hidden_states[-1]
        assert not torch.allclose(model(ids).logits, model.get_output_embeddings()(hidden), atol=1e-3)
    message = rf"{field}={value}: the model soft-caps or rescales its logits"
    with pytest.raises(ValueError, match=message):
        model_logprobs(model, [[Sequence((3, 4, 5), (6, 7, 2))]], 64)
    model.save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'model'}: {message}"):
        spin_model.load_causal_lm(tmp_path / "model")
    setattr(config, field, None if field == "final_logit_softcapping" else 1.0)  # the plain head: accepted
    model_logprobs(AutoModelForCausalLM.from_config(config), [[Sequence((3, 4, 5), (6, 7, 2))]], 64)


@pytest.mark.parametrize("name, text_type", [("Gemma3Config", "gemma3_text"), ("PaliGemmaConfig", "gemma2")])
def test_a_multimodal_models_soft_capped_text_head_is_refused_by_its_config(name, text_type):
    """A VLM keeps its logit transform in text_config, not at the top level, and a ZeRO-3 model gets the config
    check alone (check_logits_are_the_heads): reading the top level only would train it on wrong log-probs."""
    import transformers

    text = dict(model_type=text_type, vocab_size=300, hidden_size=32, num_hidden_layers=1)
    config = getattr(transformers, name)(text_config={**text, "final_logit_softcapping": 30.0})
    assert getattr(config, "final_logit_softcapping", None) is None  # the top level names none
    with pytest.raises(ValueError, match=r"^vlm: final_logit_softcapping=30.0: the model soft-caps"):
        spin_model.check_head_is_plain(config, "vlm")
    spin_model.check_head_is_plain(getattr(transformers, name)(text_config={**text, "final_logit_softcapping": None}),
                                   "vlm")


def test_a_model_whose_logits_are_more_than_its_head_is_refused_by_running_it(tmp_path):
    """A transform no config field in LOGIT_TRANSFORMS names (Inkling's cut vocabulary: 280 of the head's 300 rows
    are logits) shows when the model's logits are compared with its head's: refused as it loads, and by Trainer."""
    import transformers

    from spin_fast.training import Trainer

    config = transformers.InklingTextConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=2, unpadded_vocab_size=280,
                                            logits_mup_width_multiplier=1.0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    message = r"the model's logits are not its LM head's output on its last hidden states \(shape \(1, 4, 280\)\)"
    # SDPA: Inkling's layers pass spin_varlen attention no positions.
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'model'}: {message}"):
        spin_model.load_causal_lm(tmp_path / "model", attention_impl="sdpa")
    with pytest.raises(ValueError, match=message):
        Trainer(AutoModelForCausalLM.from_config(config), None, TrainConfig(mode="sft"), tmp_path / "out", [])
    config.unpadded_vocab_size = None  # every row of the head a logit: accepted
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "plain")
    spin_model.load_causal_lm(tmp_path / "plain", attention_impl="sdpa")


def test_a_small_unknown_rescaling_of_the_logits_is_refused():
    """Logits 1% off the head's (a rescaling no config field names) are refused: 1% changes every log-prob."""
    model = AutoModelForCausalLM.from_config(spin_model.tiny_config("llama"))
    spin_model.check_logits_are_the_heads(model, "m")  # plain: accepted

    def rescaled(module, args, kwargs, output):
        output.logits = output.logits * 1.01
        return output

    model.register_forward_hook(rescaled, with_kwargs=True)
    with pytest.raises(ValueError, match=r"^m: the model's logits are not its LM head's output .*\(up to .* apart\)"):
        spin_model.check_logits_are_the_heads(model, "m")


def test_refuses_a_model_with_code_of_its_own_without_trust_remote_code(tmp_path):
    config = spin_model.tiny_config("llama")
    config.auto_map = {"AutoModelForCausalLM": "modeling_custom.Custom"}
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        spin_model.load_causal_lm(tmp_path)


def checked(kernel):
    """The kernel, asserting the call has varlen_attn's layout: [T, H, D] tensors, shared int32 boundaries."""

    def call(q, k, v, cu_q, cu_k, max_q, max_k, **options):
        assert q.dim() == 3 and q.shape[1] in (k.shape[1], 2 * k.shape[1]) and torch.equal(cu_q, cu_k)
        assert cu_q.dtype == torch.int32 and max_q == max_k == int((cu_q[1:] - cu_q[:-1]).max())
        if "host_bounds" in options:  # the boundaries read once a forward are the row's
            assert options["host_bounds"]() == cu_q.tolist()
        return kernel(q, k, v, cu_q, cu_k, max_q, max_k, **options)

    call.takes_host_bounds = getattr(kernel, "takes_host_bounds", False)  # as the kernel takes them or not
    return call


def torch_2_10_varlen(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):
    """torch 2.10's varlen_attn call: is_causal, no window, no scale (1/sqrt(head_dim)), one key/value head per
    query head."""
    assert is_causal and q.shape[1] == k.shape[1]
    return attention.per_sequence_sdpa(q, k, v, cu_q, cu_k, max_q, max_k)


def torch_2_11_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
    """torch 2.11's: window_size, but still one key/value head per query head."""
    assert window_size[1] == 0 and q.shape[1] == k.shape[1]
    return attention.per_sequence_sdpa(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=window_size)


@pytest.mark.parametrize("family,kv_heads,window", [("llama", 4, None), ("llama", 2, None), ("mistral", 4, 6)],
                         ids=["mha", "gqa", "sliding-window"])
@pytest.mark.parametrize("pass_cu_seqlens", [True, False])
@pytest.mark.parametrize("kernel", [attention.per_sequence_sdpa, torch_2_11_varlen, torch_2_10_varlen],
                         ids=["newest-call", "torch-2.11-call", "torch-2.10-call"])
def test_spin_varlen_attention_equals_block_diagonal_sdpa(monkeypatch, family, kv_heads, window, pass_cu_seqlens,
                                                          kernel):
    """spin_varlen (per-sequence SDPA on the CPU; PyTorch's varlen kernel, same call, on CUDA) gives the packed
    hidden states of plain SDPA with its block-diagonal mask, boundaries given or derived from the positions, also
    through the calls of older torch releases' varlen_attn (which adapt_varlen makes up for)."""
    monkeypatch.setattr(attention, "varlen_kernel", lambda *unused: checked(attention.adapt_varlen(kernel)))
    attention.register()
    config = spin_model.tiny_config(family, vocab_size=300, hidden_size=128, heads=4)
    config.num_key_value_heads = kv_heads
    if family == "mistral":
        config.sliding_window = window  # shorter than the longest sequences: the window must cut them
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    lengths = [5, 11, 1, 8]
    ids = torch.randint(0, 300, (sum(lengths),))
    positions = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.tensor([0, 5, 16, 17, 25], dtype=torch.int32)
    with torch.no_grad():
        expected = spin_model.packed_hidden_states(model, ids, positions)
        model.set_attn_implementation(attention.NAME)
        extra = (cu, max(lengths)) if pass_cu_seqlens else ()
        got = spin_model.packed_hidden_states(model, ids, positions, *extra)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    derived_cu, derived_max = attention.cu_seqlens_from_positions(positions)
    assert torch.equal(derived_cu, cu) and derived_max == max(lengths)


def test_torch_2_10_varlen_takes_no_scale_and_other_scales_run_per_sequence():
    """torch 2.10's varlen_attn has no scale argument (always 1/sqrt(head_dim)): the default scale goes to its kernel
    without the argument, another one runs per-sequence SDPA."""
    calls = []

    def kernel(*args, **options):
        calls.append(options)
        return torch_2_10_varlen(*args, **options)

    q, k, v = (torch.randn(9, 2, 16, dtype=torch.float64) for _ in range(3))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    call = attention.adapt_varlen(kernel)
    for scale in (None, 16**-0.5, 0.3):
        got = call(q, k, v, cu, cu, 5, 5, scale=scale)
        assert torch.allclose(got, attention.per_sequence_sdpa(q, k, v, cu, cu, 5, 5, scale=scale)), scale
    assert calls == [{"is_causal": True}, {"is_causal": True}]  # 0.3 never reached the kernel


def test_under_bf16_autocast_attention_takes_queries_keys_and_values_in_bf16():
    """Rotary embeddings under autocast give fp32 queries and keys beside bf16 values: the varlen kernel, which is
    FlashAttention on CUDA in fp16/bf16 only, must get all three in bf16 (the hidden states are unchanged)."""
    seen = []

    def recording(device, dtype, head_dim):
        def call(q, k, v, *args, **options):
            seen.append((dtype, q.dtype, k.dtype, v.dtype))
            return attention.per_sequence_sdpa(q, k, v, *args, **options)

        return call

    attention.register()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(spin_model.tiny_config("llama", vocab_size=300),
                                             attn_implementation=attention.NAME).eval()
    batch = next(iter(pack_groups([[Sequence([1, 2, 3], [4, 5])], [Sequence([6, 7], [8, 9, 10])]], 64)))
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention, "varlen_kernel", recording)
        spin_model.micro_batch_hidden_states(model, batch, bf16_autocast=True)
    assert seen and all(dtypes == (torch.bfloat16,) * 4 for dtypes in seen), seen


def flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                      softmax_scale=None, causal=False, window_size=(-1, -1), **unused):
    """flash_attn.flash_attn_varlen_func's documented contract, written plainly: grouped key/value heads taken as
    they are, window_size (left, right) in tokens, -1 for unlimited."""
    assert causal and window_size[1] in (0, -1) and not dropout_p
    out = torch.empty_like(q)
    bounds = cu_seqlens_q.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        i = torch.arange(end - start)
        visible = i[:, None] >= i[None, :]
        if window_size[0] >= 0:
            visible &= i[:, None] - i[None, :] <= window_size[0]
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        out[start:end] = torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=visible, scale=softmax_scale, enable_gqa=q.shape[1] != k.shape[1]).transpose(0, 1)
    return out


def flash_attn_2_2_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                          softmax_scale=None, causal=False, return_attn_probs=False):
    """flash_attn before 2.3: no window_size argument."""
    return flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                             softmax_scale, causal)


KERNELS = {"newest-call": lambda: attention.per_sequence_sdpa, "flash-attn": lambda: attention.adapt_flash_attn(
    flash_attn_varlen), "flash-attn-2.2": lambda: attention.adapt_flash_attn(flash_attn_2_2_varlen),
           "torch-2.10-call": lambda: attention.adapt_varlen(torch_2_10_varlen)}


@pytest.mark.parametrize("family,kv_heads,window", [("llama", 4, None), ("llama", 2, None), ("mistral", 2, 6)],
                         ids=["mha", "gqa", "sliding-window"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_shared_prompts_equal_each_sequence_alone(monkeypatch, family, kv_heads, window, kernel):
    """Pairs whose prompt is held once in the row (packing's share_prompts): every row's hidden state, and every
    parameter's gradient, equal those of each sequence run alone (float64; the row keeps a shared prompt's states
    from the pair's first sequence, which are the second's too)."""
    monkeypatch.setattr(attention, "varlen_kernel", lambda *unused: checked(KERNELS[kernel]()))
    attention.register()
    config = spin_model.tiny_config(family, vocab_size=300, hidden_size=128, heads=4)
    config.num_key_value_heads = kv_heads
    if family == "mistral":
        config.sliding_window = window  # shorter than most sequences: the window must cut them
    alone_model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float64)
    shared_model = copy.deepcopy(alone_model)
    shared_model.set_attn_implementation(attention.NAME)

    def ids(n):
        return tuple(torch.randint(0, 300, (n,)).tolist())

    groups = [[Sequence(prompt, ids(r1)), Sequence(prompt, ids(r2))]
              for prompt, r1, r2 in ((ids(4), 7, 2), (ids(9), 1, 12), (ids(1), 5, 5))]
    (batch,) = pack_groups(groups, 10_000, share_prompts=True)
    assert batch.n_tokens == 14 + 32 and batch.expand_index is not None
    hidden = spin_model.micro_batch_hidden_states(shared_model, batch)
    whole = [torch.tensor(s.prompt_ids + s.response_ids) for group in groups for s in group]  # the layout's order
    alone = torch.cat([spin_model.body(alone_model)(input_ids=seq[None], use_cache=False).last_hidden_state[0]
                       for seq in whole])
    expected = alone[batch.collapse_index]  # row token r belongs to the whole sequence at collapse_index[r]
    upstream = torch.randn_like(hidden)
    (hidden * upstream).sum().backward()
    (expected * upstream).sum().backward()
    assert torch.allclose(hidden, expected, atol=1e-10), (hidden - expected).abs().max()
    # The forward is the same arithmetic; the backward sums a shared prompt's two gradients before its RMSNorms,
    # which transformers computes in float32 whatever the dtype: float32 rounding, not float64's.
    for (name, p), q in zip(shared_model.named_parameters(), alone_model.parameters()):
        if q.grad is not None:
            assert_close(p.grad, q.grad, torch.float32, name)


def windowed_attention_by_hand(q, k, v, bounds, window):
    """Causal attention over each sequence's last `window` tokens (the query's own included), one query at a time."""
    out = torch.empty_like(q)
    for start, end in zip(bounds[:-1], bounds[1:]):
        for i in range(start, end):
            keys = slice(max(start, i - window + 1), i + 1)
            weights = torch.einsum("hd,khd->hk", q[i], k[keys]).mul(q.shape[-1] ** -0.5).softmax(-1)
            out[i] = torch.einsum("hk,khd->hd", weights, v[keys])
    return out


@pytest.mark.parametrize("kernel", [attention.per_sequence_sdpa, attention.adapt_flash_attn(flash_attn_2_2_varlen)],
                         ids=["per-sequence-sdpa", "flash-attn-2.2"])
@pytest.mark.parametrize("window", [1, 6])
def test_a_sliding_window_cuts_sequences_one_token_longer_than_it(kernel, window):
    """A sequence of window + 1 tokens is the shortest the window cuts: its last token must not see its first."""
    torch.manual_seed(0)
    lengths = [window + 1, window, window + 2, 1]
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0)], dtype=torch.int32)
    q, k, v = (torch.randn(sum(lengths), 2, 8, dtype=torch.float64) for _ in range(3))
    got = kernel(q, k, v, bounds, bounds, max(lengths), max(lengths), window_size=(window - 1, 0))
    expected = windowed_attention_by_hand(q, k, v, bounds.tolist(), window)
    assert torch.allclose(got, expected, atol=1e-12), (got - expected).abs().max()


FAMILY_SIZES = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=2)


def response_logprob_alone(model, sequence: Sequence) -> float:
    """A sequence's summed response log-prob from the model run on it alone, unpacked."""
    ids = torch.tensor(sequence.prompt_ids + sequence.response_ids)[None]
    with torch.no_grad():
        logps = model(ids).logits[0].double().log_softmax(-1)
    n = len(sequence.prompt_ids)
    return float(logps[n - 1:-1].gather(1, ids[0, n:, None]).sum())


def test_a_row_whose_positions_do_not_start_at_0_is_refused_not_split_wrongly():
    """Positions 5, 6, 7, 0, 1 (a sequence continued from elsewhere, then one of its own): boundaries read from them
    would put the first three tokens in the next sequence's, so the row is refused."""
    with pytest.raises(ValueError, match="positions do not restart at 0 for each sequence"):
        attention.cu_seqlens_from_positions(torch.tensor([5, 6, 7, 0, 1]))


@pytest.mark.parametrize("family", ["StableLm", "Nemotron"])
def test_shared_prompts_are_refused_where_layers_do_not_pass_the_row_layout(family):
    """StableLM's and Nemotron's layers call their attention without the row's layout (cu_seq_lens_q, the shared
    prompt's indices): the boundaries read from the positions would let a second response attend to the first
    (scoring shares prompts whenever it can), so such a row is refused, while unshared rows come out right."""
    import transformers

    from spin_fast.scoring import model_logprobs

    attention.register()
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(**FAMILY_SIZES)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float64, attn_implementation="sdpa").eval()
    group = [Sequence((5, 6, 7, 8), (9, 10, 11, 2)), Sequence((5, 6, 7, 8), (12, 13, 2))]
    alone = torch.tensor([response_logprob_alone(model, s) for s in group], dtype=torch.float64)
    model.set_attn_implementation(attention.NAME)
    with pytest.raises(ValueError, match="positions do not restart at 0 for each sequence.*sdpa"):
        model_logprobs(model, [group], 1000, backend="torch")
    unshared = model_logprobs(model, [[s] for s in group], 1000, backend="torch")
    torch.testing.assert_close(unshared[:, 0], alone, rtol=0, atol=1e-6)  # transformers rounds rotary in fp32


@pytest.mark.parametrize("family, argument", [("GptOss", "sinks"), ("Gemma2", "softcap")])
def test_attention_arguments_spin_varlen_cannot_compute_are_refused(family, argument):
    """GPT-OSS's attention sinks (s_aux) and Gemma 2's soft-capped attention scores change the result: spin_varlen
    refuses them rather than dropping them."""
    import transformers

    attention.register()
    extra = (dict(head_dim=16, num_local_experts=2, num_experts_per_tok=1) if family == "GptOss" else
             dict(head_dim=16, final_logit_softcapping=None, attn_logit_softcapping=1.0))
    config = getattr(transformers, f"{family}Config")(**FAMILY_SIZES, **extra)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention.NAME).eval()
    with torch.no_grad(), pytest.raises(ValueError, match=f"{argument}.*eager"):
        model(torch.randint(3, 128, (1, 9)), position_ids=torch.arange(9)[None], use_cache=False)


def test_bidirectional_attention_is_refused_not_run_causally(tmp_path):
    """A Gemma 3 with use_bidirectional_attention (EmbeddingGemma's setting) lets each token see the later ones;
    spin_varlen's kernels are causal, so its log-probs would be silently other than the model's own (0.17 apart
    here): refused as it loads. Causal (the default): accepted."""
    import transformers

    config = transformers.Gemma3TextConfig(**FAMILY_SIZES, head_dim=16, use_bidirectional_attention=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "bidirectional")
    with pytest.raises(ValueError, match=r"spin_varlen attention is causal, and this model's attention "
                                         r"\(Gemma3Attention\) is not .*set model.attention to sdpa"):
        spin_model.load_causal_lm(tmp_path / "bidirectional")
    config.use_bidirectional_attention = False
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "causal")
    spin_model.load_causal_lm(tmp_path / "causal")


def test_attention_dropout_in_training_is_refused_naming_the_way_out():
    """SFT keeps the model's dropout; spin_varlen has none: its error says which attention applies it."""
    import transformers

    attention.register()
    config = transformers.LlamaConfig(**FAMILY_SIZES, attention_dropout=0.1)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention.NAME).train()
    with pytest.raises(ValueError, match="attention_dropout to 0.1: set model.attention=sdpa"):
        model(torch.randint(3, 128, (1, 9)), position_ids=torch.arange(9)[None], use_cache=False)


def test_flash_attention_is_picked_only_for_what_its_kernels_take(monkeypatch):
    """Varlen FlashAttention on CUDA in fp16/bf16 up to head dim 256, and PyTorch's kernel (which does not pad) for
    multiples of 8 only; per-sequence SDPA for the rest (asked on the CPU too: only the device's type is read)."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # flash_attn absent: PyTorch's own varlen kernel
    torch_varlen = attention.varlen_kernel(cuda, torch.bfloat16, 128)
    assert torch_varlen is not attention.per_sequence_sdpa
    assert attention.varlen_kernel(cuda, torch.bfloat16, 256) is torch_varlen  # Gemma's head dim: the limit's own
    for device, dtype, head_dim in ((cpu, torch.bfloat16, 128), (cuda, torch.float32, 128),
                                    (cuda, torch.bfloat16, 512), (cuda, torch.float16, 100)):
        assert attention.varlen_kernel(device, dtype, head_dim) is attention.per_sequence_sdpa, (device, dtype,
                                                                                                head_dim)
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen))
    assert attention.varlen_kernel(cuda, torch.float16, 100) is attention.adapt_flash_attn(flash_attn_varlen)
    assert attention.varlen_kernel(cuda, torch.bfloat16, 512) is attention.per_sequence_sdpa


def test_shared_prompts_need_spin_varlen(saved_model):
    path, _ = saved_model
    model = spin_model.load_causal_lm(path, attention_impl="sdpa")
    assert not spin_model.can_share_prompts(model)
    (batch,) = pack_groups([[Sequence((1, 2), (3,)), Sequence((1, 2), (4,))]], 100, share_prompts=True)
    with pytest.raises(ValueError, match="shared prompts, which only spin_varlen attention follows; the model runs "
                                         "'sdpa'"):
        spin_model.micro_batch_hidden_states(model, batch)


def test_liger_kernels_need_cuda(saved_model):
    path, _ = saved_model
    with pytest.raises(ValueError, match="liger_kernels needs CUDA"):
        spin_model.load_causal_lm(path, liger_kernels=True)


def test_head_like_casts_a_biased_head_to_the_hidden_states_dtype():
    """Under autocast the body's hidden states are bf16 and the head's parameters fp32: head_like casts the weight
    and the bias too (a biased LM head, Phi's), so the log-probs are the bf16 head's, bias included (float64 truth)."""
    hidden = torch.randn(20, 16, dtype=torch.float64).to(torch.bfloat16)
    weight, bias = torch.randn(50, 16) / 4, torch.randn(50)
    targets = torch.randint(0, 50, (20,))
    head_weight, head_bias = spin_model.head_like(hidden, weight, bias)
    assert head_weight.dtype == torch.bfloat16 and head_bias is not None and head_bias.dtype == torch.bfloat16
    out = spin_kernels.linear_logprobs(hidden, head_weight, targets, bias=head_bias, backend="torch")
    truth = truth_token_logprobs(hidden.double(), weight.to(torch.bfloat16).double(), targets,
                                 bias.to(torch.bfloat16).double())
    assert_close(out, truth, torch.float32, "log-probs")


def test_dropout_goes_from_layers_that_skip_layers_in_training():
    """OPT's layerdrop (a whole layer skipped at random in training, a rate held on the decoder, not an nn.Dropout):
    after disable_dropout the model in training mode computes its eval-mode outputs."""
    import transformers

    torch.manual_seed(0)
    config = transformers.OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    ffn_dim=64, word_embed_proj_dim=32, layerdrop=0.5)
    model = AutoModelForCausalLM.from_config(config)
    ids = torch.randint(3, 128, (1, 12))
    spin_model.disable_dropout(model)
    with torch.no_grad():
        expected = model.eval()(ids).logits
        for _ in range(4):  # each layer skipped with probability 0.5: one draw could keep them both
            torch.testing.assert_close(model.train()(ids).logits, expected, rtol=0, atol=0)


# Families beyond saved_model's Llama, Mistral and Qwen2, built small from their configs (the README lists them).
# Sliding windows of 5, shorter than the sequences: a window ignored, or one read on the wrong layers, shows.
# HF's MoE experts run grouped_mm by default, which takes no float64 on the CPU: eager experts, the same sums.
MOE = dict(num_experts_per_tok=2, experts_implementation="eager")
FAMILIES = {
    "qwen3": ("Qwen3", dict(head_dim=16)),  # q/k norms
    "gemma": ("Gemma", dict(head_dim=16)),  # scaled embeddings, (1 + w) norms, tied head
    "gemma3_text": ("Gemma3Text", dict(head_dim=16, sliding_window=5,  # a window on its sliding layers alone
                                       layer_types=["sliding_attention", "full_attention"])),
    "phi3": ("Phi3", dict(sliding_window=5, pad_token_id=0)),
    "olmo2": ("Olmo2", {}),
    "mixtral": ("Mixtral", dict(num_local_experts=4, sliding_window=5, **MOE)),
    "qwen2_moe": ("Qwen2Moe", dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                   use_sliding_window=True, sliding_window=5, max_window_layers=1, **MOE)),
    "starcoder2": ("Starcoder2", dict(sliding_window=5)),
    "phi": ("Phi", {}),  # a biased LM head, partial rotary
    "gpt_neox": ("GPTNeoX", {}),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_families_packed_logprobs_and_spin_gradient_equal_the_models_own(family):
    """Scoring's summed response log-probs (packed rows whose pairs share their prompts, spin_varlen) equal the model's
    own on each sequence alone (plain SDPA), 1e-10 in float64, and a SPIN loss's gradient from PackedLoss, as
    training takes it, equals the naive loss's on those: to 1e-6 of each parameter's largest, as HF's norms run in
    fp32 and round each path's gradient there (a wrong layout is off by far more)."""
    import transformers

    from spin_fast.scoring import model_logprobs
    from spin_fast.training import PackedLoss

    attention.register()
    torch.manual_seed(0)
    name, extra = FAMILIES[family]
    config = getattr(transformers, f"{name}Config")(**FAMILY_SIZES, **extra)
    reference = AutoModelForCausalLM.from_config(config, dtype=torch.float64, attn_implementation="sdpa")
    model = copy.deepcopy(reference)
    model.set_attn_implementation(attention.NAME)
    spin_model.check_logits_are_the_heads(model, family)  # what loading checks: the head alone makes the logits
    prompt = (5, 6, 7, 8, 9, 10, 11)
    groups = [[Sequence(prompt, (9, 10, 11, 12, 13, 14, 2)), Sequence(prompt, (12, 2))],
              [Sequence((20, 21), (22, 23, 24, 25, 26, 27, 28, 2)), Sequence((20, 21), (30, 2))]]
    alone = torch.tensor([[response_logprob_alone(reference, s) for s in group] for group in groups],
                         dtype=torch.float64)
    got = model_logprobs(model, groups, 1000, backend="torch")
    torch.testing.assert_close(got, alone, rtol=1e-10, atol=1e-10)

    opponent = alone + torch.tensor([0.5, -0.5], dtype=torch.float64)  # margins away from 0
    (batch,) = pack_groups(groups, 1000, share_prompts=True)
    order = batch.group_indices.tolist()
    loss, _ = PackedLoss(model, TrainConfig(mode="spin", beta=0.1, backend="torch"))(
        batch, torch.cat([opponent[order, 0], opponent[order, 1]]))
    loss.backward()
    policy = torch.stack([torch.stack([summed_logprob(reference, s) for s in group]) for group in groups])
    margins = (policy - opponent) @ torch.tensor([1.0, -1.0], dtype=torch.float64)
    (-torch.nn.functional.logsigmoid(0.1 * margins).mean()).backward()
    torch.testing.assert_close(loss, -torch.nn.functional.logsigmoid(0.1 * margins.detach()).mean(), rtol=1e-10,
                               atol=1e-10)
    for (name, ours), truth in zip(model.named_parameters(), reference.parameters()):
        if truth.grad is None:  # an expert no token was routed to
            assert ours.grad is None or not ours.grad.any(), name
            continue
        torch.testing.assert_close(ours.grad, truth.grad, rtol=0, atol=1e-6 * float(truth.grad.abs().max()) + 1e-15,
                                   msg=name)


def summed_logprob(model, sequence: Sequence) -> torch.Tensor:
    """A sequence's summed response log-prob from the model run on it alone, with its gradient."""
    ids = torch.tensor(sequence.prompt_ids + sequence.response_ids)[None]
    logps = model(ids).logits[0].double().log_softmax(-1)
    n = len(sequence.prompt_ids)
    return logps[n - 1:-1].gather(1, ids[0, n:, None]).sum()


def test_a_row_whose_longest_sequence_switches_the_rotary_frequencies_is_refused():
    """Phi-3's longrope (Phi-3-mini-128k, Phi-3.5: past 4096 tokens) takes its long factors for a whole batch once
    its largest position passes original_max_position_embeddings: a short sequence packed beside a longer one would
    get other log-probs than alone, silently (1e-5 apart here), so such a row is refused, naming data.max_length;
    rows within the limit are the model's own."""
    import transformers

    from spin_fast.scoring import model_logprobs

    attention.register()
    torch.manual_seed(0)
    rope = dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0] * 8, long_factor=[4.0] * 8)
    config = transformers.Phi3Config(**FAMILY_SIZES, pad_token_id=0, max_position_embeddings=64,
                                     original_max_position_embeddings=8, rope_parameters=rope)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float64, attn_implementation="sdpa").eval()
    short, long = Sequence((5, 6, 7), (8, 9, 2)), Sequence(tuple(range(10, 20)), (30, 31, 2))  # 6 and 13 tokens
    alone = torch.tensor([[response_logprob_alone(model, s)] for s in (short, long)], dtype=torch.float64)
    model.set_attn_implementation(attention.NAME)
    with pytest.raises(ValueError, match=r"^Phi3ForCausalLM: its longrope rotary embeddings .* past 8 tokens, .* "
                                         r"a sequence of 13 tokens beside others, .* data.max_length to at most 8$"):
        model_logprobs(model, [[short], [long]], 1000, backend="torch")
    apart = torch.cat([model_logprobs(model, [[s]], 1000, backend="torch") for s in (short, long)])
    torch.testing.assert_close(apart, alone, rtol=1e-10, atol=1e-10)
