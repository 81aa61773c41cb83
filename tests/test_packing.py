"""spin_fast.packing: layout invariants on fresh random groups, the kernel's sequence-id contract, errors."""

from __future__ import annotations

import pytest
import torch

import spin_kernels
from spin_fast.packing import MicroBatch, Sequence, pack_groups, packing_efficiency

VOCAB = 50


def _ids(low: int, high: int) -> tuple[int, ...]:
    """Random token ids, length drawn in [low, high]."""
    length = int(torch.randint(low, high + 1, ()))
    return tuple(torch.randint(0, VOCAB, (length,)).tolist())


def random_groups(n_groups: int, group_size: int, max_prompt: int = 9, max_response: int = 9) -> list[list[Sequence]]:
    """Groups sharing a prompt within each group, as SPIN pairs do."""
    groups = []
    for _ in range(n_groups):
        prompt = _ids(1, max_prompt)
        groups.append([Sequence(prompt, _ids(1, max_response)) for _ in range(group_size)])
    return groups


def group_length(group: list[Sequence]) -> int:
    return sum(sequence.length for sequence in group)


def check_invariants(groups: list[list[Sequence]], batches: list[MicroBatch], budget: int) -> None:
    """Every property packing promises, checked against the groups themselves."""
    k = len(groups[0])
    seen = []
    for mb in batches:
        G = mb.group_indices.numel()
        seen += mb.group_indices.tolist()
        assert mb.group_size == k
        for name in ("input_ids", "position_ids", "targets", "sequence_ids", "group_indices"):
            assert getattr(mb, name).dtype == torch.int64, name
        assert mb.cu_seqlens.dtype == torch.int32
        assert mb.input_ids.shape == mb.position_ids.shape == mb.targets.shape == mb.sequence_ids.shape
        assert 0 < mb.n_tokens <= budget, "budget respected"
        assert mb.cu_seqlens.numel() == k * G + 1
        assert mb.cu_seqlens[0] == 0 and mb.cu_seqlens[-1] == mb.n_tokens
        members = [groups[g] for g in mb.group_indices.tolist()]
        # No padding: the row holds exactly the tokens of its groups' sequences.
        assert sum(group_length(group) for group in members) == mb.n_tokens
        assert mb.max_seqlen == max(s.length for group in members for s in group)
        # Sequences laid out in id order: id j * G + g is sequence j of the g-th group here.
        for j in range(k):
            for g, group in enumerate(members):
                sid = j * G + g
                sequence = group[j]
                start, end = int(mb.cu_seqlens[sid]), int(mb.cu_seqlens[sid + 1])
                assert end - start == sequence.length
                tokens = list(sequence.prompt_ids + sequence.response_ids)
                assert mb.input_ids[start:end].tolist() == tokens
                assert mb.position_ids[start:end].tolist() == list(range(sequence.length))
                targets = mb.targets[start:end]
                ids = mb.sequence_ids[start:end]
                loss = targets != -100
                assert int(loss.sum()) == len(sequence.response_ids)
                assert not bool(loss[-1]), "the last position of a sequence predicts nothing"
                # Each loss target is the next token, and only response tokens are targets.
                positions = loss.nonzero().squeeze(1)
                assert targets[positions].tolist() == [tokens[p + 1] for p in positions.tolist()]
                assert all(p + 1 >= len(sequence.prompt_ids) for p in positions.tolist())
                assert (ids[loss] == sid).all() and (ids[~loss] == -1).all()
    # Every group exactly once (so its k sequences all sit in one micro-batch).
    assert sorted(seen) == list(range(len(groups)))


@pytest.mark.parametrize("group_size", [1, 2, 3])
def test_random_groups_invariants(group_size):
    for _ in range(5):
        groups = random_groups(int(torch.randint(1, 40, ())), group_size)
        longest = max(group_length(group) for group in groups)
        budget = longest + int(torch.randint(0, 3 * longest, ()))
        batches = pack_groups(groups, budget)
        check_invariants(groups, batches, budget)
        # Greedy: a micro-batch was closed only because the next group did not fit.
        for mb, nxt in zip(batches, batches[1:]):
            assert mb.n_tokens + group_length(groups[int(nxt.group_indices[0])]) > budget


def test_positions_restart_at_each_boundary():
    groups = random_groups(12, 2)
    for mb in pack_groups(groups, 4 * max(group_length(g) for g in groups)):
        starts = mb.cu_seqlens[:-1].long()
        assert (mb.position_ids[starts] == 0).all()
        # Everywhere else the position is the previous one plus 1.
        inside = torch.ones(mb.n_tokens, dtype=torch.bool)
        inside[starts] = False
        assert (mb.position_ids[1:][inside[1:]] == mb.position_ids[:-1][inside[1:]] + 1).all()


def test_pair_sequence_ids_match_fused_spin_loss():
    """policy_logps[g] / [G + g] = log p(real / generated response of group g), computed by hand."""
    hidden_size = 8
    groups = random_groups(3, 2)
    (mb,) = pack_groups(groups, 10_000)
    G = 3
    hidden = torch.randn(mb.n_tokens, hidden_size, dtype=torch.float64)
    weight = torch.randn(VOCAB, hidden_size, dtype=torch.float64)
    opponent_logps = -torch.rand(2 * G, dtype=torch.float64) * 10
    out = spin_kernels.fused_linear_spin_loss(hidden, weight, mb.targets, mb.sequence_ids, opponent_logps)
    logps = torch.log_softmax(hidden @ weight.T, dim=-1)
    offset = 0
    expected = {}
    # Walk the row in the documented layout without using targets or sequence_ids.
    for j in range(2):
        for g in range(G):
            sequence = groups[g][j]
            n_prompt = len(sequence.prompt_ids)
            expected[j * G + g] = sum(
                logps[offset + n_prompt - 1 + i, token] for i, token in enumerate(sequence.response_ids)
            )
            offset += sequence.length
    for g in range(G):
        torch.testing.assert_close(out.policy_logps[g], expected[g], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out.policy_logps[G + g], expected[G + g], rtol=1e-10, atol=1e-10)


def test_sft_groups_of_one():
    groups = random_groups(20, 1)
    budget = 2 * max(group_length(g) for g in groups)
    batches = pack_groups(groups, budget)
    check_invariants(groups, batches, budget)
    for mb in batches:
        loss = mb.targets != -100
        assert mb.sequence_ids[loss].unique().tolist() == list(range(mb.group_indices.numel()))


def test_empty_input():
    assert pack_groups([], 16) == []
    assert packing_efficiency([], 16) == 0.0


def test_group_too_long():
    groups = [[Sequence((1, 2), (3,))], [Sequence((1, 2, 3), (4, 5, 6))]]
    with pytest.raises(ValueError, match=r"group 1 has 6 tokens.*token_budget=5"):
        pack_groups(groups, 5)


def test_mixed_group_sizes():
    pair = [Sequence((1,), (2,)), Sequence((1,), (3,))]
    with pytest.raises(ValueError, match="group 2 has 1 sequences, expected 2"):
        pack_groups([pair, pair, pair[:1]], 100)
    with pytest.raises(ValueError, match="group 1 is empty"):
        pack_groups([pair, []], 100)


@pytest.mark.parametrize("budget", [0, -3])
def test_bad_budget(budget):
    with pytest.raises(ValueError, match="token_budget must be >= 1"):
        pack_groups([[Sequence((1,), (2,))]], budget)


def test_bad_order_and_sequences():
    groups = [[Sequence((1,), (2,))]] * 3
    for order in ([0, 1], [0, 1, 1], [0, 1, 3]):
        with pytest.raises(ValueError, match="permutation"):
            pack_groups(groups, 10, order=order)
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        Sequence((), (1,))
    with pytest.raises(ValueError, match="response_ids is empty"):
        Sequence((1,), ())
    with pytest.raises(ValueError, match="negative"):
        Sequence((1,), (2, -1))


def test_sequence_normalises_to_tuples():
    sequence = Sequence([1, 2], [3])
    assert sequence.prompt_ids == (1, 2) and sequence.response_ids == (3,) and sequence.length == 3
    hash(sequence)


def test_packing_efficiency_hand_made():
    # Budget 10; group lengths 6, 6, 4 -> [6], [6, 4]: 16 tokens in 2 rows of 10.
    groups = [[Sequence((1,) * 3, (2,) * 3)], [Sequence((1,) * 2, (2,) * 4)], [Sequence((1,), (2,) * 3)]]
    batches = pack_groups(groups, 10)
    assert [mb.group_indices.tolist() for mb in batches] == [[0], [1, 2]]
    assert packing_efficiency(batches, 10) == pytest.approx(0.8)


def test_order_changes_packing_deterministically():
    # Lengths 6, 6, 4, 4 with budget 10: in order -> [6], [6, 4], [4]; interleaved -> [6, 4], [6, 4].
    groups = [[Sequence((1,) * 2, (2,) * (n - 2))] for n in (6, 6, 4, 4)]
    assert [mb.group_indices.tolist() for mb in pack_groups(groups, 10)] == [[0], [1, 2], [3]]
    interleaved = pack_groups(groups, 10, order=[0, 2, 1, 3])
    assert [mb.group_indices.tolist() for mb in interleaved] == [[0, 2], [1, 3]]
    # Random groups, shuffled order: same order -> identical batches, and the walk follows the order.
    groups = random_groups(30, 2)
    budget = 3 * max(group_length(g) for g in groups)
    order = torch.randperm(len(groups)).tolist()  # the trainer's epoch_order is such a permutation
    first, second = pack_groups(groups, budget, order=order), pack_groups(groups, budget, order=order)
    check_invariants(groups, first, budget)
    assert torch.cat([mb.group_indices for mb in first]).tolist() == order
    assert len(first) == len(second)
    for a, b in zip(first, second):
        for name in ("input_ids", "position_ids", "targets", "sequence_ids", "cu_seqlens", "group_indices"):
            assert torch.equal(getattr(a, name), getattr(b, name))


def test_microbatch_to():
    (mb,) = pack_groups(random_groups(3, 2), 10_000)
    moved = mb.to("meta")
    assert moved is not mb
    for name in ("input_ids", "position_ids", "targets", "sequence_ids", "cu_seqlens", "group_indices"):
        tensor = getattr(moved, name)
        assert tensor.device.type == "meta" and tensor.dtype == getattr(mb, name).dtype
        assert getattr(mb, name).device.type == "cpu", "the original stays where it was"
    assert moved.max_seqlen == mb.max_seqlen and moved.group_size == mb.group_size
    back = mb.to(torch.device("cpu"))
    assert torch.equal(back.input_ids, mb.input_ids) and back.n_tokens == mb.n_tokens
